"""A real redis-server on a free loopback port, for the tests (never skipped)."""

from __future__ import annotations

import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes] | None = None
    config: str | None = None
    """A config file, read before the options (a sentinel's: it rewrites it)."""
    args: tuple[str, ...] = ()
    """More options, after the usual ones (e.g. ``--replicaof``, ``--sentinel``)."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) it, without persistence: a restart loses every key."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: apt-get install redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                *([self.config] if self.config else []),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tempfile.gettempdir(),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, nothing is answered, no error, no reset."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT), with everything sent to it meanwhile."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """End it at once (SIGKILL): no goodbye to clients or replicas, nothing flushed."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused process would not terminate
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_redis() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Partition:
    """A TCP relay to a redis-server that can be cut silently, like a network partition.

    While cut it neither relays nor accepts: what either side sends waits in the kernel's
    buffers, nothing is answered, and nothing is reset. Healing it relays everything that
    waited, as TCP does when a partition heals before the connection times out.
    """

    def __init__(self, upstream: RedisServer) -> None:
        self._upstream = upstream.port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._cut = threading.Event()
        self._idle = threading.Event()  # set by the relay while it is cut
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        """Cut it; once this returns, nothing more goes through."""
        self._cut.set()
        assert self._idle.wait(10), "the relay did not stop"

    def heal(self) -> None:
        self._cut.clear()
        self._idle.clear()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(10)

    def _relay(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}
        try:
            while not self._closed.is_set():
                if self._cut.is_set():
                    self._idle.set()
                    time.sleep(0.01)
                    continue
                for key, _ in selector.select(0.05):
                    if self._cut.is_set():
                        break
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        with suppress(BlockingIOError):
                            client, _ = sock.accept()
                            server = socket.create_connection(("127.0.0.1", self._upstream))
                            for end in (client, server):
                                end.setblocking(True)
                                selector.register(end, selectors.EVENT_READ)
                            peers[client], peers[server] = server, client
                        continue
                    if sock not in peers:
                        continue
                    try:
                        data = sock.recv(65536)
                        if data:
                            peers[sock].sendall(data)
                            continue
                    except OSError:
                        pass
                    peer = peers.pop(sock)  # one end closed: close the pair
                    peers.pop(peer, None)
                    for end in (sock, peer):
                        selector.unregister(end)
                        end.close()
        finally:
            for end in peers:
                end.close()
            self._listener.close()
            selector.close()


@contextmanager
def partition(server: RedisServer) -> Iterator[Partition]:
    relay = Partition(server)
    try:
        yield relay
    finally:
        relay.close()
