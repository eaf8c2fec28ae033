"""The interop matrix: every (server, app) cell connects, receives a broadcast, and resumes,
over a WebSocket and over Server-Sent Events (whose cells also check that a client that goes
away is detected).

Apps (tests/support/interop_apps.py): bare ASGI, Starlette, FastAPI, Litestar, Quart, Django.
Servers: hypercorn's asyncio and trio workers in this process (the ``serve`` fixture);
uvicorn, granian and daphne as subprocesses on a free 127.0.0.1 port. Each cell also checks
lifespan: what the app sent the server, and that the server then stops. The matrix and the
reasons for each expected failure: docs/interop.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

import asgi_events
from asgi_events import EventHub

from .support.interop_apps import APP_ENV, LIFESPAN_MARK, PROBE, build, record_lifespan
from .support.server import TIMEOUT, Connect, ServeFn, recv, recv_n
from .support.sse import open_events

ROOT = Path(__file__).resolve().parent.parent
APPS = ("bare", "starlette", "fastapi", "litestar", "quart", "django")
PROTOCOL = "asgi-events.v1"
BOTH = ["lifespan.startup.complete", "lifespan.shutdown.complete"]

# Cells that fail for a reason outside asgi-events: (server, app) -> why (docs/interop.md).
XFAIL: dict[tuple[str, str], str] = {
    ("hypercorn-trio", "quart"): (
        "Quart is asyncio-only (its request handling calls asyncio.wait): a request on trio "
        "fails with RuntimeError: no running event loop (Quart-Trio is the trio variant)"
    ),
    ("hypercorn-trio", "django"): (
        "Django's ASGI handler is asyncio-only (it sends request_started with asyncio.gather): "
        "a request on trio fails with TypeError: trio.run received unrecognized yield message"
    ),
}


def _marks(server: str, app: str) -> list[pytest.MarkDecorator]:
    reason = XFAIL.get((server, app))
    if reason is None:
        return []
    # The failed framework leaves coroutines and files behind for the garbage collector.
    ignore = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    return [pytest.mark.xfail(strict=True, reason=reason), ignore]


def _require(app: str) -> None:
    if app != "bare" and importlib.util.find_spec(app) is None:
        pytest.fail(f"{app} is not installed: pip install -e '.[test]'")


async def exercise(base: str, connect: Connect, http: httpx.AsyncClient) -> None:
    """Connect, receive a broadcast, reconnect with ``lastEventId`` and get what was missed."""

    async def publish(n: int) -> None:
        response = await http.post(f"{base}/publish", params={"user": "alice", "n": n})
        assert response.status_code == 200, response.text

    url = f"{base}/ws?token=tok-alice"
    async with connect(url, subprotocols=[PROTOCOL]) as ws:
        assert ws.subprotocol == PROTOCOL
        ready = await recv(ws)
        assert ready["type"] == "asgi_events.ready"
        assert ready["payload"]["replayed"] == 0
        await publish(1)
        first = await recv(ws)
        assert (first["type"], first["payload"]) == ("INTEROP", {"n": 1})

    await publish(2)  # missed while disconnected
    await publish(3)
    async with connect(f"{url}&lastEventId={first['id']}", subprotocols=[PROTOCOL]) as ws:
        second, third, ready = await recv_n(ws, 3)
        assert [second["payload"], third["payload"]] == [{"n": 2}, {"n": 3}]
        assert ready == {
            "type": "asgi_events.ready",
            "payload": {"position": third["id"], "recovered": True, "replayed": 2},
        }
        await publish(4)  # and live again after the replay
        assert (await recv(ws))["payload"] == {"n": 4}


# The hub's presence of alice and its open streams, however the test reaches the hub.
Presence = Callable[[], Awaitable[tuple[int, int]]]


async def until_gone(presence: Presence) -> None:
    """Wait (bounded) until the hub has let go of every stream: its presence of alice and its
    open streams are 0 (the server notices a client that went away; no event to wait on)."""
    with anyio.fail_after(TIMEOUT):
        while await presence() != (0, 0):  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def exercise_sse(base: str, http: httpx.AsyncClient, presence: Presence) -> None:
    """The same over Server-Sent Events (token in the query, ``Last-Event-ID`` to resume), and
    each time the client goes away, the hub notices."""

    async def publish(n: int) -> None:
        response = await http.post(f"{base}/publish", params={"user": "alice", "n": n})
        assert response.status_code == 200, response.text

    url = f"{base}/ws"
    async with open_events(url, token="tok-alice") as s:
        assert s.status == 200
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        before, ready = await s.until_ready()
        assert before == [] and ready["data"]["payload"]["replayed"] == 0
        assert await presence() == (1, 1)  # registered before the response started
        await publish(1)
        first = await s.fields()
        assert (first["data"]["type"], first["data"]["payload"]) == ("INTEROP", {"n": 1})
        assert first["id"] == first["data"]["id"]
    await until_gone(presence)

    await publish(2)  # missed while disconnected
    await publish(3)
    async with open_events(url, {"last-event-id": first["id"]}, token="tok-alice") as s:
        (second, third), ready = await s.until_ready()
        assert [second["data"]["payload"], third["data"]["payload"]] == [{"n": 2}, {"n": 3}]
        assert ready["id"] == third["id"]
        assert ready["data"] == {
            "type": "asgi_events.ready",
            "payload": {"position": third["id"], "recovered": True, "replayed": 2},
        }
        await publish(4)  # and live again after the replay
        assert (await s.fields())["data"]["payload"] == {"n": 4}
    await until_gone(presence)


def hub_presence(hub: EventHub) -> Presence:
    async def presence() -> tuple[int, int]:
        return await hub.presence("alice"), hub.stats()["total_connections"]

    return presence


# -- hypercorn, in process: asyncio and trio --------------------------------------------


HYPERCORN_CELLS = [
    pytest.param(backend, app, id=f"{backend}-{app}", marks=_marks(f"hypercorn-{backend}", app))
    for backend in ("asyncio", "trio")
    for app in APPS
]


@pytest.mark.parametrize(("anyio_backend", "app_name"), HYPERCORN_CELLS)
async def test_hypercorn(
    app_name: str,
    serve: ServeFn,
    connect: Connect,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _require(app_name)
    caplog.set_level(logging.INFO, logger="asgi_events")
    app, _hub = build(app_name)
    sent: list[str] = []
    server = await serve(record_lifespan(app, sent.append))
    await exercise(server.url, connect, http)
    await server.stop()
    assert sent == BOTH
    # Django's ASGI app raises on a lifespan scope: the middleware completed the protocol.
    # (The bare app returns at once instead; completed silently, as ``sent`` shows.)
    completed = "does not support lifespan" in caplog.text
    assert completed == (app_name == "django")


@pytest.mark.parametrize(("anyio_backend", "app_name"), HYPERCORN_CELLS)
async def test_hypercorn_sse(app_name: str, serve: ServeFn, http: httpx.AsyncClient) -> None:
    _require(app_name)
    app, hub = build(app_name)
    server = await serve(app)
    await exercise_sse(server.url, http, hub_presence(hub))


# -- uvicorn, granian, daphne: subprocesses -----------------------------------------------


def _command(server: str, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    target = "tests.support.interop_apps:app"
    bind = ["--host", "127.0.0.1", "--port", str(port)]
    if server.startswith("uvicorn"):
        ws = "wsproto" if server == "uvicorn-wsproto" else "websockets-sansio"
        quiet = ["--log-level", "warning", "--no-access-log"]
        return [str(bin_dir / "uvicorn"), target, *bind, "--ws", ws, "--lifespan", "on", *quiet]
    if server == "granian":
        quiet = ["--log-level", "warning", "--no-access-log"]
        return [str(bin_dir / "granian"), target, "--interface", "asgi", *bind, *quiet]
    assert server == "daphne"
    return [str(bin_dir / "daphne"), "-b", "127.0.0.1", "-p", str(port), "-v", "2", target]


@dataclass
class Process:
    """A server subprocess serving one app of tests/support/interop_apps.py."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_answering(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}):\n{self.output()}")
            try:
                httpx.get(f"{self.base}/", timeout=1.0)  # any HTTP answer will do
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} did not answer in {TIMEOUT} s:\n{self.output()}")
                time.sleep(0.05)

    def stop(self) -> list[str]:
        """SIGTERM, a bounded wait for the exit; the lifespan messages the app sent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"{self.name} did not stop in {TIMEOUT} s:\n{self.output()}")
        lines = self.output().splitlines()
        return [line.removeprefix(LIFESPAN_MARK) for line in lines if LIFESPAN_MARK in line]


def _free_port() -> int:
    """A port free now (another process may take it before the server binds it: unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server_options() -> list[str]:
    """Options added to the server's command line (a test parametrizes this to set some)."""
    return []


@pytest.fixture
def server_process(
    server_name: str, app_name: str, server_options: list[str], tmp_path: Path
) -> Iterator[Process]:
    _require(app_name)
    for module in SERVER_REQUIRES[server_name]:
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[test]'")
    port = _free_port()
    env = {**os.environ, APP_ENV: app_name}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log = tmp_path / f"{server_name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*_command(server_name, port), *server_options],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,  # a process group of its own, with granian's worker
        )
    process = Process(server_name, proc, log, port)
    try:
        process.wait_until_answering()
        yield process
    finally:  # after a failure, or a worker left behind: nothing of it outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# uvicorn twice: with websockets (the default of uvicorn[standard]: its sans-I/O protocol)
