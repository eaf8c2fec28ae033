"""A real hypercorn server on an ephemeral port, and httpx-ws client helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import anyio
import pytest
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect
from hypercorn.config import Config

from asgi_events import EventHub
from asgi_events.types import ASGIApp, Message, Receive, Scope, Send

TIMEOUT = 10.0  # bound on any single wait in a test
QUIET = 0.2  # the one allowed short window: asserting that nothing arrives


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


async def run_server(backend: str, app: ASGIApp, cfg: Config, server: Server) -> None:
    try:
        if backend == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, cfg, shutdown_trigger=server.trigger.wait)  # type: ignore[arg-type]
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            await asyncio_serve(app, cfg, shutdown_trigger=server.trigger.wait)  # type: ignore[arg-type]
    finally:
        server.stopped.set()


def signal_startup(app: ASGIApp, started: anyio.Event) -> ASGIApp:
    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                started.set()

        await app(scope, receive, send_wrapper if scope["type"] == "lifespan" else send)

    return wrapper


# -- clients ----------------------------------------------------------------------------

Connect = Callable[..., AbstractAsyncContextManager[AsyncWebSocketSession]]


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
