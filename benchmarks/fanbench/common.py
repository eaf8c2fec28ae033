"""Constants, type aliases and the process and machine helpers both sides share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"
SERVERS = ("hypercorn-asyncio", "hypercorn-trio", "uvicorn")
ASYNCIO_SERVERS = ("hypercorn-asyncio", "uvicorn")  # the peer variants run on asyncio only
MODES = ("burst", "steady", "stalled", "idle", "routing", "soak")

REDIS_VARIANT = "asgi-events-redis"  # two nodes on one redis-server
BATCH_VARIANT = "asgi-events-batch"  # the asgi-events server; clients offer the batch subprotocol
SSE_VARIANT = "asgi-events-sse"  # the asgi-events server; clients read Server-Sent Events
BROADCASTER_VARIANT = "starlette-broadcaster"  # Starlette + broadcaster (memory://)
SOCKETIO_VARIANT = "python-socketio"  # socketio.AsyncServer + socketio.ASGIApp
PEER_VARIANTS = (BROADCASTER_VARIANT, SOCKETIO_VARIANT)
BATCH_SUBPROTOCOL = b"asgi-events.v1.batch"
# The order runs are interleaved in.
VARIANTS = (
    "raw",
    "asgi-events",
    BATCH_VARIANT,
    SSE_VARIANT,
    BROADCASTER_VARIANT,
    SOCKETIO_VARIANT,
    REDIS_VARIANT,
)
# --quick runs these unless --variants says otherwise (the peers only on asyncio servers).
QUICK_VARIANTS = ("raw", "asgi-events", BATCH_VARIANT, SSE_VARIANT, *PEER_VARIANTS)
REDIS_NODES = 2

# Targets (issue): reported as met / NOT met, never asserted.
BATCH_GOAL = 2.0  # batched frames >= 2x the raw app under the same burst
SSE_GOAL = 2.0  # Server-Sent Events (batched body chunks) >= 2x the raw WebSocket app, same burst
PLAIN_GOAL = 1.0  # plain frames >= 1x the raw app under the same burst
REDIS_GOAL = 0.7  # two nodes on Redis >= 0.7x one node in memory
STEADY_P99_GOAL = 1.2  # steady: asgi-events p99 <= 1.2x the raw app's
STALLED_GOAL = 0.95  # stalled: healthy deliveries/s >= 0.95x the run without stalled clients
IDLE_GOAL_KB = 5.0  # idle: asgi-events <= raw + 5 KB per socket
ROUTING_STRAY_GOAL = 0.01  # routing, one-sided: node B receives <= 1% of the events
ROUTING_IDLE_GOAL = 0.05  # routing, one-sided: node B's CPU <= 5% of a core ("near idle")
ROUTING_EVEN_GOAL = 0.55  # routing, even: each node receives <= 55% of the events

EVENT_TYPE = "bench.tick"
WS_PATH = "/ws"
SOCKETIO_PATH = "/socket.io/"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# An event's payload is {"seq": int, "t": int, "pad": str} in every variant; a regex on the frame
# reads the two numbers far more cheaply than json.loads (the load side must not be the limit).
EVENT_FIELDS = re.compile(rb'"payload":\{"seq":(\d+),"t":(\d+),')
# A batch frame is a JSON array of messages. One pass finds every message (each starts with
# {"type":"); for each, (seq, t, b"") for one of our events, (b"", b"", READY_TYPE) for the ready
# message a batch client gets first (ignored), (b"", b"", b"") for anything else.
READY_TYPE = b"asgi_events.ready"
BATCH_MESSAGE = re.compile(
    rb'\{"type":"(?:'
    + re.escape(EVENT_TYPE.encode())
    + rb'","payload":\{"seq":(\d+),"t":(\d+),|('
    + re.escape(READY_TYPE)
    + rb')")?'
)
# Server-Sent Events: the body (de-chunked) is blocks, each ended by a blank line; each of our
# events is one block, "data: " + the same JSON ("id: ...\n" first if the server gave it an id).
# SSE_NEXT matches every blank line and reads the start of the block after it: (seq, t, b"") for
# one of our events, (b"", b"", READY_TYPE) for the ready event (the first one), (b"", b"", b"")
# for anything else (the first chunk's "retry:", a keepalive comment, a close event, or nothing:
# the blank line that ends the last block). SSE_FIRST reads a chunk's first block the same way.
# One pass of each finds every block of a chunk, so the load side stays cheap.
_SSE_BLOCK = (
    rb'(?:(?:id: [^\n]*\n)?data: \{"type":"'
    + re.escape(EVENT_TYPE.encode())
    + rb'","payload":\{"seq":(\d+),"t":(\d+),|event: ('
    + re.escape(READY_TYPE)
    + rb")\n)?"
)
SSE_FIRST = re.compile(_SSE_BLOCK)
SSE_NEXT = re.compile(rb"\n\n" + _SSE_BLOCK)
SSE_CLOSE = b"event: asgi_events.close\n"  # the server ends the stream: {"code", "reason"}
SERVER_CPU, LOAD_CPU = 0, 1
FULL = (1000, 200, 100, 3)  # default sockets, events, payload, runs
QUICK = (20, 10, 100, 1)
IDLE_SOCKETS, QUICK_IDLE_SOCKETS = 5000, 50
# Routing mode: --events is per user in the even case (every user gets one event per round).
ROUTING_EVENTS, QUICK_ROUTING_EVENTS = 50, 10
ROUTING_PUBLISH_TASKS = 8  # the publisher's concurrent loops (each with its share of users)
STEADY_DURATION, QUICK_STEADY_DURATION = 10.0, 1.0  # seconds of publishing per steady run
QUICK_STEADY_RATE = 20.0  # events/s: --quick does not calibrate (a 20-socket burst says little)
STALL_FRACTION = 0.01  # stalled mode: this share of the clients stop reading (at least one)
STALL_RCVBUF = 4096  # SO_RCVBUF of a stalled client, so that its kernel buffer fills up soon
STALL_WAIT_FACTOR, STALL_MIN_WAIT = 3.0, 5.0  # stalled runs wait max(min, factor x baseline)
QUICK_STALL_MIN_WAIT = 2.0
WARMUP_SOCKETS, WARMUP_EVENTS = 10, 5  # idle mode: the warm-up before the empty server's RSS
LOAD_BOUND = 0.90  # a load process busier than this over the window may be the bottleneck
NOISY = 0.10  # other processes + steal above this share of a core: the run was disturbed
QUIET = 0.10  # before a run, wait (bounded) until the machine is busy below this, in cores
QUIET_LOOK = 0.1  # --quiet-wait 0: how long to look at the machine before a run, s
BENCH_DIR = Path(__file__).resolve().parent.parent
PROJECT_DIR = BENCH_DIR.parent  # --redis cluster imports tests.support.redis_cluster from here
ENTRY_SCRIPT = BENCH_DIR / "fanout.py"
RESULTS_DIR = BENCH_DIR / "results"
CHART_PATH = RESULTS_DIR / "fanout.png"
SRC_DIR = PROJECT_DIR / "src" / "asgi_events"

# Bounds on every wait (seconds); --timeout bounds the delivery wait itself.
SERVER_START_TIMEOUT = 30.0
CONNECT_TIMEOUT = 60.0  # all N sockets
HTTP_TIMEOUT = 10.0
SERVER_READY_WAIT = 10.0  # the server waits this long for all N sockets to be registered
SERVER_STOP_TIMEOUT = 15.0
REDIS_START_TIMEOUT = 10.0
REDIS_CLUSTER_START_TIMEOUT = 30.0  # six nodes, the cluster created and every replica in sync
CHILD_MAX_LIFETIME = 900.0  # a server process ends itself after this, whatever happens

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def variants_for(server: str, variants: list[str]) -> list[str]:
    """The variants that run on ``server``: the peers (asyncio libraries) not on trio."""
    if server in ASYNCIO_SERVERS:
        return variants
    return [v for v in variants if v not in PEER_VARIANTS]


# -- process setup ----------------------------------------------------------------------------


def pin_to_cpu(cpu: int) -> str:
    """Pin this process to ``cpu`` if the machine has it; say what was done."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    if (os.cpu_count() or 1) <= cpu:
        return f"not pinned (no CPU {cpu})"
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        return f"not pinned ({exc})"
    return f"CPU {cpu}"


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; fail early if ``needed`` does not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {target} < {needed} file descriptors needed")
    return target


