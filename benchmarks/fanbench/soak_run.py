"""Soak mode, one run: the timeline (publish, drop, check the stalled clients, close the
buckets) and its figures. The clients and their churn are in ``soak``, the report in
``soak_report``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import time
from array import array
from dataclasses import dataclass
from typing import Any, cast

from .clients import connect_all, stalled_indices
from .common import (
    HTTP_TIMEOUT,
    LOAD_BOUND,
    NOISY,
    SERVER_READY_WAIT,
    STALL_FRACTION,
    load_cpu_seconds,
    machine_busy_seconds,
)
from .procs import ServerProcess, http_request
from .runs import fleet, post
from .soak import (
    BEHIND,
    DRAIN_WAIT,
    DROP_FRACTION,
    LONG_BUCKET_S,
    QUICK_MIN_DROPS,
    QUICK_MIN_STALLED,
    SHORT_BUCKET_S,
    SOAK_VARIANT,
    STALL_MSS,
    Churn,
    SoakTally,
    soak_client,
)
from .soak_report import Bucket, SoakResult, print_bucket


async def connect_soak(
    ports: list[int], args: argparse.Namespace, events: int
) -> tuple[Churn, list[Any], list[Any]]:
    """Open every client (the stalled ones stop reading once open); wait until every healthy
    one has its ready message (so it knows its position even before its first event)."""
    fraction = STALL_FRACTION
    if args.quick:
        fraction = max(fraction, QUICK_MIN_STALLED / args.sockets)
    stalled_ids = stalled_indices(args.sockets, fraction)
    tally = SoakTally(args.sockets - len(stalled_ids), events, asyncio.Event())
    idle = SoakTally(0, events, asyncio.Event())
    healthy, stalled = await connect_all(
        ports,
        tally,
        SOAK_VARIANT,
        stalled=stalled_ids,
        stalled_tally=idle,
        kind=soak_client,
        stall_mss=STALL_MSS,
    )
    deadline = time.monotonic() + SERVER_READY_WAIT
    while tally.ready < len(healthy):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tally.ready} of {len(healthy)} ready messages")
        await asyncio.sleep(0.01)
    return Churn(tally, idle, healthy, stalled), healthy, stalled


def drops_per_second(args: argparse.Namespace, healthy: int) -> int:
    drops = max(1, round(healthy * DROP_FRACTION))
    return max(drops, QUICK_MIN_DROPS) if args.quick else drops


def bucket_seconds(duration: float) -> int:
    return LONG_BUCKET_S if duration >= 3 * LONG_BUCKET_S else SHORT_BUCKET_S


@dataclass
class Probe:
    """Readings at one instant: the hub's counters, the server's RSS and sockets, CPU times."""

    at: float  # perf_counter()
    stats: dict[str, Any]
    rss_kb: int
    sockets: int
    server_cpu: float
    load_cpu: float
    busy: float  # the machine's busy CPU time (softirq apart)
    counts: dict[str, int]  # Churn.counts()


async def stats_of(port: int) -> dict[str, Any]:
    """The hub's ``stats()``."""
    status, answer = await http_request(port, "GET", "/stats", None, timeout=HTTP_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"GET /stats answered {status}: {answer}")
    return cast(dict[str, Any], answer["stats"])


async def probe(node: ServerProcess, churn: Churn) -> Probe:
    stats = await stats_of(node.port)
    return Probe(
        time.perf_counter(),
        stats,
        node.rss_kb(),
        server_sockets(node.proc.pid),
        node.cpu_seconds(),
        load_cpu_seconds(),
        machine_busy_seconds()[0],
        churn.counts(),
    )


def server_sockets(pid: int) -> int:
    """Socket file descriptors of process ``pid`` (the listening socket included)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def latency_ms(values: array[int]) -> tuple[float, float, float]:
    """p50, p99 and max of ``values`` (ns), in ms; the index rule of ``common.percentile``."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    import numpy as np  # (matplotlib's dependency; a minute holds millions of deliveries)

    n = len(values)
    at = [min(n - 1, max(0, round(q * n) - 1)) for q in (0.50, 0.99)] + [n - 1]
    part = np.partition(np.frombuffer(values, dtype=np.int64), at)
    return float(part[at[0]]) / 1e6, float(part[at[1]]) / 1e6, float(part[at[2]]) / 1e6


def make_bucket(index: int, t0: float, before: Probe, after: Probe, lat: array[int]) -> Bucket:
    wall = after.at - before.at
    server, load = after.server_cpu - before.server_cpu, after.load_cpu - before.load_cpu

    def count(key: str) -> int:
        return after.counts[key] - before.counts[key]

    def stat(key: str) -> int:
        return int(after.stats[key]) - int(before.stats[key])

    return Bucket(
        index,
        after.at - t0,
        len(lat),
        *latency_ms(lat),
        stat("events_published"),
        count("drops"),
        count("resumes"),
        count("replayed"),
        count("server_closed"),
        count("stall_closes"),
        stat("slow_consumer_closes"),
        stat("replays_incomplete"),
        after.rss_kb / 1024,
        after.sockets,
        int(after.stats["total_connections"]),
        server / wall,
        load / wall,
        max(0.0, after.busy - before.busy - server - load) / wall,
    )


async def run_soak(args: argparse.Namespace) -> SoakResult:
    """One soak run on a fresh server: ``args.duration`` s of publishing, then the drain."""
    events = max(1, round(args.rate * args.duration))
    async with fleet(args.server, SOAK_VARIANT, 1, args) as f:
        churn, healthy, stalled = await connect_soak(f.ports, args, events)
        f.clients, f.stalled = healthy, stalled  # (kept current by the churn: closed at the end)
        try:
            return await timeline(f.nodes[0], churn, args, events)
        finally:
            await churn.stop()


async def timeline(
    node: ServerProcess, churn: Churn, args: argparse.Namespace, events: int
) -> SoakResult:
    tally, bucket_s = churn.tally, bucket_seconds(args.duration)
    await post(
        node.port, "/measure/start", {"sockets": args.sockets}, SERVER_READY_WAIT + HTTP_TIMEOUT
    )
    drops = drops_per_second(args, len(churn.clients))
    request = {
        "users": args.sockets,
        "events": events,
        "rate": args.rate,
        "payload": args.payload,
        "bucket_s": bucket_s,
    }
    seconds = math.ceil(args.duration)
    last = start = await probe(node, churn)
    wait = 3 * args.duration + DRAIN_WAIT  # far behind schedule: it fails and says so
    publish = asyncio.ensure_future(
        http_request(node.port, "POST", "/publish-soak", request, timeout=wait)
    )
    buckets: list[Bucket] = []
    latencies: array[int] = array("q")
    try:
        for second in range(1, seconds + 1):
            await asyncio.sleep(max(0.0, start.at + second - time.perf_counter()))
            if publish.done():
                break
            churn.drop(drops)
            churn.check_stalled((await stats_of(node.port))["connections_per_user"])
            latencies.extend(tally.take_latencies())
            if second % bucket_s == 0 and second < seconds:
                now = await probe(node, churn)
                buckets.append(make_bucket(len(buckets) + 1, start.at, last, now, latencies))
                print_bucket(buckets[-1])
                last, latencies = now, array("q")
    except BaseException:
        publish.cancel()  # (no publishing request left behind)
        raise
    status, answer = await publish
    if status != 200:
        raise RuntimeError(f"POST /publish-soak answered {status}: {answer}")
    timed_out = False
    try:
        await asyncio.wait_for(tally.done.wait(), DRAIN_WAIT)
    except asyncio.TimeoutError:
        timed_out = True
    latencies.extend(tally.take_latencies())
    end = await probe(node, churn)
    await churn.stop()
    buckets.append(make_bucket(len(buckets) + 1, start.at, last, end, latencies))
    print_bucket(buckets[-1])
    _, measured = await http_request(node.port, "POST", "/measure/stop", {}, HTTP_TIMEOUT)
    for bucket, (lag_p99, lag_max) in zip(buckets, answer["lag_ms"], strict=False):
        bucket.lag_p99_ms, bucket.lag_max_ms = lag_p99, lag_max
    return soak_result(args, churn, events, bucket_s, buckets, end, timed_out, answer, measured)


def soak_result(
    args: argparse.Namespace,
    churn: Churn,
    events: int,
    bucket_s: int,
    buckets: list[Bucket],
    end: Probe,
    timed_out: bool,
    answer: dict[str, Any],
    measured: dict[str, Any],
) -> SoakResult:
    tally = churn.tally
    result = SoakResult(
        variant=SOAK_VARIANT,
        run=1,
        client=f"ws/{args.load_loop}",
        sockets=args.sockets,
        healthy=len(churn.clients),
        stalled=len(churn.stalled),
        drops_per_s=drops_per_second(args, len(churn.clients)),
        events=events,
        rate=args.rate,
        duration=args.duration,
        bucket_s=bucket_s,
        buckets=buckets,
        lost=sum(events - client.received for client in churn.clients),
        out_of_order=tally.out_of_order,
        duplicates=tally.duplicates,
        unexpected=tally.unexpected,
        drops=churn.drops,
        resumes=tally.resumes,
        incomplete=tally.incomplete,
        replayed=tally.replayed,
        replay_max_ms=tally.replay_max_ns / 1e6,
        reconnect_errors=churn.errors,
        server_closed=dict(churn.server_closed),
        stall_closes=churn.stall_closes,
        closes={str(code): int(n) for code, n in end.stats["closes"].items()},
        timed_out=timed_out,
        call_s=float(answer["call_s"]),
        server_gc=float(measured["gc_s"]) / buckets[-1].end_s,
    )
    if result.call_s > args.duration * BEHIND + 1:
        result.notes.append(
            f"**FELL BEHIND**: the ticks of {args.duration:g} s took {result.call_s:.1f} s to "
            "publish, so the server did not keep up with the rate (latency and RSS then grow "
            "with the backlog: overload, not drift)"
        )
    if timed_out:
        result.notes.append(f"healthy clients not complete {DRAIN_WAIT:g} s after publishing")
    if result.unexpected:
        result.notes.append(f"{result.unexpected} unexpected frames")
    if result.reconnect_errors:
        result.notes.append(f"{result.reconnect_errors} failed connection attempts (retried)")
    bound = sum(b.load_cpu > LOAD_BOUND for b in buckets)
    noisy = sum(b.other_cpu > NOISY for b in buckets)
    if bound:
        result.notes.append(f"LOAD-BOUND in {bound} of {len(buckets)} buckets")
    if noisy:
        result.notes.append(
            f"NOISY (other processes or steal) in {noisy} of {len(buckets)} buckets"
        )
    return result
