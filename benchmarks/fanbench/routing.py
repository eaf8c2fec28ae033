"""The routing mode: two nodes on Redis, each holding half of the users; events per user.

Only ``asgi-events-redis`` applies (per-user channels are the Redis backend's; one node in
memory, the raw loop and the peers have nothing to route). Users: user ``u`` has ``1 + (u // 2)
% 2`` sockets (1, 1, 2, 2, 1, 1, ...: 1.5 on average, as for people with a phone and sometimes
a laptop) and all of them on node ``u % 2``, so each node holds half of the users and half of the
sockets. A third process publishes: a hub node of its own on the same Redis (the same server
kind), holding no socket, pinned to the load process's core (CPU 1), so that neither measured
node's CPU includes publishing, as when an API server publishes for users connected elsewhere.
It calls ``hub.broadcast(user_id, event)`` per event in ``ROUTING_PUBLISH_TASKS`` concurrent
loops (``publisher``).

Two cases, interleaved over runs, each on fresh processes and a fresh Redis:

- **one-sided**: every event is for a user of node A (``2 x --events`` per user);
- **even**: every user gets ``--events`` events (the same total when both halves are equal).

Per node: the events it read from Redis (``stats()["backend"]``, before and after), its CPU
(seconds, and share of a core over the window), its deliveries/s; plus the publisher's and
redis-server's CPU. Every socket of a targeted user must get each of its user's events once and
in order; a socket of another user must get none (``misrouted``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .clients import BaseClient, Tally, client_class, load_client, open_connection
from .common import (
    CONNECT_TIMEOUT,
    HTTP_TIMEOUT,
    LOAD_BOUND,
    LOAD_CPU,
    NOISY,
    QUIET,
    REDIS_NODES,
    REDIS_VARIANT,
    ROUTING_PUBLISH_TASKS,
    SERVER_READY_WAIT,
    load_cpu_seconds,
    machine_busy_seconds,
    percentile,
    run_load,
    wait_for_quiet,
)
from .procs import RedisCpu, RedisService, ServerProcess, http_request, start_redis
from .runs import post, redis_cpu_text, run_prefix

CASES = ("one-sided", "even")


@dataclass
class Plan:
    """Who is where: ``user_node[u]`` holds all ``user_sockets[u]`` sockets of user ``u``."""

    user_sockets: list[int]
    user_node: list[int]

    @classmethod
    def make(cls, sockets: int, nodes: int = REDIS_NODES) -> Plan:
        sizes: list[int] = []
        while sum(sizes) < sockets:
            sizes.append(min(1 + (len(sizes) // 2) % 2, sockets - sum(sizes)))
        return cls(sizes, [u % nodes for u in range(len(sizes))])

    def users_of(self, node: int) -> list[int]:
        return [u for u, k in enumerate(self.user_node) if k == node]

    def sockets_of(self, node: int) -> int:
        return sum(self.user_sockets[u] for u in self.users_of(node))

    def targets(self, case: str, events: int) -> tuple[list[int], int]:
        """The users a case publishes to, and the events (rounds) each of them gets."""
        if case == "one-sided":
            return self.users_of(0), 2 * events
        return list(range(len(self.user_sockets))), events


def user_id(u: int) -> str:
    return f"user-{u}"  # the token is the user id (the nodes' verify_token)


@dataclass
class RoutingResult:
    """One routing run (one case). Per-node lists are [node A, node B]."""

    case: str
    run: int
    users: int
    targeted_users: int
    rounds: int  # events per targeted user
    events: int  # published in all
    node_sockets: list[int]
    node_users: list[int]
    deliveries_per_s: float  # all deliveries over the window
    node_deliveries_per_s: list[float]
    node_received: list[int]  # events_received in the window (stats()["backend"])
    node_received_idle: list[int]  # events_received_idle in the window
    node_user_channels: list[int]  # user_channels at the start of the window
    node_cpu_s: list[float]  # CPU seconds of the node's main thread in the window
    node_cpu: list[float]  # the same, as a share of one core
    publisher_received: int
    publisher_cpu_s: float
    publisher_cpu: float
    publish_call_s: float  # the publisher's loops, first call to last return
    redis_cpu_s: float  # redis-server's main thread (a cluster: the masters', summed)
    redis_cpu: float
    load_cpu: float
    other_cpu: float
    window_s: float  # publish start to last delivery
    wall_s: float  # the CPU window: POST /publish-users to last delivery
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    out_of_order: int
    duplicates: int
    misrouted: int  # events that reached a socket of a user they were not for
    unexpected: int  # frames that were not one of our events
    closed: int
    timed_out: bool
    variant: str = REDIS_VARIANT
    client: str = ""
    notes: list[str] = field(default_factory=list)
    redis_cpu_parts: list[float] = field(default_factory=list)  # a cluster: per master
    redis_replicas_cpu: float | None = None  # a cluster: its replicas' main threads, summed

    def received_share(self, node: int) -> float:
        return self.node_received[node] / self.events if self.events else float("nan")

    def cpu_us_per_event(self, node: int) -> float:
        """The node's CPU time per event it received: what the routing saves, whatever rate the
        publisher reached."""
        received = self.node_received[node]
        return self.node_cpu_s[node] / received * 1e6 if received else float("nan")

    @property
    def load_bound(self) -> bool:
        """CPU 1 (the load process and the publisher) was busy: the rate was set there."""
        return self.load_cpu + self.publisher_cpu > LOAD_BOUND

    @property
    def noisy(self) -> bool:
        return self.other_cpu > NOISY

    @property
    def failed(self) -> bool:
        return bool(
            self.lost or self.out_of_order or self.duplicates or self.misrouted or self.timed_out
        )


@dataclass
class RoutingFleet:
    redis: RedisService
    nodes: list[ServerProcess]
    publisher: ServerProcess
    clients: list[tuple[int, BaseClient]] = field(default_factory=list)  # (node, client)

    def cpu_seconds(self) -> tuple[list[float], float, RedisCpu]:
        nodes = [node.cpu_seconds() for node in self.nodes]
        return nodes, self.publisher.cpu_seconds(), self.redis.redis_cpu()


@contextlib.asynccontextmanager
async def routing_fleet(
    server: str, run: int, args: argparse.Namespace
) -> AsyncIterator[RoutingFleet]:
    """A fresh Redis, two nodes (CPU 0) and the publisher node (CPU 1); all stopped at the end."""
    redis = start_redis(args.redis)
    procs: list[ServerProcess] = []
    fleet: RoutingFleet | None = None
    try:
        await redis.wait_ready()
        target = (redis.url, run_prefix(run))
        for k in range(REDIS_NODES + 1):
            cpu = {"cpu": LOAD_CPU} if k == REDIS_NODES else {}
            procs.append(
                ServerProcess(
                    server,
                    REDIS_VARIANT,
                    None,
                    target,
                    args.uvicorn_ws,
                    cluster=redis.cluster,
                    **cpu,
                )
            )
        await asyncio.gather(*(proc.wait_ready() for proc in procs))
        fleet = RoutingFleet(redis, procs[:-1], procs[-1])
        yield fleet
    finally:
        if fleet is not None:
            for _, client in fleet.clients:
                client.close()
        await asyncio.sleep(0.1)  # let the close frames go out
        await asyncio.gather(*(proc.stop() for proc in procs), return_exceptions=True)
        for name, proc in zip(("node A", "node B", "publisher"), procs, strict=False):
            problems = proc.log_problems()
            if problems:
                print(f"  server log ({name}, routing run {run}):\n{problems}", file=sys.stderr)
            proc.close()
        redis.close()


async def node_stats(proc: ServerProcess) -> dict[str, Any]:
    status, answer = await http_request(proc.port, "GET", "/stats", None, timeout=HTTP_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"GET /stats answered {status}: {answer}")
    return dict(answer["stats"])


async def wait_followed(proc: ServerProcess, sockets: int, users: int) -> dict[str, Any]:
    """Until the node has registered ``sockets`` and Redis confirmed ``users`` channels (a
    socket is registered before its user's channel is confirmed); its stats then."""
    deadline = time.monotonic() + SERVER_READY_WAIT
    while True:
        stats = await node_stats(proc)
        backend = stats["backend"]
        if stats["total_connections"] >= sockets and backend["user_channels"] >= users:
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"node not ready: {stats['total_connections']} of {sockets} sockets, "
                f"{backend['user_channels']} of {users} user channels"
            )
        await asyncio.sleep(0.01)


