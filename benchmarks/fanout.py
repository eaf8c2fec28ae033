"""Burst fan-out benchmark: asgi-events (EventsMiddleware + EventHub) against a naive raw loop.

One invocation measures every variant on one server (see ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/fanout.py --server hypercorn-asyncio
    .venv/bin/python benchmarks/fanout.py --server hypercorn-trio --quick

The server runs in its own process pinned to CPU 0; this process holds the N WebSocket clients
(plain asyncio protocols with a minimal frame parser: a server's frames are unmasked, so the
client side needs no more) and is pinned to CPU 1. Once every socket is connected it asks the
server (``POST /publish``) to publish M events in one burst, and measures until every client
has all M. A fresh server process serves each run; runs are interleaved (raw, asgi-events, ...).

The ``asgi-events-batch`` variant is the ``asgi-events`` server, but its clients offer the
``asgi-events.v1.batch`` subprotocol: every frame is a JSON array of messages. The
``asgi-events-redis`` variant runs two server processes (nodes) on one ``redis-server``, all
three on CPU 0; half the clients connect to each node, and one node publishes the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

HOST = "127.0.0.1"
SERVERS = ("hypercorn-asyncio", "hypercorn-trio")
REDIS_VARIANT = "asgi-events-redis"  # two nodes on one redis-server
BATCH_VARIANT = "asgi-events-batch"  # the asgi-events server; clients offer the batch subprotocol
BATCH_SUBPROTOCOL = b"asgi-events.v1.batch"
BATCH_GOAL = 2.0  # issue 5: batched frames >= 2x the raw app under the same burst
REDIS_GOAL = 0.7  # two nodes on Redis >= 0.7x one node in memory
# The order runs are interleaved in.
VARIANTS = ("raw", "asgi-events", BATCH_VARIANT, REDIS_VARIANT)
# --quick runs these unless --variants says otherwise.
QUICK_VARIANTS = ("raw", "asgi-events", BATCH_VARIANT)
REDIS_NODES = 2
EVENT_TYPE = "bench.tick"
WS_PATH = "/ws"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# An event's payload is {"seq": int, "t": int, "pad": str} in every variant; a regex on the frame
# reads the two numbers far more cheaply than json.loads (the load side must not be the limit).
EVENT_FIELDS = re.compile(rb'"payload":\{"seq":(\d+),"t":(\d+),')
# A batch frame is a JSON array of messages. One pass finds every message (each starts with
# {"type":"); for each, (seq, t, b"") for one of our events, (b"", b"", READY_TYPE) for the ready
# message a batch client gets first (ignored), (b"", b"", b"") for anything else.
READY_TYPE = b"asgi_events.ready"
BATCH_MESSAGE = re.compile(
    rb'\{"type":"(?:'
    + re.escape(EVENT_TYPE.encode())
    + rb'","payload":\{"seq":(\d+),"t":(\d+),|('
    + re.escape(READY_TYPE)
    + rb')")?'
)
SERVER_CPU, LOAD_CPU = 0, 1
FULL = (1000, 200, 100, 3)  # default sockets, events, payload, runs
QUICK = (20, 10, 100, 1)
LOAD_BOUND = 0.90  # a load process busier than this over the window may be the bottleneck
NOISY = 0.10  # other processes + steal above this share of a core: the run was disturbed
QUIET = 0.10  # before a run, wait (bounded) until the machine is busy below this, in cores
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SRC_DIR = BENCH_DIR.parent / "src" / "asgi_events"

# Bounds on every wait (seconds); --timeout bounds the delivery wait itself.
SERVER_START_TIMEOUT = 30.0
CONNECT_TIMEOUT = 60.0  # all N sockets
HTTP_TIMEOUT = 10.0
SERVER_READY_WAIT = 10.0  # the server waits this long for all N sockets to be registered
SERVER_STOP_TIMEOUT = 15.0
REDIS_START_TIMEOUT = 10.0
CHILD_MAX_LIFETIME = 900.0  # a server process ends itself after this, whatever happens

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# -- process setup ----------------------------------------------------------------------------


def pin_to_cpu(cpu: int) -> str:
    """Pin this process to ``cpu`` if the machine has it; say what was done."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    if (os.cpu_count() or 1) <= cpu:
        return f"not pinned (no CPU {cpu})"
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        return f"not pinned ({exc})"
    return f"CPU {cpu}"


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; fail early if ``needed`` does not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {target} < {needed} file descriptors needed")
    return target


