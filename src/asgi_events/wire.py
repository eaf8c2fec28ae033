"""What the core asks of a transport's messages: the ``Wire`` that frames them, and the two
classes that mark what a message may cost a client (the outbox's policy reads them).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from .types import Message


class DurableMessage(dict[str, Any]):
    """A transport's message for a buffered event: replayable by id; ``key`` orders it among
    its user's events."""

    __slots__ = ("key",)
    key: Any


class TransientMessage(dict[str, Any]):
    """A transport's message for a transient event: live only, shed first under pressure."""


class Wire(Protocol):
    """How one transport frames what the core sends; one instance serves all its streams, and
    a message it builds is shared by every stream it goes to (built once per broadcast)."""

    def event(self, text: str, event_id: str | None, key: Any, transient: bool) -> Message:
        """The message for an encoded event: a ``DurableMessage`` (with ``key``) when ``key``
        is given (a live buffered event), a ``TransientMessage`` when ``transient``, else a
        plain one (``broadcast_to_all``, or a replayed event: ``event_id`` without ``key``)."""
        ...

    closing_handshake: bool
    """Whether the peer answers a close (WebSocket): then the stream ends when it does; else
    (Server-Sent Events) it ends as soon as its close is out."""

    def control(self, kind: str, text: str, event_id: str | None = None) -> Message:
        """The message for a control message of type ``kind`` (encoded as ``text``), with the
        id a client may resume from after it, if any (the ready message's position)."""
        ...

    def close(self, code: int, reason: str) -> Message:
        """The message that ends the stream with a close code and reason."""
        ...

    def batch(self, queue: deque[Message], limit: int) -> tuple[Message, int, int]:
        """Take what leads ``queue`` into one message, up to about ``limit`` characters (one
        message at least; one that cannot share a batch, like a pong, goes alone). Returns the
        message, how many it took, and how many of those were ``DurableMessage``."""
        ...