async def connect(f: RoutingFleet, plan: Plan, targets: set[int], hit: Tally, stray: Tally) -> None:
    """Every socket of every user, to its user's node: the clients of ``targets`` count in
    ``hit``, the others' in ``stray`` (which should get nothing)."""
    gate = asyncio.Semaphore(64)
    kind = client_class(REDIS_VARIANT)

    async def one(u: int, tally: Tally) -> None:
        node = plan.user_node[u]
        port = f.nodes[node].port
        async with gate:
            client = kind(port, user_id(u), tally, False)
            f.clients.append((node, client))
            await open_connection(client, port)
            await client.opened

    jobs = [
        one(u, hit if u in targets else stray)
        for u, size in enumerate(plan.user_sockets)
        for _ in range(size)
    ]
    await asyncio.wait_for(asyncio.gather(*jobs), CONNECT_TIMEOUT)


async def run_routing(server: str, case: str, run: int, args: argparse.Namespace) -> RoutingResult:
    """One run of one case: fresh processes, every socket connected, one publish, the figures."""
    plan = Plan.make(args.sockets)
    targets, rounds = plan.targets(case, args.events)
    targeted_sockets = sum(plan.user_sockets[u] for u in targets)
    hit = Tally(targeted_sockets, rounds, asyncio.Event())
    stray = Tally(0, rounds, asyncio.Event())
    async with routing_fleet(server, run, args) as f:
        await connect(f, plan, set(targets), hit, stray)
        nodes = range(len(f.nodes))
        before = [
            await wait_followed(f.nodes[k], plan.sockets_of(k), len(plan.users_of(k)))
            for k in nodes
        ]
        for k in nodes:  # collect garbage, as before the other modes' windows
            await post(
                f.nodes[k].port, "/measure/start", {"sockets": plan.sockets_of(k)}, HTTP_TIMEOUT
            )
        publisher_before = await node_stats(f.publisher)
        wait = args.timeout
        request = {
            "users": [user_id(u) for u in targets],
            "rounds": rounds,
            "payload": args.payload,
            "tasks": ROUTING_PUBLISH_TASKS,
        }
        load_before, cpu_before = load_cpu_seconds(), f.cpu_seconds()
        machine_before, wall_before = sum(machine_busy_seconds()), time.perf_counter()
        publish = asyncio.ensure_future(
            http_request(f.publisher.port, "POST", "/publish-users", request, wait + HTTP_TIMEOUT)
        )
        timed_out = False
        try:
            await asyncio.wait_for(hit.done.wait(), wait)
        except asyncio.TimeoutError:
            timed_out = True
        wall = time.perf_counter() - wall_before
        load_after, cpu_after = load_cpu_seconds(), f.cpu_seconds()
        machine_after = sum(machine_busy_seconds())
        status, answer = await asyncio.wait_for(publish, wait + HTTP_TIMEOUT)
        if status != 200:
            raise RuntimeError(f"POST /publish-users answered {status}: {answer}")
        await asyncio.sleep(0.1)  # anything still on its way to the wrong node lands
        after = [await node_stats(node) for node in f.nodes]
        publisher_after = await node_stats(f.publisher)
        return make_result(
            case, run, plan, targets, rounds, f, hit, stray, answer, timed_out,
            wall=wall,
            counters=(before, after, publisher_before, publisher_after),
            cpu=(cpu_before, cpu_after, load_after - load_before, machine_after - machine_before),
            client=load_client(REDIS_VARIANT, args.load_loop),
        )  # fmt: skip


