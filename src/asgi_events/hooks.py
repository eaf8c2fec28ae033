"""The application's connection hooks: ``ConnectionInfo``, and how hooks are called.

A hook that raises is logged and counted (``stats()["hook_errors"]``); it never closes the
stream it was called for, nor breaks the hub. While a hook runs, ``current_connection()``
returns the connection it runs for (so does it inside ``on_client_message``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import anyio

from .stats import Counters
from .types import ClientMessageHook, Principal

logger = logging.getLogger("asgi_events")

HOOK_TIMEOUT = 5.0  # seconds on_disconnect may take once its connection is being cancelled

Transport = Literal["websocket", "sse"]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """One connection, as the hooks see it.

    :param user_id: whose connection it is.
    :param connection_id: unique among every connection of every node (random).
    :param transport: ``"websocket"`` (or ``"sse"``).
    :param subprotocol: the WebSocket subprotocol accepted, if any.
    :param client: the peer's ``(host, port)``, if the server knows it.
    :param connected_at: when it was admitted (UTC).
    :param principal: what authentication returned (with its ``info``).
    """

    user_id: str
    connection_id: str
    transport: Transport
    subprotocol: str | None
    client: tuple[str, int] | None
    connected_at: datetime
    principal: Principal


_current: ContextVar[ConnectionInfo | None] = ContextVar("asgi_events_connection", default=None)


def current_connection() -> ConnectionInfo | None:
    """The connection whose hook (or ``on_client_message``) is running; None elsewhere."""
    return _current.get()


async def call_hook(
    hook: Callable[..., Awaitable[None] | None],
    info: ConnectionInfo,
    counters: Counters,
    *args: Any,
) -> None:
    """Run ``hook(*args)`` (sync or async) for ``info``'s connection; log and count a raise."""
    token = _current.set(info)
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        counters.hook_errors += 1
        name = getattr(hook, "__name__", "a hook")
        logger.exception("%s raised for connection %s", name, info.connection_id)
    finally:
        _current.reset(token)


ConnectHook = Callable[[ConnectionInfo], Awaitable[None] | None]
"""``(info) -> None``, sync or async: a connection is open (``EventHub(on_connect=...)``)."""

DisconnectHook = Callable[[ConnectionInfo, int], Awaitable[None] | None]
"""``(info, code) -> None``, sync or async: a connection ended with ``code``."""


@dataclass(frozen=True, slots=True)
class Hooks:
    """The application's hooks (see ``EventHub``), and how each is called."""

    on_connect: ConnectHook | None = None
    on_disconnect: DisconnectHook | None = None
    on_client_message: ClientMessageHook | None = None

    async def connected(self, info: ConnectionInfo, counters: Counters) -> None:
        if self.on_connect is not None:
            await call_hook(self.on_connect, info, counters, info)

    async def disconnected(self, info: ConnectionInfo, code: int, counters: Counters) -> None:
        """Run ``on_disconnect`` within ``HOOK_TIMEOUT``, even while the connection's task is
        being cancelled."""
        if self.on_disconnect is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(HOOK_TIMEOUT):
                await call_hook(self.on_disconnect, info, counters, info, code)

    async def message(
        self, info: ConnectionInfo, message: dict[str, Any], counters: Counters
    ) -> None:
        if self.on_client_message is not None:
            await call_hook(self.on_client_message, info, counters, info.user_id, message)
