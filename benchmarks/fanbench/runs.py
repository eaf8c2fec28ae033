"""One run of each mode: fresh server process(es), the clients, the measurement."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cclient import CLoad, CSocket, uses_c
from .clients import BaseClient, Tally, connect_all, load_client, stalled_indices
from .common import (
    BATCH_VARIANT,
    HTTP_TIMEOUT,
    LOAD_BOUND,
    NOISY,
    REDIS_NODES,
    REDIS_VARIANT,
    SERVER_READY_WAIT,
    SSE_VARIANT,
    STALL_FRACTION,
    WARMUP_EVENTS,
    WARMUP_SOCKETS,
    load_cpu_seconds,
    machine_busy_seconds,
    percent,
    percentile,
)
from .procs import RedisCpu, RedisService, ServerProcess, http_request, start_redis
from .wire import annotate, print_text


@dataclass
class RunResult:
    """One delivery run (burst, steady or stalled mode)."""

    variant: str
    run: int
    deliveries_per_s: float
    frames_per_s: float  # frames that carried events, per second of the window
    deliveries_per_frame: float  # 1 without batching
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    out_of_order: int
    duplicates: int
    closed: int  # sockets the server closed or lost during the run
    server_cpu: float  # share of one core over the window (all nodes)
    server_rss_mb: float  # peak RSS, summed over the nodes
    node_rss_mb: list[float]  # peak RSS per node
    redis_cpu: float | None  # redis-server's main thread (a cluster: the masters'), share of one
    # core (Redis variant)
    load_cpu: float  # over the whole run (from POST /publish)
    load_cpu_delivering: float  # from the first delivery to the last
    server_gc: float  # share of the window the server spent in the garbage collector
    gc_runs: list[int]  # the server's collections per generation in the window
    softirq_cpu: float  # softirq time of the machine (mostly loopback TCP), in cores
    other_cpu: float  # busy CPU time charged to neither process: other processes and steal
    window_s: float
    call_ms: float  # time spent inside the server's publish call (the whole loop for raw)
    timed_out: bool
    stalled: int = 0  # clients that stopped reading (stalled mode); not counted anywhere else
    rate: float = 0.0  # steady mode: events/s published
    lag_p99_ms: float = float("nan")  # steady mode: how late the publisher was, p99
    lag_max_ms: float = float("nan")
    notes: list[str] = field(default_factory=list)
    client: str = ""  # the load client and the load process's loop, e.g. "sse/uvloop"
    redis_cpu_parts: list[float] = field(default_factory=list)  # a cluster: per master
    redis_replicas_cpu: float | None = None  # a cluster: its replicas' main threads, summed
    wall_s: float = float("nan")  # what the CPU shares are over: POST /publish to last delivery
    wire_bytes_per_event: float = float("nan")  # frames received / deliveries (C client only)
    message_bytes_per_event: float = float("nan")  # the same, inflated payloads only
    extensions: str = ""  # the server's Sec-WebSocket-Extensions answer (C client)

    @property
    def load_bound(self) -> bool:
        delivering = self.load_cpu_delivering
        return self.load_cpu > LOAD_BOUND or (delivering == delivering and delivering > LOAD_BOUND)

    @property
    def noisy(self) -> bool:
        return self.other_cpu > NOISY

    @property
    def failed(self) -> bool:
        """Lost, duplicated or reordered events, or a time-out (except a stalled run's: that is
        the measurement, reported as such)."""
        if self.lost or self.out_of_order or self.duplicates:
            return True
        return self.timed_out and not self.stalled


@dataclass
class IdleResult:
    """One idle run: the server's RSS empty (after a warm-up) and with N idle sockets."""

    variant: str
    run: int
    sockets: int
    empty_kb: int
    full_kb: int
    other_cpu: float
    notes: list[str] = field(default_factory=list)
    client: str = ""  # the load client and the load process's loop, e.g. "sse/uvloop"

    @property
    def per_socket_kb(self) -> float:
        return (self.full_kb - self.empty_kb) / self.sockets

    @property
    def noisy(self) -> bool:
        return self.other_cpu > NOISY

    failed = False


@dataclass
class Fleet:
    """The processes of one run: server node(s), maybe redis-server, and the clients."""

    nodes: list[ServerProcess]
    redis: RedisService | None
    clients: list[BaseClient | CSocket] = field(default_factory=list)
    stalled: list[BaseClient] = field(default_factory=list)
    load: CLoad | None = None  # the C load client's process, if it is the run's client

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def server_cpu_seconds(self) -> tuple[float, RedisCpu]:
        redis = self.redis.redis_cpu() if self.redis else RedisCpu()
        return sum(n.cpu_seconds() for n in self.nodes), redis

    def close_clients(self, clients: list[BaseClient | CSocket] | list[BaseClient]) -> None:
        for client in clients:
            client.close()


@asynccontextmanager
async def fleet(
    server: str,
    variant: str,
    run: int,
    args: argparse.Namespace,
    profiles: list[Path] | None = None,
) -> AsyncIterator[Fleet]:
    """Fresh server process(es) (and redis-server); everything stopped and killed at the end.

    ``profiles``: one cProfile output path per node (node 1 publishes), or None.
    """
    redis: RedisService | None = None
    nodes: list[ServerProcess] = []
    started: Fleet | None = None
    try:
        node_redis: tuple[str, str] | None = None
        redis_cluster = False
        if variant == REDIS_VARIANT:
            redis = start_redis(args.redis)
            await redis.wait_ready()
            node_redis = (redis.url, run_prefix(run))
            redis_cluster = redis.cluster
        for k in range(REDIS_NODES if variant == REDIS_VARIANT else 1):
            profile = profiles[k] if profiles is not None else None
            nodes.append(
                ServerProcess(
                    server, variant, profile, node_redis, args.uvicorn_ws, cluster=redis_cluster
                )
            )
        await asyncio.gather(*(node.wait_ready() for node in nodes))
        started = Fleet(nodes, redis)
        yield started
    finally:
        if started is not None:
            started.close_clients(started.clients + started.stalled)
        await asyncio.sleep(0.1)  # let the close frames go out
        if started is not None and started.load is not None:
            await started.load.wait_closed()
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)
        for k, node in enumerate(nodes, 1):
            problems = node.log_problems()
            if problems:
                where = f"node {k}, " if len(nodes) > 1 else ""
                print(f"  server log ({where}{variant} run {run}):\n{problems}", file=sys.stderr)
            node.close()
        if redis is not None:
            redis.close()


def run_prefix(run: int) -> str:
    """A key prefix of the run's own (the Redis is fresh anyway; this keeps keys apart)."""
    return f"fanout-{os.getpid()}-{run}-{secrets.token_hex(4)}"