def received(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after["backend"][key]) - int(before["backend"][key])


def make_result(
    case: str,
    run: int,
    plan: Plan,
    targets: list[int],
    rounds: int,
    f: RoutingFleet,
    hit: Tally,
    stray: Tally,
    answer: dict[str, Any],
    timed_out: bool,
    *,
    wall: float,
    counters: tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], dict[str, Any]],
    cpu: tuple[
        tuple[list[float], float, RedisCpu], tuple[list[float], float, RedisCpu], float, float
    ],
    client: str,
) -> RoutingResult:
    before, after, publisher_before, publisher_after = counters
    (nodes_before, pub_before, redis_before), (nodes_after, pub_after, redis_after) = cpu[:2]
    load_s, machine_s = cpu[2], cpu[3]
    node_cpu_s = [b - a for a, b in zip(nodes_before, nodes_after, strict=True)]
    publisher_cpu_s, redis = pub_after - pub_before, redis_after - redis_before
    redis_cpu_s = redis.total
    window_s = max(hit.last_ns - int(answer["start_ns"]), 1) / 1e9
    per_node = [
        sum(c.received for k, c in f.clients if k == node and c.tally is hit) for node in (0, 1)
    ]
    hit.settle()
    latencies = sorted(hit.latencies_ns)
    own = sum(node_cpu_s) + publisher_cpu_s + redis_cpu_s + redis.replicas + load_s
    result = RoutingResult(
        case=case,
        run=run,
        users=len(plan.user_sockets),
        targeted_users=len(targets),
        rounds=rounds,
        events=int(answer["events"]),
        node_sockets=[plan.sockets_of(k) for k in (0, 1)],
        node_users=[len(plan.users_of(k)) for k in (0, 1)],
        deliveries_per_s=hit.received / window_s,
        node_deliveries_per_s=[n / window_s for n in per_node],
        node_received=[
            received(b, a, "events_received") for b, a in zip(before, after, strict=True)
        ],
        node_received_idle=[
            received(b, a, "events_received_idle") for b, a in zip(before, after, strict=True)
        ],
        node_user_channels=[int(b["backend"]["user_channels"]) for b in before],
        node_cpu_s=node_cpu_s,
        node_cpu=[s / wall for s in node_cpu_s],
        publisher_received=received(publisher_before, publisher_after, "events_received"),
        publisher_cpu_s=publisher_cpu_s,
        publisher_cpu=publisher_cpu_s / wall,
        publish_call_s=float(answer["call_s"]),
        redis_cpu_s=redis_cpu_s,
        redis_cpu=redis_cpu_s / wall,
        load_cpu=load_s / wall,
        other_cpu=max(0.0, machine_s - own) / wall,
        window_s=window_s,
        wall_s=wall,
        p50_ms=percentile(latencies, 0.50) / 1e6,
        p99_ms=percentile(latencies, 0.99) / 1e6,
        max_ms=latencies[-1] / 1e6 if latencies else float("nan"),
        lost=sum(rounds - c.received for _, c in f.clients if c.tally is hit),
        out_of_order=hit.out_of_order,
        duplicates=hit.duplicates,
        misrouted=stray.received + stray.duplicates,
        unexpected=hit.unexpected + stray.unexpected,
        closed=sum(c.closed for _, c in f.clients),
        timed_out=timed_out,
        client=client,
    )
    if f.redis.cluster:
        result.redis_cpu_parts = [part / wall for part in redis.parts]
        result.redis_replicas_cpu = redis.replicas / wall
    if timed_out:
        result.notes.append(f"timed out ({hit.received:,} of {hit.expected:,} deliveries)")
    if result.unexpected:
        result.notes.append(f"{result.unexpected} unexpected frames")
    if result.load_bound:
        result.notes.append("LOAD-BOUND (publisher + load on CPU 1)")
    if result.noisy:
        result.notes.append("NOISY (other processes or steal)")
    return result


