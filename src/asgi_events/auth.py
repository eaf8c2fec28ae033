"""Credentials: what a handshake asks for (token, resume point, subprotocol, origin), and the
``Authenticator`` that runs the application's ``verify_token`` or ``authenticate``."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import anyio.to_thread

from . import protocol
from .protocol import SUBPROTOCOLS, TOKEN_PROTOCOL_PREFIX, Close, ResumePoint
from .request import Authenticate, HandshakeRequest
from .types import Principal, Scope, VerifyToken

logger = logging.getLogger("asgi_events")

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
    for name in offered if isinstance(offered, (list, tuple)) else ():
        if isinstance(name, str) and name.startswith(TOKEN_PROTOCOL_PREFIX):
            return name[len(TOKEN_PROTOCOL_PREFIX) :] or None
    return None


def parse_origins(allowed: Iterable[str]) -> frozenset[str]:
    """``allowed_origins`` normalised (``normalize_origin``); a single string is one origin.

    :raises ValueError: one is not an origin.
    """
    origins = set()
    for origin in [allowed] if isinstance(allowed, str) else allowed:
        normal = normalize_origin(origin)
        if normal is None:
            raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
        origins.add(normal)
    return frozenset(origins)


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


class Authenticator:
    """The application's check of a connection request: exactly one of ``verify_token`` (given
    the token; a request without one is refused before it is called) and ``authenticate``
    (given the whole ``HandshakeRequest``: cookies, headers, address).

    :raises TypeError: neither or both are given.
    """

    def __init__(
        self, verify_token: VerifyToken | None = None, authenticate: Authenticate | None = None
    ) -> None:
        if (verify_token is None) == (authenticate is None):
            raise TypeError("give EventHub exactly one of verify_token and authenticate")
        self.request_aware = authenticate is not None
        self.reads_cookies = bool(getattr(authenticate, "reads_cookies", False))
        self._check: Callable[[Any], object] = cast(
            "Callable[[Any], object]", verify_token or authenticate
        )
        self._name = "verify_token" if verify_token is not None else "authenticate"

    async def __call__(self, request: HandshakeRequest, limit: float) -> Principal | Close:
        """Who ``request`` is from, or why it is refused, within ``limit`` seconds; never
        raises for the check's sake."""
        if not self.request_aware and not request.token:
            return protocol.MISSING_TOKEN
        argument = request if self.request_aware else request.token
        try:
            principal = await verify(self._check, argument, limit, self._name)
        except TimeoutError:
            logger.warning("%s did not answer within %.1f s", self._name, limit)
            return protocol.AUTH_TIMEOUT
        except Exception as exc:
            # The exception text may quote the token or a cookie, so log only its type.
            logger.error("%s raised %s", self._name, type(exc).__name__)
            return protocol.AUTH_ERROR
        if principal is None:
            return protocol.AUTH_FAILED
        if principal.expires_at is not None and principal.expires_at <= time.time():
            return protocol.TOKEN_EXPIRED
        return principal


async def verify(
    check: Callable[[Any], object], argument: object, limit: float, name: str = "verify_token"
) -> Principal | None:
    """Run ``check(argument)`` within ``limit`` seconds; a sync one runs in a thread.

    :raises TimeoutError: it did not answer in time.
    :raises TypeError: it returned neither a user id (str), a ``Principal``, nor None.
    """
    result: object
    with anyio.fail_after(limit):
        if _is_async(check):
            result = await cast("Awaitable[object]", check(argument))
        else:
            result = await anyio.to_thread.run_sync(check, argument, abandon_on_cancel=True)
            if inspect.isawaitable(result):
                result = await result
    if result is None or result == "":
        return None
    if isinstance(result, str):
        return Principal(result)
    if isinstance(result, Principal) and result.user_id:
        return result
    raise TypeError(f"{name} must return a user id, a Principal or None, not {type(result)}")


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )
