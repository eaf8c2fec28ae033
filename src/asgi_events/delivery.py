"""The fan-out hot path: one bounded outbox and one writer per socket, and the send slots.

``Outbox.push`` is all that ``broadcast`` does per socket: append a pre-built ASGI message to a
deque (no await, no JSON, no task switch) and wake the writer only if it sleeps. The writer
sends everything queued per wake-up, so a burst costs one wake-up per socket, not one per
message.

``SendSlots`` lets only a few writers send at once. On trio a send suspends at every message, so
without it a burst leaves every writer suspended mid-send at once, and the garbage collector
walks all their frames again and again. A writer whose send makes no progress for
``stall_timeout`` gives its slot up and sends outside the limit from then on, so a few stalled
clients can never hold every slot.
"""

from __future__ import annotations

from collections import deque

import anyio

from .stats import Counters
from .types import Clock, Message, Send


def close_message(code: int, reason: str) -> Message:
    return {"type": "websocket.close", "code": code, "reason": reason}


def text_message(text: str) -> Message:
    """The ASGI message for one text frame; built once and shared by every socket it goes to."""
    return {"type": "websocket.send", "text": text}


class SendSlots:
    """At most ``size`` writers send at once; a stalled one loses its slot to a waiting writer."""

    def __init__(self, size: int, stall_timeout: float, clock: Clock) -> None:
        if size < 1:
            raise ValueError("send slots must be at least 1")
        self._free = size
        self._stall_timeout = stall_timeout
        self._clock = clock
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
        self._holders[holder] = (holder.sent, self._clock())

    def release(self, holder: Outbox) -> None:
        if self._holders.pop(holder, None) is not None:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self._free += 1

    def _revoke_stalled(self) -> None:
        now = self._clock()
        for holder, (sent, since) in list(self._holders.items()):
            if holder.sent != sent:
                self._holders[holder] = (holder.sent, now)
            elif now - since >= self._stall_timeout:
                del self._holders[holder]
                holder.stalled = True
                self._hand_over()


class Outbox:
    """One socket's bounded queue of outgoing ASGI messages and the loop that sends them."""

    __slots__ = (
        "_close",
        "_counters",
        "_limit",
        "_queue",
        "_wake",
        "overflowed",
        "sending",
        "sent",
        "stalled",
    )

    def __init__(self, limit: int, counters: Counters) -> None:
        self._queue: deque[Message] = deque()
        self._limit = limit
        self._counters = counters
        self._wake: anyio.Event | None = None
        self._close: Message | None = None
        self.sent = 0
        self.sending = False  # a send is in flight
        self.stalled = False  # lost its send slot once: sends outside the limit
        self.overflowed = False

    @property
    def closing(self) -> bool:
        return self._close is not None

    def push(self, message: Message) -> None:
        """Queue ``message``; a full queue closes the socket with 1013 instead."""
        if self._close is not None:
            return
        if len(self._queue) >= self._limit:
            self.overflowed = True
            self._counters.slow_consumer_closes += 1
            self.close(1013, "Slow consumer")
            return
        self._queue.append(message)
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def preload(self, messages: list[Message]) -> None:
        """Queue a replay before the socket joins live delivery; not counted against the limit."""
        self._queue.extend(messages)

    def close(self, code: int, reason: str) -> None:
        """Drop what is queued and send a close frame next (after a send in flight, if any)."""
        if self._close is None:
            self._close = close_message(code, reason)
            self._queue.clear()
            if self._wake is not None:
                self._wake.set()
                self._wake = None

    async def run(self, send: Send, slots: SendSlots) -> None:
        """Send until closed; returns once the close frame is sent or the peer is gone."""
        queue = self._queue
        try:
            while True:
                if not queue and self._close is None:
                    self._wake = wake = anyio.Event()
                    await wake.wait()
                if queue:
                    if self.stalled:
                        await self._drain(send)
                    else:
                        await slots.acquire(self)
                        try:
                            await self._drain(send)
                        finally:
                            slots.release(self)
                if self._close is not None and not queue:
                    await send(self._close)
                    return
        except OSError:  # some servers raise once the peer is gone; the reader sees that too
            self.close(1006, "")  # nothing more is sent; later pushes are dropped

    async def _drain(self, send: Send) -> None:
        queue = self._queue
        start = self.sent
        self.sending = True
        try:
            while queue:
                await send(queue.popleft())
                self.sent += 1
        finally:
            self.sending = False
            self._counters.messages_sent += self.sent - start