def routing_runs(args: argparse.Namespace) -> list[RoutingResult]:
    """The two cases, interleaved: one-sided, even, one-sided, even, ..."""
    results = []
    for run in range(1, args.runs + 1):
        for case in CASES:
            busy = wait_for_quiet(args.quiet_wait)
            result = run_load(args.load_loop, run_routing(args.server, case, run, args))
            if busy > QUIET:
                result.notes.append(f"machine busy before the run ({busy:.0%} of a core)")
            results.append(result)
            print_routing(result)
    return results


def print_routing(r: RoutingResult) -> None:
    a, b = r.node_received
    redis = redis_cpu_text(r.redis_cpu, r.redis_cpu_parts, r.redis_replicas_cpu)
    print(
        f"  run {r.run} routing {r.case:<10} {r.client:<10} {r.events:,} events  "
        f"received A {a:,} ({r.received_share(0):.1%}) B {b:,} ({r.received_share(1):.1%})  "
        f"idle {r.node_received_idle[0]}/{r.node_received_idle[1]}  "
        f"CPU A {r.node_cpu_s[0]:.4f} s ({r.node_cpu[0]:.0%}) B {r.node_cpu_s[1]:.4f} s "
        f"({r.node_cpu[1]:.1%}), per event A {r.cpu_us_per_event(0):.0f} us  "
        f"publisher {r.publisher_cpu:.0%}  redis {redis}  "
        f"{r.deliveries_per_s:,.0f} deliveries/s (A {r.node_deliveries_per_s[0]:,.0f}, "
        f"B {r.node_deliveries_per_s[1]:,.0f})  p99 {r.p99_ms:.1f} ms  lost {r.lost}  "
        f"ooo {r.out_of_order}  dup {r.duplicates}  misrouted {r.misrouted}  "
        f"load CPU {r.load_cpu:.0%}  other CPU {r.other_cpu:.0%}  {' '.join(r.notes)}",
        flush=True,
    )


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")
