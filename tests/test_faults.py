"""Faults over a real server and real sockets: TCP resets, stalled readers, bursts, shutdown.

Each test runs on hypercorn's asyncio and trio workers. Waits are bounded; where there is no
event to wait on (a server-side state), a bounded polling loop watches for it.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws

from asgi_events import EventHub
from asgi_events.stream import State, Stream

from .support.server import TIMEOUT, Connect, ServeFn, Server, close_code, recv, recv_n, users

V1 = ["asgi-events.v1"]
BIG = "x" * 65536
KB = "x" * 1000
PAST = "2000-01-01T00:00:00Z"
ERROR_LOGGERS = ("asgi_events", "hypercorn.error")
BURST_BACKLOG = 2048  # hypercorn re-listens with its `backlog` (100 by default) on its socket


# -- helpers ----------------------------------------------------------------------------


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """Warnings and errors of asgi_events and of hypercorn's error log, during the test."""
    keep = _Keep()
    loggers = [logging.getLogger(name) for name in ERROR_LOGGERS]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        yield keep.records
    finally:
        for logger in loggers:
            logger.removeHandler(keep)


async def start(serve: ServeFn, hub: EventHub, **config: Any) -> Server:
    """A server whose hypercorn error log goes to the ``hypercorn.error`` logger."""
    return await serve(hub=hub, errorlog=logging.getLogger("hypercorn.error"), **config)


def formatted(records: list[logging.LogRecord]) -> list[str]:
    return [logging.Formatter("%(name)s %(levelname)s %(message)s").format(r) for r in records]


async def reset(ws: AsyncWebSocketSession) -> None:
    """Abort the client's TCP connection: SO_LINGER 0, then close (an RST, no close frame)."""
    sock = ws.stream.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await ws.stream.aclose()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a server-side state (there is no event to wait on), within TIMEOUT."""
    with anyio.fail_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 - a state of the server, not an event
            await anyio.sleep(0.005)


def conns(hub: EventHub, user: str) -> list[Stream]:
    return list(hub.streams.of(user))


def payloads(frames: list[Any]) -> list[Any]:
    return [frame["payload"]["n"] for frame in frames]


async def collect(ws: AsyncWebSocketSession, count: int, into: list[int]) -> None:
    for _ in range(count):
        into.append((await recv(ws))["payload"]["n"])


async def read_until_closed(ws: AsyncWebSocketSession, frames: list[Any]) -> tuple[int, str]:
    """Append every frame to ``frames`` until the server closes; its code and reason."""
    while True:
        try:
            frames.append(await recv(ws))
        except WebSocketDisconnect as closed:
            return closed.code, closed.reason


def wide_client() -> httpx.AsyncClient:
    """One client for hundreds of sockets at once (no pool limit, nothing kept alive)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.AsyncClient(limits=limits, timeout=TIMEOUT)


def ws_session(url: str, client: httpx.AsyncClient, subprotocols: list[str] | None = None) -> Any:
    return aconnect_ws(url, client, subprotocols=subprotocols, keepalive_ping_interval_seconds=None)


# -- abrupt TCP resets --------------------------------------------------------------------


