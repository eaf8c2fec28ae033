"""The sender tasks: a few tasks that send for every stream, in turn, as a plain loop would.

Streams with something queued go on the ready queue (``Senders.ready``, an outbox's
``on_ready``). A handful of sender tasks take them off it and await their ``drain`` in turn: when
the server's send does not suspend (hypercorn's and uvicorn's asyncio workers, unless a socket's
buffer is full), an event reaches a thousand streams with a few task switches, not a thousand.
An idle stream costs no task at all.

A sender whose send makes no progress for ``stall_timeout`` (a client that stopped reading) is
retired: a new sender takes its place at once, and the retired one stays with that stream until
its queue is empty, then ends. So stalled clients never hold up the others, and a slow one costs
a task of its own only while it is behind. Without a running hub (a server with no lifespan)
every stream has its own writer, ``Outbox.run``.
"""

from __future__ import annotations

import math
from collections import deque
from time import perf_counter

import anyio
import anyio.abc
import anyio.lowlevel

from .outbox import Outbox
from .stats import Counters

TURN = 32  # messages a sender sends to one stream before it moves on to the next ready one
SLICE = 0.001  # seconds the senders together may keep the event loop before others run


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

    @property
    def count(self) -> int:
        """Senders serving the ready queue (retired ones, finishing a stuck stream, not counted)."""
        return len(self._senders)

    @property
    def idle(self) -> int:
        """Senders waiting for work."""
        return len(self._idle)

    @property
    def pending(self) -> int:
        """Streams waiting for a sender."""
        return len(self._ready)

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
            # One turn: send for the stream, inline (a turn per delivery under steady load).
            outbox = sender.outbox = ready.popleft()
            await outbox.drain(TURN)
            sender.outbox = None
            if sender.retired:
                # Replaced while its send was stuck: it finishes this socket's queue alone.
                if outbox.scheduled and not outbox.finished:
                    await outbox.drain(math.inf)
                outbox.stuck(None)
                return
            if outbox.scheduled and not outbox.finished:
                ready.append(outbox)  # more queued: back in line
            del outbox  # (an idle sender keeps no closed socket alive)

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
                box.stuck(sender.scope.cancel)
                self._senders.discard(sender)
                self._counters.stalled_sends += 1
                self._add()
