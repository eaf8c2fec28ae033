"""The fan-out hot path: one bounded outbox and one writer per socket, and the send slots.

``Outbox.push`` is all that ``broadcast`` does per socket: append a pre-built ASGI message to a
deque (no await, no JSON, no task switch) and wake the writer only if it sleeps. The writer
sends everything queued per wake-up, so a burst costs one wake-up per socket, not one per
message.

The message's class says what it may cost a client: a ``DurableMessage`` is buffered for replay
(a client closed for falling behind gets it back by id), a ``TransientMessage`` is shed first
when its queue is under pressure, and a plain ``dict`` (``broadcast_to_all``) is neither.

``SendSlots`` lets only a few writers send at once. On trio a send suspends at every message, so
without it a burst leaves every writer suspended mid-send at once, and the garbage collector
walks all their frames again and again. A writer whose send makes no progress for
``stall_timeout`` gives its slot up and sends outside the limit from then on, so a few stalled
clients can never hold every slot.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio

from .stats import Counters
from .types import Message, Send

BATCH_BYTES = 64 * 1024  # a batch frame stops growing past this many characters

# What Outbox.push reports.
OK = 0
BUSY = 1  # the queue is past its high-water mark: the publisher should let writers run
FULL = 2  # the socket cannot keep up: close it (1013); nothing was queued


class DurableMessage(dict[str, Any]):
    """The frame of a buffered event: replayable by id; ``key`` orders it among its user's."""

    __slots__ = ("key",)
    key: Any


class TransientMessage(dict[str, Any]):
    """The frame of a transient event: live only, shed first under pressure."""


def text_message(text: str, kind: type[dict[str, Any]] = dict) -> Message:
    """The ASGI message for one text frame; built once and shared by every socket it goes to."""
    return kind(type="websocket.send", text=text)


PONG: Message = {"type": "websocket.send", "text": "pong"}


def durable_message(text: str, key: Any) -> Message:
    message = DurableMessage(type="websocket.send", text=text)
    message.key = key
    return message


def close_message(code: int, reason: str) -> Message:
    return {"type": "websocket.close", "code": code, "reason": reason}


