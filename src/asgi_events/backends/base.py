"""The backend contract: what the hub needs from wherever events are buffered and fanned out.

A backend deals in events, ids and positions only; it knows nothing of handshakes, transports
or the messages they send. The contract, which ``tests/backends/`` checks for every backend:

- **Ids.** A buffered event's id is ``<epoch>.<offset>`` (``protocol.make_id``). Within an
  epoch, ids are unique and strictly increasing per user, in the order events are delivered.
  The epoch changes whenever the buffered data may have been lost (a new process for memory, a
  lost Redis data set), so that an id of another epoch is never misread. ``key`` is an id's
  order key (any comparable value): within a user, a later event has a greater key.
- **Following.** A node receives the events of the users it follows: ``follow(user_id)``
  returns once every event of the user published from then on reaches this node's
  ``deliver``. The hub follows a user as each of its streams joins, before the stream's replay
  is read (so that an event is in the replay or arrives live, or both: the hub drops the
  copy). A backend may stop delivering a user's events once this node's count of its streams
  (``present``) has been 0 for a while (it documents how long), and may deliver more than the
  followed users' events (memory delivers every event; the hub ignores those with no stream).
  ``broadcast_to_all`` reaches every node.
- **Order.** Every node receives each followed user's buffered events in id order, exactly once
  while it is connected to the backend.
- **Position.** ``replay(...).position`` is the id of the newest event assigned to that user,
  or the epoch's origin id (``<epoch>.0`` in memory, ``<epoch>.0-0`` on Redis) before there is
  one; ``key`` is its order key. A client that has everything up to ``position`` is current.
- **Replay.** For a resume point, ``events`` are the buffered events after it, oldest first,
  as ``Published`` values (text with the id); transient events never. ``recovered`` is False,
  with ``reason`` and ``oldest`` (the oldest id a client could resume from completely now),
  when the events after the point are not all there:

  ============ ======================================== ===================================
  reason       when                                     ``events``
  ============ ======================================== ===================================
  ``evicted``  the size bound (or the bound on buffered the events still buffered after it
               users) dropped events after the point
  ``expired``  the age bound dropped them               the events still buffered after it
  ``epoch``    the id is of another epoch               every event buffered now
  ``unknown``  an offset that is malformed or was never none
               issued, or ``ResumePoint.invalid``
  ============ ======================================== ===================================

  With ``since`` (a timestamp), ``events`` are the buffered events whose own timestamp is
  strictly later; ``recovered`` is False if a dropped event was later too.
- **Latest values.** An event published with a ``latest`` slot is transient (live only, no id)
  but the backend keeps it as the user's latest value of that slot, replacing the previous
  one, for ``max_age`` seconds at most; ``replay(..., latest=True).latest`` returns the values
  kept, oldest first (by when they were published), as they were delivered.
- **Idempotency.** ``publish(..., idempotency_key=key)`` publishes at most once per user and
  key within ``max_age`` seconds of the first call that did: a later call with the same user
  and key (whatever its event) returns what that first call returned (its id, or None if it was
  transient) and neither buffers nor delivers anything. The check and the publish are one
  atomic step, also across nodes: of calls racing with one key, exactly one publishes. The key
  is recorded in that same step, so a call that failed but published all the same (its reply
  lost) has recorded it too, and a retry returns its id. The backend documents how many keys
  it keeps; a key it had to drop publishes again. The hub checks keys before they reach a
  backend (``idempotency.check_key``: a non-empty str of at most 200 characters).
- **Disconnect.** ``disconnect(user_id, code, reason)`` reaches every node's bound
  ``disconnect`` callback (this node's included), once, whether or not it follows the user (a
  stream of the user may be being admitted there), and in order with the user's events on
  the nodes that follow it: events published before it are delivered before it.
- **Presence.** The hub tells its backend how many streams of a user this node holds
  (``present``, on every change); ``presence`` sums them over the live nodes. A node that
  stops without saying goodbye stops counting within a bound the backend documents.
- **Loss.** When delivery may have been interrupted (a lost subscription), the backend sets
  ``healthy`` to False and awaits ``lost(None)``: the hub closes every stream with 1012 so
  that clients resume. While unhealthy, new streams are refused. It recovers by itself. A
  backend whose delivery is split (a Redis Cluster's shards) may lose a part only: it awaits
  ``lost(affected)`` with a test of the users concerned, stays ``healthy``, and refuses the
  new streams of those users from ``follow`` until that part is back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from anyio.abc import TaskGroup

from ..protocol import GapReason, ResumePoint


class Published(NamedTuple):
    """One event as a backend hands it to this node's streams."""

    user_id: str | None
    """Whose streams get it; None for every stream (``broadcast_to_all``)."""
    text: str
    """The encoded event as clients receive it (``id`` included)."""
    id: str | None = None
    """Its id, for buffered events only."""
    key: Any = None
    """Its order key among the user's events, for buffered events only."""

    @property
    def transient(self) -> bool:
        """A user's event delivered live only (never replayed)."""
        return self.id is None and self.user_id is not None


