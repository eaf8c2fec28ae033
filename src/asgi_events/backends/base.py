"""The backend interface: what the hub needs from wherever events are buffered and fanned out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from anyio.abc import TaskGroup

from ..auth import Handshake
from ..buffer import GapReason
from ..types import Message

Deliver = Callable[[str | None, Message], Awaitable[None]]
"""``(user_id or None for everyone, message)``: fan one message out to this node's sockets."""

Lost = Callable[[], Awaitable[None]]
"""Called when delivery was interrupted: events may have been missed, so sockets must go."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What a connecting socket gets before it goes live.

    ``position`` is the id up to which the client is current once it has ``frames``; ``key`` is
    its order key: live messages held while the replay was read with a key up to it are dropped
    (they are in the replay, or before the resume point).
    """

    frames: list[str]
    position: str
    key: Any
    recovered: bool = True
    reason: GapReason | None = None
    oldest: str | None = None


class Backend(Protocol):
    """Buffers events for replay and delivers every event to every node's ``deliver``."""

    healthy: bool
    """False while events cannot be delivered (new sockets are refused with 1012)."""

    def bind(
        self, deliver: Deliver, lost: Lost, *, size: int, max_age: float, max_users: int | None
    ) -> None:
        """Called once by the hub: where to deliver, whom to tell of a loss, buffer bounds."""

    async def start(self, task_group: TaskGroup) -> None:
        """Start background work (subscriptions, expiry) in the hub's task group."""

    async def stop(self) -> None:
        """Stop delivering and release resources."""

    async def publish(self, user_id: str, fields: dict[str, Any], transient: bool) -> None:
        """Buffer (unless ``transient``) and deliver an event of one user, on every node.

        :raises BackendUnavailableError: the event could not be published.
        """

    async def publish_to_all(self, text: str) -> None:
        """Deliver an encoded event to every socket on every node (never buffered).

        :raises BackendUnavailableError: the event could not be published.
        """

    async def replay(self, user_id: str, handshake: Handshake) -> Replay:
        """What a socket connecting with ``handshake`` gets before live events.

        :raises BackendUnavailableError: the replay could not be read.
        """

    async def clear(self) -> None:
        """Forget what this node buffered (``hub.shutdown()``); a shared store is left alone."""

    def stats(self) -> dict[str, Any]:
        """Gauges for ``hub.stats()``."""
