"""What an ``authenticate`` callable sees of a connection request: ``HandshakeRequest``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import cached_property
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, unquote

from .types import Principal, Scope

logger = logging.getLogger("asgi_events")

COOKIE_WARNING = (
    "authenticate read cookies but allowed_origins is not set: any web site can open a "
    "connection with this user's cookies (cross-site WebSocket hijacking). Set "
    "EventsMiddleware(allowed_origins=[...]) to the origins of your pages."
)

_warned = False  # the warning is logged once per process, not per request


def warn_about_cookies() -> None:
    """Log ``COOKIE_WARNING`` as an error, once per process."""
    global _warned
    if not _warned:
        _warned = True
        logger.error(COOKIE_WARNING)


def reset_cookie_warning() -> None:
    """Log ``COOKIE_WARNING`` again at the next cookie read without an Origin check (it is
    logged once per process); for tests."""
    global _warned
    _warned = False


class HandshakeRequest:
    """One connection request (a WebSocket handshake, an SSE request), read-only and parsed
    on first use. Headers, cookies and query parameters keep the first of repeated names.

    :param scope: the raw ASGI scope.
    :param token: what ``verify_token`` would receive (``?token=``, ``Authorization:
        Bearer``, or the token subprotocol), or None.
    :param origin_checked: whether the request's ``Origin`` was checked against
        ``allowed_origins``; reading ``cookies`` when it was not logs ``COOKIE_WARNING``.
    """

    __slots__ = ("__dict__", "_origin_checked", "scope", "token")

    def __init__(self, scope: Scope, token: str | None, *, origin_checked: bool = True) -> None:
        self.scope = scope
        self.token = token
        self._origin_checked = origin_checked

    @cached_property
    def headers(self) -> Mapping[str, str]:
        """Header values by lower-case name (latin-1, as HTTP has it)."""
        headers: dict[str, str] = {}
        for name, value in self.scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        return MappingProxyType(headers)

    @cached_property
    def cookies(self) -> Mapping[str, str]:
        """The ``Cookie`` header's cookies by name (values unquoted as browsers send them)."""
        if not self._origin_checked:
            warn_about_cookies()
        cookies: dict[str, str] = {}
        for chunk in self.headers.get("cookie", "").split(";"):
            name, eq, value = chunk.partition("=")
            name, value = name.strip(), value.strip()
            if eq and name:
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                cookies.setdefault(name, unquote(value))
        return MappingProxyType(cookies)

    @cached_property
    def query(self) -> Mapping[str, str]:
        """The query string's parameters by name."""
        query: dict[str, str] = {}
        raw: bytes = self.scope.get("query_string", b"")
        for key, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
            query.setdefault(key, value)
        return MappingProxyType(query)

    @property
    def client(self) -> tuple[str, int] | None:
        """The peer's ``(host, port)``, if the server knows it."""
        client: Any = self.scope.get("client")
        return (str(client[0]), int(client[1])) if client else None

    @property
    def path(self) -> str:
        """The request's path."""
        return str(self.scope.get("path", ""))

    def __repr__(self) -> str:  # never the token or a cookie: reprs end up in logs
        return f"HandshakeRequest(path={self.path!r}, client={self.client!r})"


Authenticate = Callable[
    [HandshakeRequest],
    str | Principal | Awaitable[str | Principal | None] | Awaitable[str | None] | None,
]
"""``(request) -> user id | Principal | None``, sync (run in a worker thread) or async: the
request-aware alternative to ``VerifyToken`` (cookies, headers, the address)."""
