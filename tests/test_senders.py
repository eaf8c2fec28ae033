"""The shared sender tasks (``senders.py``), and a publisher under pressure (``streams.py``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

from asgi_events import EventHub
from asgi_events.backends.base import Published
from asgi_events.outbox import OK, Outbox
from asgi_events.senders import Senders
from asgi_events.stats import Counters
from asgi_events.stream import Stream
from asgi_events.streams import PRESSURE_ROUNDS
from asgi_events.transports.websocket import WIRE
from asgi_events.types import Message, Principal

from .support.messages import plain
from .support.server import users


@asynccontextmanager
async def running(senders: Senders) -> AsyncIterator[Senders]:
    async with anyio.create_task_group() as tg:
        await tg.start(senders.run)
        yield senders
        tg.cancel_scope.cancel()


class Socket:
    """A fake socket: records what is sent; a send suspends (like trio's) unless told not to."""

    def __init__(self, suspend: bool = True) -> None:
        self.sent: list[str] = []
        self.suspend = suspend
        self.gate: anyio.Event | None = None  # while set to an unset event, sends block
        self.got = anyio.Event()
        self.errors: list[Exception | None] = []
        self.outbox = Outbox(1000, 1000, Counters(), WIRE, self.send, self.errors.append)

    async def send(self, message: Message) -> None:
        if self.gate is not None:
            await self.gate.wait()
        elif self.suspend:
            await anyio.lowlevel.checkpoint()
        self.sent.append(message.get("text") or f"close {message.get('code')}")
        self.got.set()

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(5):
            while len(self.sent) < count:
                self.got = anyio.Event()
                await self.got.wait()


async def test_nothing_is_sent_before_start() -> None:
    sock = Socket()
    async with running(Senders(2, 1.0, Counters())) as senders:
        sock.outbox.push(plain(1))
        await anyio.wait_all_tasks_blocked()
        assert sock.sent == []
        sock.outbox.start(senders.ready)
        await sock.wait_for(1)
    assert sock.sent == ["1"]


async def test_senders_deliver_every_socket_in_order_at_most_size_at_once() -> None:
    in_flight = peak = 0

    def counting(sock: Socket) -> Callable[[Message], object]:
        async def send(message: Message) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await Socket.send(sock, message)
            finally:
                in_flight -= 1

        return send

    sockets = [Socket() for _ in range(6)]
    async with running(Senders(2, 1.0, Counters())) as senders:
        for sock in sockets:
            sock.outbox.send = counting(sock)  # type: ignore[assignment]
            sock.outbox.start(senders.ready)
        for n in range(100):  # more than a turn per socket
            for sock in sockets:
                sock.outbox.push(plain(n))
        for sock in sockets:
            await sock.wait_for(100)
    assert all(sock.sent == [str(n) for n in range(100)] for sock in sockets)
    assert peak == 2


async def test_a_stalled_send_is_left_behind_and_the_others_go_on() -> None:
    stuck, other = Socket(), Socket()
    stuck.gate = anyio.Event()
    counters = Counters()
    async with running(Senders(1, 0.05, counters)) as senders:
        for sock in (stuck, other):
            sock.outbox.start(senders.ready)
        stuck.outbox.push(plain(1))  # the only sender blocks in this send
        await anyio.wait_all_tasks_blocked()
        other.outbox.push(plain(2))
        await other.wait_for(1)  # sent by the sender that replaced the stuck one
        assert counters.stalled_sends == 1 and stuck.outbox.stalled
        stuck.outbox.push(plain(3))  # queued behind the stuck send
        stuck.gate.set()
        stuck.gate = None
        await stuck.wait_for(2)  # the retired sender finishes the queue, then ends
        await anyio.wait_all_tasks_blocked()
        stuck.outbox.push(plain(4))  # back with the senders
        other.outbox.push(plain(5))
        await stuck.wait_for(3)
        await other.wait_for(2)
        assert counters.stalled_sends == 1 and senders.count == 1
        assert not stuck.outbox.stalled  # caught up: back with the senders
    assert stuck.sent == ["1", "3", "4"] and other.sent == ["2", "5"]


async def test_a_sender_lets_other_tasks_run_when_sends_never_suspend() -> None:
    sockets = [Socket(suspend=False) for _ in range(40)]
    for sock in sockets:
        sock.send = slow(sock.send)  # type: ignore[method-assign]
        sock.outbox.send = sock.send
    async with running(Senders(1, 10.0, Counters())) as senders:
        for sock in sockets:
            sock.outbox.start(senders.ready)
            sock.outbox.push(plain(0))
        await sockets[0].wait_for(1)  # this task wants to run as soon as the first one is sent
        seen = sum(len(sock.sent) for sock in sockets)
        await sockets[-1].wait_for(1)
    assert seen < len(sockets)  # it ran before the sender was through


async def test_where_sends_never_suspend_all_but_two_senders_wait() -> None:
    sockets = [Socket(suspend=False) for _ in range(40)]
    for sock in sockets:
        sock.outbox.send = slow(sock.send)
    busy: list[int] = []
    async with running(Senders(8, 60.0, Counters())) as senders:
        for sock in sockets:
            sock.outbox.start(senders.ready)
            for n in range(5):
                sock.outbox.push(plain(n))
        with anyio.fail_after(10):
            while any(len(sock.sent) < 5 for sock in sockets):
                await anyio.lowlevel.checkpoint()  # runs between two slices
                if senders.pending:  # (not once the last sockets are being sent for)
                    busy.append(senders.count - senders.idle)
    assert all(sock.sent == [str(n) for n in range(5)] for sock in sockets)
    assert set(busy[len(busy) // 2 :]) == {2}  # one sending, one watching (all 8 woke first)


async def test_a_sender_woken_mid_turn_does_not_add_a_slice_to_that_turn_of_the_loop() -> None:
    """Every send here uses up a slice: one send per turn of the event loop, however many
    waiting senders new messages wake. Between two steps of this task lies one turn (two on
    trio, which may run a batch of tasks in either order)."""
    sockets = [Socket(suspend=False) for _ in range(100)]
    late = [Socket(suspend=False) for _ in range(100)]
    for sock in sockets + late:
        sock.outbox.send = slow(sock.send, 0.002)
    per_turn: list[int] = []
    async with running(Senders(8, 60.0, Counters())) as senders:
        for sock in sockets:
            sock.outbox.start(senders.ready)
            sock.outbox.push(plain(0))
        with anyio.fail_after(10):
            for sock in late:  # each wakes a waiting sender, if there is one
                sent = sum(len(s.sent) for s in sockets + late)
                sock.outbox.start(senders.ready)
                sock.outbox.push(plain(0))
                await anyio.lowlevel.checkpoint()
                per_turn.append(sum(len(s.sent) for s in sockets + late) - sent)
    assert max(per_turn) <= 2  # (before: every woken sender added one, up to 9 here)


async def test_sends_stuck_one_after_the_other_do_not_hold_up_the_others() -> None:
    """The sending sender blocks (at socket 10's third message), then the one that took over
    (at socket 30's): each time a watcher takes over, long before the watchdog would."""
    sockets = [Socket(suspend=False) for _ in range(40)]
    gate = anyio.Event()
    for i, sock in enumerate(sockets):
        send = slow(sock.send)
        if i in (10, 30):
            send = blocking_at("2", send, gate)
        sock.outbox.send = send
    counters = Counters()
    async with running(Senders(8, 60.0, counters)) as senders:
        for sock in sockets:
            sock.outbox.start(senders.ready)
            for n in range(5):
                sock.outbox.push(plain(n))
        for i, sock in enumerate(sockets):
            await sock.wait_for(5 if i not in (10, 30) else 2)
        assert counters.stalled_sends == 0
        gate.set()
        await sockets[10].wait_for(5)
        await sockets[30].wait_for(5)
    assert all(sock.sent == [str(n) for n in range(5)] for sock in sockets)


def blocking_at(
    text: str, send: Callable[[Message], object], gate: anyio.Event
) -> Callable[[Message], object]:
    async def send_or_block(message: Message) -> None:
        if message.get("text") == text:
            await gate.wait()
        await send(message)  # type: ignore[misc]

    return send_or_block


def slow(send: Callable[[Message], object], seconds: float = 0.001) -> Callable[[Message], object]:
    async def blocking_send(message: Message) -> None:
        busy_until = time.perf_counter() + seconds  # a send that takes a while, never suspending
        while time.perf_counter() < busy_until:
            pass
        await send(message)  # type: ignore[misc]

    return blocking_send


async def test_a_failing_send_drops_only_its_socket() -> None:
    gone, broken, fine = Socket(), Socket(), Socket()

    async def reset(message: Message) -> None:
        raise ConnectionResetError

    async def bug(message: Message) -> None:
        raise RuntimeError("server bug")

    gone.outbox.send, broken.outbox.send = reset, bug
    async with running(Senders(1, 1.0, Counters())) as senders:
        for sock in (gone, broken, fine):
            sock.outbox.start(senders.ready)
            sock.outbox.push(plain(1))
        await fine.wait_for(1)
        fine.outbox.push(plain(2))
        await fine.wait_for(2)
    assert gone.errors == [None] and gone.outbox.finished
    assert [type(e) for e in broken.errors] == [RuntimeError] and broken.outbox.finished
    assert gone.outbox.push(plain(3)) == OK and not gone.outbox.queued  # dropped from now on
    assert fine.sent == ["1", "2"] and fine.errors == []


async def test_a_close_frame_ends_the_socket_once() -> None:
    sock = Socket()
    async with running(Senders(1, 1.0, Counters())) as senders:
        sock.outbox.start(senders.ready)
        sock.outbox.push(plain(1))
        sock.outbox.close(1013, "Slow consumer")  # the queued message is dropped
        sock.outbox.push(plain(2))
        await sock.wait_for(1)
        await anyio.wait_all_tasks_blocked()
    assert sock.sent == ["close 1013"] and sock.errors == [None]


@pytest.mark.parametrize("size", [0, -1])
def test_senders_need_one(size: int) -> None:
    with pytest.raises(ValueError):
        Senders(size, 1.0, Counters())


async def test_a_publisher_waits_for_a_pressed_queue_but_not_for_a_stuck_one() -> None:
    """Under pressure broadcast lets the senders run for a few rounds; a socket whose send is
    stuck gains nothing from that, so it must not slow every publisher down."""
    hub = EventHub(users)
    counters = hub.streams.counters

    def backlogged(stalled: bool) -> Stream:
        stream = Stream(Principal("alice"), WIRE, counters)
        stream.outbox = Outbox(8, 100, counters, WIRE)  # (never started: nothing drains it)
        for n in range(5):
            stream.outbox.push(plain(n))  # past half of the limit: pressed
        stream.outbox.stuck((lambda: None) if stalled else None)  # as a retirement does
        return stream

    rounds = 0

    async def count_rounds() -> None:
        nonlocal rounds
        while True:
            await anyio.lowlevel.checkpoint()
            rounds += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_rounds)
        await anyio.lowlevel.checkpoint()  # (it runs whenever this task yields)
        before = rounds
        await hub.streams.fan_out([backlogged(stalled=True)], Published(None, "9"))
        stuck_rounds, before = rounds - before, rounds
        await hub.streams.fan_out([backlogged(stalled=False)], Published(None, "9"))
        pressed_rounds = rounds - before
        tg.cancel_scope.cancel()
    assert stuck_rounds == 0
    assert pressed_rounds >= PRESSURE_ROUNDS - 1


async def test_a_send_stuck_for_a_socket_that_is_gone_is_cancelled() -> None:
    """The connection ended (its close deadline passed): the retired sender must not stay."""
    stuck, cancelled, counters = Socket(), anyio.Event(), Counters()
    stuck.gate = anyio.Event()  # never set: the client never reads again

    async def send(message: Message) -> None:
        try:
            await Socket.send(stuck, message)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    stuck.outbox.send = send
    async with running(Senders(1, 0.05, counters)) as senders:
        stuck.outbox.start(senders.ready)
        stuck.outbox.push(plain(1))
        with anyio.fail_after(5):
            while not counters.stalled_sends:  # noqa: ASYNC110 (no event marks a retirement)
                await anyio.sleep(0.01)
            stuck.outbox.abandon()
            await cancelled.wait()
        assert senders.count == 1 and stuck.sent == []
