"""Several nodes on one real Redis: fan-out, resume across nodes, order, faults."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import coredis
import httpx
import pytest
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect

from asgi_events import BackendUnavailableError, EventHub
from asgi_events.backends.redis import RedisBackend

from .support.redis_cluster import RedisCluster
from .support.redis_server import RedisServer, free_port, partition
from .support.server import Connect, ServeFn, Server, assert_silent, close_code, recv, recv_n, users

ROOT = Path(__file__).resolve().parent.parent
V1 = ["asgi-events.v1"]


# Short heartbeats for the tests of silent partitions: one is noticed within 0.7 s.
BEATS = {"heartbeat_interval": 0.2, "heartbeat_timeout": 0.5}
NOTICED = 0.2 + 0.5 + 2.0  # the bound on noticing one, plus room for a loaded machine


async def nodes(
    serve: ServeFn,
    redis: RedisServer | RedisCluster,
    n: int = 2,
    backend: dict[str, Any] | None = None,
    **hub: Any,
) -> list[Server]:
    """``n`` servers, each with its own hub, sharing one Redis (or Redis Cluster) under a
    prefix of the test's."""
    prefix = f"t-{secrets.token_hex(4)}"
    servers = []
    for _ in range(n):
        options = {"prefix": prefix, "timeout": 1.0, "max_backoff": 0.2, **(backend or {})}
        if isinstance(redis, RedisCluster):
            options["cluster"] = True
        redis_backend = RedisBackend(redis.url, **options)
        servers.append(await serve(hub=EventHub(users, backend=redis_backend, **hub)))
    return servers


def redis_backend(server: Server) -> RedisBackend:
    assert server.hub is not None and isinstance(server.hub.backend, RedisBackend)
    return server.hub.backend


async def until_healthy(*servers: Server) -> None:
    """Wait (bounded) until every node has its subscription back, by itself."""
    with anyio.fail_after(10):  # no event to wait on: poll
        while not all(s.hub and s.hub.stats()["backend"]["healthy"] for s in servers):  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def heartbeats_go_round(*servers: Server) -> None:
    """Wait (bounded) until each node has sent two more heartbeats (one whole came back)."""
    targets = [(redis_backend(s), redis_backend(s).heartbeats_sent + 2) for s in servers]
    with anyio.fail_after(5):
        while any(backend.heartbeats_sent < target for backend, target in targets):  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def frames_until_closed(ws: AsyncWebSocketSession) -> tuple[list[Any], tuple[int, str]]:
    """Every frame the server sends until it closes the socket, and its close code and reason."""
    frames = []
    while True:
        try:
            frames.append(json.loads(await ws.receive_text(timeout=10)))
        except WebSocketDisconnect as exc:
            return frames, (exc.code, exc.reason)