# and with wsproto.
SUBPROCESS_SERVERS = ("uvicorn", "uvicorn-wsproto", "granian", "daphne")
SERVER_REQUIRES = {
    "uvicorn": ("uvicorn", "websockets"),
    "uvicorn-wsproto": ("uvicorn", "wsproto"),
    "granian": ("granian",),
    "daphne": ("daphne",),
}
SUBPROCESS_CELLS = [
    pytest.param(server, app, id=f"{server}-{app}", marks=_marks(server, app))
    for server in SUBPROCESS_SERVERS
    for app in APPS
]
# What each server sends the app: daphne implements no lifespan at all.
LIFESPAN = {"uvicorn": BOTH, "uvicorn-wsproto": BOTH, "granian": BOTH, "daphne": []}
# daphne's reaper of finished connections runs once a second; until it has run, a SIGTERM
# makes daphne hang (docs/interop.md, and the last test of this file): wait for it first.
DAPHNE_REAPER = 1.0


# The server runs its own event loop in its own process; only the client side (httpx) runs
# here, so these cells run once, under asyncio, not once per anyio backend.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("server_name", "app_name"), SUBPROCESS_CELLS)
async def test_server_process(
    anyio_backend: str,
    server_name: str,
    server_process: Process,
    connect: Connect,
    http: httpx.AsyncClient,
) -> None:
    await exercise(server_process.base, connect, http)
    if server_name == "daphne":
        await anyio.sleep(DAPHNE_REAPER + 0.2)
    assert server_process.stop() == LIFESPAN[server_name], server_process.output()


