"""Several nodes on one real Redis: fan-out, resume across nodes, order, faults."""

from __future__ import annotations

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

from asgi_events import BackendUnavailableError, EventHub
from asgi_events.backends.redis import RedisBackend

from .conftest import Connect, ServeFn, Server, assert_silent, close_code, recv, recv_n, users
from .redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
V1 = ["asgi-events.v1"]


async def nodes(serve: ServeFn, redis: RedisServer, n: int = 2, **hub: Any) -> list[Server]:
    """``n`` servers, each with its own hub, sharing one Redis under a prefix of the test's."""
    prefix = f"t-{secrets.token_hex(4)}"
    servers = []
    for _ in range(n):
        backend = RedisBackend(redis.url, prefix=prefix, timeout=1.0, max_backoff=0.2)
        servers.append(await serve(hub=EventHub(users, backend=backend, **hub)))
    return servers


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
    backend = a.hub._backend
    assert isinstance(backend, RedisBackend)
    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        assert await client.xlen(backend._keys("alice")[0]) == 1


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
    backend = here.hub._backend
    assert isinstance(backend, RedisBackend)
    other = "trio" if anyio_backend == "asyncio" else "asyncio"
    port = free_port()
    env = {
        **os.environ,
        "ASGI_EVENTS_REDIS_URL": redis_server.url,
        "ASGI_EVENTS_PREFIX": backend._prefix,
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
    backend = a.hub._backend
    assert isinstance(backend, RedisBackend)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
            for junk in ["", "hello", "42\n1-0\n{}", '"alice"\nnot-an-id\n{}', "[1]\n\n{}"]:
                await client.publish(backend._channel, junk)
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
    backend = a.hub._backend
    assert isinstance(backend, RedisBackend)
    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        await client.delete([backend._keys("alice")[0]])  # what the stream's expiry does
    async with connect(a.ws_url(token="tok-alice", lastEventId=second["id"]), V1) as ws:
        ready = await recv(ws)
    assert ready["payload"] == {"position": second["id"], "recovered": True, "replayed": 0}
    async with connect(a.ws_url(token="tok-alice", lastEventId=first["id"]), V1) as ws:
        ready = await recv(ws)
    assert ready["payload"]["recovered"] is False and ready["payload"]["reason"] == "expired"