def die_with_parent() -> None:
    """Linux: have the kernel kill this process if the benchmark process dies."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def start_watchdog(limit: float) -> None:
    """End this process after ``limit`` seconds whatever it is doing."""

    def expire() -> None:
        time.sleep(limit)
        print(f"server: exceeded its {limit:.0f} s lifetime, exiting", file=sys.stderr)
        os._exit(3)

    threading.Thread(target=expire, daemon=True).start()


# -- the server process -----------------------------------------------------------------------


def utc_now_iso() -> str:
    """The same timestamp format asgi-events adds to each event."""
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class Control:
    """The HTTP control routes every variant shares: ready, publish, measure, shutdown.

    From the start of a burst (``POST /publish``, or ``POST /measure/start`` on a node that does
    not publish) to ``POST /measure/stop`` it times the garbage collector (and, with a profile
    path, runs cProfile).
    """

    def __init__(
        self,
        count: Callable[[], int],
        publish: Callable[[int, str], Awaitable[None]],
        profile_path: str | None,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        import anyio

        self._anyio = anyio
        self.count = count  # sockets the server has registered for delivery
        self.publish = publish  # (events, pad) -> the whole burst
        self.ready = ready  # e.g. subscribed to Redis
        self.shutdown = anyio.Event()
        self._profile_path = profile_path
        self._profiler: cProfile.Profile | None = None
        self._gc_seconds = 0.0
        self._gc_runs = [0, 0, 0]  # collections per generation
        self._gc_started: float | None = None
        self._measuring = False
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if not self._measuring:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_seconds += time.perf_counter() - self._gc_started
            self._gc_runs[info["generation"]] += 1
            self._gc_started = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # http.disconnect
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        route = (scope["method"], scope["path"])
        if route == ("GET", "/ready"):
            ok = self.ready()
            await respond(send, 200 if ok else 503, {"ok": ok})
        elif route == ("POST", "/measure/start"):
            status, answer = await self._arm(int(json.loads(body)["sockets"]))
            await respond(send, status, answer)
        elif route == ("POST", "/publish"):
            status, answer = await self._publish(json.loads(body))
            await respond(send, status, answer)
        elif route == ("POST", "/measure/stop"):
            self._stop_measuring()
            await respond(send, 200, {"gc_s": self._gc_seconds, "gc_runs": self._gc_runs})
        elif route == ("POST", "/shutdown"):
            self._stop_measuring()
            await respond(send, 200, {"ok": True})
            self.shutdown.set()
        else:
            await respond(send, 404, {"error": "not found"})

    async def _arm(self, sockets: int) -> tuple[int, dict[str, Any]]:
        """Wait until ``sockets`` are registered, collect garbage, start measuring."""
        # The client saw its 101 before the server registered the socket: wait for all of them.
        with self._anyio.move_on_after(SERVER_READY_WAIT):
            while self.count() < sockets:
                await self._anyio.sleep(0.005)
        connected = self.count()
        if connected < sockets:
            return 503, {"error": f"only {connected} of {sockets} sockets registered"}
        gc.collect()
        self._measuring = True
        if self._profile_path is not None and self._profiler is None:
            self._profiler = cProfile.Profile()
            self._profiler.enable()
        return 200, {"connected": connected}

    async def _publish(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        events, pad = int(request["events"]), "x" * int(request["payload"])
        status, answer = await self._arm(int(request["sockets"]))
        if status != 200:
            return status, answer
        start_ns = time.time_ns()
        started = time.perf_counter()
        await self.publish(events, pad)
        call_s = time.perf_counter() - started
        return 200, {"start_ns": start_ns, "call_s": call_s, **answer}

    def _stop_measuring(self) -> None:
        self._measuring = False
        profiler, self._profiler = self._profiler, None
        if profiler is not None and self._profile_path is not None:
            profiler.disable()
            profiler.dump_stats(self._profile_path)


async def respond(send: Send, status: int, answer: dict[str, Any]) -> None:
    body = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def run_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


def build_asgi_events_app(
    profile_path: str | None, redis: tuple[str, str] | None = None
) -> tuple[ASGIApp, Control]:
    """EventsMiddleware + EventHub; the burst is M ``broadcast_to_all`` calls.

    With ``redis`` (url, key prefix) the hub is one node on ``RedisBackend``: it is ready once
    subscribed, and a burst published here reaches the other nodes' sockets through Redis.
    """
    from asgi_events import EventHub, EventsMiddleware

    async def verify_token(token: str) -> str | None:
        return token or None

    ready: Callable[[], bool] = lambda: True  # noqa: E731
    if redis is None:
        hub = EventHub(verify_token)
    else:
        from asgi_events.backends.redis import RedisBackend

        url, prefix = redis
        backend = RedisBackend(url, prefix=prefix)
        hub = EventHub(verify_token, backend=backend)
        ready = lambda: backend.healthy  # noqa: E731

    async def publish(events: int, pad: str) -> None:
        for seq in range(events):
            payload = {"seq": seq, "t": time.time_ns(), "pad": pad}
            await hub.broadcast_to_all({"type": EVENT_TYPE, "payload": payload})

    control = Control(lambda: int(hub.stats()["total_connections"]), publish, profile_path, ready)

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
        elif scope["type"] == "http":
            await control.handle(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1000})

    return EventsMiddleware(inner, hub=hub, path=WS_PATH), control


def build_raw_app(profile_path: str | None) -> tuple[ASGIApp, Control]:
    """The naive loop: encode each event once, then await ``send`` for each socket in turn."""
    sockets: set[Send] = set()
    failed_sends = 0

    async def publish(events: int, pad: str) -> None:
        nonlocal failed_sends
        for seq in range(events):
            payload = {"seq": seq, "t": time.time_ns(), "pad": pad}
            event = {"type": EVENT_TYPE, "payload": payload, "timestamp": utc_now_iso()}
            message = {"type": "websocket.send", "text": _encoder.encode(event)}
            for send in list(sockets):
                try:
                    await send(message)
                except Exception:
                    failed_sends += 1
                    sockets.discard(send)

    control = Control(lambda: len(sockets), publish, profile_path)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
        elif scope["type"] == "http":
            await control.handle(scope, receive, send)
        elif scope["type"] == "websocket" and scope["path"] == WS_PATH:
            if (await receive())["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept"})
            sockets.add(send)
            try:
                while (await receive())["type"] != "websocket.disconnect":
                    pass
            finally:
                sockets.discard(send)
        else:
            await send({"type": "websocket.close", "code": 1000})

    return app, control


def serve_main(
    server: str, variant: str, fd: int, profile_path: str | None, redis: tuple[str, str] | None
) -> None:
    """The server process: hypercorn on the listening socket ``fd`` until ``POST /shutdown``."""
    die_with_parent()
    start_watchdog(CHILD_MAX_LIFETIME)
    pin_to_cpu(SERVER_CPU)
    raise_nofile(0)

    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{fd}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.backlog = 4096
    config.graceful_timeout = 3.0

    async def main() -> None:
        if variant == "raw":
            app, control = build_raw_app(profile_path)
        else:
            app, control = build_asgi_events_app(profile_path, redis)
        if server == "hypercorn-asyncio":
            from hypercorn.asyncio import serve

            await serve(app, config, shutdown_trigger=control.shutdown.wait)  # type: ignore[arg-type]
        else:
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, config, shutdown_trigger=control.shutdown.wait)  # type: ignore[arg-type]

    if server == "hypercorn-asyncio":
        asyncio.run(main())
    else:
        import trio

        trio.run(main)


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


class ServerProcess(ProcStats):
    """A server process on an ephemeral port of 127.0.0.1 (the socket is bound here)."""

    live: ClassVar[set[ServerProcess]] = set()  # for the cleanup on exit

    def __init__(
        self,
        server: str,
        variant: str,
        profile_path: Path | None,
        redis: tuple[str, str] | None = None,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port: int = sock.getsockname()[1]
        fd = sock.detach()
        self.log = tempfile.TemporaryFile(mode="w+b", prefix="fanout-server-")
        command = [sys.executable, __file__, "--serve", server, variant, str(fd)]
        if profile_path is not None:
            command += ["--profile-to", str(profile_path)]
        if redis is not None:
            command += ["--redis-url", redis[0], "--redis-prefix", redis[1]]
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


# -- the load side ----------------------------------------------------------------------------


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


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


@dataclass
class Tally:
    """What all clients of one run received."""

    sockets: int
    events: int
    done: asyncio.Event
    received: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    unexpected: int = 0  # frames (batch: messages) that are not one of our events
    frames: int = 0  # frames that carried at least one of our events
    ready: int = 0  # asgi_events.ready control messages (batch clients get one each)
    last_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    # perf_counter() and the load process's CPU time at the first delivery: the load CPU while
    # delivering (the window also holds the server's queueing, when the clients are idle).
    first_perf: float = 0.0
    first_cpu: float = 0.0
    # Batch frames: (receive time, the events' "t" fields), turned into latencies after the run.
    pending: list[tuple[int, tuple[bytes, ...]]] = field(default_factory=list)

    expected: int = 0

    # The seq fields a batch frame holds in the regular case, as text: checked without int().
    seq_texts: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        self.expected = self.sockets * self.events
        self.seq_texts = tuple(b"%d" % seq for seq in range(self.events))

    def mark_first(self) -> None:
        self.first_perf, self.first_cpu = time.perf_counter(), load_cpu_seconds()

    def settle(self) -> None:
        """Compute the latencies deferred by batch frames (after the measured window)."""
        for now, t_texts in self.pending:
            self.latencies_ns.extend(now - int(t) for t in t_texts)
        self.pending.clear()


class Client(asyncio.Protocol):
    """One WebSocket client: the upgrade by hand, then a minimal parser for unmasked frames.

    With ``batch`` it offers the ``asgi-events.v1.batch`` subprotocol (and insists the server
    selects it): every frame is then a JSON array of messages, read with the same regex.
    """

    def __init__(self, port: int, token: str, tally: Tally, batch: bool = False) -> None:
        self.tally = tally
        self.batch = batch
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self.lost_connection = False
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._open = False
        self._next_seq = 0
        self._seen = bytearray(tally.events)
        key = base64.b64encode(os.urandom(16))
        self._accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        protocol = f"Sec-WebSocket-Protocol: {BATCH_SUBPROTOCOL.decode()}\r\n" if batch else ""
        self._request = (
            f"GET {WS_PATH}?token={token} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"{protocol}\r\n"
        ).encode()

    @property
    def received(self) -> int:
        return sum(self._seen)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_connection = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()  # every frame in this chunk arrived by now
        if self._buffer or not self._open:
            self._buffer += data
            if not self._open and not self._handshake():
                return
            data = bytes(self._buffer)
            self._buffer.clear()
        pos, size = 0, len(data)
        while size - pos >= 2:
            first, second = data[pos], data[pos + 1]
            length, header = second & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, header = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, header = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            start = pos + header
            end = start + length
            if second & 0x80:  # servers do not mask, but be lenient
                end += 4
            if end > size:
                break
            if first == 0x81 and not second & 0x80:  # the common case: a whole, unmasked text
                if self.batch:
                    self._array(data, start, end, now)
                else:
                    self._message(EVENT_FIELDS.search(data, start, end), now)
            else:
                payload = data[start:end]
                if second & 0x80:
                    mask, payload = payload[:4], payload[4:]
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self._frame(first & 0x0F, bool(first & 0x80), payload, now)
            pos = end
        if pos < size:
            self._buffer += data[pos:]

    def _handshake(self) -> bool:
        head, sep, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}
        problem = ""
        if b" 101 " not in lines[0] + b" " or headers.get(b"sec-websocket-accept") != self._accept:
            problem = f"upgrade refused: {lines[0]!r}"
        elif self.batch and headers.get(b"sec-websocket-protocol") != BATCH_SUBPROTOCOL:
            selected = headers.get(b"sec-websocket-protocol")
            problem = f"{BATCH_SUBPROTOCOL.decode()} not selected (got {selected!r})"
        if problem:
            self.opened.set_exception(ConnectionError(problem))
            assert self.transport is not None
            self.transport.close()
            return False
        self._buffer[:] = rest
        self._open = True
        self.opened.set_result(None)
        return True

    def _frame(self, opcode: int, fin: bool, payload: bytes, now: int) -> None:
        if opcode == 0x0:  # continuation
            self._fragments.append(payload)
            if fin:
                payload, self._fragments = b"".join(self._fragments), []
                self._text(payload, now)
        elif opcode in (0x1, 0x2):
            if fin:
                self._text(payload, now)
            else:
                self._fragments = [payload]
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close()
        elif opcode == 0x9 and self.transport is not None:
            self.transport.write(masked_frame(0xA, payload))

    def _text(self, payload: bytes, now: int) -> None:
        """A whole message that did not take the fast path (masked, fragmented or binary)."""
        if self.batch:
            self._array(payload, 0, len(payload), now)
        else:
            self._message(EVENT_FIELDS.search(payload), now)

    def _message(self, fields: re.Match[bytes] | None, now: int) -> None:
        """A frame of one message (no subprotocol): one event."""
        tally = self.tally
        if fields is None:
            tally.unexpected += 1
            return
        tally.frames += 1
        seq = int(fields[1])
        if seq != self._next_seq:
            tally.out_of_order += 1
        self._next_seq = seq + 1
        if seq >= tally.events or self._seen[seq]:
            tally.duplicates += 1
            return
        self._seen[seq] = 1
        tally.latencies_ns.append(now - int(fields[2]))
        tally.last_ns = now
        if not tally.received:
            tally.mark_first()
        tally.received += 1
        if tally.received == tally.expected:
            tally.done.set()

    def _array(self, data: bytes, start: int, end: int, now: int) -> None:
        """A batch frame ``data[start:end]``: a JSON array of messages, each event a delivery.

        No JSON parsing: one regex pass finds every message (``BATCH_MESSAGE``). In the regular
        case (only events, the next ones in order, none seen before) no Python code runs per
        event: the checks compare tuples and search a bytearray, and the latencies are computed
        after the run (``Tally.settle``), outside the measured window.
        """
        tally = self.tally
        found = None
        if end > start and data[start] == 0x5B:  # "[": a batch frame must be an array
            found = BATCH_MESSAGE.findall(data, start, end)
        if not found:
            tally.unexpected += 1
            return
        seq_texts, t_texts, readies = zip(*found, strict=True)
        if b"" in seq_texts:  # not only events: the ready message, or something unexpected
            ready = readies.count(READY_TYPE)
            events = [(seq, t) for seq, t, _ in found if seq]
            tally.ready += ready
            tally.unexpected += len(found) - ready - len(events)
            if not events:
                return
            seq_texts, t_texts = zip(*events, strict=True)
        tally.frames += 1
        first, n = int(seq_texts[0]), len(seq_texts)
        seen = self._seen
        if (
            first == self._next_seq
            and seq_texts == tally.seq_texts[first : first + n]
            and seen.find(1, first, first + n) == -1
        ):
            seen[first : first + n] = bytes([1]) * n
            self._next_seq = first + n
            tally.pending.append((now, t_texts))
            new = n
        else:
            new = self._irregular(list(map(int, seq_texts)), t_texts, now)
        if new:
            tally.last_ns = now
            if not tally.received:
                tally.mark_first()
            tally.received += new
            if tally.received == tally.expected:
                tally.done.set()

    def _irregular(self, seqs: list[int], t_texts: tuple[bytes, ...], now: int) -> int:
        """A batch frame with a gap, a repeat or a reordering: count them event by event."""
        tally = self.tally
        seen, expect, events = self._seen, self._next_seq, tally.events
        latencies = tally.latencies_ns
        new = 0
        for seq, t_text in zip(seqs, t_texts, strict=True):
            if seq != expect:
                tally.out_of_order += 1
            expect = seq + 1
            if seq >= events or seen[seq]:
                tally.duplicates += 1
                continue
            seen[seq] = 1
            latencies.append(now - int(t_text))
            new += 1
        self._next_seq = expect
        return new

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(masked_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()


async def connect_all(
    ports: list[int], tally: Tally, batch: bool = False, concurrency: int = 64
) -> list[Client]:
    """Client ``i`` connects to ``ports[i % len(ports)]`` (round robin over the nodes)."""
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    gate = asyncio.Semaphore(concurrency)

    async def connect(i: int) -> None:
        port = ports[i % len(ports)]
        async with gate:
            client = Client(port, f"user-{i}", tally, batch)
            clients.append(client)
            await loop.create_connection(lambda: client, HOST, port)
            await client.opened

    tasks = [asyncio.ensure_future(connect(i)) for i in range(tally.sockets)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), CONNECT_TIMEOUT)
    except BaseException:
        for task in tasks:
            task.cancel()
        for client in clients:
            client.close()
        raise
    return clients


@dataclass
class RunResult:
    variant: str
    run: int
    deliveries_per_s: float
    frames_per_s: float  # frames that carried events, per second of the window
    deliveries_per_frame: float  # 1 without batching
    p50_ms: float
    p99_ms: float
    lost: int
    out_of_order: int
    duplicates: int
    closed: int  # sockets the server closed or lost during the run
    server_cpu: float  # share of one core over the window (all nodes)
    server_rss_mb: float  # peak RSS, summed over the nodes
    node_rss_mb: list[float]  # peak RSS per node
    redis_cpu: float | None  # redis-server's main thread, share of one core (Redis variant)
    load_cpu: float  # over the whole run (from POST /publish)
    load_cpu_delivering: float  # from the first delivery to the last
    server_gc: float  # share of the window the server spent in the garbage collector
    gc_runs: list[int]  # the server's collections per generation in the window
    softirq_cpu: float  # softirq time of the machine (mostly loopback TCP), in cores
    other_cpu: float  # busy CPU time charged to neither process: other processes and steal
    window_s: float
    call_ms: float  # time spent inside the server's publish call (the whole loop for raw)
    timed_out: bool
    notes: list[str] = field(default_factory=list)

    @property
    def load_bound(self) -> bool:
        delivering = self.load_cpu_delivering
        return self.load_cpu > LOAD_BOUND or (delivering == delivering and delivering > LOAD_BOUND)


def load_cpu_seconds() -> float:
    """User + system CPU time of this (the load) process, microsecond resolution."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> tuple[float, float]:
    """Busy CPU time of the whole machine, all CPUs: (everything but softirq, softirq), in s."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + steal) / tick, softirq / tick


def wait_for_quiet(limit: float, sample: float = 0.5) -> float:
    """Wait up to ``limit`` s until the machine's busy CPU is below ``QUIET``; the last level seen.

    The machine may be shared (tests running next to the benchmark): a run started while
    something else is busy measures that as much as the server.
    """
    deadline = time.monotonic() + limit
    while True:
        before = sum(machine_busy_seconds())
        time.sleep(sample)
        busy = (sum(machine_busy_seconds()) - before) / sample
        if busy < QUIET or time.monotonic() >= deadline:
            return busy


def percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


async def run_once(
    server: str, variant: str, run: int, args: argparse.Namespace, profiles: list[Path] | None
) -> RunResult:
    """One run: fresh server process(es) (and redis-server), N clients, one burst.

    ``profiles``: one cProfile output path per node (node 1 publishes), or None.
    """
    redis: RedisProcess | None = None
    nodes: list[ServerProcess] = []
    clients: list[Client] = []
    try:
        count = REDIS_NODES if variant == REDIS_VARIANT else 1
        node_redis: tuple[str, str] | None = None
        if variant == REDIS_VARIANT:
            redis = RedisProcess()
            await redis.wait_ready()
            # A prefix of this run's own (the server is fresh anyway; this keeps keys apart).
            node_redis = (redis.url, f"fanout-{os.getpid()}-{run}-{secrets.token_hex(4)}")
        for k in range(count):
            profile = profiles[k] if profiles is not None else None
            nodes.append(ServerProcess(server, variant, profile, node_redis))
        await asyncio.gather(*(node.wait_ready() for node in nodes))
        tally = Tally(args.sockets, args.events, asyncio.Event())
        batch = variant == BATCH_VARIANT
        clients = await connect_all([node.port for node in nodes], tally, batch)
        shares = [len(range(k, args.sockets, count)) for k in range(count)]  # sockets per node
        # The nodes that only receive: wait for their sockets, collect garbage, start measuring.
        for node, share in zip(nodes[1:], shares[1:], strict=True):
            status, answer = await http_request(
                node.port,
                "POST",
                "/measure/start",
                {"sockets": share},
                timeout=SERVER_READY_WAIT + HTTP_TIMEOUT,
            )
            if status != 200:
                raise RuntimeError(f"POST /measure/start answered {status}: {answer}")
        gc.collect()
        request = {"sockets": shares[0], "events": args.events, "payload": args.payload}

        def server_cpu_seconds() -> tuple[float, float]:
            return sum(n.cpu_seconds() for n in nodes), redis.cpu_seconds() if redis else 0.0

        cpu_before, server_before = load_cpu_seconds(), server_cpu_seconds()
        machine_before = machine_busy_seconds()
        wall_before = time.perf_counter()
        sent_ns = time.time_ns()
        publisher = nodes[0]
        publish = asyncio.ensure_future(
            http_request(
                publisher.port, "POST", "/publish", request, timeout=args.timeout + HTTP_TIMEOUT
            )
        )
        timed_out = False
        try:
            await asyncio.wait_for(tally.done.wait(), args.timeout)
        except asyncio.TimeoutError:
            timed_out = True
        wall_after = time.perf_counter()
        wall = wall_after - wall_before
        cpu_after, server_after = load_cpu_seconds(), server_cpu_seconds()
        machine_after = machine_busy_seconds()
        notes: list[str] = []
        try:
            status, answer = await asyncio.wait_for(publish, HTTP_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            if not timed_out:
                raise
            # The server is still stuck in the burst: report what arrived.
            status, answer = 200, {"start_ns": sent_ns, "call_s": float("nan")}
            notes.append(f"publish did not answer ({type(exc).__name__})")
        if status != 200:
            raise RuntimeError(f"POST /publish answered {status}: {answer}")
        gc_s, gc_runs = 0.0, [0, 0, 0]
        for node in nodes:
            measured: dict[str, Any] = {"gc_s": float("nan"), "gc_runs": [0, 0, 0]}
            try:
                _, measured = await http_request(
                    node.port, "POST", "/measure/stop", {}, timeout=HTTP_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError, ValueError):
                if not timed_out:
                    raise
            gc_s += float(measured["gc_s"])
            gc_runs = [a + b for a, b in zip(gc_runs, measured["gc_runs"], strict=True)]
        node_rss = [node.peak_rss_mb() for node in nodes]

        load_cpu = (cpu_after - cpu_before) / wall
        load_cpu_delivering = float("nan")
        if tally.first_perf and wall_after - tally.first_perf > 0.01:  # too short to tell
            load_cpu_delivering = (cpu_after - tally.first_cpu) / (wall_after - tally.first_perf)
        servers_cpu = server_after[0] - server_before[0]
        redis_cpu = server_after[1] - server_before[1]
        window_s = max(tally.last_ns - int(answer["start_ns"]), 1) / 1e9
        tally.settle()
        latencies = sorted(tally.latencies_ns)
        result = RunResult(
            variant=variant,
            run=run,
            deliveries_per_s=tally.received / window_s,
            frames_per_s=tally.frames / window_s,
            deliveries_per_frame=tally.received / tally.frames if tally.frames else float("nan"),
            p50_ms=percentile(latencies, 0.50) / 1e6,
            p99_ms=percentile(latencies, 0.99) / 1e6,
            lost=sum(args.events - c.received for c in clients),
            out_of_order=tally.out_of_order,
            duplicates=tally.duplicates,
            closed=sum(c.close_code is not None or c.lost_connection for c in clients),
            server_cpu=servers_cpu / wall,
            server_rss_mb=sum(node_rss),
            node_rss_mb=node_rss,
            redis_cpu=redis_cpu / wall if redis is not None else None,
            server_gc=gc_s / wall,
            gc_runs=gc_runs,
            load_cpu=load_cpu,
            load_cpu_delivering=load_cpu_delivering,
            softirq_cpu=(machine_after[1] - machine_before[1]) / wall,
            other_cpu=max(
                0.0,
                machine_after[0] - machine_before[0] - servers_cpu - redis_cpu - load_cpu * wall,
            )
            / wall,
            window_s=window_s,
            call_ms=float(answer["call_s"]) * 1e3,
            timed_out=timed_out,
            notes=notes,
        )
        if timed_out:
            result.notes.append(f"timed out after {args.timeout:g} s")
        if tally.unexpected:
            what = "messages" if batch else "frames"
            result.notes.append(f"{tally.unexpected} unexpected {what}")
        if batch and tally.ready != args.sockets:
            result.notes.append(f"{tally.ready} ready messages for {args.sockets} clients")
        if result.load_bound:
            result.notes.append("LOAD-BOUND")
        if result.other_cpu > NOISY:
            result.notes.append("NOISY (other processes or steal)")
        return result
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.1)  # let the close frames go out
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)
        for k, node in enumerate(nodes, 1):
            problems = node.log_problems()
            if problems:
                where = f"node {k}, " if len(nodes) > 1 else ""
                print(f"  server log ({where}{variant} run {run}):\n{problems}", file=sys.stderr)
            node.close()
        if redis is not None:
            redis.close()


# -- reporting --------------------------------------------------------------------------------


MEDIAN_KEYS = (
    "deliveries_per_s",
    "frames_per_s",
    "deliveries_per_frame",
    "p50_ms",
    "p99_ms",
    "server_cpu",
    "server_gc",
    "server_rss_mb",
    "load_cpu",
    "load_cpu_delivering",
    "other_cpu",
)


def median_result(results: list[RunResult]) -> dict[str, float]:
    medians = {k: statistics.median(getattr(r, k) for r in results) for k in MEDIAN_KEYS}
    redis = [r.redis_cpu for r in results if r.redis_cpu is not None]
    medians["redis_cpu"] = statistics.median(redis) if redis else float("nan")
    return medians


def percent(value: float | None) -> str:
    """A share of a core; one decimal below 10% (redis-server's is well under 1%)."""
    if value is None or value != value:
        return "-"
    return f"{value:.1%}" if value < 0.1 else f"{value:.0%}"


def ratio_lines(
    medians: dict[str, dict[str, float]], load_bound: dict[str, int] | None = None
) -> list[str]:
    """The ratios of median deliveries/s: to raw, batched frames to plain ones, and two Redis
    nodes to one node in memory. ``load_bound``: load-bound runs per variant (then the ratio
    says more about the load process than about the server)."""
    rate = {variant: m["deliveries_per_s"] for variant, m in medians.items()}
    bound = load_bound or {}

    def caveat(*variants: str) -> str:
        flagged = [v for v in variants if bound.get(v)]
        if not flagged:
            return ""
        return (
            " — **LOAD-BOUND runs in " + ", ".join(flagged) + ": the load process limited "
            "the rate (a lower bound for the server), not a server figure**"
        )

    def verdict(ratio: float, goal: float) -> str:
        return f" (goal >= {goal:g}x: {'met' if ratio >= goal else 'NOT met'})"

    lines = []
    for variant in VARIANTS[1:]:
        if "raw" in rate and variant in rate:
            ratio = rate[variant] / rate["raw"]
            goal = verdict(ratio, BATCH_GOAL) if variant == BATCH_VARIANT else ""
            lines.append(
                f"**{variant} / raw deliveries/s: {ratio:.2f}x**{goal}{caveat(variant, 'raw')}"
            )
    if "asgi-events" in rate and BATCH_VARIANT in rate:
        ratio = rate[BATCH_VARIANT] / rate["asgi-events"]
        lines.append(
            f"**{BATCH_VARIANT} / asgi-events deliveries/s (batched frames / one message per "
            f"frame, same server): {ratio:.2f}x**{caveat(BATCH_VARIANT, 'asgi-events')}"
        )
    if "asgi-events" in rate and REDIS_VARIANT in rate:
        ratio = rate[REDIS_VARIANT] / rate["asgi-events"]
        lines.append(
            f"**{REDIS_VARIANT} / asgi-events deliveries/s (two nodes on Redis / one node in "
            f"memory, same clients): {ratio:.2f}x**{verdict(ratio, REDIS_GOAL)}"
            f"{caveat(REDIS_VARIANT, 'asgi-events')}"
        )
    return [line for text in lines for line in ("", text)]


def markdown_report(args: argparse.Namespace, results: list[RunResult], header: list[str]) -> str:
    lines = [
        *header,
        "",
        f"Median of {args.runs} run(s) per variant; N={args.sockets} sockets, "
        f"M={args.events} events/burst, payload {args.payload} B.",
        "",
        "| variant | deliveries/s (min-max) | frames/s | deliveries/frame | p50 ms | p99 ms "
        "| lost | out-of-order | server CPU | server GC | server peak RSS MB | redis CPU "
        "| load CPU | load CPU delivering | load-bound runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, dict[str, float]] = {}
    load_bound: dict[str, int] = {}
    for variant in VARIANTS:
        runs = [r for r in results if r.variant == variant]
        if not runs:
            continue
        m = medians[variant] = median_result(runs)
        load_bound[variant] = sum(r.load_bound for r in runs)
        rates = [r.deliveries_per_s for r in runs]
        lines.append(
            f"| {variant} | {m['deliveries_per_s']:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {m['frames_per_s']:,.0f} | {m['deliveries_per_frame']:.1f} "
            f"| {m['p50_ms']:.1f} | {m['p99_ms']:.1f} "
            f"| {sum(r.lost for r in runs)} | {sum(r.out_of_order for r in runs)} "
            f"| {m['server_cpu']:.0%} | {m['server_gc']:.0%} | {m['server_rss_mb']:.1f} "
            f"| {percent(m['redis_cpu'])} "
            f"| {m['load_cpu']:.0%} | {percent(m['load_cpu_delivering'])} "
            f"| {sum(r.load_bound for r in runs)}/{len(runs)} |"
        )
    lines += ratio_lines(medians, load_bound)
    if BATCH_VARIANT in medians:
        lines += [
            "",
            f"{BATCH_VARIANT}: the asgi-events server (one node, in memory); its clients offer "
            f"`{BATCH_SUBPROTOCOL.decode()}`, so every frame is a JSON array of the messages "
            "queued for the socket (up to 64 KiB). Deliveries count events, as in the other "
            "variants; frames/s counts the frames that carried events (deliveries/frame is 1 "
            "without batching).",
        ]
    if REDIS_VARIANT in medians:
        lines += [
            "",
            f"{REDIS_VARIANT}: two server processes (nodes) on one redis-server, half the "
            "clients on each; node 1 publishes the burst with `broadcast_to_all`, node 2 gets "
            f"it through Redis. Both nodes and redis-server share CPU {SERVER_CPU} (the load "
            f"is on CPU {LOAD_CPU}): the same one core as the single in-memory node, so this "
            "is a conservative setup (two real nodes would have a core each). Its server CPU, "
            "GC and peak RSS are both nodes' sums; redis CPU is redis-server's main thread.",
        ]
    lines += [
        "",
        "Per run, in the order run (window: publish start to last delivery; publish call: time "
        "inside the server's publish loop; GC runs: the server's collections per generation; "
        "load CPU delivering: the load process from the first delivery to the last, when it "
        f"has frames to read; above {LOAD_BOUND:.0%} in either load column the run is "
        "LOAD-BOUND; two nodes: CPU and GC summed, RSS per node):",
        "",
        "| run | variant | deliveries/s | frames/s | deliveries/frame | window s "
        "| publish call ms | p50 ms | p99 ms | lost | out-of-order | dup | closed | server CPU "
        "| server GC | GC runs | RSS MB | redis CPU | load CPU | load CPU delivering | softirq "
        "| other CPU | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:"
        "|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rss = "+".join(f"{x:.1f}" for x in r.node_rss_mb)
        lines.append(
            f"| {r.run} | {r.variant} | {r.deliveries_per_s:,.0f} | {r.frames_per_s:,.0f} "
            f"| {r.deliveries_per_frame:.1f} | {r.window_s:.3f} "
            f"| {r.call_ms:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.lost} | {r.out_of_order} "
            f"| {r.duplicates} | {r.closed} | {r.server_cpu:.0%} | {r.server_gc:.0%} "
            f"| {'/'.join(map(str, r.gc_runs))} | {rss} | {percent(r.redis_cpu)} "
            f"| {r.load_cpu:.0%} | {percent(r.load_cpu_delivering)} "
            f"| {r.softirq_cpu:.0%} | {r.other_cpu:.0%} "
            f"| {'; '.join(r.notes)} |"
        )
    return "\n".join(lines) + "\n"


def source_digest() -> str:
    """A short hash of src/asgi_events/**/*.py (backends included), to tell which version of the
    package was measured."""
    digest = hashlib.sha256()
    for path in sorted(SRC_DIR.rglob("*.py")):
        digest.update(path.relative_to(SRC_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def profile_summary(paths: list[Path], limit: int = 25) -> str:
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return "(no profile was written)\n"
    out = io.StringIO()
    stats = pstats.Stats(existing[0], stream=out)
    for path in existing[1:]:
        stats.add(path)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    out.write("\n")
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=SERVERS, default="hypercorn-asyncio")
    parser.add_argument("--sockets", type=int, help="N WebSocket clients (default 1000)")
    parser.add_argument("--events", type=int, help="M events per burst (default 200)")
    parser.add_argument("--payload", type=int, help="pad bytes per event (default 100)")
    parser.add_argument("--runs", type=int, help="runs per variant (default 3)")
    parser.add_argument("--timeout", type=float, default=120.0, help="delivery wait bound, s")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for the machine to be idle (0: don't)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 20 sockets, 10 events, 1 run; not {REDIS_VARIANT} unless in --variants",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the server from publish to last delivery; print the hot spots",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help=f"variants to run (default: all; with --quick: {' '.join(QUICK_VARIANTS)})",
    )
    parser.add_argument(
        "--serve", nargs=3, metavar=("SERVER", "VARIANT", "FD"), help=argparse.SUPPRESS
    )
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--redis-prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = list(QUICK_VARIANTS if args.quick else VARIANTS)
    args.variants = [v for v in VARIANTS if v in args.variants]  # interleaving order, once each
    defaults = QUICK if args.quick else FULL
    for name, default in zip(("sockets", "events", "payload", "runs"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if min(args.sockets, args.events, args.runs) < 1 or args.payload < 0:
        parser.error("--sockets, --events and --runs must be positive, --payload not negative")
    return args


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        server, variant, fd = args.serve
        redis = (args.redis_url, args.redis_prefix) if args.redis_url else None
        serve_main(server, variant, int(fd), args.profile_to, redis)
        return 0

    pinned = pin_to_cpu(LOAD_CPU)
    nofile = raise_nofile(args.sockets + 256)
    redis_note = ""
    if REDIS_VARIANT in args.variants:
        redis_note = (
            f"; {REDIS_VARIANT}: {REDIS_NODES} nodes and redis-server "
            f"{redis_server_version()}, all on CPU {SERVER_CPU}"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    # Quick and profiled runs do not overwrite the real results.
    suffix = ("-quick" if args.quick else "") + ("-profile" if args.profile else "")
    if not args.quick and (args.sockets, args.events, args.payload) != FULL[:3]:
        suffix += f"-n{args.sockets}-m{args.events}-p{args.payload}"
    if not args.quick and args.variants != list(VARIANTS):
        suffix += "-" + "+".join(args.variants)  # a subset: not the real results either
    digest = source_digest()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"# Fan-out burst: {args.server}{' (quick)' if args.quick else ''}",
        "",
        f"`{' '.join([Path(sys.executable).name, 'benchmarks/fanout.py', *sys.argv[1:]])}` — "
        f"{started}, Python {sys.version.split()[0]}, asgi-events src {digest}, "
        f"server on CPU {SERVER_CPU}, load on {pinned}, RLIMIT_NOFILE {nofile}{redis_note}"
        + (", **server under cProfile**" if args.profile else "")
        + ".",
    ]
    print("\n".join(header), flush=True)

    results: list[RunResult] = []
    # Profile label (the variant, or the variant and node) -> one pstats file per run.
    profiles: dict[str, list[Path]] = {}
    with cleanup_on_exit():
        for run in range(1, args.runs + 1):
            for variant in args.variants:
                run_profiles = None
                if args.profile:
                    labels = [variant]
                    if variant == REDIS_VARIANT:
                        labels = [f"{variant}-node{k}" for k in range(1, REDIS_NODES + 1)]
                    run_profiles = []
                    for label in labels:
                        path = RESULTS_DIR / f"profile-{args.server}-{label}-{run}.pstats.tmp"
                        profiles.setdefault(label, []).append(path)
                        run_profiles.append(path)
                busy = wait_for_quiet(args.quiet_wait)
                result = asyncio.run(run_once(args.server, variant, run, args, run_profiles))
                if busy > QUIET:
                    result.notes.append(f"machine busy before the run ({busy:.0%} of a core)")
                results.append(result)
                redis_cpu = ""
                if result.redis_cpu is not None:
                    redis_cpu = f"redis CPU {percent(result.redis_cpu)}  "
                print(
                    f"  run {run} {variant:<17} {result.deliveries_per_s:>11,.0f} deliveries/s  "
                    f"({result.deliveries_per_frame:.1f}/frame)  "
                    f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  "
                    f"lost {result.lost}  ooo {result.out_of_order}  "
                    f"server CPU {result.server_cpu:.0%} (GC {result.server_gc:.0%})  {redis_cpu}"
                    f"load CPU {result.load_cpu:.0%} "
                    f"(delivering {percent(result.load_cpu_delivering)})  "
                    f"softirq {result.softirq_cpu:.0%}  other CPU {result.other_cpu:.0%}  "
                    f"{' '.join(result.notes)}",
                    flush=True,
                )

    if source_digest() != digest:
        header += ["", f"**Warning: src/asgi_events changed during the runs ({digest} at start).**"]
    report = markdown_report(args, results, header)
    print()
    print(report)
    out = RESULTS_DIR / f"fanout-{args.server}{suffix}.md"
    out.write_text(report)
    print(f"written to {out.relative_to(BENCH_DIR.parent)}")
    if args.profile:
        for label, paths in profiles.items():
            text = profile_summary(paths)
            path = RESULTS_DIR / f"profile-{args.server}-{label}.txt"
            path.write_text(text)
            print(f"\n## server profile, {label} (top by tottime, then cumulative)\n")
            print(text[:6000])
            print(f"(full: {path.relative_to(BENCH_DIR.parent)})")
            for p in paths:
                p.unlink(missing_ok=True)
    bad = [r for r in results if r.lost or r.out_of_order or r.duplicates or r.timed_out]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
