"""The backend contract suite's harness: one backend at a time, driven directly (no hub).

``subject`` is parametrised over the backends (memory, and Redis on the session's real
redis-server under a fresh random prefix); each test runs on asyncio and trio (``anyio_backend``
in ``tests/conftest.py``). ``async with subject.node(size=...) as node`` binds a backend to a
collector, starts it in a task group of its own, follows the test users (``FOLLOWED``, as a node
with streams of them does: a Redis node receives the events of the users it follows only), and
stops it (and cancels the group) at the end.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from asgi_events import codec
from asgi_events.backends.base import Backend, Published, Replay
from asgi_events.backends.memory import MemoryBackend
from asgi_events.backends.redis import RedisBackend
from asgi_events.protocol import ResumePoint, make_id, split_id

from .redis_cluster import RedisCluster
from .redis_server import RedisServer

TIMEOUT = 10.0  # bound on any single wait
FOLLOWED = ("alice", "bob", "carol")
"""The users a node follows unless told otherwise (``Subject.node(follow=...)``)."""
IDLE = 3600.0
"""A Redis node's ``unsubscribe_delay`` unless told otherwise: the harness follows users without
counting streams of them (``present``), so they are idle from the start, and must stay followed
for the whole test."""


class Clock:
    """The memory backend's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    """A running backend and what it delivered (``deliver``) and reported lost (``lost``)."""

    backend: Backend
    kind: str
    clock: Clock | None
    delivered: list[Published] = field(default_factory=list)
    losses: int = 0
    disconnects: list[tuple[str, int, str]] = field(default_factory=list)
    disconnected_after: list[int] = field(default_factory=list)
    affected: list[Callable[[str], bool] | None] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    """The users this node follows (as if it held streams of them)."""
    reached: dict[str, set[str]] = field(default_factory=dict)
    """For each text published to all, the users its copies have reached so far."""
    """For each loss, which users it concerned (None: all)."""
    """For each disconnect, how many events had been delivered before it."""
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def deliver(
        self, published: Published, only: Callable[[str], bool] | None = None
    ) -> None:
        first = True
        if published.user_id is None:  # (a cluster delivers one copy per shard: ``only``)
            reached = self.reached.setdefault(published.text, set())
            first = not reached
            reached.update(user for user in self.users if only is None or only(user))
            reached.add("")  # (reached this node)
        if first:
            self.delivered.append(published)
        self._changed.set()
        self._changed = anyio.Event()

    async def disconnect(self, user_id: str, code: int, reason: str) -> None:
        self.disconnects.append((user_id, code, reason))
        self.disconnected_after.append(len(self.delivered))
        self._changed.set()
        self._changed = anyio.Event()

    async def lost(self, affected: Callable[[str], bool] | None = None) -> None:
        self.losses += 1
        self.affected.append(affected)
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        """Wait (bounded) until something is delivered or lost."""
        with anyio.fail_after(TIMEOUT):
            await self._changed.wait()

    async def received(self, n: int) -> list[Published]:
        """The first ``n`` events delivered, once they are (bounded wait)."""
        with anyio.fail_after(TIMEOUT):
            while len(self.delivered) < n:
                await self._changed.wait()
        return self.delivered[:n]

    async def settle(self) -> list[Published]:
        """Everything delivered so far, once whatever was published before has arrived (a
        ``publish_to_all`` marker goes round; delivery is in publish order); the marker is
        removed (other nodes on the same Redis receive it too)."""
        marker = Published(None, f'{{"type":"settled","payload":"{secrets.token_hex(8)}"}}')
        await self.backend.publish_to_all(marker.text)
        with anyio.fail_after(TIMEOUT):  # (on a cluster, its copy on every shard of a user)
            while not self.reached.get(marker.text, set()) >= self.users | {""}:
                await self._changed.wait()
        self.delivered.remove(marker)
        return list(self.delivered)

    async def publish(
        self, user_id: str, payload: Any = None, *, transient: bool = False, **fields: Any
    ) -> dict[str, Any]:
        """Publish an event as the hub does (``codec.prepare``); its fields, as given."""
        prepared = codec.prepare({"type": "T", "payload": payload, **fields})
        sent = dict(prepared)
        await self.backend.publish(user_id, prepared, transient)
        return sent

    async def replay(self, user_id: str, resume: ResumePoint | None = None) -> Replay:
        return await self.backend.replay(user_id, resume)

    async def elapse(self, seconds: float) -> None:
        """Let time go on for the age bound: the memory clock moves; Redis' clock is real, so
        this waits (only ever inside a loop bounded by ``anyio.fail_after``)."""
        if self.clock is not None:
            self.clock.now += seconds
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.sleep(seconds)


