"""The default backend: one process, buffers in memory, delivery by direct call."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import codec
from ..buffer import Entry, ReplayLog, Resume
from ..idempotency import IdempotencyKeys
from ..latest import LatestValues
from ..protocol import ResumePoint
from ..types import Clock
from .base import Deliver, Disconnect, Lost, Published, Replay


class MemoryBackend:
    """Buffers in this process: per user at most ``size`` events for ``max_age`` seconds, and
    at most ``max_users`` users (least recently used out first).

    Idempotency keys are kept ``max_age`` seconds from their first publish, at most
    ``idempotency.MAX_KEYS`` of them over every user (the oldest goes first: a retry of a key
    dropped so publishes again)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._log = ReplayLog(size=200, max_age=300.0)
        self._latest = LatestValues(max_age=300.0)
        self._keys = IdempotencyKeys(max_age=300.0)
        self._deliver: Deliver | None = None
        self._disconnect: Disconnect | None = None
        self._present: dict[str, int] = {}

    healthy = True

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
        self._deliver, self._disconnect = deliver, disconnect
        self._log = ReplayLog(size=size, max_age=max_age, max_users=max_users)
        self._latest = LatestValues(max_age=max_age, max_users=max_users)
        self._keys = IdempotencyKeys(max_age=max_age)

    async def start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._expire)

    async def stop(self) -> None:
        pass

    async def _expire(self) -> None:
        interval = max(min(self._log.max_age / 10, 30.0), 0.05)
        while True:
            await anyio.sleep(interval)
            now = self._clock()
            self._log.prune(now)
            self._latest.prune(now)
            self._keys.prune(now)

    async def publish(
        self,
        user_id: str,
        fields: dict[str, Any],
        transient: bool,
        latest: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str | None:
        # No await before the event is buffered and its key recorded: racing calls with one
        # key find it.
        now = self._clock()
        if idempotency_key is not None:
            seen = self._keys.get(user_id, idempotency_key, now)
            if seen is not None:
                return seen.id
        if transient or latest is not None:
            published = Published(user_id, codec.encode(fields))
            if latest is not None:
                self._latest.set(user_id, latest, published.text, now)
        else:
            seq, fields["id"] = self._log.assign()
            text = codec.encode(fields)
            timestamp = codec.parse_timestamp(fields["timestamp"])
            self._log.append(user_id, seq, text, timestamp, now)
            published = Published(user_id, text, fields["id"], seq)
        if idempotency_key is not None:
            self._keys.record(user_id, idempotency_key, published.id, now)
        assert self._deliver is not None
        await self._deliver(published)
        return published.id

    async def publish_to_all(self, text: str) -> None:
        assert self._deliver is not None
        await self._deliver(Published(None, text))

    async def replay(
        self, user_id: str, resume: ResumePoint | None, latest: bool = False
    ) -> Replay:
        # No await before the return: the replay and going live are one step here.
        log, now = self._log, self._clock()
        if resume is None:
            found = Resume([], recovered=True)
        elif resume.start:
            found = Resume(log.buffered(user_id, now), recovered=True)
        elif resume.since is not None:
            found = log.since_timestamp(user_id, resume.since, now)
        else:  # (an invalid point has no epoch: "unknown", from the oldest complete position)
            found = log.since(user_id, resume.epoch or "", resume.offset or "", now)
        events = [self._published(user_id, entry) for entry in found.entries]
        position, key = log.position(user_id), log.last_seq(user_id)
        values = self._latest.of(user_id, now) if latest else []
        kept = [Published(user_id, text) for text in values]
        return Replay(events, position, key, found.recovered, found.reason, found.oldest, kept)

    def _published(self, user_id: str, entry: Entry) -> Published:
        return Published(user_id, entry.frame, self._log.make_id(entry.seq), entry.seq)

    async def disconnect(self, user_id: str, code: int, reason: str) -> None:
        assert self._disconnect is not None
        await self._disconnect(user_id, code, reason)

    async def follow(self, user_id: str) -> None:
        pass  # every event is delivered to this one node (no await: attach stays atomic)

    def present(self, user_id: str, count: int) -> None:
        if count:
            self._present[user_id] = count
        else:
            self._present.pop(user_id, None)

    async def presence(self, user_ids: Collection[str]) -> dict[str, int]:
        return {user_id: self._present.get(user_id, 0) for user_id in user_ids}

    async def clear(self) -> None:
        # A new epoch: ids handed out before are foreign from now on.
        log = self._log
        self._log = ReplayLog(size=log.size, max_age=log.max_age, max_users=log.max_users)
        self._latest = LatestValues(max_age=log.max_age, max_users=log.max_users)
        self._keys = IdempotencyKeys(max_age=log.max_age)

    def stats(self) -> dict[str, Any]:
        buffered_events, buffered_users = self._log.stats()
        return {
            "buffered_events": buffered_events,
            "buffered_users": buffered_users,
            "latest_values": len(self._latest),
        }