class Outbox:
    """One socket's bounded queue of outgoing ASGI messages and the loop that sends them.

    :param limit: messages queued at most; past half of it, transient ones are shed.
    :param durable_limit: buffered events queued at most. Keep it below the replay buffer's
        size, so that a socket closed for falling behind can still resume without a gap.
    """

    __slots__ = (
        "_close",
        "_counters",
        "_durable",
        "_durable_limit",
        "_floor",
        "_held",
        "_high",
        "_limit",
        "_preloaded",
        "_queue",
        "_wake",
        "batch",
        "sent",
        "stalled",
    )

    def __init__(self, limit: int, durable_limit: int, counters: Counters) -> None:
        self._queue: deque[Message] = deque()
        self._limit = limit
        self._high = max(limit // 2, 1)
        self._durable_limit = durable_limit
        self._durable = 0  # DurableMessages queued
        self._preloaded = 0  # the replay queued on connect, exempt from the limits
        self._held: list[Message] | None = None  # live messages while a replay is read
        self._floor: Any = None  # the replay's key: live messages up to it are in the replay
        self._counters = counters
        self._wake: anyio.Event | None = None
        self._close: Message | None = None
        self.sent = 0
        self.stalled = False  # lost its send slot once: sends outside the limit
        self.batch = False  # asgi-events.v1.batch: everything queued goes out in one frame

    def push(self, message: Message) -> int:
        """Queue ``message``; OK, BUSY (queued, or shed if transient) or FULL (not queued)."""
        if self._close is not None:
            return OK
        if self._held is not None:
            self._held.append(message)
            return FULL if len(self._held) > self._limit else OK
        if self._floor is not None and type(message) is DurableMessage:
            if message.key <= self._floor:
                return OK  # already replayed: its live copy came late (another connection)
            self._floor = None  # delivery is in key order: nothing older can follow
        status = OK
        if self.pressed:
            status = self._relieve(message)
            if status != OK:
                return status
            status = BUSY
        if type(message) is DurableMessage:
            if self._durable >= self._durable_limit:
                return FULL
            self._durable += 1
            if self._durable * 2 > self._durable_limit:
                status = BUSY  # half way to the durable bound: the publisher should yield too
        self._queue.append(message)  # (_relieve may have replaced the queue)
        if self._wake is not None:
            self._wake.set()
            self._wake = None
        return status

    @property
    def pressed(self) -> bool:
        """Past a high-water mark: half the queue (a replay not counted), or half the durable
        bound."""
        if self._durable * 2 > self._durable_limit:
            return True
        return len(self._queue) >= self._high and self._backlog() >= self._high

    def _backlog(self) -> int:
        return len(self._queue) - max(self._preloaded - self.sent, 0)

    def _relieve(self, message: Message) -> int:
        """Under pressure: shed transient messages, the incoming one first. OK: queue it."""
        if type(message) is TransientMessage:
            self._counters.transient_shed += 1
            return BUSY
        if self._backlog() < self._limit:
            return OK
        kept = deque(m for m in self._queue if type(m) is not TransientMessage)
        self._counters.transient_shed += len(self._queue) - len(kept)
        self._queue = kept
        return OK if self._backlog() < self._limit else FULL

    def preload(self, messages: list[Message]) -> None:
        """Queue a replay before the socket joins live delivery; exempt from the limits."""
        self._queue.extend(messages)
        self._preloaded += len(messages)

    def hold(self) -> None:
        """Keep live messages aside until ``release``: the replay is being read."""
        self._held = []

    def release(self, key: Any) -> int:
        """Queue the held messages after the replay; from now on drop the live copies of
        messages the replay covers (key up to ``key``), held or arriving late."""
        held, self._held = self._held or [], None
        self._floor = key
        status = OK
        for message in held:
            status = max(status, self.push(message))
        return status

    def close(self, code: int, reason: str) -> None:
        """Drop what is queued and send a close frame next (after a send in flight, if any)."""
        if self._close is None:
            self._close = close_message(code, reason)
            self._queue.clear()
            self._durable = 0
            if self._wake is not None:
                self._wake.set()
                self._wake = None

    async def run(self, send: Send, slots: SendSlots) -> None:
        """Send until closed; returns once the close frame is sent or the peer is gone."""
        try:
            while True:
                if not self._queue and self._close is None:
                    self._wake = wake = anyio.Event()
                    await wake.wait()
                if self._queue:
                    if self.stalled:
                        await self._drain(send)
                    else:
                        await slots.acquire(self)
                        try:
                            await self._drain(send)
                        finally:
                            slots.release(self)
                if self._close is not None and not self._queue:
                    await send(self._close)
                    return
        except OSError:  # some servers raise once the peer is gone; the reader sees that too
            self.close(1006, "")  # nothing more is sent; later pushes are dropped

    async def _drain(self, send: Send) -> None:
        start = self.sent
        try:
            while self._queue:  # (close() may replace or clear it while a send is in flight)
                if self.batch:
                    await self._send_batch(send)
                    continue
                message = self._queue.popleft()
                if type(message) is DurableMessage:
                    self._durable -= 1
                await send(message)
                self.sent += 1
        finally:
            self._counters.messages_sent += self.sent - start

    async def _send_batch(self, send: Send) -> None:
        """Send what is queued (up to ``BATCH_BYTES``) as one JSON array; never waits for more."""
        queue, size = self._queue, 0
        texts: list[str] = []
        while queue and size < BATCH_BYTES:
            message = queue[0]
            if message is PONG:  # not JSON: it goes alone, as the plain text "pong"
                if texts:
                    break
                queue.popleft()
                await send(message)
                self.sent += 1
                return
            queue.popleft()
            if type(message) is DurableMessage:
                self._durable -= 1
            texts.append(message["text"])
            size += len(texts[-1])
        await send({"type": "websocket.send", "text": f"[{','.join(texts)}]"})
        self.sent += len(texts)


class SendSlots:
    """At most ``size`` writers send at once; a stalled one loses its slot to a waiting writer."""

    def __init__(self, size: int, stall_timeout: float) -> None:
        if size < 1:
            raise ValueError("send slots must be at least 1")
        self._free = size
        self._stall_timeout = stall_timeout
        # holder -> (its sent count, when that count was last seen to change)
        self._holders: dict[Outbox, tuple[int, float]] = {}
        self._waiters: deque[anyio.Event] = deque()

    async def acquire(self, holder: Outbox) -> None:
        if self._free and not self._waiters:
            self._free -= 1
        else:
            granted = anyio.Event()
            self._waiters.append(granted)
            try:
                while not granted.is_set():
                    with anyio.move_on_after(self._stall_timeout):
                        await granted.wait()
                    if not granted.is_set():
                        self._revoke_stalled()
            except BaseException:
                if granted.is_set():
                    self._hand_over()
                else:
                    self._waiters.remove(granted)
                raise
        self._holders[holder] = (holder.sent, anyio.current_time())

    def release(self, holder: Outbox) -> None:
        if self._holders.pop(holder, None) is not None:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self._free += 1

    def _revoke_stalled(self) -> None:
        now = anyio.current_time()
        for holder, (sent, since) in list(self._holders.items()):
            if holder.sent != sent:
                self._holders[holder] = (holder.sent, now)
            elif now - since >= self._stall_timeout:
                del self._holders[holder]
                holder.stalled = True
                self._hand_over()