async def post(port: int, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    status, answer = await http_request(port, "POST", path, body, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"POST {path} answered {status}: {answer}")
    return answer


async def run_delivery(
    server: str,
    variant: str,
    run: int,
    args: argparse.Namespace,
    profiles: list[Path] | None = None,
    *,
    events: int | None = None,
    rate: float | None = None,
    stall: bool = False,
    wait: float | None = None,
) -> RunResult:
    """One run: fresh server process(es), N clients, M events (a burst, or ``rate`` events/s).

    ``stall``: ``STALL_FRACTION`` of the N clients stop reading once open; only the others
    (healthy) are waited for and counted. ``wait``: the bound on the delivery wait (default
    ``--timeout``); a stalled run that reaches it ends its window there.
    """
    events = args.events if events is None else events
    wait = args.timeout if wait is None else wait
    stalled = stalled_indices(args.sockets, STALL_FRACTION) if stall else frozenset()
    async with fleet(server, variant, run, args, profiles) as f:
        tally = Tally(args.sockets - len(stalled), events, asyncio.Event())
        if uses_c(args, variant, stall):
            f.load = tally = CLoad(args.sockets, events, asyncio.Event())
            f.clients = list(await f.load.start(f.ports, variant, args.deflate))
        else:
            f.clients, f.stalled = await connect_all(f.ports, tally, variant, stalled=stalled)
        count = len(f.nodes)
        shares = [len(range(k, args.sockets, count)) for k in range(count)]  # sockets per node
        # The nodes that only receive: wait for their sockets, collect garbage, start measuring.
        for node, share in zip(f.nodes[1:], shares[1:], strict=True):
            await post(
                node.port, "/measure/start", {"sockets": share}, SERVER_READY_WAIT + HTTP_TIMEOUT
            )
        gc.collect()
        request: dict[str, Any] = {"sockets": shares[0], "events": events, "payload": args.payload}
        if rate is not None:
            request["rate"] = rate
        result = await measure(f, variant, run, request, tally, wait, stall)
        result.client = load_client(variant, "c" if f.load else args.load_loop)
        annotate(result, f.load)
        return result


async def measure(
    f: Fleet,
    variant: str,
    run: int,
    request: dict[str, Any],
    tally: Tally,
    wait: float,
    stall: bool,
) -> RunResult:
    """``POST /publish`` to node 1, wait (bounded) for every healthy delivery, collect figures."""
    cpu_before, server_before = tally.cpu_seconds(), f.server_cpu_seconds()
    machine_before = machine_busy_seconds()
    wall_before = time.perf_counter()
    sent_ns = time.time_ns()
    publisher = f.nodes[0]
    publish = asyncio.ensure_future(
        http_request(publisher.port, "POST", "/publish", request, timeout=wait + HTTP_TIMEOUT)
    )
    timed_out = False
    try:
        await asyncio.wait_for(tally.done.wait(), wait)
    except asyncio.TimeoutError:
        timed_out = True
    end_ns = time.time_ns()
    wall_after = time.perf_counter()
    wall = wall_after - wall_before
    cpu_after, server_after = tally.cpu_seconds(), f.server_cpu_seconds()
    machine_after = machine_busy_seconds()
    await tally.finish()  # the C client's counts and latencies (no await for the Python ones)
    delivered = tally.received  # not what arrives later (a blocked server resumes below)
    # A server blocked on a stalled socket (the raw loop) goes on once those clients go.
    f.close_clients(f.stalled)
    notes: list[str] = []
    try:
        status, answer = await asyncio.wait_for(publish, HTTP_TIMEOUT)
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        if not timed_out:
            raise
        # The server is still stuck in the burst: report what arrived.
        status, answer = 200, {"start_ns": sent_ns, "call_s": float("nan")}
        notes.append(f"publish did not answer ({type(exc).__name__})")
    if status != 200:
        raise RuntimeError(f"POST /publish answered {status}: {answer}")
    gc_s, gc_runs = await stop_measuring(f, timed_out)
    node_rss = [node.peak_rss_mb() for node in f.nodes]

    load_cpu = (cpu_after - cpu_before) / wall
    load_cpu_delivering = float("nan")
    if tally.first_perf and wall_after - tally.first_perf > 0.01:  # too short to tell
        load_cpu_delivering = (cpu_after - tally.first_cpu) / (wall_after - tally.first_perf)
    servers_cpu = server_after[0] - server_before[0]
    redis = server_after[1] - server_before[1]
    redis_cpu = redis.total
    # A stalled run that timed out: the healthy clients waited until the end.
    last_ns = end_ns if (stall and timed_out) else tally.last_ns
    window_s = max(last_ns - int(answer["start_ns"]), 1) / 1e9
    tally.settle()
    latencies = sorted(tally.latencies_ns)
    result = RunResult(
        variant=variant,
        run=run,
        deliveries_per_s=delivered / window_s,
        frames_per_s=tally.frames / window_s,
        deliveries_per_frame=tally.received / tally.frames if tally.frames else float("nan"),
        p50_ms=percentile(latencies, 0.50) / 1e6,
        p99_ms=percentile(latencies, 0.99) / 1e6,
        max_ms=latencies[-1] / 1e6 if latencies else float("nan"),
        lost=sum(tally.events - c.received for c in f.clients),
        out_of_order=tally.out_of_order,
        duplicates=tally.duplicates,
        closed=sum(c.closed for c in f.clients),
        server_cpu=servers_cpu / wall,
        server_rss_mb=sum(node_rss),
        node_rss_mb=node_rss,
        redis_cpu=redis_cpu / wall if f.redis is not None else None,
        server_gc=gc_s / wall,
        gc_runs=gc_runs,
        load_cpu=load_cpu,
        load_cpu_delivering=load_cpu_delivering,
        softirq_cpu=(machine_after[1] - machine_before[1]) / wall,
        other_cpu=max(
            0.0,
            machine_after[0]
            - machine_before[0]
            - servers_cpu
            - redis_cpu
            - redis.replicas
            - load_cpu * wall,
        )
        / wall,
        window_s=window_s,
        call_ms=float(answer["call_s"]) * 1e3,
        timed_out=timed_out,
        stalled=len(f.stalled),
        rate=float(request.get("rate", 0.0)),
        lag_p99_ms=float(answer.get("lag_p99_ms", float("nan"))),
        lag_max_ms=float(answer.get("lag_max_ms", float("nan"))),
        notes=notes,
        wall_s=wall,
    )
    if f.redis is not None and f.redis.cluster:
        result.redis_cpu_parts = [part / wall for part in redis.parts]
        result.redis_replicas_cpu = redis.replicas / wall
    add_notes(result, tally, variant, wait, delivered)
    return result


async def stop_measuring(f: Fleet, timed_out: bool) -> tuple[float, list[int]]:
    """``POST /measure/stop`` to every node: the GC time and runs, summed."""
    gc_s, gc_runs = 0.0, [0, 0, 0]
    for node in f.nodes:
        measured: dict[str, Any] = {"gc_s": float("nan"), "gc_runs": [0, 0, 0]}
        try:
            _, measured = await http_request(
                node.port, "POST", "/measure/stop", {}, timeout=HTTP_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError, ValueError):
            if not timed_out:
                raise
        gc_s += float(measured["gc_s"])
        gc_runs = [a + b for a, b in zip(gc_runs, measured["gc_runs"], strict=True)]
    return gc_s, gc_runs


def add_notes(result: RunResult, tally: Tally, variant: str, wait: float, delivered: int) -> None:
    if result.timed_out:
        result.notes.append(
            f"timed out after {wait:.1f} s ({delivered:,} of {tally.expected:,} deliveries)"
        )
    if tally.unexpected:
        what = {BATCH_VARIANT: "messages", SSE_VARIANT: "blocks"}.get(variant, "frames")
        result.notes.append(f"{tally.unexpected} unexpected {what}")
    # Batch and SSE clients get the ready message (the others are not sent one).
    if variant in (BATCH_VARIANT, SSE_VARIANT) and tally.ready != tally.sockets:
        result.notes.append(f"{tally.ready} ready messages for {tally.sockets} clients")
    if result.load_bound:
        result.notes.append("LOAD-BOUND")
    if result.noisy:
        result.notes.append("NOISY (other processes or steal)")


async def run_idle(server: str, variant: str, run: int, args: argparse.Namespace) -> IdleResult:
    """Server RSS empty (after a warm-up: a few sockets, a small burst, all closed) and with
    N idle sockets connected and registered; garbage collected before each reading."""
    async with fleet(server, variant, run, args) as f:
        port = f.ports[0]
        machine_before, wall_before = sum(machine_busy_seconds()), time.perf_counter()
        cpu_before, server_before = load_cpu_seconds(), f.server_cpu_seconds()[0]
        await warm_up(f, variant)
        await post(port, "/settle", {"sockets": 0}, SERVER_READY_WAIT + HTTP_TIMEOUT)
        empty_kb = f.nodes[0].rss_kb()
        tally = Tally(args.sockets, 0, asyncio.Event())
        f.clients, _ = await connect_all(f.ports, tally, variant)
        await post(port, "/settle", {"sockets": args.sockets}, SERVER_READY_WAIT + HTTP_TIMEOUT)
        full_kb = f.nodes[0].rss_kb()
        wall = time.perf_counter() - wall_before
        busy = sum(machine_busy_seconds()) - machine_before
        own = load_cpu_seconds() - cpu_before + f.server_cpu_seconds()[0] - server_before
        result = IdleResult(
            variant, run, args.sockets, empty_kb, full_kb, max(0.0, busy - own) / wall
        )
        result.client = load_client(variant, args.load_loop)
        closed = sum(c.closed for c in f.clients)
        if closed:
            result.notes.append(f"{closed} sockets closed by the server")
        if result.noisy:
            result.notes.append("NOISY (other processes or steal)")
        return result


async def warm_up(f: Fleet, variant: str) -> None:
    """A few sockets and a small burst, then closed: imports and first-use allocations done."""
    tally = Tally(WARMUP_SOCKETS, WARMUP_EVENTS, asyncio.Event())
    f.clients, _ = await connect_all(f.ports, tally, variant)
    request = {"sockets": WARMUP_SOCKETS, "events": WARMUP_EVENTS, "payload": 100}
    await post(f.ports[0], "/publish", request, SERVER_READY_WAIT + HTTP_TIMEOUT)
    await asyncio.wait_for(tally.done.wait(), HTTP_TIMEOUT)
    await post(f.ports[0], "/measure/stop", {}, HTTP_TIMEOUT)
    f.close_clients(f.clients)
    f.clients = []


# -- printing and failure, per run --------------------------------------------------------


def print_run(result: RunResult) -> None:
    redis_cpu = ""
    if result.redis_cpu is not None:
        text = redis_cpu_text(result.redis_cpu, result.redis_cpu_parts, result.redis_replicas_cpu)
        redis_cpu = f"redis CPU {text}  "
    stalled = f" (stalled {result.stalled})" if result.stalled else ""
    print(
        f"  run {result.run} {result.variant + stalled:<33} {result.client:<16} "
        f"{result.deliveries_per_s:>11,.0f} deliveries/s  "
        f"({result.deliveries_per_frame:.1f}/frame)  {print_text(result)}"
        f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  "
        f"lost {result.lost}  ooo {result.out_of_order}  "
        f"server CPU {result.server_cpu:.0%} (GC {result.server_gc:.0%})  {redis_cpu}"
        f"load CPU {result.load_cpu:.0%} "
        f"(delivering {percent(result.load_cpu_delivering)})  "
        f"softirq {result.softirq_cpu:.0%}  other CPU {result.other_cpu:.0%}  "
        f"{' '.join(result.notes)}",
        flush=True,
    )


def redis_cpu_text(total: float | None, parts: list[float], replicas: float | None) -> str:
    """The redis CPU; a cluster's with each master's and the replicas' (not in the total) after
    it: ``3.1% (1.0%/1.1%/1.0%; replicas 0.8%)``."""
    if not parts:
        return percent(total)
    return f"{percent(total)} ({'/'.join(map(percent, parts))}; replicas {percent(replicas)})"


def print_idle(result: IdleResult) -> None:
    print(
        f"  run {result.run} {result.variant:<33} {result.client:<16} "
        f"{result.sockets} idle sockets: RSS "
        f"{result.empty_kb / 1024:.1f} -> {result.full_kb / 1024:.1f} MB, "
        f"{result.per_socket_kb:.2f} KB per socket  other CPU {result.other_cpu:.0%}  "
        f"{' '.join(result.notes)}",
        flush=True,
    )
