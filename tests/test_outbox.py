"""One stream's queue policy (sync) and its own writer: ``outbox.py``."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from asgi_events.outbox import BUSY, FULL, OK, Outbox
from asgi_events.stats import Counters
from asgi_events.transports.websocket import WIRE
from asgi_events.types import Message

from .support.messages import durable, plain, texts, transient


def test_push_is_ok_until_half_full_then_busy_then_full() -> None:
    box = Outbox(limit=4, durable_limit=100, counters=Counters(), wire=WIRE)
    assert [box.push(plain(n)) for n in range(5)] == [OK, OK, BUSY, BUSY, FULL]
    assert texts(box) == ["0", "1", "2", "3"]


def test_transient_events_are_shed_first() -> None:
    counters = Counters()
    box = Outbox(limit=4, durable_limit=100, counters=counters, wire=WIRE)
    for n in range(2):
        box.push(transient(n))
    assert box.push(transient(2)) == BUSY  # past half full: a new transient one is shed
    assert box.push(plain(3)) == BUSY
    assert box.push(plain(4)) == BUSY
    assert box.push(plain(5)) == BUSY  # full: the queued transient ones make room
    assert texts(box) == ["3", "4", "5"]
    assert counters.transient_shed == 3


def test_durable_backlog_is_bounded_below_the_buffer() -> None:
    box = Outbox(limit=100, durable_limit=4, counters=Counters(), wire=WIRE)
    # past half the bound the publisher is asked to yield; at the bound the socket must go
    assert [box.push(durable(n)) for n in range(5)] == [OK, OK, BUSY, BUSY, FULL]
    assert box.push(plain(9)) == BUSY  # queued, while the durable backlog is high


def test_a_replay_does_not_count_against_the_limits() -> None:
    box = Outbox(limit=4, durable_limit=2, counters=Counters(), wire=WIRE)
    box.preload([plain(n) for n in range(10)])  # the hub replays frames as plain messages
    assert [box.push(durable(n)) for n in range(10, 12)] == [OK, BUSY]
    assert [box.push(plain(n)) for n in range(12, 15)] == [BUSY, BUSY, FULL]


def test_a_closed_outbox_drops_everything() -> None:
    box = Outbox(limit=4, durable_limit=2, counters=Counters(), wire=WIRE)
    box.push(plain(1))
    box.close(1013, "Slow consumer")
    assert box.push(plain(2)) == OK and texts(box) == []


async def test_the_close_is_unsent_until_it_is_out_or_the_peer_is_gone() -> None:
    close = {"type": "websocket.close", "code": 1001, "reason": "Server shutdown"}
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    box = Outbox(4, 2, Counters(), WIRE, send)
    assert box.unsent_close() is None  # none queued
    box.close(1001, "Server shutdown")
    assert box.unsent_close() == close
    box.start(None)
    await box.drain(1)
    assert sent == [close] and box.unsent_close() is None  # out
    gone = Outbox(4, 2, Counters(), WIRE, send)
    gone.close(1001, "Server shutdown")
    gone.abandon()
    assert gone.unsent_close() is None and sent == [close]  # the peer is gone: never sent


async def test_a_writer_of_its_own_sends_all_then_the_close() -> None:
    counters = Counters()
    sent: list[Message] = []
    done: list[Exception | None] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if len(sent) == 3:
            box.close(1000, "done")

    box = Outbox(100, 100, counters, WIRE, send, done.append)
    for n in range(5):
        box.push(durable(n))
    box.start(None)
    with anyio.fail_after(5):
        await box.run()
    assert [m.get("text") for m in sent] == ["0", "1", "2", None]
    assert sent[-1] == {"type": "websocket.close", "code": 1000, "reason": "done"}
    assert counters.messages_sent == 3 and box.durable == 0
    assert done == [None] and box.finished