# Over HTTP both uvicorn cells are the same server (h11; the WebSocket library differs): once.
SSE_SUBPROCESS_CELLS = [
    pytest.param(server, app, id=f"{server}-{app}", marks=_marks(server, app))
    for server in ("uvicorn", "granian", "daphne")
    for app in APPS
]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("server_name", "app_name"), SSE_SUBPROCESS_CELLS)
async def test_server_process_sse(
    anyio_backend: str, server_process: Process, http: httpx.AsyncClient
) -> None:
    async def presence() -> tuple[int, int]:
        answer = (await http.get(f"{server_process.base}{PROBE}", params={"user": "alice"})).json()
        assert answer["module"] == asgi_events.__file__  # the server runs the code under test
        return answer["presence"], answer["total_connections"]

    await exercise_sse(server_process.base, http, presence)


# -- stopping the server with an event stream open -------------------------------------

# An event stream never ends by itself: a server that waits for the responses in flight before
# it stops must, at some point, cancel them (then the stream says why it ends).
SHUTDOWN_EVENT = {"event": "asgi_events.close", "data": {"code": 1001, "reason": "Server shutdown"}}
STOP_BOUND = 4.0  # seconds from the stop to the end of the stream (each server cancels in 1 s)


async def test_hypercorn_stop_ends_open_streams(serve: ServeFn) -> None:
    """hypercorn cancels what still runs after its ``graceful_timeout`` (1 s here)."""
    app, hub = build("bare")
    server = await serve(app)
    async with open_events(f"{server.url}/ws", token="tok-alice") as s:
        await s.until_ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.stop)
            with anyio.fail_after(STOP_BOUND):
                assert await s.end() == SHUTDOWN_EVENT
    assert hub.stats()["total_connections"] == 0


