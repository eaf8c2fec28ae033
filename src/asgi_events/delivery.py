"""The fan-out hot path: a bounded outbox per socket, and a few sender tasks that drain them.

``Outbox.push`` is all that ``broadcast`` does per socket: append a pre-built ASGI message to a
deque (no await, no JSON, no task switch) and, if the socket had nothing queued, put it on the
senders' ready queue. A handful of sender tasks (``Senders``) take sockets off that queue and
await their ``send`` in turn, as a plain loop over the sockets would: when the server's send
does not suspend (hypercorn's and uvicorn's asyncio workers, unless a socket's buffer is full),
an event reaches a thousand sockets with a few task switches, not a thousand. An idle socket
costs no task at all.

The message's class says what it may cost a client: a ``DurableMessage`` is buffered for replay
(a client closed for falling behind gets it back by id), a ``TransientMessage`` is shed first
when its queue is under pressure, and a plain ``dict`` (``broadcast_to_all``) is neither.

A sender whose send makes no progress for ``stall_timeout`` (a client that stopped reading) is
retired: a new sender takes its place at once, and the retired one stays with that socket until
its queue is empty, then ends. So stalled clients never hold up the others, and a slow one costs
a task of its own only while it is behind. Without a running hub (a server with no lifespan)
every socket has its own writer, ``Outbox.run``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from .stats import Counters
from .types import Message, Send

BATCH_BYTES = 64 * 1024  # a batch frame stops growing past this many characters
TURN = 32  # messages a sender sends to one socket before it moves on to the next ready one
SLICE = 0.001  # seconds the senders together may keep the event loop before others run

# What Outbox.push reports.
OK = 0
BUSY = 1  # the queue is past its high-water mark: the publisher should let senders run
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


def _nothing(error: Exception | None) -> None:
    pass


# The queue of a socket that was never sent anything: a deque costs about 760 bytes, and most
# sockets of a large deployment are idle. It holds nothing (maxlen 0): the first push replaces it.
_NO_QUEUE: deque[Message] = deque(maxlen=0)


class Outbox:
    """One socket's bounded queue of outgoing ASGI messages.

    :param limit: messages queued at most; past half of it, transient ones are shed.
    :param durable_limit: buffered events queued at most. Keep it below the replay buffer's
        size, so that a socket closed for falling behind can still resume without a gap.
    :param send: the socket's ASGI ``send``.
    :param on_done: called once nothing more will be sent: with None once the close frame is
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
        "_preloaded",
        "_queue",
        "_scheduled",
        "_send",
        "_senders",
        "_unstick",
        "_wake",
        "batch",
        "finished",
        "sent",
    )

    def __init__(
        self,
        limit: int,
        durable_limit: int,
        counters: Counters,
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
        self._send = send
        self._on_done = on_done
        self._senders: Senders | None = None
        # True while a sender has this socket on its ready queue or is sending for it (pushes
        # then only append), and until start(): nothing is sent before the handshake is.
        self._scheduled = True
        self._wake: anyio.Event | None = None  # its own writer's (Outbox.run), while it waits
        self._close: Message | None = None
        self.sent = 0
        self.finished = False  # nothing more will be sent
        # While its send is stuck (its sender was replaced, see Senders): cancels that sender.
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
        # The common case, once per socket and event: far from every bound.
        if len(queue) < self._high and (self._durable + 1) * 2 <= self._durable_limit:
            if type(message) is DurableMessage:
                self._durable += 1
            if queue is _NO_QUEUE:
                self._queue = queue = deque()
            queue.append(message)
            if not self._scheduled:
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
        if not self._scheduled:
            self._schedule()
        return status

    @property
    def stalled(self) -> bool:
        """Its send is stuck: its sender was replaced and finishes its queue alone."""
        return self._unstick is not None

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
        """Queue a replay before the socket joins live delivery; exempt from the limits."""
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
            self._close = close_message(code, reason)
            self._queue.clear()
            self._durable = 0
            if not self._scheduled:
                self._schedule()

    def start(self, senders: Senders | None) -> None:
        """The handshake is sent: from now on ``senders`` send what is queued, or, if None,
        the writer that runs ``run``."""
        if self.finished:
            return
        self._senders = senders
        self._scheduled = False
        if self._queue or self._close is not None:
            self._schedule()

    def abandon(self, error: Exception | None = None) -> None:
        """The peer is gone (or ``send`` raised ``error``): send nothing more, drop what is
        queued and what comes."""
        if self._close is None:
            self._close = close_message(1006, "")
        self._queue.clear()
        self._durable = 0
        self._done(error)
        if self._unstick is not None:  # a send stuck for it would outlive the connection
            self._unstick()

    def _schedule(self) -> None:
        self._scheduled = True
        if self._senders is not None:
            self._senders.ready(self)
        elif self._wake is not None:
            self._wake.set()
            self._wake = None

    def _done(self, error: Exception | None) -> None:
        if not self.finished:
            self.finished = self._scheduled = True  # (never scheduled again)
            on_done, self._on_done = self._on_done, _nothing  # (no cycle with its connection)
            on_done(error)

    async def run(self) -> None:
        """Send until finished, as this socket's own writer."""
        while not self.finished:
            if not self._scheduled:
                self._wake = wake = anyio.Event()
                await wake.wait()
            await self.drain(math.inf)

    async def drain(self, turn: float) -> None:
        """Send up to ``turn`` queued messages, then the close frame if it is due. Leaves the
        outbox scheduled (its sender comes back) if more is queued."""
        send = self._send
        assert send is not None, "an outbox needs its socket's send"
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
            self._scheduled = False

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


class _Sender:
    __slots__ = ("outbox", "retired", "scope", "seen", "since")

    def __init__(self) -> None:
        self.outbox: Outbox | None = None  # the socket it is sending for
        self.retired = False
        self.scope = anyio.CancelScope()  # cancelled if its socket goes while it is stuck
        self.seen: tuple[Outbox | None, int] = (None, 0)  # the watchdog's last look
        self.since = 0.0  # when that look last changed


class Senders:
    """``size`` tasks that send for every socket; a stalled one is replaced (see the module).

    :param size: how many sockets may be mid-send at once (besides stalled ones).
    :param stall_timeout: seconds a send may make no progress before its sender is retired.
    :param counters: where retirements are counted (``stalled_sends``).
    """

    def __init__(self, size: int, stall_timeout: float, counters: Counters) -> None:
        if size < 1:
            raise ValueError("send slots must be at least 1")
        self._size = size
        self._stall_timeout = stall_timeout
        self._ready: deque[Outbox] = deque()
        self._idle: deque[anyio.Event] = deque()  # the waiting senders' wake-ups
        self._senders: set[_Sender] = set()
        self._watch: anyio.Event | None = None  # the watchdog's wake-up, while all is quiet
        self._deadline = 0.0  # when the current slice ends (see _pause)
        self._slices = 0
        self._task_group: anyio.abc.TaskGroup | None = None
        self._counters = counters

    def ready(self, outbox: Outbox) -> None:
        """``outbox`` has something to send: a sender will come to it."""
        self._ready.append(outbox)
        if self._idle:
            self._idle.popleft().set()
        if self._watch is not None:
            self._watch.set()
            self._watch = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the senders and their watchdog until cancelled."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            for _ in range(self._size):
                self._add()
            task_status.started()
            while True:
                if not self._ready and all(s.outbox is None for s in self._senders):
                    for sender in self._senders:
                        sender.seen = (None, 0)  # (keeps no closed socket alive)
                    self._watch = watch = anyio.Event()
                    await watch.wait()
                await anyio.sleep(self._stall_timeout / 2)
                self._retire_stalled()

    def _add(self) -> None:
        assert self._task_group is not None
        sender = _Sender()
        self._senders.add(sender)
        self._task_group.start_soon(self._work, sender)

    async def _work(self, sender: _Sender) -> None:
        with sender.scope:
            await self._serve(sender)

    async def _serve(self, sender: _Sender) -> None:
        ready, idle = self._ready, self._idle
        park = False
        while True:
            while park or not ready:
                park = False
                wake = anyio.Event()
                idle.append(wake)
                since = perf_counter()
                await wake.wait()
                # A slice that ended before this sender stopped has had no sending since, and
                # the loop has come round: start afresh. One that began after may have been
                # used up in this very turn of the loop: then this sender pauses first.
                if self._deadline <= since:
                    self._new_slice()
            if perf_counter() >= self._deadline:
                park = await self._pause()
                continue
            if await self._turn(sender, ready.popleft()):
                return

    async def _turn(self, sender: _Sender, outbox: Outbox) -> bool:
        """Send for ``outbox``; True if this sender was retired meanwhile (it is done)."""
        sender.outbox = outbox
        await outbox.drain(TURN)
        sender.outbox = None
        if outbox._scheduled and not outbox.finished:
            if not sender.retired:
                self._ready.append(outbox)  # more queued: back in line
                return False
            # Replaced while its send was stuck: it finishes this socket's queue alone.
            await outbox.drain(math.inf)
        if sender.retired:
            outbox._unstick = None
        return sender.retired

    async def _pause(self) -> bool:
        """The slice is used up: let every other task run, and the loop poll for I/O, once.
        True if this sender is not needed for now (it waits like an idle one).

        Sends that never suspend would keep everything else from running. The slice is shared:
        however many senders are busy, they send for at most ``SLICE`` between two turns of the
        event loop, so a publisher waiting for I/O (a reply from Redis) gets ahead of them and
        events pile up per socket, where they go out back to back.

        Where sends never suspend, the first sender back uses up the whole next slice, and the
        others would only wake to find it gone and yield again, each, every slice. Such a
        sender waits with the idle ones instead while two others are neither idle nor sending:
        one to send and one to watch. A watcher that finds a slice not used up knows the sender
        is stuck in a send: it sends in its place and calls in another watcher.
        """
        slices = self._slices
        await anyio.lowlevel.checkpoint()
        first_back = self._slices == slices
        if first_back:
            self._new_slice()
        busy = len(self._senders) - len(self._idle)
        watching = busy - sum(1 for sender in self._senders if sender.outbox is not None)
        if not first_back and watching > 2 and perf_counter() >= self._deadline:
            return True
        if watching < 2 and self._idle and self._ready:
            self._idle.popleft().set()
        return False

    def _new_slice(self) -> None:
        self._slices += 1
        self._deadline = perf_counter() + SLICE

    def _retire_stalled(self) -> None:
        now = anyio.current_time()
        for sender in list(self._senders):
            box = sender.outbox
            seen = (box, box.sent if box is not None else 0)
            if box is None or seen != sender.seen:
                sender.seen, sender.since = seen, now
            elif now - sender.since >= self._stall_timeout:
                sender.retired = True
                box._unstick = sender.scope.cancel
                self._senders.discard(sender)
                self._counters.stalled_sends += 1
                self._add()
