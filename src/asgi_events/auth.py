"""Credentials: what a handshake asks for (token, resume point, subprotocol, origin), and the
adapter that runs the application's ``verify_token``."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import anyio.to_thread

from .protocol import SUBPROTOCOLS, TOKEN_PROTOCOL_PREFIX, ResumePoint
from .types import Principal, Scope, VerifyToken

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


@dataclass(frozen=True, slots=True)
class Handshake:
    """What one WebSocket handshake asks for; parsed without I/O."""

    token: str | None
    last_event_id: str | None
    last_event_ts: str | None
    subprotocol: str | None  # the subprotocol to accept, if the client offered one of ours
    origin: str | None  # the Origin header, if any

    @property
    def resume(self) -> ResumePoint | None:
        """The resume point asked for, parsed (``lastEventId`` wins over ``lastEventTs``)."""
        return ResumePoint.parse(self.last_event_id, self.last_event_ts)


def parse_handshake(scope: Scope) -> Handshake:
    """Read the token, the resume point, the subprotocol and the Origin of a handshake.

    The token is the first of: the ``token`` query parameter, an ``Authorization: Bearer``
    header, a ``asgi-events.token.<token>`` subprotocol. Empty values count as absent.
    """
    query: dict[str, str] = {}
    raw = scope.get("query_string", b"")
    for key, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
        query.setdefault(key, value)  # the first of repeated parameters wins
    offered = scope.get("subprotocols") or ()
    headers = _headers(scope)
    return Handshake(
        token=query.get("token") or _bearer(headers) or _token_protocol(offered),
        last_event_id=query.get("lastEventId") or None,
        last_event_ts=query.get("lastEventTs") or None,
        subprotocol=next((p for p in SUBPROTOCOLS if p in offered), None),
        origin=headers.get("origin"),
    )


def _headers(scope: Scope) -> dict[str, str]:
    """The first value of each header, by lower-case name."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _bearer(headers: dict[str, str]) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def _token_protocol(offered: object) -> str | None:
    for protocol in offered if isinstance(offered, (list, tuple)) else ():
        if isinstance(protocol, str) and protocol.startswith(TOKEN_PROTOCOL_PREFIX):
            return protocol[len(TOKEN_PROTOCOL_PREFIX) :] or None
    return None


def normalize_origin(origin: str) -> str | None:
    """``scheme://host:port`` in lower case with the port made explicit; None if malformed."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or port is None:
        return None
    return f"{parts.scheme.lower()}://{parts.hostname.lower()}:{port}"


async def verify(verify_token: VerifyToken, token: str, limit: float) -> Principal | None:
    """Run the user's ``verify_token`` within ``limit`` seconds; a sync one runs in a thread.

    :raises TimeoutError: it did not answer in time.
    :raises TypeError: it returned neither a user id (str), a ``Principal``, nor None.
    """
    result: object
    with anyio.fail_after(limit):
        if _is_async(verify_token):
            result = await cast("Awaitable[object]", verify_token(token))
        else:
            result = await anyio.to_thread.run_sync(verify_token, token, abandon_on_cancel=True)
            if inspect.isawaitable(result):
                result = await result
    if result is None or result == "":
        return None
    if isinstance(result, str):
        return Principal(result)
    if isinstance(result, Principal) and result.user_id:
        return result
    raise TypeError(f"verify_token must return a user id, a Principal or None, not {result!r}")


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )
