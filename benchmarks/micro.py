"""Micro-benchmarks of the fan-out hot path and of resume lookups: no network, no server.

What is timed (see ``benchmarks/MICRO.md``)::

    .venv/bin/python benchmarks/micro.py                  # asyncio, about 6 s
    .venv/bin/python benchmarks/micro.py --backend trio
    .venv/bin/python benchmarks/micro.py --quick          # CI smoke run, tiny sizes, < 1 s
    .venv/bin/python benchmarks/micro.py --profile        # also cProfile one broadcast round

1. Fan-out: an ``EventHub`` (memory backend, default queue and buffer sizes) with 10,000
   sockets registered through the real ``hub.streams.attach``, built the way
   ``transports.websocket.serve`` builds them (``hub.streams.create``: a ``Stream`` and its
   ``Outbox``, ``asgi-events.v1`` subprotocol, so each socket also gets its ready message
   queued, which is drained before timing). No writer task runs:
   a round times only ``await hub.broadcast_to_all(event)`` / ``await hub.broadcast(user,
   event)`` calls, i.e. validation, encoding, buffering and one ``Outbox.push`` per socket.
   Between rounds (untimed) every outbox is drained through the real writer loop
   (``Outbox.drain``) into a fake ``send`` that counts messages; the count must equal the
   sockets reached x events, and no outbox may have reached its high-water mark (so the
   publisher never yielded and nothing was shed or closed).
2. Resume: ``ReplayLog.since_id`` on one user's log of n events, for a resume point a few
   events from the end, against n.
3. Reference: ``Outbox.push`` alone and ``codec.encode`` of a typical ~100-byte event.

Every figure is the median of several repetitions timed with ``time.perf_counter`` (the
garbage collector is left on, after a ``gc.collect()`` before each repetition). The Markdown
table is printed and written to ``benchmarks/results/micro[-trio].md`` (``--quick`` and
``--profile`` runs write ``micro*-quick.md`` / ``micro*-profile.md``, which git ignores).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import math
import os
import platform
import pstats
import statistics
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio

from asgi_events import codec
from asgi_events.buffer import ReplayLog
from asgi_events.hub import EventHub
from asgi_events.outbox import Outbox
from asgi_events.stats import Counters
from asgi_events.stream import State
from asgi_events.transports.websocket import WIRE
from asgi_events.types import Message, Principal

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GOAL = 1_000_000  # enqueues per second (issue 5, item 5)

# A typical event: with the timestamp and id the hub adds, its frame is about 100 bytes.
EVENT: dict[str, Any] = {"type": "order.paid", "payload": {"order": 4821}}


@dataclasses.dataclass(frozen=True)
class Sizes:
    sockets: int  # sockets in the hub
    events: int  # events per timed round (each reaches every socket it targets)
    rounds: int  # timed rounds per fan-out case
    repeat: int  # repetitions of the smaller measurements
    pushes: int  # outboxes pushed into per repetition (Outbox.push alone)
    encodes: int  # codec.encode calls per repetition
    buffers: tuple[int, ...]  # replay buffer sizes n
    lookups: int  # since_id calls per repetition
    returned: tuple[int, ...]  # events a lookup returns, for the "+ events returned" table


FULL = Sizes(10_000, 20, 7, 7, 10_000, 20_000, (100, 1_000, 10_000, 100_000), 5_000, (1, 10, 100))
QUICK = Sizes(1_000, 5, 3, 3, 1_000, 1_000, (100, 1_000), 300, (1, 10))
NEAR_END = 5  # a resume point this many events before the newest


# -- timing helpers -------------------------------------------------------------------------


def median_time(
    fn: Callable[[], object], repeat: int, after: Callable[[], object] | None = None
) -> float:
    """Median seconds one call of ``fn`` takes over ``repeat`` calls (``after`` untimed)."""
    times: list[float] = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if after is not None:
            after()
    return statistics.median(times)


def si(value: float) -> str:
    """1234567 -> '1.23 M'."""
    for factor, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if value >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


# -- 1. fan-out through the hub -------------------------------------------------------------


class FakeSocket:
    """The ``send`` callable of a socket that takes everything at once; counts messages."""

    def __init__(self) -> None:
        self.received = 0

    async def send(self, message: Message) -> None:
        self.received += 1


async def verify_token(token: str) -> str:
    return token


async def make_hub(sockets: int, one_user: bool) -> tuple[EventHub, list[Outbox], list[str]]:
    """A hub with ``sockets`` open sockets, of distinct users or all of one user.

    Everything but ``max_connections_per_user`` is the hub's default, so the queue bounds are
    the ones production runs with: 1024 messages per socket, 100 buffered events (half of
    ``buffer_size=200``); ``run_round`` checks they are never approached.
    """
    hub = EventHub(verify_token, max_connections_per_user=max(sockets, 1))
    streams, socket = hub.streams, FakeSocket()
    outboxes: list[Outbox] = []
    users: list[str] = []
    for i in range(sockets):
        user = "user-0" if one_user else f"user-{i}"
        # As transports.websocket.serve does it for an asgi-events.v1 client, minus the socket:
        # stream and outbox, attach, accept (never started: no writer, no sender).
        stream = streams.create(Principal(user), WIRE, socket.send, control=True)
        await streams.attach(stream)
        stream.to(State.OPEN)
        outboxes.append(stream.outbox)
        if not users or users[-1] != user:
            users.append(user)
    assert len(streams.all()) == sockets, "a socket was displaced"
    await drain(outboxes, FakeSocket())  # the ready messages
    return hub, outboxes, users


async def drain(outboxes: list[Outbox], socket: FakeSocket) -> int:
    """Run each outbox's writer loop until its queue is empty; the messages sent."""
    before = socket.received
    for box in outboxes:
        box.send = socket.send  # (as a sender would: everything queued, in one go)
        await box.drain(math.inf)
    return socket.received - before


@dataclasses.dataclass(frozen=True)
class FanOut:
    case: str
    calls: int  # broadcast calls per round
    reached: int  # sockets each call reaches
    seconds: float  # median seconds per round
    fastest: float
    slowest: float

    @property
    def enqueues(self) -> int:
        return self.calls * self.reached

    @property
    def rate(self) -> float:
        return self.enqueues / self.seconds


async def run_round(
    hub: EventHub,
    outboxes: list[Outbox],
    publish: Callable[[], Awaitable[None]],
    expected: int,
    profile: cProfile.Profile | None = None,
) -> float:
    """Time one ``publish()`` (profiled if ``profile``); then check that it queued
    ``expected`` messages, without pressure, and drain them (untimed)."""
    gc.collect()
    if profile is not None:
        profile.enable()
    start = time.perf_counter()
    await publish()
    elapsed = time.perf_counter() - start
    if profile is not None:
        profile.disable()
    if any(box.pressed for box in outboxes):
        raise RuntimeError("an outbox reached its high-water mark: fewer events per round")
    if hub.streams.counters.slow_consumer_closes:
        raise RuntimeError("a socket was closed as a slow consumer")
    queued = await drain(outboxes, FakeSocket())
    if queued != expected:
        raise RuntimeError(f"{queued} messages queued, {expected} expected")
    return elapsed


async def fan_out(sizes: Sizes, profiles: dict[str, cProfile.Profile] | None) -> list[FanOut]:
    """The fan-out cases; with ``profiles``, also one profiled round of each (not timed)."""
    events, results = sizes.events, []

    async def to_all() -> None:
        for _ in range(events):
            await hub.broadcast_to_all(EVENT)

    async def to_each_user() -> None:
        for user in users:
            await hub.broadcast(user, EVENT)

    async def to_one_user() -> None:
        for _ in range(events):
            await hub.broadcast("user-0", EVENT)

    n = sizes.sockets
    for one_user in (False, True):
        hub, outboxes, users = await make_hub(n, one_user)
        who = "1 user" if one_user else f"{n:,} users"
        cases: list[tuple[str, Callable[[], Awaitable[None]], int, int]] = [
            (f"broadcast_to_all, {n:,} sockets of {who}", to_all, events, n),
        ]
        if one_user:
            cases.append((f"broadcast(user), {n:,} sockets of 1 user", to_one_user, events, n))
        else:
            cases.append(
                (f"broadcast(user) to each of {n:,} users, 1 socket each", to_each_user, n, 1)
            )
        for case, publish, calls, reached in cases:
            await run_round(hub, outboxes, publish, calls * reached)  # warm-up
            times = [
                await run_round(hub, outboxes, publish, calls * reached)
                for _ in range(sizes.rounds)
            ]
            results.append(
                FanOut(case, calls, reached, statistics.median(times), min(times), max(times))
            )
            if profiles is not None:
                profiles[case] = profile = cProfile.Profile()
                await run_round(hub, outboxes, publish, calls * reached, profile)
    return results


# -- 2. resume lookups ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lookup:
    size: int  # events in the user's log
    returned: int  # events the lookup returns
    seconds: float  # median seconds per lookup


def filled_log(size: int, frame: str) -> ReplayLog:
    log = ReplayLog(size=size, max_age=1e9, max_users=None)
    timestamp = datetime.now(timezone.utc)
    for _ in range(size):
        seq, _id = log.assign()
        log.append("user-0", seq, frame, timestamp, 0.0)
    return log


def lookups(sizes: Sizes, frame: str) -> tuple[list[Lookup], list[Lookup]]:
    by_size: list[Lookup] = []
    by_returned: list[Lookup] = []
    count = sizes.lookups
    for size in sizes.buffers:
        log = filled_log(size, frame)
        for returned in (NEAR_END, *(() if size != sizes.buffers[-1] else sizes.returned)):
            last_id = log.make_id(size - returned)
            resume = log.since_id("user-0", last_id, 0.0)
            assert resume.recovered and len(resume.frames) == returned

            def lookup(log: ReplayLog = log, last_id: str = last_id) -> None:
                since_id = log.since_id
                for _ in range(count):
                    since_id("user-0", last_id, 0.0)

            found = Lookup(size, returned, median_time(lookup, sizes.repeat) / count)
            (by_size if returned == NEAR_END else by_returned).append(found)
    return by_size, by_returned


# -- 3. the pieces --------------------------------------------------------------------------


def pieces(sizes: Sizes) -> tuple[list[tuple[str, float]], str]:
    """(name, median seconds per operation) for codec.encode and Outbox.push; the frame."""
    fields = codec.prepare(EVENT)
    fields["id"] = "5f3a9c1e.123456"  # as the memory backend sets it
    frame = codec.encode(fields)
    encodes = sizes.encodes

    def encode() -> None:
        enc = codec.encode
        for _ in range(encodes):
            enc(fields)

    results = [
        (
            f"codec.encode, {len(frame.encode())}-byte frame",
            median_time(encode, sizes.repeat) / encodes,
        )
    ]
    counters = Counters()
    for label, message in (
        ("plain (broadcast_to_all)", WIRE.event(frame, None, None, False)),
        ("durable (broadcast)", WIRE.event(frame, fields["id"], 123456, False)),
    ):

        def empty_boxes() -> list[Outbox]:
            # Never started, with an empty queue (preload of nothing): as a writer leaves them.
            boxes = [Outbox(1024, 100, counters, WIRE) for _ in range(sizes.pushes)]
            for box in boxes:
                box.preload([])
            return boxes

        boxes = empty_boxes()

        def push(boxes: list[Outbox] = boxes, message: Message = message) -> None:
            for box in boxes:
                box.push(message)

        def empty(boxes: list[Outbox] = boxes) -> None:
            boxes[:] = empty_boxes()  # what the writer would leave: nothing queued

        seconds = median_time(push, sizes.repeat, after=empty) / sizes.pushes
        results.append((f"Outbox.push, {label}, one push into each of {sizes.pushes:,}", seconds))
    return results, frame


# -- report ---------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    sizes: Sizes,
    fan: list[FanOut],
    parts: list[tuple[str, float]],
    by_size: list[Lookup],
    by_returned: list[Lookup],
    load: tuple[float, float],
) -> str:
    lines = [
        f"# Micro-benchmarks{' (quick)' if args.quick else ''}",
        "",
        f"`{' '.join([Path(sys.executable).name, *sys.argv])}` on {args.backend}; "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.platform()}); "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; 1-minute load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after (other processes compete for the CPUs "
        "if it is well above 1). Medians; see `benchmarks/MICRO.md`.",
        "",
        f"## Fan-out through `EventHub` ({sizes.rounds} rounds, no writer tasks running)",
        "",
        "Enqueues/s = calls x sockets each reaches / time. Goal: >= 1M/s.",
        "",
        "| case | calls per round | sockets per call | ms per round (min-max) | ns per enqueue "
        "| enqueues/s | goal |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in fan:
        goal = (
            "n/a (1 socket per call)" if r.reached == 1 else ("met" if r.rate >= GOAL else "MISSED")
        )
        lines.append(
            f"| {r.case} | {r.calls:,} | {r.reached:,} "
            f"| {r.seconds * 1e3:.1f} ({r.fastest * 1e3:.1f}-{r.slowest * 1e3:.1f}) "
            f"| {r.seconds / r.enqueues * 1e9:.0f} | {si(r.rate)} | {goal} |"
        )
    lines += [
        "",
        "## Pieces of the hot path",
        "",
        "| operation | ns per op | ops/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {sec * 1e9:.0f} | {si(1 / sec)} |" for name, sec in parts]
    first, last = by_size[0], by_size[-1]
    ratio = last.seconds / first.seconds
    bound = math.log(last.size) / math.log(first.size)
    lines += [
        "",
        f"## Resume lookup: `ReplayLog.since_id`, {NEAR_END} events before the newest",
        "",
        "| buffered events n | events returned | µs per lookup |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r.size:,} | {r.returned} | {r.seconds * 1e6:.2f} |" for r in by_size]
    verdict = "met" if ratio <= bound else "MISSED"
    lines += [
        "",
        f"n={last.size:,} / n={first.size:,}: **{ratio:.2f}x** (a pure O(log n) lookup may take "
        f"up to log({last.size:,})/log({first.size:,}) = {bound:.2f}x; a linear one "
        f"{last.size // first.size:,}x): {verdict}.",
        "",
        f"Events returned, n={last.size:,}:",
        "",
        "| events returned | µs per lookup |",
        "|---:|---:|",
    ]
    lines += [
        f"| {r.returned} | {r.seconds * 1e6:.2f} |"
        for r in sorted([last, *by_returned], key=lambda r: r.returned)
    ]
    return "\n".join(lines) + "\n"


def profile_report(profiles: dict[str, cProfile.Profile], top: int = 12) -> str:
    """The top entries by own time of one profiled round of each fan-out case."""
    parts = ["", "## cProfile: one round of each fan-out case (sorted by own time)", ""]
    for case, profile in profiles.items():
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
        text = out.getvalue()
        text = text[text.find("   ncalls") :].rstrip()  # (from the column headers on)
        for prefix in (str(Path.cwd()), sysconfig.get_paths()["stdlib"], sys.prefix):
            text = text.replace(prefix + os.sep, "")
        parts += [f"### {case}", "", "```", text, "```", ""]
    return "\n".join(parts)


async def main(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else FULL
    if args.sockets:
        sizes = dataclasses.replace(sizes, sockets=args.sockets)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    profiles: dict[str, cProfile.Profile] | None = {} if args.profile else None
    fan = await fan_out(sizes, profiles)
    parts, frame = pieces(sizes)
    by_size, by_returned = lookups(sizes, frame)
    text = report(args, sizes, fan, parts, by_size, by_returned, (load, os.getloadavg()[0]))
    if profiles is not None:
        text += profile_report(profiles)
    print(text)
    suffix = ("-trio" if args.backend == "trio" else "") + ("-quick" if args.quick else "")
    suffix += "-profile" if args.profile else ""
    if args.sockets:
        suffix += f"-{args.sockets}"
    path = args.output or RESULTS_DIR / f"micro{suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written to {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (< 3 s)")
    parser.add_argument("--sockets", type=int, help="sockets in the hub (default 10,000)")
    parser.add_argument("--profile", action="store_true", help="cProfile one broadcast round")
    parser.add_argument("--output", type=Path, help="where to write the Markdown table")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
