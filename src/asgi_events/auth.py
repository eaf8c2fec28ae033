"""The handshake: what a WebSocket scope asks for (token, resume point, subprotocol), and auth."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qsl

import anyio.to_thread

from .types import Scope, VerifyToken

SUBPROTOCOL = "asgi-events.v1"


@dataclass(frozen=True, slots=True)
class Handshake:
    """What one WebSocket handshake asks for; parsed without I/O."""

    token: str | None
    last_event_id: str | None
    last_event_ts: str | None
    subprotocol: str | None  # the subprotocol to accept, if the client offered ours


def parse_handshake(scope: Scope) -> Handshake:
    """Read the token (``?token=``, else ``Authorization: Bearer``), resume point, subprotocol."""
    query: dict[str, str] = {}
    raw = scope.get("query_string", b"")
    for key, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
        query.setdefault(key, value)  # the first of repeated parameters wins
    token = query.get("token") or _bearer(scope)
    offered = scope.get("subprotocols") or ()
    return Handshake(
        token=token or None,
        last_event_id=query.get("lastEventId") or None,
        last_event_ts=query.get("lastEventTs") or None,
        subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None,
    )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip() or None
            return None
    return None


async def verify(verify_token: VerifyToken, token: str, limit: float) -> str | None:
    """Run the user's ``verify_token`` within ``limit`` seconds; a sync one runs in a thread.

    :raises TimeoutError: it did not answer in time.
    :raises TypeError: it returned something other than a string or None.
    """
    result: object
    with anyio.fail_after(limit):
        if _is_async(verify_token):
            result = await cast("Awaitable[object]", verify_token(token))
        else:
            result = await anyio.to_thread.run_sync(verify_token, token, abandon_on_cancel=True)
            if inspect.isawaitable(result):
                result = await result
    if result is not None and not isinstance(result, str):
        raise TypeError(f"verify_token must return a user id (str) or None, not {type(result)}")
    return result or None


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )
