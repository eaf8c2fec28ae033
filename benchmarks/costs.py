"""Unit costs for the scaling model (``docs/scaling.md``): CPU and memory per publish, per
received event, per delivery, per buffered event and per subscription, on a real redis-server.

    .venv/bin/python benchmarks/costs.py            # under two minutes
    .venv/bin/python benchmarks/costs.py --quick    # smoke run, a few seconds

Everything is CPU *time* (``time.process_time`` of a process, Redis ``INFO cpu``
``used_cpu_user + used_cpu_sys``) or memory (Redis ``INFO memory`` ``used_memory``, a process'
``VmRSS``), never wall-clock throughput, so a busy machine changes the figures little. Each is
measured ``--repeats`` times; the table gives the median and the range.

Sizes are in ``FULL`` and ``QUICK`` below. Events are about 100 bytes (``EVENT``).

1. **Publish.** This process runs a hub on a ``RedisBackend`` and awaits ``hub.broadcast(user,
   event)`` round-robin over 1,000 users, one at a time (1,000 calls), then from 32 concurrent
   tasks (4,000): node CPU and Redis CPU per publish (the append-and-publish Lua script).
   First with no node subscribed to those users, then with one (the receiver below).
2. **Receive.** A receiver node (a child process: ``costs.py --receiver``, a hub on the same
   Redis) follows the same users with 0 streams each (``backend.follow``, as a node does for
   ``unsubscribe_delay`` after a user's last socket left, and as every node did for every
   event before channels per user), then 1 and 4 streams each. The streams are the hub's own
   (``streams.create`` / ``attach`` / ``start``, the real outbox and senders) on a fake
   ``send`` that takes every message at once: the difference is the hub's share of a
   delivery, without the server's WebSocket framing and socket writes (the full per-delivery
   cost is cited from ``fanout-*-steady*.json``, below). Its CPU per event received, between
   two marks, for events published as in step 1 and, third, as raw ``PUBLISH`` commands in
   the append script's message format, 100 pipelined (the receiver then reads many messages
   a read, as under heavy load). With sockets, only the loaded cases: at one event at a
   time the event loop's wake-ups dominate and the sockets' part drowns in their noise.
3. **Redis Pub/Sub.** Raw ``PUBLISH`` of a 150-byte message on one channel with 0, 1 and 4
   raw subscriber connections (threads here that only read), one command at a time and 100
   pipelined: Redis CPU per publish; (4 subscribers - 0) / 4 is Redis CPU per message
   delivered to a subscriber.
4. **Redis memory per buffered event.** ``FLUSHALL``; one event for each of 500 users, then
   the rest of 50,000 events (100 a user), through ``hub.broadcast`` from 32 tasks:
   ``used_memory`` after the first event a user (per user), and after all (per event).
5. **Redis memory per subscribed channel.** A raw connection subscribes to 100,000 users'
   channels (1,000 a command), then a second connection to the same ones (a second node
   following the same users): ``used_memory`` delta per channel. The receiver of step 2
   reports its own RSS growth per user followed (5,000 users, without sockets).
6. **Cited.** Node CPU per delivery (server CPU seconds / deliveries, the asgi-events variant
   of the steady runs, at about half a core, one WebSocket frame per event) and node memory
   per idle socket (the idle runs) are read from ``benchmarks/results/fanout-*.json``, which
   this script does not re-run.

Writes ``benchmarks/results/costs.md`` and ``costs.json`` (``--quick``: ``costs-quick.*``,
which git ignores).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
from micro import FakeSocket, verify_token  # (this script's folder, as micro.py's)

from asgi_events import codec
from asgi_events.backends.redis import RedisBackend, routing
from asgi_events.hub import EventHub
from asgi_events.stream import State
from asgi_events.transports.websocket import WIRE
from asgi_events.types import Principal

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
HOST = "127.0.0.1"
PREFIX = "costs"
# About 100 bytes as a client receives it (with its id).
CONCURRENT = 32  # publishers at once for the loaded case (and the fill)
EVENT: dict[str, Any] = {"type": "job.progress", "payload": {"job": 4821, "done": 73, "of": 100}}


@dataclass(frozen=True)
class Sizes:
    repeats: int
    users: int  # users published to, and followed by the receiver
    publishes: tuple[int, int]  # per repetition of steps 1 and 2: one at a time, concurrent
    followed: int  # users the 0-stream receiver follows (for its RSS per user)
    raw: int  # raw PUBLISH commands per repetition of step 3
    fill: int  # events buffered per repetition of step 4
    fill_users: int
    channels: int  # channels subscribed per repetition of step 5


FULL = Sizes(
    repeats=3,
    users=1000,
    publishes=(1000, 4000),
    followed=5000,
    raw=20_000,
    fill=50_000,
    fill_users=500,
    channels=100_000,
)
QUICK = Sizes(
    repeats=2,
    users=50,
    publishes=(200, 600),
    followed=200,
    raw=1000,
    fill=2000,
    fill_users=50,
    channels=2000,
)


@dataclass
class Cost:
    """One unit cost: its values over the repetitions."""

    name: str
    unit: str
    how: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "how": self.how,
            "values": self.values,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
        }


# -- redis-server and a raw RESP client -----------------------------------------------------


class RedisServer:
    """A redis-server on a free port of 127.0.0.1, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise SystemExit("costs.py needs redis-server (apt-get install redis-server)")
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"redis://{HOST}:{self.port}/0"
        self.dir = tempfile.TemporaryDirectory(prefix="costs-redis-")
        command = [binary, "--port", str(self.port), "--bind", HOST, "--save", ""]
        command += ["--appendonly", "no", "--dir", self.dir.name]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if Raw(self.port).command("PING") == "PONG":
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        self.dir.cleanup()


def resp(*args: str | bytes) -> bytes:
    """One command in RESP."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Raw:
    """A blocking connection that sends RESP and reads simple replies (no client library, so
    that what Redis does is all that is measured)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("redis-server closed the connection")
        self.buf += chunk

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-"):
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self.buf) < size + 2:
                self._fill()
            data, self.buf = self.buf[:size], self.buf[size + 2 :]
            return data.decode()
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise ValueError(f"unexpected reply {line!r}")

    def command(self, *args: str) -> Any:
        self.sock.sendall(resp(*args))
        return self.reply()

    def info(self, section: str) -> dict[str, str]:
        text = self.command("INFO", section)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key: value for key, value in pairs}

    def cpu(self) -> float:
        """Redis' CPU seconds so far (user + system, every thread)."""
        info = self.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def memory(self) -> int:
        return int(self.info("memory")["used_memory"])


# -- the receiver node (a child process) ------------------------------------------------------


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def say(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


async def receiver(url: str, users: int, followed: int, sockets: int) -> None:
    """Follow ``followed`` users (``users`` of them with ``sockets`` streams each, when
    ``sockets``); then answer ``mark`` lines on stdin with CPU seconds and counts."""
    backend = RedisBackend(url, prefix=PREFIX, unsubscribe_delay=3600.0)
    hub = EventHub(verify_token, backend=backend, max_connections_per_user=max(sockets, 1))
    fake = FakeSocket()
    async with hub:
        gc.collect()
        before = rss_kb()
        if sockets == 0:
            for chunk in range(0, followed, 500):  # (as users join: not all at once)
                async with anyio.create_task_group() as tg:
                    for i in range(chunk, min(chunk + 500, followed)):
                        tg.start_soon(backend.follow, f"user-{i}")
        else:
            for i in range(users):
                for _ in range(sockets):
                    stream = hub.streams.create(Principal(f"user-{i}"), WIRE, fake.send)
                    await hub.streams.attach(stream)
                    stream.to(State.OPEN)
                    if not hub.streams.start(stream):
                        raise RuntimeError("no sender runs")
        gc.collect()
        grown = rss_kb() - before
        channels = backend.stats()["backend"]["user_channels"]
        say({"ready": True, "rss_kb": grown, "followed": followed, "channels": channels})
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if line.strip() != "mark":
                break
            await anyio.sleep(0.05)  # let queued sends finish
            counts = backend.stats()["backend"]
            received, idle = counts["events_received"], counts["events_received_idle"]
            say({"cpu": time.process_time(), "received": received, "idle": idle,
                 "delivered": fake.received})  # fmt: skip


class Receiver:
    """A receiver node in a child process, driven over its stdin and stdout."""

    def __init__(self, url: str, users: int, followed: int, sockets: int) -> None:
        command = [sys.executable, __file__, "--receiver", url, str(users), str(followed)]
        command.append(str(sockets))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the receiver exited with {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def mark(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()
        return self._read()

    def wait_for(self, received: int, timeout: float = 60.0) -> dict[str, Any]:
        """Mark until it has received ``received`` events in all."""
        deadline = time.monotonic() + timeout
        while True:
            mark = self.mark()
            if mark["received"] >= received:
                return mark
            if time.monotonic() > deadline:
                raise RuntimeError(f"the receiver got {mark['received']} of {received} events")
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(3)


# -- the steps ------------------------------------------------------------------------------


async def publish_round(hub: EventHub, users: int, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        await hub.broadcast(f"user-{i % users}", EVENT)


async def publish(hub: EventHub, users: int, count: int, tasks: int, offset: int = 0) -> None:
    """``count`` publishes by ``tasks`` concurrent publishers, round-robin over ``users``."""
    if tasks == 1:
        await publish_round(hub, users, count, offset)
        return
    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            share = count // tasks + (t < count % tasks)
            start = offset + t * (count // tasks) + min(t, count % tasks)
            tg.start_soon(publish_round, hub, users, share, start)


LOADS = {"": 1, "c": CONCURRENT, "b": 0}  # cost key suffix -> publishers (0: raw, pipelined)
BURST = 100  # raw PUBLISH commands a pipeline


def burst(port: int, users: int, count: int, start: int) -> None:
    """``count`` messages as the append script publishes them (synthetic ids), on the users'
    channels, ``BURST`` pipelined at a time: the receiver gets them in large reads."""
    text = codec.encode(codec.prepare(EVENT))
    conn, ms = Raw(port), int(time.time() * 1000)
    for first in range(start, start + count, BURST):
        batch = []
        for i in range(first, min(first + BURST, start + count)):
            user = f"user-{i % users}"
            message = f"{routing.header(user)}\n5c1e09aa.{ms}-{i}\n{text}"
            batch.append(resp("PUBLISH", routing.user_channel(PREFIX, user), message))
        conn.sock.sendall(b"".join(batch))
        for _ in batch:
            conn.reply()
    conn.close()


async def publishing(redis: RedisServer, sizes: Sizes, costs: dict[str, Cost]) -> None:
    """Steps 1 and 2: publish with 0 receivers, then with a receiver of 0, 1 and 4 streams;
    one publish at a time, then ``CONCURRENT`` at once."""
    raw = Raw(redis.port)
    hub = EventHub(verify_token, backend=RedisBackend(redis.url, prefix=PREFIX))
    async with hub:
        await publish(hub, sizes.users, 500, CONCURRENT)  # warm-up
        for suffix, tasks in list(LOADS.items())[:2]:
            n = sizes.publishes[tasks > 1]
            for _ in range(sizes.repeats):
                cpu, rcpu = time.process_time(), raw.cpu()
                await publish(hub, sizes.users, n, tasks)
                costs["pub0" + suffix].values.append((time.process_time() - cpu) / n * 1e6)
                costs["rpub0" + suffix].values.append((raw.cpu() - rcpu) / n * 1e6)
        for streams in (0, 1, 4):
            followed = sizes.followed if streams == 0 else sizes.users
            node = await anyio.to_thread.run_sync(
                Receiver, redis.url, sizes.users, followed, streams
            )
            try:
                if streams == 0:
                    costs["rss_follow"].values.append(node.ready["rss_kb"] * 1024 / followed)
                await publish(hub, sizes.users, 500, CONCURRENT)  # warm-up
                await anyio.to_thread.run_sync(node.wait_for, 500)
                for suffix, tasks in LOADS.items():
                    if tasks == 1 and streams:
                        continue  # (at one event at a time, wake-ups drown the sockets' part)
                    n = sizes.publishes[tasks != 1]
                    for rep in range(sizes.repeats):
                        first = await anyio.to_thread.run_sync(node.mark)
                        cpu, rcpu = time.process_time(), raw.cpu()
                        if tasks:
                            await publish(hub, sizes.users, n, tasks)
                        else:
                            await anyio.to_thread.run_sync(
                                burst, redis.port, sizes.users, n, rep * n
                            )
                        pub_cpu, redis_cpu = time.process_time() - cpu, raw.cpu() - rcpu
                        last = await anyio.to_thread.run_sync(node.wait_for, first["received"] + n)
                        got = last["received"] - first["received"]
                        if got != n or last["delivered"] - first["delivered"] != n * streams:
                            raise RuntimeError(f"{got} received, {streams} streams: counts differ")
                        used = (last["cpu"] - first["cpu"]) / n * 1e6
                        costs[f"recv{streams}{suffix}"].values.append(used)
                        if streams == 0 and tasks:
                            costs["pub1" + suffix].values.append(pub_cpu / n * 1e6)
                            costs["rpub1" + suffix].values.append(redis_cpu / n * 1e6)
            finally:
                await anyio.to_thread.run_sync(node.close)
    raw.close()
    for suffix in ("c", "b"):
        for streams in (1, 4):
            with_sockets = costs[f"recv{streams}{suffix}"].values
            pairs = zip(with_sockets, costs["recv0" + suffix].values, strict=True)
            costs[f"hubsock{streams}{suffix}"].values = [(a - b) / streams for a, b in pairs]


async def filling(redis: RedisServer, sizes: Sizes, costs: dict[str, Cost]) -> None:
    """Step 4: Redis memory per buffered event."""
    raw = Raw(redis.port)
    hub = EventHub(verify_token, backend=RedisBackend(redis.url, prefix=PREFIX))
    users, rest = sizes.fill_users, sizes.fill - sizes.fill_users

    async with hub:
        for _ in range(sizes.repeats):
            raw.command("FLUSHALL")
            gc.collect()
            empty = raw.memory()
            await publish(hub, users, users, CONCURRENT)
            first = raw.memory()
            await publish(hub, users, rest, CONCURRENT, users)
            costs["mem_event"].values.append((raw.memory() - empty) / sizes.fill)
            costs["mem_user"].values.append((first - empty) / users)
        raw.command("FLUSHALL")
    raw.close()


def drain(sock: socket.socket, counter: list[int], stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except OSError:
            return
        if not chunk:
            return
        counter[0] += len(chunk)


def pubsub(redis: RedisServer, sizes: Sizes, costs: dict[str, Cost]) -> None:
    """Step 3: Redis CPU per raw PUBLISH with 0, 1 and 4 subscribers, depth 1 and 100."""
    channel = f"{PREFIX}:{{user-0}}:ch"
    payload = ('"user-0"\n5c1e09aa.1764162300123-0\n' + json.dumps(EVENT)).ljust(150, " ")
    frame = resp("message", channel, payload)  # as a subscriber receives it
    publisher = Raw(redis.port)
    for depth in (1, 100):
        per_sub: dict[int, list[float]] = {}
        for subscribers in (0, 1, 4):
            conns = [Raw(redis.port) for _ in range(subscribers)]
            for conn in conns:
                conn.command("SUBSCRIBE", channel)
            stop = threading.Event()
            counters = [[len(conn.buf)] for conn in conns]
            threads = [
                threading.Thread(target=drain, args=(conn.sock, counter, stop), daemon=True)
                for conn, counter in zip(conns, counters, strict=True)
            ]
            for thread in threads:
                thread.start()
            batch = resp("PUBLISH", channel, payload) * depth
            values = per_sub.setdefault(subscribers, [])
            for _ in range(sizes.repeats):
                expected = [c[0] + sizes.raw * len(frame) for c in counters]
                rcpu = publisher.cpu()
                for _ in range(sizes.raw // depth):
                    publisher.sock.sendall(batch)
                    for _ in range(depth):
                        if publisher.reply() != subscribers:
                            raise RuntimeError("a subscriber is missing")
                deadline = time.monotonic() + 30
                while any(c[0] < e for c, e in zip(counters, expected, strict=True)):
                    if time.monotonic() > deadline:
                        raise RuntimeError("a subscriber did not get every message")
                    time.sleep(0.01)
                values.append((publisher.cpu() - rcpu) / sizes.raw * 1e6)
            stop.set()
            for thread in threads:
                thread.join()
            for conn in conns:
                conn.close()
            costs[f"rraw{depth}_{subscribers}"].values = values
        slopes = [(b4 - b0) / 4 for b4, b0 in zip(per_sub[4], per_sub[0], strict=True)]
        costs[f"rdeliver{depth}"].values = slopes
    publisher.close()


def subscribe_all(conn: Raw, channels: list[str]) -> None:
    for i in range(0, len(channels), 1000):
        conn.sock.sendall(resp("SUBSCRIBE", *channels[i : i + 1000]))
        for _ in channels[i : i + 1000]:
            conn.reply()


def subscriptions(redis: RedisServer, sizes: Sizes, costs: dict[str, Cost]) -> None:
    """Step 5: Redis memory per subscribed channel, for a first and a second subscriber."""
    channels = [f"{PREFIX}:{{user-{i}}}:ch" for i in range(sizes.channels)]
    probe = Raw(redis.port)
    for _ in range(sizes.repeats):
        before = probe.memory()
        first, second = Raw(redis.port), Raw(redis.port)
        subscribe_all(first, channels)
        one = probe.memory()
        subscribe_all(second, channels)
        two = probe.memory()
        costs["mem_channel"].values.append((one - before) / len(channels))
        costs["mem_channel2"].values.append((two - one) / len(channels))
        first.close()
        second.close()
        deadline = time.monotonic() + 10
        while int(probe.info("clients")["connected_clients"]) > 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the subscribers did not go away")
            time.sleep(0.02)
    probe.close()


# -- cited from the fan-out runs -------------------------------------------------------------


def cited() -> list[dict[str, Any]]:
    """Node CPU per delivery (steady runs) and memory per idle socket (idle runs), from the
    saved fan-out results."""
    rows: list[dict[str, Any]] = []
    for name in sorted(RESULTS_DIR.glob("fanout-*.json")):
        data = json.loads(name.read_text())
        mode = data.get("mode")
        if mode not in ("steady", "idle"):
            continue
        mine = [r for r in data["results"] if r["variant"] == "asgi-events"]
        raw = [r for r in data["results"] if r["variant"] == "raw"]
        if not mine:
            continue
        if mode == "steady":
            values = [r["server_cpu"] / r["deliveries_per_s"] * 1e6 for r in mine]
            unit, what = "µs", "node CPU per delivery (one WebSocket frame per event)"
            extra = {"rate": round(statistics.median(r["deliveries_per_s"] for r in mine))}
            extra["server_cpu"] = round(statistics.median(r["server_cpu"] for r in mine), 2)
        else:
            values = [(r["full_kb"] - r["empty_kb"]) / r["sockets"] for r in mine]
            unit, what = "KB", "node RSS per idle socket (server and asgi-events)"
            per_raw = [(r["full_kb"] - r["empty_kb"]) / r["sockets"] for r in raw]
            extra = {"raw_kb": round(statistics.median(per_raw), 2)} if per_raw else {}
        rows.append(
            {
                "name": what,
                "unit": unit,
                "file": f"benchmarks/results/{name.name}",
                "server": data["server"],
                "started": data["started"],
                "values": values,
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                **extra,
            }
        )
    return rows


# -- report ---------------------------------------------------------------------------------


def plural(n: int) -> str:
    return "" if n == 1 else "s"


def new_costs() -> dict[str, Cost]:
    load = {"": "one at a time", "c": "32 concurrent", "b": "raw, 100 pipelined"}
    rows: list[tuple[str, str, str]] = []
    for n in (0, 1):
        for k in ("", "c"):
            rows.append(
                (
                    f"pub{n}{k}",
                    "µs",
                    f"node CPU per publish, {n} node{plural(n)} subscribed, {load[k]}",
                )
            )
    for n in (0, 1):
        for k in ("", "c"):
            what = (
                f"Redis CPU per publish (append script), {n} node{plural(n)} subscribed, {load[k]}"
            )
            rows.append((f"rpub{n}{k}", "µs", what))
    for k in load:
        for n in (0, 1, 4) if k else (0,):
            what = f"node CPU per received event, {n} socket{plural(n)} of the user, {load[k]}"
            rows.append((f"recv{n}{k}", "µs", what))
    for k in ("c", "b"):
        for n in (1, 4):
            what = f"hub's part of a delivery, per socket: (recv{n} - recv0) / {n}, {load[k]}"
            rows.append((f"hubsock{n}{k}", "µs", what))
    for depth, how in ((1, "one at a time"), (100, "100 pipelined")):
        for n in (0, 1, 4):
            what = f"Redis CPU per raw PUBLISH, {n} subscriber{plural(n)}, {how}"
            rows.append((f"rraw{depth}_{n}", "µs", what))
        what = f"Redis CPU per message delivered to a subscriber, {how}"
        rows.append((f"rdeliver{depth}", "µs", what))
    rows += [
        ("mem_event", "B", "Redis memory per buffered event, all in (100 a user)"),
        ("mem_user", "B", "Redis memory of a user with 1 buffered event (stream, meta)"),
        ("mem_channel", "B", "Redis memory per subscribed channel (first subscriber)"),
        ("mem_channel2", "B", "Redis memory per subscription of a second node to a channel"),
        ("rss_follow", "B", "node RSS per followed user (no socket)"),
    ]
    return {key: Cost(name, unit, key) for key, unit, name in rows}


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis = subprocess.run(
        [shutil.which("redis-server") or "redis-server", "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    source = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis": redis,
        "coredis": version("coredis"),
        "anyio": version("anyio"),
        "asgi_events_src": source,
    }


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def report(costs: dict[str, Cost], quoted: list[dict[str, Any]], info: dict[str, Any]) -> str:
    quick, host = " --quick" if info["quick"] else "", info["machine"]
    lines = [
        f"# Unit costs{' (quick)' if info['quick'] else ''}",
        "",
        f"`python benchmarks/costs.py{quick}` — {info['date']}, Python {host['python']}, "
        f"{host['redis'].split(' sha')[0]}, coredis {host['coredis']}, asgi-events src "
        f"{host['asgi_events_src']}, {host['cpus']} CPUs ({host['cpu']}), shared with other "
        f"work. {info['sizes']['repeats']} repetitions each; CPU time, not throughput. How "
        "each is measured: the docstring of `benchmarks/costs.py`.",
        "",
        "| unit cost | median | min-max | unit |",
        "|---|---:|---:|---|",
    ]
    for cost in costs.values():
        if cost.values:
            low, high = fmt(min(cost.values)), fmt(max(cost.values))
            lines.append(f"| {cost.name} | {fmt(cost.median)} | {low}-{high} | {cost.unit} |")
    lines += [
        "",
        "Cited from the saved fan-out runs (asgi-events variant, one node in memory; not re-run):",
        "",
        "| unit cost | server | median | min-max | unit | file (run started) |",
        "|---|---|---:|---:|---|---|",
    ]
    for row in quoted:
        note = f"`{row['file'].rsplit('/', 1)[1]}` ({row['started']})"
        if "rate" in row:
            note += f", {row['rate']:,} deliveries/s at {row['server_cpu']:.0%} of a core"
        if "raw_kb" in row:
            note += f", raw ASGI app: {row['raw_kb']} KB"
        span = f"{fmt(row['min'])}-{fmt(row['max'])}"
        cells = [row["name"], row["server"], fmt(row["median"]), span, row["unit"], note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else FULL
    costs = new_costs()
    started = time.monotonic()
    redis = RedisServer()
    try:
        await publishing(redis, sizes, costs)
        await anyio.to_thread.run_sync(pubsub, redis, sizes, costs)
        await filling(redis, sizes, costs)
        await anyio.to_thread.run_sync(subscriptions, redis, sizes, costs)
    finally:
        redis.close()
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine(),
        "sizes": sizes.__dict__,
        "event": EVENT,
        "method": (__doc__ or "").strip(),
    }
    quoted = cited()
    text = report(costs, quoted, info)
    print(text)
    stem = "costs-quick" if args.quick else "costs"
    out = args.output or RESULTS_DIR / stem
    markdown, data_file = out.with_name(out.name + ".md"), out.with_name(out.name + ".json")
    markdown.write_text(text)
    results = [cost.as_dict() for cost in costs.values() if cost.values]
    data = {**info, "results": results, "cited": quoted}
    data_file.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {markdown} and {data_file.name} in {info['seconds']} s")


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    import logging

    logger = logging.getLogger("asgi_events")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--output", type=Path, help="where to write (a path without suffix: .md and .json)"
    )
    parser.add_argument("--receiver", nargs=4, metavar=("URL", "USERS", "FOLLOWED", "SOCKETS"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    with quiet_warnings():
        if arguments.receiver:
            url, users, followed, sockets = arguments.receiver
            anyio.run(receiver, url, int(users), int(followed), int(sockets))
        else:
            anyio.run(main, arguments)