@dataclass
class Subject:
    """One kind of backend, and what differs between kinds in the contract's terms."""

    kind: str
    """``memory``, ``redis`` (one redis-server) or ``cluster`` (a Redis Cluster)."""
    redis: RedisServer
    cluster: RedisCluster | None = None
    prefix: str = field(default_factory=lambda: f"contract-{secrets.token_hex(4)}")

    @property
    def origin_offset(self) -> str:
        """The offset of an epoch's origin id (a position before any event)."""
        return "0" if self.kind == "memory" else "0-0"

    @property
    def origin_key(self) -> Any:
        return 0 if self.kind == "memory" else (0, 0)

    def next_offset(self, offset: str) -> str:
        """An offset just beyond ``offset`` (one never issued if ``offset`` is the newest)."""
        if self.kind == "memory":
            return str(int(offset) + 1)
        ms, _, n = offset.partition("-")
        return f"{ms}-{int(n) + 1}"

    def make(self, **options: Any) -> tuple[Backend, Clock | None]:
        if self.kind == "memory":
            clock = Clock()
            return MemoryBackend(clock), clock
        settings = {"prefix": self.prefix, "timeout": 2.0, "max_backoff": 0.2}
        settings |= {"unsubscribe_delay": IDLE, **options}
        if self.kind == "cluster":
            assert self.cluster is not None
            return RedisBackend(self.cluster.url, cluster=True, **settings), None
        return RedisBackend(self.redis.url, **settings), None

    @asynccontextmanager
    async def node(
        self,
        *,
        size: int = 200,
        max_age: float = 300.0,
        max_users: int | None = None,
        follow: Collection[str] = FOLLOWED,
        **options: Any,
    ) -> AsyncIterator[Node]:
        """A started backend (a node of its own, sharing the prefix for Redis), following the
        users of ``follow``."""
        backend, clock = self.make(**options)
        node = Node(backend, self.kind, clock, users=set(follow))
        backend.bind(
            node.deliver,
            node.lost,
            disconnect=node.disconnect,
            size=size,
            max_age=max_age,
            max_users=max_users,
        )
        async with anyio.create_task_group() as tg:
            await backend.start(tg)
            try:
                assert backend.healthy
                for user_id in follow:
                    await backend.follow(user_id)
                yield node
            finally:
                await backend.stop()
                tg.cancel_scope.cancel()


def point(event_id: str) -> ResumePoint:
    """The resume point of a client that has everything up to ``event_id``."""
    resume = ResumePoint.parse(event_id, None)
    assert resume is not None and not resume.invalid
    return resume


def epoch_of(event_id: str) -> str:
    parts = split_id(event_id)
    assert parts is not None
    return parts[0]


def offset_of(event_id: str) -> str:
    parts = split_id(event_id)
    assert parts is not None
    return parts[1]


def fields_of(published: Published) -> dict[str, Any]:
    decoded = json.loads(published.text)
    assert isinstance(decoded, dict)
    return decoded


__all__ = (
    "FOLLOWED",
    "TIMEOUT",
    "Node",
    "Subject",
    "epoch_of",
    "fields_of",
    "make_id",
    "offset_of",
    "point",
)