async def test_fan_out_reaches_every_node_once(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    a, b = await nodes(serve, redis_server)
    async with (
        connect(a.ws_url(token="tok-alice")) as on_a,
        connect(b.ws_url(token="tok-alice")) as on_b,
        connect(a.ws_url(token="tok-bob")) as bob,
    ):
        await b.hub.broadcast("alice", {"type": "T", "payload": "from b"})
        await a.hub.broadcast_to_all({"type": "ALL", "payload": "from a"})
        for ws in (on_a, on_b):
            first, second = await recv_n(ws, 2)
            assert (first["payload"], second["payload"]) == ("from b", "from a")
            assert first["id"].count(".") == 1 and "id" not in second
        assert (await recv(bob))["payload"] == "from a"
        await assert_silent(on_a)
        await assert_silent(bob)


async def test_resume_on_another_node_by_id_and_by_timestamp(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    a, b = await nodes(serve, redis_server)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        await a.hub.broadcast(
            "alice", {"type": "T", "payload": 0, "timestamp": "2026-01-01T00:00:00Z"}
        )
        seen = await recv(ws)
    for n in (1, 2):
        ts = f"2026-01-01T00:00:0{n}Z"
        await a.hub.broadcast("alice", {"type": "T", "payload": n, "timestamp": ts})
    await a.hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": "transient"})
    async with connect(b.ws_url(token="tok-alice", lastEventId=seen["id"]), V1) as ws:
        one, two, ready = await recv_n(ws, 3)
    assert (one["payload"], two["payload"]) == (1, 2)
    assert ready["payload"] == {"position": two["id"], "recovered": True, "replayed": 2}
    url = b.ws_url(token="tok-alice", lastEventTs="2026-01-01T00:00:01Z")
    async with connect(url) as ws:
        assert (await recv(ws))["payload"] == 2
        await assert_silent(ws)


async def test_concurrent_broadcasts_from_two_nodes_keep_one_order(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    a, b = await nodes(serve, redis_server, buffer_size=1000)
    total = 100
    async with (
        connect(a.ws_url(token="tok-alice")) as on_a,
        connect(b.ws_url(token="tok-alice")) as on_b,
    ):
        async with anyio.create_task_group() as tg:
            for node in (a, b):

                async def publish(node: Server = node) -> None:
                    for n in range(total):
                        await node.hub.broadcast("alice", {"type": "T", "payload": [node.port, n]})

                tg.start_soon(publish)
        got_a = await recv_n(on_a, 2 * total)
        got_b = await recv_n(on_b, 2 * total)
    assert [f["id"] for f in got_a] == [f["id"] for f in got_b]
    keys = [tuple(int(x) for x in f["id"].split(".")[1].split("-")) for f in got_a]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for node in (a, b):  # each node's own events stay in its order
        mine = [f["payload"][1] for f in got_a if f["payload"][0] == node.port]
        assert mine == list(range(total))


async def test_a_client_bouncing_between_nodes_misses_nothing(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    servers = await nodes(serve, redis_server, n=2, buffer_size=1000)
    total, received, last_id = 300, [], None
    trace: list[object] = []

    async def publisher() -> None:
        for n in range(total):
            await servers[n % 2].hub.broadcast("alice", {"type": "T", "payload": n})

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            hop = 0
            while len(received) < total:
                params = {"token": "tok-alice", "lastEventTs": "2000-01-01T00:00:00Z"}
                if last_id is not None:
                    params["lastEventId"] = last_id
                async with connect(servers[hop % 2].ws_url(**params), V1) as ws:
                    for _ in range(23):
                        frame = await recv(ws)
                        if frame["type"] == "asgi_events.ready":
                            assert frame["payload"]["recovered"] is True
                            continue
                        received.append(frame["payload"])
                        trace.append((hop, frame["payload"], frame["id"]))
                        last_id = frame["id"]
                        if len(received) == total:
                            break
                trace.append((hop, "reconnect", last_id))
                hop += 1
    assert received == list(range(total)), trace


async def test_transient_events_never_enter_a_stream(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    (a,) = await nodes(serve, redis_server, n=1)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        await a.hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": 1})
        await a.hub.broadcast("alice", {"type": "JOB_DONE", "payload": 2})
        assert [f["payload"] for f in await recv_n(ws, 2)] == [1, 2]
    backend = a.hub.backend
    assert isinstance(backend, RedisBackend)
    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        assert await client.xlen(backend.keys("alice").stream) == 1


async def test_redis_lost_and_back(
    serve: ServeFn, connect: Connect, own_redis: RedisServer
) -> None:
    a, b = await nodes(serve, own_redis)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        await b.hub.broadcast("alice", {"type": "T", "payload": "before"})
        before = await recv(ws)
        own_redis.stop()
        # The node lost its subscription: its sockets are told to resume elsewhere.
        assert await close_code(ws) == (1012, "Service restart")
    with anyio.fail_after(5), pytest.raises(BackendUnavailableError):
        await a.hub.broadcast("alice", {"type": "T", "payload": "lost"})
    assert a.hub.stats()["backend"]["healthy"] is False
    async with connect(a.ws_url(token="tok-alice")) as refused:
        assert await close_code(refused) == (1012, "Service restart")
    own_redis.start()  # without its data: a new epoch for every user
    with anyio.fail_after(10):  # the nodes reconnect by themselves (no event to wait on)
        while not all(node.hub.stats()["backend"]["healthy"] for node in (a, b)):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    await b.hub.broadcast("alice", {"type": "T", "payload": "after"})
    async with connect(a.ws_url(token="tok-alice", lastEventId=before["id"]), V1) as ws:
        after, ready = await recv_n(ws, 2)
    assert after["payload"] == "after"
    assert ready["payload"]["recovered"] is False and ready["payload"]["reason"] == "epoch"
    assert a.hub.stats()["backend"]["interruptions"] == 1


async def test_nodes_on_asyncio_and_trio_together(
    serve: ServeFn, connect: Connect, redis_server: RedisServer, anyio_backend: str
) -> None:
    """This node runs on the test's backend; another process runs the other one."""
    (here,) = await nodes(serve, redis_server, n=1)
    backend = here.hub.backend
    assert isinstance(backend, RedisBackend)
    other = "trio" if anyio_backend == "asyncio" else "asyncio"
    port = free_port()
    env = {
        **os.environ,
        "ASGI_EVENTS_REDIS_URL": redis_server.url,
        "ASGI_EVENTS_PREFIX": backend.prefix,
    }
    command = [sys.executable, "-m", "hypercorn", "--worker-class", other]
    command += ["--bind", f"127.0.0.1:{port}", "examples.starlette_app:app"]
    process = await anyio.open_process(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    async with process:
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                with anyio.fail_after(20):  # a new process: wait until it answers
                    while True:
                        try:
                            if (await http.get("/stats")).status_code == 200:
                                break
                        except httpx.TransportError:
                            await anyio.sleep(0.1)
                there = f"http://127.0.0.1:{port}/ws?token=secret-alice"
                async with (
                    connect(there) as far,
                    connect(here.ws_url(token="tok-alice")) as near,
                ):
                    await here.hub.broadcast("alice", {"type": "T", "payload": "from here"})
                    job = (await http.post("/jobs/alice")).json()["jobId"]
                    got_far, got_near = await recv_n(far, 2), await recv_n(near, 2)
            assert got_far == got_near
            assert [f["payload"] for f in got_near] == ["from here", {"jobId": job}]
        finally:
            process.terminate()


async def test_foreign_messages_on_the_channel_are_ignored(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    (a,) = await nodes(serve, redis_server, n=1)
    backend = a.hub.backend
    assert isinstance(backend, RedisBackend)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
            for junk in ["", "hello", "42\n1-0\n{}", '"alice"\nnot-an-id\n{}', "[1]\n\n{}"]:
                await client.publish(backend.channel, junk)
        await a.hub.broadcast("alice", {"type": "T", "payload": "still here"})
        assert (await recv(ws))["payload"] == "still here"
        await assert_silent(ws)
    assert a.hub.stats()["backend"]["interruptions"] == 0


async def test_events_trimmed_by_size_are_reported_lost(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    (a,) = await nodes(serve, redis_server, n=1, buffer_size=3)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        for n in range(10):
            await a.hub.broadcast("alice", {"type": "T", "payload": n})
        ids = [f["id"] for f in await recv_n(ws, 10)]
    async with connect(a.ws_url(token="tok-alice", lastEventId=ids[0]), V1) as ws:
        *replayed, ready = await recv_n(ws, 4)
    assert [f["payload"] for f in replayed] == [7, 8, 9]
    assert ready["payload"]["recovered"] is False and ready["payload"]["reason"] == "evicted"
    assert ready["payload"]["oldest"] == ids[6]
    async with connect(a.ws_url(token="tok-alice", lastEventId=ids[6]), V1) as ws:
        *replayed, ready = await recv_n(ws, 4)
    assert ready["payload"]["recovered"] is True


async def test_a_user_idle_past_the_age_bound_resumes_exactly(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    (a,) = await nodes(serve, redis_server, n=1)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        for n in range(2):
            await a.hub.broadcast("alice", {"type": "T", "payload": n})
        first, second = await recv_n(ws, 2)
    backend = a.hub.backend
    assert isinstance(backend, RedisBackend)
    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        await client.delete([backend.keys("alice").stream])  # what the stream's expiry does
    async with connect(a.ws_url(token="tok-alice", lastEventId=second["id"]), V1) as ws:
        ready = await recv(ws)
    assert ready["payload"] == {"position": second["id"], "recovered": True, "replayed": 0}
    async with connect(a.ws_url(token="tok-alice", lastEventId=first["id"]), V1) as ws:
        ready = await recv(ws)
    assert ready["payload"]["recovered"] is False and ready["payload"]["reason"] == "expired"


async def test_a_frozen_redis_is_noticed_and_the_node_recovers(
    serve: ServeFn, connect: Connect, own_redis: RedisServer
) -> None:
    """A silent partition: Redis stops answering (SIGSTOP), with no error and no reset."""
    a, b = await nodes(serve, own_redis, backend=BEATS)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        await b.hub.broadcast("alice", {"type": "T", "payload": "before"})
        before = await recv(ws)
        own_redis.pause()
        try:
            # The heartbeat does not come back: the sockets are told to resume elsewhere.
            with anyio.fail_after(NOTICED):
                assert await close_code(ws) == (1012, "Service restart")
            backend = a.hub.stats()["backend"]
            assert backend["healthy"] is False and backend["interruptions"] == 1
            # (the heartbeat's publish may wait for its reply, or for a new connection, in vain)
            assert backend["last_error"].startswith(("heartbeat timeout", "heartbeat publish"))
            async with connect(a.ws_url(token="tok-alice")) as refused:
                assert await close_code(refused) == (1012, "Service restart")
        finally:
            own_redis.resume()
    await until_healthy(a, b)
    url = a.ws_url(token="tok-alice", lastEventId=before["id"])
    async with connect(a.ws_url(token="tok-alice")) as fresh, connect(url, V1) as resumed:
        await b.hub.broadcast("alice", {"type": "T", "payload": "after"})
        after = await recv(fresh)
        ready, live = await recv_n(resumed, 2)
        assert after["payload"] == "after" and live == after
        assert ready["payload"] == {"position": before["id"], "recovered": True, "replayed": 0}
        await assert_silent(fresh)
    async with connect(a.ws_url(token="tok-alice", lastEventId=before["id"]), V1) as again:
        replayed, ready = await recv_n(again, 2)
    assert replayed == after and ready["payload"]["recovered"] is True
    assert a.hub.stats()["backend"]["interruptions"] == 1


async def test_a_node_cut_off_alone_loses_nothing(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    """A silent partition of one node: the others go on publishing, it misses their events."""
    prefix = f"t-{secrets.token_hex(4)}"
    options: dict[str, Any] = {"prefix": prefix, "timeout": 1.0, "max_backoff": 0.2, **BEATS}
    with partition(redis_server) as relay:
        a = await serve(hub=EventHub(users, backend=RedisBackend(relay.url, **options)))
        b = await serve(hub=EventHub(users, backend=RedisBackend(redis_server.url, **options)))
        async with connect(a.ws_url(token="tok-alice")) as on_a:
            await b.hub.broadcast("alice", {"type": "T", "payload": 0})
            first = await recv(on_a)
            relay.cut()
            for n in (1, 2, 3):
                await b.hub.broadcast("alice", {"type": "T", "payload": n})
            with anyio.fail_after(NOTICED):
                missed, code = await frames_until_closed(on_a)
        assert missed == [] and code == (1012, "Service restart")
        assert a.hub is not None and a.hub.stats()["backend"]["healthy"] is False
        # The client resumes on the other node: everything it missed, exactly.
        async with connect(b.ws_url(token="tok-alice", lastEventId=first["id"]), V1) as on_b:
            *replayed, ready = await recv_n(on_b, 4)
        assert [f["payload"] for f in replayed] == [1, 2, 3]
        assert ready["payload"]["recovered"] is True and ready["payload"]["replayed"] == 3
        relay.heal()
        await until_healthy(a)
        async with connect(a.ws_url(token="tok-alice", lastEventId=first["id"]), V1) as back:
            await b.hub.broadcast("alice", {"type": "T", "payload": 4})
            *again, ready, live = await recv_n(back, 5)
        assert again == replayed and ready["payload"]["recovered"] is True
        assert live["payload"] == 4
        assert a.hub.stats()["backend"]["interruptions"] == 1
        await a.stop()  # before the relay goes


async def test_heartbeats_do_not_disturb_delivery(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    beats = {"heartbeat_interval": 0.01, "heartbeat_timeout": 1.0}
    a, b = await nodes(serve, redis_server, backend=beats)
    async with (
        connect(a.ws_url(token="tok-alice")) as on_a,
        connect(b.ws_url(token="tok-alice"), V1) as on_b,
        connect(a.ws_url(token="tok-bob")) as bob,
    ):
        (ready,) = await recv_n(on_b, 1)
        assert ready["type"] == "asgi_events.ready"
        sent = []
        for n in range(10):
            node = (a, b)[n % 2]
            await node.hub.broadcast("alice", {"type": "T", "payload": n})
            await node.hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": n})
            sent += [n, n]
            await heartbeats_go_round(a, b)
        await b.hub.broadcast_to_all({"type": "ALL", "payload": "end"})
        for ws in (on_a, on_b):
            frames = await recv_n(ws, len(sent) + 1)
            assert [f["type"] for f in frames] == ["T", "JOB_PROGRESS"] * 10 + ["ALL"]
            assert [f["payload"] for f in frames] == [*sent, "end"]
            await assert_silent(ws)
        assert (await recv(bob))["payload"] == "end"
        await assert_silent(bob)
    for node in (a, b):
        assert node.hub is not None
        backend = node.hub.stats()["backend"]
        assert backend["healthy"] is True and backend["interruptions"] == 0
        assert backend["last_error"] is None


async def test_heartbeats_can_be_turned_off(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    (a,) = await nodes(serve, redis_server, n=1, backend={"heartbeat_interval": None})
    async with connect(a.ws_url(token="tok-alice")) as ws:
        await a.hub.broadcast("alice", {"type": "T", "payload": 1})
        assert (await recv(ws))["payload"] == 1
    assert redis_backend(a).heartbeats_sent == 0
    with pytest.raises(ValueError, match="heartbeat_interval"):
        RedisBackend(redis_server.url, heartbeat_interval=0)
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        RedisBackend(redis_server.url, heartbeat_timeout=-1)


async def test_a_frozen_redis_at_startup_does_not_hold_the_hub_up(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, timeout=0.5, max_backoff=0.2, **BEATS)
    own_redis.pause()
    try:
        with anyio.fail_after(0.5 + 2):  # the subscription's attempt fails within ``timeout``
            async with EventHub(users, backend=backend) as hub:
                assert hub.stats()["backend"]["healthy"] is False
                with pytest.raises(BackendUnavailableError):
                    await hub.broadcast("alice", {"type": "T"})
                own_redis.resume()
                with anyio.fail_after(5):
                    while not hub.stats()["backend"]["healthy"]:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                await hub.broadcast("alice", {"type": "T"})
    finally:
        own_redis.resume()


async def test_heartbeats_missed_at_any_moment_leave_nothing_behind(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    """Heartbeats so tight that most are "missed": the subscription is given up over and over,
    at every stage (subscribing, delivering, publishing a heartbeat), and comes back each time;
    nothing escapes (no stray cancellation, no unraisable warning), and it works after."""
    spurious = {"heartbeat_interval": 0.001, "heartbeat_timeout": 0.0005}
    (a,) = await nodes(serve, redis_server, n=1, backend=spurious)
    backend = redis_backend(a)
    # As many rounds as it takes (no wall-clock window: a busy machine only makes it slower).
    with anyio.fail_after(40):
        while backend.stats()["backend"]["interruptions"] <= 3:
            async with connect(a.ws_url(token="tok-alice")) as ws:
                with contextlib.suppress(BackendUnavailableError):
                    await a.hub.broadcast("alice", {"type": "T"})
                frames, code = await frames_until_closed(ws)
            assert code == (1012, "Service restart")
            assert all(frame["type"] == "T" for frame in frames)
    assert backend.stats()["backend"]["interruptions"] > 3
    backend.heartbeat_timeout = 1.0  # back to sane heartbeats, once the current one is over
    await heartbeats_go_round(a)
    await until_healthy(a)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        await a.hub.broadcast("alice", {"type": "T", "payload": "fine"})
        assert (await recv(ws))["payload"] == "fine"
