"""The application API across two nodes on one real Redis: ids, positions and history,
disconnect, presence and latest values reach every node."""

from __future__ import annotations

import anyio

from .support.redis_server import RedisServer
from .support.server import Connect, ServeFn, assert_silent, close_code, recv, recv_n
from .test_redis import nodes

V1 = ["asgi-events.v1"]


async def test_ids_positions_and_history_are_the_same_on_every_node(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    one, two = await nodes(serve, redis_server)
    assert one.hub is not None and two.hub is not None
    async with connect(two.ws_url(token="tok-alice")) as ws:
        event_id = await one.hub.broadcast("alice", {"type": "T", "payload": 1})
        assert (await recv(ws))["id"] == event_id
    assert await two.hub.position("alice") == event_id == await one.hub.position("alice")
    found = await two.hub.history("alice")
    assert [e["id"] for e in found.events] == [event_id] and found.recovered


async def test_disconnect_on_one_node_closes_the_users_sockets_on_every_node(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    one, two = await nodes(serve, redis_server)
    assert one.hub is not None and two.hub is not None
    async with (
        connect(one.ws_url(token="tok-alice"), subprotocols=V1) as here,
        connect(two.ws_url(token="tok-alice"), subprotocols=V1) as there,
        connect(two.ws_url(token="tok-bob"), subprotocols=V1) as bob,
    ):
        for ws in (here, there, bob):
            assert (await recv(ws))["type"] == "asgi_events.ready"
        await one.hub.disconnect("alice", code=4100, reason="Banned")
        assert await close_code(here) == (4100, "Banned")
        assert await close_code(there) == (4100, "Banned")
        await one.hub.broadcast("bob", {"type": "STILL"})
        assert (await recv(bob))["type"] == "STILL"
    assert one.hub.stats()["disconnects"] == 1 and two.hub.stats()["disconnects"] == 1


async def test_presence_counts_the_connections_of_every_node(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    one, two = await nodes(serve, redis_server)
    assert one.hub is not None and two.hub is not None
    hub = one.hub

    async def counts(expected: int) -> None:
        with anyio.fail_after(10):  # the other node writes its counts in the background: poll
            while await hub.presence("alice") != expected:  # noqa: ASYNC110
                await anyio.sleep(0.01)

    async with connect(one.ws_url(token="tok-alice"), subprotocols=V1) as a1:
        await recv(a1)
        assert await hub.presence("alice") == 1  # this node's own count is exact at once
        async with connect(two.ws_url(token="tok-alice"), subprotocols=V1) as a2:
            await recv(a2)
            await counts(2)
            assert await hub.online(["alice", "bob"]) == {"alice"}
            assert await two.hub.online(["alice", "bob"]) == {"alice"}
        await counts(1)
    await counts(0)
    with anyio.fail_after(10):
        while await two.hub.online(["alice"]):  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_latest_values_published_on_one_node_reach_a_client_of_another(
    serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    one, two = await nodes(serve, redis_server, latest_types={"JOB_PROGRESS": "payload.jobId"})
    assert one.hub is not None and two.hub is not None
    for job, percent in (("j1", 10), ("j2", 20), ("j1", 30)):
        progress = {"type": "JOB_PROGRESS", "payload": {"jobId": job, "percent": percent}}
        assert await one.hub.broadcast("alice", progress) is None
    async with connect(two.ws_url(token="tok-alice"), subprotocols=V1) as ws:
        j2, j1, ready = await recv_n(ws, 3)
        assert (j2["payload"], j2["latest"]) == ({"jobId": "j2", "percent": 20}, True)
        assert (j1["payload"], j1["latest"]) == ({"jobId": "j1", "percent": 30}, True)
        assert ready["type"] == "asgi_events.ready"
        await assert_silent(ws)
    assert (await two.hub.history("alice")).events == ()
