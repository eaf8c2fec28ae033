"""ASGI aliases and the callable types of the public API (no runtime dependency on asgiref)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Event = Mapping[str, Any]
"""An event to publish: ``type`` (str), ``payload`` (any JSON value), optional ``timestamp``."""

VerifyToken = Callable[[str], str | Awaitable[str | None] | None]
"""``(token) -> user id | None``, sync (run in a worker thread) or async."""

ClientMessageHook = Callable[[str, dict[str, Any]], Awaitable[None] | None]
"""``(user_id, message) -> None``, sync or async, called for each JSON object a client sends."""

Clock = Callable[[], float]
"""A monotonic clock in seconds, injectable for tests."""
