"""Where a delivery's CPU goes in the hub, in process: push, drain, sender scheduling, slices.

A hub with N streams of distinct users, the real outboxes and senders, on a ``send`` that takes
every message at once (``micro.FakeSocket``); M ``broadcast_to_all`` calls, timed from the first
call to the last message taken. Against it, a raw loop over the same fake sends (``for event:
for socket: await send(frame)``), which is what the raw ASGI app of ``fanout.py`` does minus the
server. Each case's nanoseconds per delivery, median of several rounds:

- ``raw loop``: the baseline.
- ``push``: the ``broadcast_to_all`` calls alone (senders not running).
- ``drain``: each outbox's queue sent in one ``drain`` call (no sender, no turn, no slice).
- ``senders, TURN=t``: the whole path with the senders; with ``SLICE`` at its value and, to
  price the slices (a yield to the event loop every ``SLICE`` seconds of sending), unbounded.

``senders - raw loop`` is what the hub adds to a delivery; ``drain - raw loop`` is the drain's
own part (both pay the fake send), the rest push and the sender scheduling (taking a stream off
the ready queue, one ``drain`` call per turn, putting it back); ``senders - senders (no
slices)`` is the slices. Each case runs on a hub of its own, so the parts need not add up.
The server's own send (WebSocket framing, the transport's write, the syscall) is not here: it is
the raw variant's server CPU per delivery in ``fanout.py`` runs.

    python benchmarks/breakdown.py [--sockets 1000] [--events 200] [--rounds 7] [--backend trio]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import anyio
from micro import EVENT, FakeSocket, verify_token  # (this script's folder)

from asgi_events import codec, senders
from asgi_events.hub import EventHub
from asgi_events.outbox import Outbox
from asgi_events.stream import State
from asgi_events.transports.websocket import WIRE
from asgi_events.types import Message, Principal


class CountingSocket(FakeSocket):
    """A fake send that sets ``done`` once ``expected`` messages were taken."""

    def __init__(self) -> None:
        super().__init__()
        self.expected = math.inf
        self.done = anyio.Event()

    async def send(self, message: Message) -> None:
        self.received += 1
        if self.received >= self.expected:
            self.done.set()

    def expect(self, more: int) -> None:
        self.expected, self.done = self.received + more, anyio.Event()


@contextmanager
def patched(turn: int, slice_: float) -> Iterator[None]:
    saved = senders.TURN, senders.SLICE
    senders.TURN, senders.SLICE = turn, slice_
    try:
        yield
    finally:
        senders.TURN, senders.SLICE = saved


async def open_streams(hub: EventHub, n: int, send: Callable[[Message], Awaitable[None]]) -> None:
    for i in range(n):
        stream = hub.streams.create(Principal(f"user-{i}"), WIRE, send, control=True)
        await hub.streams.attach(stream)
        stream.to(State.OPEN)
        if not hub.streams.start(stream):
            raise RuntimeError("no sender runs: the hub is not entered")


async def with_senders(n: int, m: int, turn: int, slice_: float) -> float:
    """Seconds from the first ``broadcast_to_all`` to the last message taken."""
    socket = CountingSocket()
    hub = EventHub(verify_token)
    with patched(turn, slice_):
        async with hub:
            socket.expect(n)  # the ready messages
            await open_streams(hub, n, socket.send)
            with anyio.fail_after(30):
                await socket.done.wait()
            socket.expect(n * m)
            gc.collect()
            start = time.perf_counter()
            for _ in range(m):
                await hub.broadcast_to_all(EVENT)
            with anyio.fail_after(60):
                await socket.done.wait()
            return time.perf_counter() - start


async def push_and_drain(n: int, m: int) -> tuple[float, float]:
    """Seconds for the ``broadcast_to_all`` calls with no sender running, then for draining
    every outbox in one call each."""
    socket = CountingSocket()
    hub = EventHub(verify_token)  # not entered: no senders
    outboxes: list[Outbox] = []
    for i in range(n):
        stream = hub.streams.create(Principal(f"user-{i}"), WIRE, socket.send, control=True)
        await hub.streams.attach(stream)
        stream.to(State.OPEN)
        outboxes.append(stream.outbox)
    for box in outboxes:  # the ready messages
        await box.drain(math.inf)
    gc.collect()
    start = time.perf_counter()
    for _ in range(m):
        await hub.broadcast_to_all(EVENT)
    pushed = time.perf_counter() - start
    if any(box.pressed for box in outboxes):
        raise RuntimeError("an outbox came under pressure: fewer events")
    before = socket.received
    start = time.perf_counter()
    for box in outboxes:
        await box.drain(math.inf)
    drained = time.perf_counter() - start
    if socket.received - before != n * m:
        raise RuntimeError("not every message was drained")
    return pushed, drained


async def raw_loop(n: int, m: int) -> float:
    socket = CountingSocket()
    sends = [socket.send] * n
    gc.collect()
    start = time.perf_counter()
    for _ in range(m):
        text = codec.encode(EVENT)  # (the raw app encodes each event once, too)
        frame = {"type": "websocket.send", "text": text}
        for send in sends:
            await send(frame)
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> None:
    n, m = args.sockets, args.events
    deliveries = n * m
    times: dict[str, list[float]] = {}

    def add(case: str, seconds: float) -> None:
        times.setdefault(case, []).append(seconds / deliveries * 1e9)

    for _ in range(args.rounds):
        add("raw loop", await raw_loop(n, m))
        pushed, drained = await push_and_drain(n, m)
        add("push", pushed)
        add("drain", drained)
        for turn in args.turns:
            add(f"senders, TURN={turn}", await with_senders(n, m, turn, senders.SLICE))
            add(f"senders, TURN={turn}, no slices", await with_senders(n, m, turn, math.inf))
    print(f"N={n} streams, M={m} broadcast_to_all, {args.rounds} rounds; ns per delivery")
    print("| case | median | range |\n|---|---:|---:|")
    for case, values in times.items():
        low, high = min(values), max(values)
        print(f"| {case} | {statistics.median(values):.0f} | {low:.0f}-{high:.0f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--turns", type=int, nargs="+", default=[senders.TURN, 1])
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 streams, 10 events")
    args = parser.parse_args(argv)
    if args.quick:
        args.sockets, args.events, args.rounds = 50, 10, 1
    return args


if __name__ == "__main__":
    arguments = parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
