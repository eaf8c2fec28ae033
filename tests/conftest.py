"""Fixtures: both anyio backends, a real hypercorn server on an ephemeral port, WS clients."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import anyio
import httpx
import pytest
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from hypercorn.config import Config

from asgi_events import EventHub, EventsMiddleware
from asgi_events.types import ASGIApp, Message, Receive, Scope, Send

from .redis_server import RedisServer, running_redis

TIMEOUT = 10.0  # bound on any single wait in a test
QUIET = 0.2  # the one allowed short window: asserting that nothing arrives


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def users(token: str) -> str | None:
    """The tests' verify_token: "tok-<user>" is <user>; anything else is refused."""
    return token.removeprefix("tok-") if token.startswith("tok-") else None


async def http_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A bare inner app: answers HTTP with 200 "inner", supports lifespan."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    elif scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})
    else:
        await send({"type": "websocket.close", "code": 1000})


@dataclass
class Server:
    """A running hypercorn server; ``stop()`` triggers its graceful shutdown."""

    port: int
    hub: EventHub | None
    started: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    trigger: anyio.Event = field(default_factory=anyio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str = "/ws", **params: str) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"{self.url}{path}{query}"

    async def stop(self) -> None:
        self.trigger.set()
        with anyio.fail_after(TIMEOUT):
            await self.stopped.wait()


class ServeFn(Protocol):
    async def __call__(
        self, app: ASGIApp | None = None, *, hub: EventHub | None = None, **config: Any
    ) -> Server: ...


@pytest.fixture
async def serve(anyio_backend: str) -> AsyncIterator[ServeFn]:
    """Start hypercorn (the asyncio or trio worker, as the test's backend) on 127.0.0.1:0.

    With no ``app``, serves ``EventsMiddleware(http_app, hub=hub)``. Returns once lifespan
    startup is complete; every server is stopped at the end of the test.
    """
    servers: list[Server] = []
    async with anyio.create_task_group() as tg:

        async def start(
            app: ASGIApp | None = None, *, hub: EventHub | None = None, **config: Any
        ) -> Server:
            if app is None:
                hub = hub or EventHub(users)
                app = EventsMiddleware(http_app, hub=hub)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
            server = Server(sock.getsockname()[1], hub)
            cfg = Config()
            cfg.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) it from here
            cfg.graceful_timeout = config.pop("graceful_timeout", 1.0)
            cfg.accesslog = None
            cfg.errorlog = None
            for key, value in config.items():
                setattr(cfg, key, value)
            tg.start_soon(_run, anyio_backend, _signal_startup(app, server.started), cfg, server)
            with anyio.fail_after(TIMEOUT):
                await server.started.wait()
            servers.append(server)
            return server

        yield start
        for server in servers:
            await server.stop()


async def _run(backend: str, app: ASGIApp, cfg: Config, server: Server) -> None:
    try:
        if backend == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, cfg, shutdown_trigger=server.trigger.wait)  # type: ignore[arg-type]
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            await asyncio_serve(app, cfg, shutdown_trigger=server.trigger.wait)  # type: ignore[arg-type]
    finally:
        server.stopped.set()


def _signal_startup(app: ASGIApp, started: anyio.Event) -> ASGIApp:
    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                started.set()

        await app(scope, receive, send_wrapper if scope["type"] == "lifespan" else send)

    return wrapper


# -- clients ----------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        yield client


Connect = Callable[..., AbstractAsyncContextManager[AsyncWebSocketSession]]


@pytest.fixture
def connect(http: httpx.AsyncClient) -> Connect:
    """``connect(url, subprotocols=None, headers=None)``: an httpx-ws session (no keepalive)."""

    @asynccontextmanager
    async def _connect(
        url: str, subprotocols: list[str] | None = None, headers: dict[str, str] | None = None
    ) -> AsyncIterator[AsyncWebSocketSession]:
        async with aconnect_ws(
            url,
            http,
            subprotocols=subprotocols,
            headers=headers or {},
            keepalive_ping_interval_seconds=None,
            max_message_size_bytes=4 * 1024 * 1024,
        ) as ws:
            yield ws

    return _connect


async def recv(ws: AsyncWebSocketSession) -> Any:
    """The next frame, parsed as JSON, within TIMEOUT."""
    return json.loads(await ws.receive_text(timeout=TIMEOUT))


async def recv_n(ws: AsyncWebSocketSession, n: int) -> list[Any]:
    return [await recv(ws) for _ in range(n)]


async def close_code(ws: AsyncWebSocketSession) -> tuple[int, str]:
    """Read until the server closes; the close code and reason."""
    with anyio.fail_after(TIMEOUT):
        while True:
            try:
                await ws.receive()
            except WebSocketDisconnect as exc:
                return exc.code, exc.reason


async def record_close(connect: Connect, url: str, codes: list[tuple[int, str]]) -> None:
    """Connect and append the close code and reason the server ends the socket with."""
    async with connect(url) as ws:
        codes.append(await close_code(ws))


async def assert_silent(ws: AsyncWebSocketSession) -> None:
    """Nothing arrives within the short QUIET window."""
    with pytest.raises(TimeoutError):
        await ws.receive(timeout=QUIET)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Every coroutine test runs under anyio, on each backend of ``anyio_backend``: marked here,
    before anyio's own hook (it parametrizes only tests marked by then)."""
    import inspect

    if isinstance(collector, pytest.Module | pytest.Class) and collector.istestfunction(obj, name):
        if inspect.iscoroutinefunction(obj):
            pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by a key prefix of their own."""
    with running_redis() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and restart."""
    with running_redis() as server:
        yield server
