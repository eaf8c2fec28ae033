"""ASGI aliases and the callable types of the public API (no runtime dependency on asgiref)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Event = Mapping[str, Any]
"""An event to publish: ``type`` (str), ``payload`` (any JSON value), optional ``timestamp``."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token belongs to and, optionally, until when it is valid.

    :param user_id: the user the socket belongs to.
    :param expires_at: UNIX time (seconds, like a JWT's ``exp``) at which the socket is closed
        with 4001 "Token expired"; None for never.
    :param info: free metadata of the application's (a JWT's claims, a session's roles), shown
        to the hooks in ``ConnectionInfo.principal``; read-only once given.
    """

    user_id: str
    expires_at: float | None = None
    info: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if self.expires_at is not None and not math.isfinite(self.expires_at):
            raise ValueError("expires_at must be a finite UNIX time, or None")
        if not isinstance(self.info, MappingProxyType):
            object.__setattr__(self, "info", MappingProxyType(dict(self.info)))


VerifyToken = Callable[
    [str], str | Principal | Awaitable[str | Principal | None] | Awaitable[str | None] | None
]
"""``(token) -> user id | Principal | None``, sync (run in a worker thread) or async."""

ClientMessageHook = Callable[[str, dict[str, Any]], Awaitable[None] | None]
"""``(user_id, message) -> None``, sync or async, called for each JSON object a client sends."""

Clock = Callable[[], float]
"""A monotonic clock in seconds, injectable for tests."""
