"""One stream's bounded queue of outgoing messages: the policy, synchronous and tested as such.

``Outbox.push`` is all that a broadcast does per stream: append a message built once per
broadcast to a deque (no await, no encoding, no task switch) and, if the stream had nothing
queued, tell whoever sends for it (``on_ready``, given at ``start``). Sending is not this
module's concern beyond ``drain``, which the senders (``senders.py``) or the stream's own writer
(``run``) call.

The message's class says what it may cost a client: a ``DurableMessage`` is buffered for replay
(a client closed for falling behind gets it back by id), a ``TransientMessage`` is shed first
when its queue is under pressure, and a plain ``dict`` (``broadcast_to_all``, control messages)
is neither (``wire.py``). What a message looks like is its transport's business.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from .stats import Counters
from .types import Message, Send
from .wire import DurableMessage, TransientMessage, Wire

BATCH_BYTES = 64 * 1024  # a batch frame stops growing past this many characters

# What Outbox.push reports.
OK = 0
BUSY = 1  # the queue is past its high-water mark: the publisher should let senders run
FULL = 2  # the stream cannot keep up: close it (1013); nothing was queued


def _nothing(error: Exception | None) -> None:
    pass


# The queue of a stream that was never sent anything: a deque costs about 760 bytes, and most
# streams of a large deployment are idle. It holds nothing (maxlen 0): the first push replaces it.
_NO_QUEUE: deque[Message] = deque(maxlen=0)
_ABANDONED: Message = {}  # the close "message" of a stream whose peer is gone: never sent


class Outbox:
    """One stream's bounded queue of outgoing messages.

    :param limit: messages queued at most; past half of it, transient ones are shed.
    :param durable_limit: buffered events queued at most. Keep it below the replay buffer's
        size, so that a stream closed for falling behind can still resume without a gap.
    :param counters: where sends and shed messages are counted.
    :param wire: how its transport frames the close and batch messages.
    :param send: the stream's ASGI ``send``.
    :param on_done: called once nothing more will be sent: with None once the close message is
        out or the peer is gone, with the exception if ``send`` raised anything else.
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
        "_on_done",
        "_on_ready",
        "_preloaded",
        "_queue",
        "_unstick",
        "_wake",
        "_wire",
        "batch",
        "finished",
        "scheduled",
        "send",
        "sent",
    )

    def __init__(
        self,
        limit: int,
        durable_limit: int,
        counters: Counters,
        wire: Wire,
        send: Send | None = None,
        on_done: Callable[[Exception | None], None] = _nothing,
    ) -> None:
        self._queue = _NO_QUEUE
        self._limit = limit
        self._high = max(limit // 2, 1)
        self._durable_limit = durable_limit
        self._durable = 0  # DurableMessages queued
        self._preloaded = 0  # the replay queued on connect, exempt from the limits
        self._held: list[Message] | None = None  # live messages while a replay is read
        self._floor: Any = None  # the replay's key: live messages up to it are in the replay
        self._counters = counters
        self.send = send  # the stream's send (may be replaced until start)
        self._on_done = on_done
        self._wire = wire
        self._on_ready: Callable[[Outbox], None] | None = None  # who sends, from start() on
        # True while a sender has this stream on its ready queue or is sending for it (pushes
        # then only append), and until start(): nothing is sent before the handshake is. Read
        # by the senders once per turn (a plain attribute: a property costs 5% there); set here.
        self.scheduled = True
        self._wake: anyio.Event | None = None  # its own writer's (Outbox.run), while it waits
        self._close: Message | None = None
        self.sent = 0
        self.finished = False  # nothing more will be sent
        # While its send is stuck (its sender was replaced, see senders.py): cancels it.
        self._unstick: Callable[[], None] | None = None
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
        queue = self._queue
        # The common case, once per stream and event: far from every bound.
        if len(queue) < self._high and (self._durable + 1) * 2 <= self._durable_limit:
            if type(message) is DurableMessage:
                self._durable += 1
            if queue is _NO_QUEUE:
                self._queue = queue = deque()
            queue.append(message)
            if not self.scheduled:
                self._schedule()
            return OK
        return self._push_near_bounds(message)

    def _push_near_bounds(self, message: Message) -> int:
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
        if self._queue is _NO_QUEUE:
            self._queue = deque()
        self._queue.append(message)
        if not self.scheduled:
            self._schedule()
        return status

    @property
    def stalled(self) -> bool:
        """Its send is stuck: its sender was replaced and finishes its queue alone."""
        return self._unstick is not None

    def stuck(self, unstick: Callable[[], None] | None) -> None:
        """Its send is stuck and ``unstick`` cancels it (None: it is not stuck any more)."""
        self._unstick = unstick

    @property
    def queued(self) -> deque[Message]:
        """What is queued, oldest first (read-only: for tests and gauges)."""
        return self._queue

    @property
    def durable(self) -> int:
        """How many queued messages are ``DurableMessage``."""
        return self._durable

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
        queue = self._queue
        kept = [m for m in queue if type(m) is not TransientMessage]
        self._counters.transient_shed += len(queue) - len(kept)
        queue.clear()  # in place: drain() holds on to the queue while it sends
        queue.extend(kept)
        return OK if self._backlog() < self._limit else FULL

    def preload(self, messages: list[Message]) -> None:
        """Queue a replay before the stream joins live delivery; exempt from the limits."""
        if self._queue is _NO_QUEUE:
            self._queue = deque()
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
            self._close = self._wire.close(code, reason)
            self._queue.clear()
            self._durable = 0
            if not self.scheduled:
                self._schedule()

    def unsent_close(self) -> Message | None:
        """The close message, if one is queued and not sent yet."""
        if self.finished or self._close is None or self._close is _ABANDONED:
            return None
        return self._close

    def start(self, on_ready: Callable[[Outbox], None] | None) -> None:
        """The handshake is sent: from now on ``on_ready`` is told whenever something is queued
        (the senders' ``ready``), or, if None, the writer that runs ``run`` sends it."""
        if self.finished:
            return
        self._on_ready = on_ready
        self.scheduled = False
        if self._queue or self._close is not None:
            self._schedule()

    def abandon(self, error: Exception | None = None) -> None:
        """The peer is gone (or ``send`` raised ``error``): send nothing more, drop what is
        queued and what comes."""
        if self._close is None:
            self._close = _ABANDONED
        self._queue.clear()
        self._durable = 0
        self._done(error)
        if self._unstick is not None:  # a send stuck for it would outlive the stream
            self._unstick()

    def _schedule(self) -> None:
        self.scheduled = True
        if self._on_ready is not None:
            self._on_ready(self)
        elif self._wake is not None:
            self._wake.set()
            self._wake = None

    def _done(self, error: Exception | None) -> None:
        if not self.finished:
            self.finished = self.scheduled = True  # (never scheduled again)
            on_done, self._on_done = self._on_done, _nothing  # (no cycle with its connection)
            on_done(error)

    async def run(self) -> None:
        """Send until finished, as this stream's own writer."""
        while not self.finished:
            if not self.scheduled:
                self._wake = wake = anyio.Event()
                await wake.wait()
            await self.drain(math.inf)

    async def drain(self, turn: float) -> None:
        """Send up to ``turn`` queued messages, then the close frame if it is due. Leaves the
        outbox scheduled (its sender comes back) if more is queued."""
        send = self.send
        assert send is not None, "an outbox needs its stream's send"
        # The queue is only ever changed in place (close() may clear it during a send).
        queue, start = self._queue, self.sent
        try:
            if self.batch:
                while queue and self.sent - start < turn:
                    await self._send_batch(send)
            else:
                end = start + turn
                while queue and self.sent < end:
                    message = queue.popleft()
                    if type(message) is DurableMessage:
                        self._durable -= 1
                    await send(message)
                    self.sent += 1
            if self._close is not None and not queue and not self.finished:
                await send(self._close)
                self._done(None)
        except OSError:  # some servers raise once the peer is gone; the reader sees that too
            self.abandon()
        except Exception as exc:
            self.abandon(exc)
        finally:
            self._counters.messages_sent += self.sent - start
        if not self._queue and not self.finished:
            self.scheduled = False

    async def _send_batch(self, send: Send) -> None:
        """Send what is queued (up to ``BATCH_BYTES``) as one batch; never waits for more."""
        message, taken, durable = self._wire.batch(self._queue, BATCH_BYTES)
        self._durable -= durable
        await send(message)
        self.sent += taken
