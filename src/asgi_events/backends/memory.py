"""The default backend: one process, buffers in memory, delivery by direct call."""

from __future__ import annotations

import time
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import codec
from ..auth import Handshake
from ..buffer import ReplayLog, Resume
from ..delivery import TransientMessage, durable_message, text_message
from ..types import Clock
from .base import Deliver, Lost, Replay


class MemoryBackend:
    """Buffers in this process: per user at most ``size`` events for ``max_age`` seconds, and
    at most ``max_users`` users (least recently used out first)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._log = ReplayLog(size=200, max_age=300.0)
        self._deliver: Deliver | None = None

    healthy = True

    def bind(
        self, deliver: Deliver, lost: Lost, *, size: int, max_age: float, max_users: int | None
    ) -> None:
        self._deliver = deliver
        self._log = ReplayLog(size=size, max_age=max_age, max_users=max_users)

    async def start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._expire)

    async def stop(self) -> None:
        pass

    async def _expire(self) -> None:
        interval = max(min(self._log.max_age / 10, 30.0), 0.05)
        while True:
            await anyio.sleep(interval)
            self._log.prune(self._clock())

    async def publish(self, user_id: str, fields: dict[str, Any], transient: bool) -> None:
        if transient:
            message = text_message(codec.encode(fields), TransientMessage)
        else:
            seq, fields["id"] = self._log.assign()
            text = codec.encode(fields)
            timestamp = codec.parse_timestamp(fields["timestamp"])
            self._log.append(user_id, seq, text, timestamp, self._clock())
            message = durable_message(text, seq)
        assert self._deliver is not None
        await self._deliver(user_id, message)

    async def publish_to_all(self, text: str) -> None:
        assert self._deliver is not None
        await self._deliver(None, text_message(text))

    async def replay(self, user_id: str, handshake: Handshake) -> Replay:
        # No await before the return: the replay and going live are one step here.
        log, now = self._log, self._clock()
        resume = Resume([], recovered=True)
        if handshake.last_event_id is not None:
            resume = log.since_id(user_id, handshake.last_event_id, now)
        elif handshake.last_event_ts is not None:
            since = codec.parse_timestamp(handshake.last_event_ts)
            if since is None:
                resume = Resume([], recovered=False, reason="unknown", oldest=log.position(user_id))
            else:
                resume = log.since_timestamp(user_id, since, now)
        position, key = log.position(user_id), log.last_seq(user_id)
        return Replay(resume.frames, position, key, resume.recovered, resume.reason, resume.oldest)

    async def clear(self) -> None:
        # A new epoch: ids handed out before are foreign from now on.
        log = self._log
        self._log = ReplayLog(size=log.size, max_age=log.max_age, max_users=log.max_users)

    def stats(self) -> dict[str, Any]:
        buffered_events, buffered_users = self._log.stats()
        return {"buffered_events": buffered_events, "buffered_users": buffered_users}