async def test_a_tcp_reset_mid_send_harms_neither_the_server_nor_other_sockets(
    serve: ServeFn, connect: Connect, server_errors: list[logging.LogRecord]
) -> None:
    hub = EventHub(users, buffer_size=1000)  # 300 queued stays below the durable bound (500)
    server = await start(serve, hub)
    burst, after = 300, 20
    got: dict[str, list[int]] = {"alice": [], "bob": []}
    async with (
        connect(server.ws_url(token="tok-alice")) as alice,
        connect(server.ws_url(token="tok-bob")) as bob,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(collect, alice, burst + after, got["alice"])
        tg.start_soon(collect, bob, burst + after, got["bob"])
        async with connect(server.ws_url(token="tok-alice")) as victim:
            victim_conn = conns(hub, "alice")[1]
            for n in range(burst):  # ~19 MB for each alice socket
                await hub.broadcast("alice", {"type": "T", "payload": {"n": n, "pad": BIG}})
                await hub.broadcast("bob", {"type": "T", "payload": {"n": n}})
            assert payloads(await recv_n(victim, 5)) == [0, 1, 2, 3, 4]
            assert victim_conn.outbox.queued, "the burst was no longer being sent"
            await reset(victim)
        await wait_until(lambda: victim_conn.state is State.CLOSED)
        assert hub.stats()["connections_per_user"] == {"alice": 1, "bob": 1}
        for n in range(burst, burst + after):
            await hub.broadcast("alice", {"type": "T", "payload": {"n": n}})
            await hub.broadcast("bob", {"type": "T", "payload": {"n": n}})
    assert got == {"alice": list(range(burst + after)), "bob": list(range(burst + after))}
    await wait_until(lambda: hub.stats()["total_connections"] == 0)
    assert not server.stopped.is_set()
    assert hub.stats()["slow_consumer_closes"] == 0
    assert formatted(server_errors) == []


async def test_a_tcp_reset_mid_replay_harms_neither_the_server_nor_other_sockets(
    serve: ServeFn, connect: Connect, server_errors: list[logging.LogRecord]
) -> None:
    hub = EventHub(users, buffer_size=300)
    server = await start(serve, hub)
    backlog = 300
    for n in range(backlog):  # ~19 MB buffered for alice, who is away
        await hub.broadcast("alice", {"type": "T", "payload": {"n": n, "pad": BIG}})
    async with (
        connect(server.ws_url(token="tok-alice")) as live,  # no resume: live events only
        connect(server.ws_url(token="tok-bob")) as bob,
    ):
        async with connect(server.ws_url(token="tok-alice", lastEventTs=PAST)) as victim:
            victim_conn = conns(hub, "alice")[1]
            await wait_until(lambda: victim_conn.outbox.sent > 0)  # the replay is being sent
            assert victim_conn.outbox.queued, "the replay was no longer being sent"
            await reset(victim)  # before reading anything
        await wait_until(lambda: victim_conn.state is State.CLOSED)
        assert hub.stats()["connections_per_user"] == {"alice": 1, "bob": 1}
        for n in range(backlog, backlog + 10):
            await hub.broadcast("alice", {"type": "T", "payload": {"n": n}})
            await hub.broadcast("bob", {"type": "T", "payload": {"n": n}})
        frames = await recv_n(live, 10)
        assert payloads(frames) == list(range(backlog, backlog + 10))
        assert payloads(await recv_n(bob, 10)) == list(range(backlog, backlog + 10))
        # The buffer is intact: a resume by id gets exactly what followed.
        url = server.ws_url(token="tok-alice", lastEventId=frames[0]["id"])
        async with connect(url, V1) as again:
            *rest, ready = await recv_n(again, 10)
        assert payloads(rest) == list(range(backlog + 1, backlog + 10))
        assert ready["payload"] == {"position": frames[-1]["id"], "recovered": True, "replayed": 9}
    await wait_until(lambda: hub.stats()["total_connections"] == 0)
    assert not server.stopped.is_set()
    assert hub.stats()["replayed_events"] == backlog + 9
    assert formatted(server_errors) == []


# -- a client that stops reading ------------------------------------------------------------


async def test_a_stalled_reader_is_closed_with_1013_and_every_queue_stays_bounded(
    serve: ServeFn, connect: Connect, server_errors: list[logging.LogRecord]
) -> None:
    """1 KB events as fast as the healthy sockets read them, to the stalled user and to others.

    The publisher runs at most ``window`` rounds ahead of the slowest healthy reader (those are
    clients in this process and need its CPU time; see the test below for a publisher
    that never waits). Queue lengths are sampled after every broadcast.
    """
    hub = EventHub(users)  # the defaults: 1024 messages queued, 100 buffered events queued
    limit, durable_limit = hub.streams.settings.send_queue_size, hub.streams.settings.durable_limit
    server = await start(serve, hub)
    window, after = 32, 50
    healthy = ["alice2", "bob", "carol"]
    got: dict[str, list[int]] = {name: [] for name in healthy}
    transients = dict.fromkeys(healthy, 0)
    progress = anyio.Event()
    peak_queue: dict[str, int] = {}
    peak_durable: dict[str, int] = {}

    async def reader(ws: AsyncWebSocketSession, name: str) -> None:
        nonlocal progress
        while True:
            frame = await recv(ws)
            if frame["type"] == "DONE":
                return
            if frame["type"] == "T":
                got[name].append(frame["payload"]["n"])
                progress.set()
            else:
                transients[name] += 1

    async with (
        connect(server.ws_url(token="tok-alice")) as stalled,
        connect(server.ws_url(token="tok-alice")) as alice2,
        connect(server.ws_url(token="tok-bob")) as bob,
        connect(server.ws_url(token="tok-carol")) as carol,
    ):
        named = dict(zip(["stalled", *healthy], hub.streams.all(), strict=True))
        stalled_conn = named["stalled"]

        def sample() -> None:
            for name, conn in named.items():
                box = conn.outbox
                peak_queue[name] = max(peak_queue.get(name, 0), len(box.queued))
                peak_durable[name] = max(peak_durable.get(name, 0), box.durable)

        async with anyio.create_task_group() as tg:
            for ws, name in zip([alice2, bob, carol], healthy, strict=True):
                tg.start_soon(reader, ws, name)
            n = 0
            with anyio.fail_after(30):
                while after:
                    for user in ("alice", "bob", "carol"):
                        await hub.broadcast(user, {"type": "T", "payload": {"n": n, "pad": KB}})
                        sample()
                    # a transient event too: it counts against the queue, never the durable bound
                    await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": KB})
                    sample()
                    n += 1
                    while n - min(len(got[name]) for name in healthy) > window:
                        progress = anyio.Event()
                        await progress.wait()
                    if stalled_conn.state is not State.OPEN:
                        after -= 1  # keep publishing for a while after the close
                    assert n < 20_000, "the stalled socket was never closed"
            for user in ("alice", "bob", "carol"):
                await hub.broadcast(user, {"type": "DONE"})

        assert got == {name: list(range(n)) for name in healthy}
        assert transients == {"alice2": n, "bob": 0, "carol": 0}
        assert hub.stats()["slow_consumer_closes"] == 1
        assert hub.stats()["connections_per_user"] == {"alice": 1, "bob": 1, "carol": 1}
        assert stalled_conn not in hub.streams.all()
        assert not stalled_conn.outbox.queued  # dropped at the close
        # The documented bounds held everywhere, and the stalled queue did reach the durable one.
        assert max(peak_queue.values()) <= limit
        assert max(peak_durable.values()) <= durable_limit
        assert peak_durable["stalled"] == durable_limit
        assert all(peak_durable[name] < durable_limit for name in healthy)
        # The stalled client, reading at last, finds what reached it in order, then the 1013.
        frames: list[Any] = []
        with anyio.fail_after(TIMEOUT):
            code = await read_until_closed(stalled, frames)
        durable = [f["payload"]["n"] for f in frames if f["type"] == "T"]
        assert durable == list(range(len(durable))) and len(durable) < n
        assert code == (1013, "Slow consumer")
    assert formatted(server_errors) == []


async def test_a_tight_publishing_loop_with_the_default_sizes_keeps_a_healthy_socket(
    serve: ServeFn, connect: Connect
) -> None:
    hub = EventHub(users)  # the defaults
    server = await serve(hub=hub)
    async with connect(server.ws_url(token="tok-alice")) as ws:
        for n in range(150):  # no await of our own between broadcasts
            await hub.broadcast("alice", {"type": "T", "payload": {"n": n}})
        assert hub.stats()["slow_consumer_closes"] == 0
        assert payloads(await recv_n(ws, 150)) == list(range(150))


# -- many sockets at once ---------------------------------------------------------------------


async def test_a_thousand_sockets_opened_in_one_burst_are_all_served(
    serve: ServeFn, server_errors: list[logging.LogRecord]
) -> None:
    count = 1000
    hub = EventHub(users)
    server = await start(serve, hub, backlog=BURST_BACKLOG)
    opened = 0
    all_open = anyio.Event()
    got: list[Any] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        nonlocal opened
        async with ws_session(server.ws_url(token=f"tok-u{i % 50}"), client) as ws:
            opened += 1
            if opened == count:
                all_open.set()
            await all_open.wait()
            got.append((await recv(ws))["payload"])

    async with wide_client() as client, anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i, client)
        with anyio.fail_after(30):
            await all_open.wait()
        stats = hub.stats()
        assert (stats["total_connections"], stats["active_users"]) == (count, 50)
        await hub.broadcast_to_all({"type": "HELLO", "payload": "all"})
    assert got == ["all"] * count
    await wait_until(lambda: hub.stats()["total_connections"] == 0)
    assert hub.stats()["messages_sent"] == count
    assert formatted(server_errors) == []


async def test_200_clients_reconnecting_at_once_resume_with_no_duplicate_and_no_gap(
    serve: ServeFn, server_errors: list[logging.LogRecord]
) -> None:
    """20 users x 10 sockets. Each reads FIRST events, then (all together) drops its socket
    unread and resumes by lastEventId, while events keep being published: some while it is
    away or still queued on its old socket (replayed), some during the reconnect burst, and
    some once every client is back (live). Each must see exactly 0..TOTAL-1, in order.
    """
    users_, per_user = [f"u{i}" for i in range(20)], 10
    first, during, later = 20, 20, 20
    total = first + during + later
    clients = len(users_) * per_user
    hub = EventHub(users, buffer_size=10_000)  # nothing is evicted: every resume is exact
    server = await start(serve, hub, backlog=BURST_BACKLOG)
    connected, at_barrier, back = anyio.Event(), anyio.Event(), anyio.Event()
    counts = {"connected": 0, "at_barrier": 0, "back": 0}
    seen: list[list[int]] = []
    replayed: list[int] = []

    def arrive(stage: str, event: anyio.Event) -> None:
        counts[stage] += 1
        if counts[stage] == clients:
            event.set()

    async def one(user: str, client: httpx.AsyncClient) -> None:
        got: list[int] = []
        async with ws_session(server.ws_url(token=f"tok-{user}"), client, V1) as ws:
            ready = await recv(ws)
            assert ready["payload"]["recovered"] is True
            arrive("connected", connected)
            frames = await recv_n(ws, first)
            got += payloads(frames)
            arrive("at_barrier", at_barrier)
            await at_barrier.wait()  # then all leave at once, leaving what is queued unread
        url = server.ws_url(token=f"tok-{user}", lastEventId=frames[-1]["id"])
        async with ws_session(url, client, V1) as ws:
            frame = await recv(ws)
            while frame["type"] != "asgi_events.ready":
                got.append(frame["payload"]["n"])
                frame = await recv(ws)
            assert frame["payload"]["recovered"] is True
            replayed.append(frame["payload"]["replayed"])
            arrive("back", back)
            while len(got) < total:
                got.append((await recv(ws))["payload"]["n"])
        seen.append(got)

    async def publish(rounds: range) -> None:
        for n in rounds:
            for user in users_:
                await hub.broadcast(user, {"type": "T", "payload": {"n": n}})
            await anyio.lowlevel.checkpoint()  # interleave with the handshakes

    async with wide_client() as client, anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(one, users_[i % len(users_)], client)
        with anyio.fail_after(30):
            await connected.wait()
            await publish(range(first))
            await at_barrier.wait()
            await publish(range(first, first + during))  # as the 200 reconnect
            await back.wait()
            await publish(range(first + during, total))
    assert len(seen) == clients
    assert all(got == list(range(total)) for got in seen)
    assert sum(replayed) > 0
    stats = hub.stats()
    assert stats["reconnection_count"] == clients and stats["replays_incomplete"] == 0
    assert stats["slow_consumer_closes"] == 0
    assert formatted(server_errors) == []


# -- shutdown -------------------------------------------------------------------------------


async def test_shutdown_during_a_large_replay_completes_within_its_bound(
    serve: ServeFn, connect: Connect, server_errors: list[logging.LogRecord]
) -> None:
    shutdown_timeout = 0.5
    hub = EventHub(users, buffer_size=200, shutdown_timeout=shutdown_timeout)
    server = await start(serve, hub)
    for n in range(200):  # ~13 MB to replay to a client that does not read
        await hub.broadcast("alice", {"type": "T", "payload": {"n": n, "pad": BIG}})
    async with (
        connect(server.ws_url(token="tok-bob")) as bob,
        connect(server.ws_url(token="tok-alice", lastEventTs=PAST)) as stalled,
    ):
        (conn,) = conns(hub, "alice")
        await wait_until(lambda: conn.outbox.sent > 0)  # the replay is being sent
        assert conn.outbox.queued, "the replay was no longer being sent"
        with anyio.fail_after(shutdown_timeout + 1.0):
            await hub.shutdown()
        stats = hub.stats()
        assert (stats["total_connections"], stats["buffered_events"]) == (0, 0)
        assert await close_code(bob) == (1001, "Server shutdown")
        del stalled  # never reads; closed (reset, with unread data) on the way out
    await wait_until(lambda: conn.state is State.CLOSED)  # its task ended too
    assert not server.stopped.is_set()
    assert formatted(server_errors) == []