class Deliver(Protocol):
    """Fan one event out to this node's streams: its user's, or for ``broadcast_to_all``
    every stream (those of the users ``only`` is true of, if given: a backend whose delivery
    is split in parts delivers each part's copy to the streams of that part's users)."""

    async def __call__(self, event: Published, only: Callable[[str], bool] | None = None) -> None:
        """Queue ``event`` for the streams it is for."""


Lost = Callable[[Callable[[str], bool] | None], Awaitable[None]]
"""Called when delivery was interrupted: events may have been missed, so streams must go:
those of the users for whom the callable it is given is true, or every one (None)."""

Disconnect = Callable[[str, int, str], Awaitable[None]]
"""``(user_id, code, reason)``: close every stream of the user on this node."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What a connecting stream gets before it goes live (see the module for the contract)."""

    events: list[Published]
    position: str
    key: Any
    recovered: bool = True
    reason: GapReason | None = None
    oldest: str | None = None
    latest: list[Published] = field(default_factory=list)
    """The user's latest values, oldest first (only when asked for: ``replay(latest=True)``)."""

    def ready_payload(self, resuming: bool) -> dict[str, Any]:
        """The ready message's payload for a stream that asked to resume, or not."""
        recovered = self.recovered or not resuming
        payload: dict[str, Any] = {
            "position": self.position,
            "recovered": recovered,
            "replayed": len(self.events) if resuming else 0,
        }
        if not recovered:
            payload["reason"], payload["oldest"] = self.reason, self.oldest
        return payload


class Backend(Protocol):
    """Buffers events for replay and delivers each event to the ``deliver`` of every node that
    follows its user (``broadcast_to_all``: of every node)."""

    healthy: bool
    """False while events cannot be delivered (new streams are refused with 1012)."""

    def bind(
        self,
        deliver: Deliver,
        lost: Lost,
        *,
        disconnect: Disconnect,
        size: int,
        max_age: float,
        max_users: int | None,
    ) -> None:
        """Called once by the hub: where to deliver, whom to tell of a loss and of a
        disconnect, and the buffer's bounds."""

    async def start(self, task_group: TaskGroup) -> None:
        """Start background work (subscriptions, expiry) in the hub's task group."""

    async def stop(self) -> None:
        """Stop delivering and release resources."""

    async def publish(
        self,
        user_id: str,
        fields: dict[str, Any],
        transient: bool,
        latest: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str | None:
        """Buffer (unless ``transient``) and deliver an event of one user, on every node; its
        id, or None for a transient one.

        ``fields`` are the event's, without ``id``: the backend assigns it. With ``latest`` (a
        slot: the event's type and key, encoded), the event is transient and kept as the
        user's latest value of that slot. With ``idempotency_key``, a call of the same user
        and key within ``max_age`` of the first one that published returns what that one
        returned and publishes nothing (see the module: *Idempotency*).

        :raises BackendUnavailableError: the event could not be published.
        """

    async def publish_to_all(self, text: str) -> None:
        """Deliver an encoded event to every stream on every node (never buffered).

        :raises BackendUnavailableError: the event could not be published.
        """

    async def replay(
        self, user_id: str, resume: ResumePoint | None, latest: bool = False
    ) -> Replay:
        """The position of ``user_id`` and, if ``resume`` is given, what follows it; with
        ``latest``, the user's latest values too (read at the same moment).

        The caller holds live events for this user aside while it awaits this, and drops
        those with a key up to ``Replay.key`` afterwards, so the switch loses nothing.

        :raises BackendUnavailableError: the replay could not be read.
        """

    async def disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Have every node close every stream of ``user_id`` with ``code`` and ``reason``.

        :raises BackendUnavailableError: the request could not be published.
        """

    async def follow(self, user_id: str) -> None:
        """Return once this node receives every event of ``user_id`` published from now on
        (at once if it does already). The hub calls it as each stream joins, after counting
        it (``present``) and before reading its replay.

        :raises BackendUnavailableError: it could not within the backend's timeout.
        """

    def present(self, user_id: str, count: int) -> None:
        """This node now holds ``count`` streams of ``user_id`` (never blocks: a shared
        backend records it in the background, coalescing changes). A backend may stop
        delivering a user's events to this node a while after its count is 0 (``follow``)."""

    async def presence(self, user_ids: Collection[str]) -> dict[str, int]:
        """Open streams of each of ``user_ids`` on every live node (0 for unknown users).

        :raises BackendUnavailableError: the counts could not be read.
        """

    async def clear(self) -> None:
        """Forget what this node buffered (``hub.shutdown()``); a shared store is left alone."""

    def stats(self) -> dict[str, Any]:
        """Gauges for ``hub.stats()``."""