def die_with_parent() -> None:
    """Linux: have the kernel kill this process if the benchmark process dies."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def start_watchdog(limit: float) -> None:
    """End this process after ``limit`` seconds whatever it is doing."""

    def expire() -> None:
        time.sleep(limit)
        print(f"server: exceeded its {limit:.0f} s lifetime, exiting", file=sys.stderr)
        os._exit(3)

    threading.Thread(target=expire, daemon=True).start()


# -- the load process's event loop -------------------------------------------------------------

# uvloop's transports cost the load process less CPU per frame than the stdlib loop's, so that
# it is not the limit before the raw app on uvicorn is (benchmarks/README.md).
LOAD_LOOPS = ("uvloop", "asyncio")
T = TypeVar("T")


def default_load_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def load_loop_description(loop: str) -> str:
    if loop == "uvloop":
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return "stdlib asyncio loop"


def run_load(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run the load process's ``main`` on ``loop``."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


# -- the machine, seen from the load process --------------------------------------------------


def load_cpu_seconds() -> float:
    """User + system CPU time of this (the load) process, microsecond resolution."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> tuple[float, float]:
    """Busy CPU time of the whole machine, all CPUs: (everything but softirq, softirq), in s."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + steal) / tick, softirq / tick


def wait_for_quiet(limit: float, sample: float = 0.5) -> float:
    """Wait up to ``limit`` s until the machine's busy CPU is below ``QUIET``; the last level seen.

    The machine may be shared (tests running next to the benchmark): a run started while
    something else is busy measures that as much as the server. With ``limit`` 0 (no waiting:
    smoke runs) one short look, ``QUIET_LOOK`` s, still says how busy it was.
    """
    if limit <= 0:
        sample = QUIET_LOOK
    deadline = time.monotonic() + limit
    while True:
        before = sum(machine_busy_seconds())
        time.sleep(sample)
        busy = (sum(machine_busy_seconds()) - before) / sample
        if busy < QUIET or time.monotonic() >= deadline:
            return busy


def percent(value: float | None) -> str:
    """A share of a core; one decimal below 10% (redis-server's is well under 1%)."""
    if value is None or value != value:
        return "-"
    return f"{value:.1%}" if value < 0.1 else f"{value:.0%}"


def percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])
