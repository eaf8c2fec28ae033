"""Child processes seen from the load side: server processes and redis-server; HTTP to them."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .common import (
    ENTRY_SCRIPT,
    HOST,
    HTTP_TIMEOUT,
    REDIS_START_TIMEOUT,
    REDIS_VARIANT,
    SERVER_CPU,
    SERVER_START_TIMEOUT,
    SERVER_STOP_TIMEOUT,
    die_with_parent,
)


async def http_request(
    port: int, method: str, path: str, body: dict[str, Any] | None, timeout: float
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request with ``Connection: close``; the JSON answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + data)
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload) if payload else {}


class ProcStats:
    """CPU time and peak RSS of a child process, read from ``/proc``."""

    proc: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """CPU time of the process's main thread so far (ns resolution where available)."""
        try:
            with open(f"/proc/{self.proc.pid}/schedstat") as schedstat:
                return int(schedstat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):  # no schedstat: clock ticks of the process
            with open(f"/proc/{self.proc.pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status(self, key: str) -> str:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
        return "?"

    def peak_rss_mb(self) -> float:
        return int(self.status("VmHWM").split()[0]) / 1024  # kB

    def rss_kb(self) -> int:
        """The resident set now (``VmRSS``), in kB."""
        return int(self.status("VmRSS").split()[0])


class ServerProcess(ProcStats):
    """A server process on an ephemeral port of 127.0.0.1 (the socket is bound here)."""

    live: ClassVar[set[ServerProcess]] = set()  # for the cleanup on exit

    def __init__(
        self,
        server: str,
        variant: str,
        profile_path: Path | None,
        redis: tuple[str, str] | None = None,
        uvicorn_ws: str = "auto",
        *,
        cluster: bool = False,
        cpu: int = SERVER_CPU,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port: int = sock.getsockname()[1]
        fd = sock.detach()
        self.log = tempfile.TemporaryFile(mode="w+b", prefix="fanout-server-")
        command = [sys.executable, str(ENTRY_SCRIPT), "--serve", server, variant, str(fd)]
        command += ["--uvicorn-ws", uvicorn_ws]
        if profile_path is not None:
            command += ["--profile-to", str(profile_path)]
        if redis is not None:
            command += ["--redis-url", redis[0], "--redis-prefix", redis[1]]
            if cluster:
                command += ["--redis-cluster"]
        if cpu != SERVER_CPU:
            command += ["--pin-cpu", str(cpu)]
        try:
            self.proc = subprocess.Popen(
                command, pass_fds=(fd,), stdout=self.log, stderr=subprocess.STDOUT
            )
        finally:
            os.close(fd)
        ServerProcess.live.add(self)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                status, _ = await http_request(self.port, "GET", "/ready", None, timeout=1.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT} s")
            await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def log_problems(self) -> str:
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return self.log_tail() if ("Traceback" in text or "Error" in text) else ""

    async def stop(self) -> None:
        """Graceful shutdown (``POST /shutdown``), then SIGTERM, then SIGKILL; all bounded."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                await http_request(self.port, "POST", "/shutdown", {}, timeout=HTTP_TIMEOUT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, SERVER_STOP_TIMEOUT)
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3.0)
        ServerProcess.live.discard(self)

    def close(self) -> None:
        self.kill()
        self.log.close()


def redis_server_binary() -> str:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"{REDIS_VARIANT} needs redis-server (apt-get install redis-server)")
    return binary


def redis_server_version() -> str:
    try:
        out = subprocess.run(
            [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    found = re.search(r"v=(\S+)", out)
    return found[1] if found else "?"


def _redis_child_setup() -> None:  # pragma: no cover - runs in the forked child
    """Before exec: pin to the server CPU and die with this process."""
    with contextlib.suppress(OSError):
        if (os.cpu_count() or 1) > SERVER_CPU:
            os.sched_setaffinity(0, {SERVER_CPU})
    die_with_parent()


class RedisProcess(ProcStats):
    """A ``redis-server`` on a free port of 127.0.0.1, without persistence, on the server CPU."""

    live: ClassVar[set[RedisProcess]] = set()  # for the cleanup on exit

    def __init__(self) -> None:
        with socket.socket() as sock:  # a free port (freed again: redis-server binds it)
            sock.bind((HOST, 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"redis://{HOST}:{self.port}/0"
        self.dir = tempfile.TemporaryDirectory(prefix="fanout-redis-")
        self.log = tempfile.TemporaryFile(mode="w+b", prefix="fanout-redis-")
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir.name,
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_redis_child_setup
        )
        RedisProcess.live.add(self)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, self.port), 1.0
                )
                try:
                    writer.write(b"PING\r\n")
                    if (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG"):
                        return
                finally:
                    writer.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not ready after {REDIS_START_TIMEOUT} s")
            await asyncio.sleep(0.02)

    cluster = False

    def close(self) -> None:
        """SIGTERM (it saves nothing, so it exits at once), then SIGKILL; bounded."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3.0)
        RedisProcess.live.discard(self)
        self.log.close()
        self.dir.cleanup()


REDIS_KINDS = ("single", "cluster")


class RedisService(Protocol):
    """What a run needs of its Redis, one server or a cluster: where the nodes connect, and
    the CPU time of its processes (a cluster's: summed over them)."""

    url: str
    cluster: bool  # the nodes pass cluster=True to RedisBackend

    async def wait_ready(self) -> None: ...
    def cpu_seconds(self) -> float: ...
    def close(self) -> None: ...


def redis_description(kind: str) -> str:
    """For the report header."""
    if kind == "single":
        return f"one redis-server {redis_server_version()}"
    return f"a Redis Cluster (3 masters, redis-server {redis_server_version()})"


def cluster_unavailable() -> str | None:
    """Why ``--redis cluster`` cannot run here, or None once it can.

    It needs two things that are being added elsewhere: ``RedisBackend(url, cluster=True)``
    and a harness that starts a cluster of three masters (and three replicas) on loopback
    ports. When both exist, ``start_redis`` wraps the harness in a ``RedisService`` (CPU: the
    sum over its processes, pinned to the server CPU like the single redis-server) and the
    rest of the benchmark needs no change: the nodes get ``--redis-cluster``.
    """
    try:
        from asgi_events.backends.redis import RedisBackend
    except ImportError as exc:
        return f"the Redis backend does not import ({exc})"
    if "cluster" not in inspect.signature(RedisBackend).parameters:
        return "RedisBackend has no cluster=True yet (the Redis Cluster backend is not merged)"
    return "no Redis Cluster harness in fanbench yet (tests/support/redis_cluster.py is coming)"


def start_redis(kind: str) -> RedisService:
    """A fresh Redis for one run: ``single`` is one redis-server, ``cluster`` three masters."""
    if kind == "single":
        return RedisProcess()
    raise SystemExit(f"--redis cluster is not available yet: {cluster_unavailable()}")


@contextlib.contextmanager
def cleanup_on_exit() -> Iterator[None]:
    """Kill any server or redis-server process left behind, also on SIGTERM/SIGINT."""

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        for proc in list(ServerProcess.live):
            proc.close()
        for redis in list(RedisProcess.live):
            redis.close()
        signal.signal(signal.SIGTERM, previous)
