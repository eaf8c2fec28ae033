"""The delivery hot path in process: queue policy, the writer, and the send slots."""

from __future__ import annotations

import anyio
import pytest

from asgi_events.delivery import (
    BUSY,
    FULL,
    OK,
    DurableMessage,
    Outbox,
    SendSlots,
    TransientMessage,
    text_message,
)
from asgi_events.stats import Counters
from asgi_events.types import Message


def plain(n: int) -> Message:
    return text_message(str(n))


def durable(n: int) -> Message:
    return text_message(str(n), DurableMessage)


def transient(n: int) -> Message:
    return text_message(str(n), TransientMessage)


def texts(outbox: Outbox) -> list[str]:
    return [m["text"] for m in outbox._queue]


def test_push_is_ok_until_half_full_then_busy_then_full() -> None:
    box = Outbox(limit=4, durable_limit=100, counters=Counters())
    assert [box.push(plain(n)) for n in range(5)] == [OK, OK, BUSY, BUSY, FULL]
    assert texts(box) == ["0", "1", "2", "3"]


def test_transient_events_are_shed_first() -> None:
    counters = Counters()
    box = Outbox(limit=4, durable_limit=100, counters=counters)
    for n in range(2):
        box.push(transient(n))
    assert box.push(transient(2)) == BUSY  # past half full: a new transient one is shed
    assert box.push(plain(3)) == BUSY
    assert box.push(plain(4)) == BUSY
    assert box.push(plain(5)) == BUSY  # full: the queued transient ones make room
    assert texts(box) == ["3", "4", "5"]
    assert counters.transient_shed == 3


def test_durable_backlog_is_bounded_below_the_buffer() -> None:
    box = Outbox(limit=100, durable_limit=4, counters=Counters())
    # past half the bound the publisher is asked to yield; at the bound the socket must go
    assert [box.push(durable(n)) for n in range(5)] == [OK, OK, BUSY, BUSY, FULL]
    assert box.push(plain(9)) == BUSY  # queued, while the durable backlog is high


def test_a_replay_does_not_count_against_the_limits() -> None:
    box = Outbox(limit=4, durable_limit=2, counters=Counters())
    box.preload([plain(n) for n in range(10)])  # the hub replays frames as plain messages
    assert [box.push(durable(n)) for n in range(10, 12)] == [OK, BUSY]
    assert [box.push(plain(n)) for n in range(12, 15)] == [BUSY, BUSY, FULL]


def test_a_closed_outbox_drops_everything() -> None:
    box = Outbox(limit=4, durable_limit=2, counters=Counters())
    box.push(plain(1))
    box.close(1013, "Slow consumer")
    assert box.push(plain(2)) == OK and texts(box) == []


async def test_the_writer_sends_all_then_the_close() -> None:
    counters = Counters()
    box = Outbox(limit=100, durable_limit=100, counters=counters)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if len(sent) == 3:
            box.close(1000, "done")

    for n in range(5):
        box.push(durable(n))
    with anyio.fail_after(5):
        await box.run(send, SendSlots(1, 1.0))
    assert [m.get("text") for m in sent] == ["0", "1", "2", None]
    assert sent[-1] == {"type": "websocket.close", "code": 1000, "reason": "done"}
    assert counters.messages_sent == 3 and box._durable == 0


async def test_a_stalled_holder_loses_its_slot_to_a_waiter() -> None:
    slots = SendSlots(1, stall_timeout=0.05)
    stuck = Outbox(limit=10, durable_limit=10, counters=Counters())
    other = Outbox(limit=10, durable_limit=10, counters=Counters())
    await slots.acquire(stuck)  # and never sends
    with anyio.fail_after(5):
        await slots.acquire(other)
    assert stuck.stalled
    slots.release(stuck)  # a revoked slot is not released twice
    slots.release(other)
    assert slots._free == 1


async def test_a_cancelled_waiter_never_keeps_a_slot() -> None:
    slots = SendSlots(1, stall_timeout=10)
    a, b, c = (Outbox(limit=10, durable_limit=10, counters=Counters()) for _ in range(3))

    async def writer(box: Outbox) -> None:  # the pattern of Outbox.run
        await slots.acquire(box)
        try:
            await anyio.sleep_forever()
        finally:
            slots.release(box)

    await slots.acquire(a)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, b)
        await anyio.wait_all_tasks_blocked()
        slots.release(a)  # granted to b ...
        tg.cancel_scope.cancel()  # ... which is cancelled before or after it wakes
    with anyio.fail_after(5):
        await slots.acquire(c)
    assert list(slots._holders) == [c] and not slots._waiters


@pytest.mark.parametrize("size", [0, -1])
def test_send_slots_need_one(size: int) -> None:
    with pytest.raises(ValueError):
        SendSlots(size, 1.0)