GRANIAN_WAITS = (
    "granian 2.8.9 stops gracefully by waiting for every response in flight, and never cancels "
    "the application nor sends it http.disconnect: an event stream keeps it running until its "
    "client leaves; --workers-kill-timeout kills the worker instead (no close event, no "
    "lifespan shutdown)"
)
STOP_CELLS = [
    # uvicorn waits for the responses in flight for ever by default: with a bound, it cancels
    # them, then runs the lifespan shutdown.
    pytest.param("uvicorn", "bare", ["--timeout-graceful-shutdown", "1"], id="uvicorn"),
    pytest.param(
        "granian",
        "bare",
        [],
        id="granian",
        marks=pytest.mark.xfail(strict=True, raises=TimeoutError, reason=GRANIAN_WAITS),
    ),
    pytest.param("daphne", "bare", [], id="daphne"),  # cancels its applications at once
]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("server_name", "app_name", "server_options"), STOP_CELLS)
async def test_server_process_stop_ends_open_streams(
    anyio_backend: str, server_name: str, server_process: Process
) -> None:
    async with open_events(f"{server_process.base}/ws", token="tok-alice") as s:
        await s.until_ready()
        if server_name == "daphne":
            await anyio.sleep(DAPHNE_REAPER + 0.2)
        server_process.proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(STOP_BOUND):
            assert await s.end() == SHUTDOWN_EVENT
    assert server_process.stop() == LIFESPAN[server_name], server_process.output()


DAPHNE_SIGTERM_BUG = (
    "daphne 4.2.3: on SIGTERM, Server.kill_all_applications raises KeyError "
    "'application_instance' for a connection that has no application instance at that moment "
    "(a request not fully received yet; for up to 1 s, the request a WebSocket was upgraded "
    "from), so the running applications are never cancelled, and the process then waits "
    "forever for the AnyIO worker thread that the open socket's sync verify_token ran in"
)


UPGRADE = (
    b"GET /ws?token=tok-alice HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.xfail(strict=True, raises=subprocess.TimeoutExpired, reason=DAPHNE_SIGTERM_BUG)
@pytest.mark.parametrize(("server_name", "app_name"), [("daphne", "bare")])
def test_daphne_stops_on_sigterm_with_a_request_pending(server_process: Process) -> None:
    """daphne should exit on SIGTERM with a WebSocket open, also while another client is
    half-way through sending a request (its headers, not its body)."""
    address = ("127.0.0.1", server_process.port)
    with (
        socket.create_connection(address, timeout=TIMEOUT) as pending,
        socket.create_connection(address, timeout=TIMEOUT) as ws,
    ):
        pending.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        ws.sendall(UPGRADE)
        assert ws.recv(4096).startswith(b"HTTP/1.1 101 ")  # accepted: verify_token has run
        server_process.proc.send_signal(signal.SIGTERM)
        server_process.proc.wait(3)