async def test_shutdown_waits_for_a_socket_closed_just_before_it(
    serve: ServeFn, connect: Connect, http: httpx.AsyncClient
) -> None:
    """A displaced socket is no longer registered, but its close frame still waits behind a
    send that its client is not reading: shutdown waits for it too, or the hub would stop (and
    its senders with it) with that close frame never sent."""
    hub = EventHub(users, max_connections_per_user=1, shutdown_timeout=TIMEOUT)
    server = await start(serve, hub)
    async with aconnect_ws(
        server.ws_url(token="tok-alice"),
        http,
        queue_size=1,  # its reader stops at once
        keepalive_ping_interval_seconds=None,
        max_message_size_bytes=4 * 1024 * 1024,
    ) as old:
        (old_conn,) = conns(hub, "alice")
        for n in range(400):  # ~26 MB: more than the socket buffers hold
            await hub.broadcast_to_all({"type": "T", "payload": {"n": n, "pad": BIG}})
        await wait_until(lambda: old_conn.outbox.stalled)  # a send to it is stuck
        async with connect(server.ws_url(token="tok-alice")) as new:  # displaces the old one
            assert old_conn.state is State.CLOSING
            assert hub.stats()["connections_per_user"] == {"alice": 1}
            shut = anyio.Event()

            async def shutdown() -> None:
                await hub.shutdown()
                shut.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(shutdown)
                assert await close_code(new) == (1001, "Server shutdown")
                with anyio.move_on_after(0.2):  # a window in which nothing may happen
                    await shut.wait()
                assert not shut.is_set(), "shutdown did not wait for the closing socket"
                frames: list[Any] = []
                with anyio.fail_after(TIMEOUT):
                    code = await read_until_closed(old, frames)  # reading at last
            assert code == (1008, "Too many connections")
            assert [f["payload"]["n"] for f in frames] == list(range(len(frames)))
    assert hub.streams.live == 0
    await wait_until(lambda: old_conn.state is State.CLOSED)
