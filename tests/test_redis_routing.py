"""Routing by user across real nodes (hypercorn, one real Redis, and a real Redis Cluster): a
node receives the events of the users it holds connections of, and no others, yet every
disconnect; clients that hop between nodes at random, resuming by id while publishers run on
every node, get every event exactly once, in order."""

from __future__ import annotations

import random
import secrets
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import pytest

from asgi_events import EventHub
from asgi_events.backends.redis import RedisBackend

from .support.redis_cluster import RedisCluster
from .support.redis_server import RedisServer
from .support.server import Connect, ServeFn, Server, close_code, recv, recv_n, users
from .test_redis import nodes, redis_backend

V1 = ["asgi-events.v1"]
Deployment = RedisServer | RedisCluster


@pytest.fixture(params=["single", "cluster"])
def deployment(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_cluster: RedisCluster
) -> Deployment:
    """What the nodes share: the session's redis-server, or its Redis Cluster."""
    return redis_server if request.param == "single" else redis_cluster


def backend_stats(server: Server) -> dict[str, Any]:
    assert server.hub is not None
    stats: dict[str, Any] = server.hub.stats()["backend"]
    return stats


async def test_a_node_receives_only_the_events_of_its_own_users(
    serve: ServeFn, connect: Connect, deployment: Deployment
) -> None:
    """alice is connected to A only, bob to B only; both nodes publish for both."""
    a, b = await nodes(serve, deployment, buffer_size=1000)
    per_node = 150
    async with (
        connect(a.ws_url(token="tok-alice")) as alice_1,
        connect(a.ws_url(token="tok-alice")) as alice_2,
        connect(b.ws_url(token="tok-bob")) as bob,
    ):
        async with anyio.create_task_group() as tg:
            for node in (a, b):

                async def publish(node: Server = node) -> None:
                    for n in range(per_node):
                        await node.hub.broadcast("alice", {"type": "T", "payload": n})
                        if n % 5 == 0:
                            await node.hub.broadcast("bob", {"type": "T", "payload": n})

                tg.start_soon(publish)
        await b.hub.broadcast_to_all({"type": "END"})  # after every event, on every node
        for ws in (alice_1, alice_2):
            frames = await recv_n(ws, 2 * per_node + 1)
            assert [f["type"] for f in frames] == ["T"] * 2 * per_node + ["END"]
        frames = await recv_n(bob, 2 * per_node // 5 + 1)
        assert [f["type"] for f in frames] == ["T"] * (2 * per_node // 5) + ["END"]
        # Everything either node received has arrived by its END; on a cluster, END has a
        # copy per shard, and those of the shards of neither user may still be on their way.
        copies = 3 if isinstance(deployment, RedisCluster) else 1
        expected = {a.port: 2 * per_node + copies, b.port: 2 * per_node // 5 + copies}
        with anyio.fail_after(5):  # (no event to wait on: poll)
            while any(backend_stats(n)["events_received"] < expected[n.port] for n in (a, b)):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        on_a, on_b = backend_stats(a), backend_stats(b)
    assert on_a["events_received"] == expected[a.port]  # alice's, and END
    assert on_b["events_received"] == expected[b.port]  # bob's, and END
    assert on_a["events_received_idle"] == on_b["events_received_idle"] == 0
    assert on_a["user_channels"] == on_b["user_channels"] == 1


async def test_a_disconnect_reaches_a_connection_being_admitted_on_a_node_not_following(
    serve: ServeFn, connect: Connect, deployment: Deployment
) -> None:
    """B checks a token of alice (slowly) while A disconnects alice: B follows no alice, yet
    it learns of the disconnect (its copy on the channel of every node), and the connection is
    closed as it joins."""
    checking, release = anyio.Event(), anyio.Event()

    async def slow(token: str) -> str | None:
        if token == "tok-slow":
            checking.set()
            await release.wait()
            return "alice"
        return users(token)

    options: dict[str, Any] = {"prefix": f"t-{secrets.token_hex(4)}", "timeout": 1.0}
    options |= {"max_backoff": 0.2, "cluster": isinstance(deployment, RedisCluster)}
    a = await serve(hub=EventHub(users, backend=RedisBackend(deployment.url, **options)))
    b = await serve(hub=EventHub(slow, backend=RedisBackend(deployment.url, **options)))
    assert a.hub is not None
    codes: list[tuple[int, str]] = []

    async def open_slow() -> None:
        async with connect(b.ws_url(token="tok-slow")) as ws:
            codes.append(await close_code(ws))

    async with connect(b.ws_url(token="tok-bob")) as bob:
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_slow)
            with anyio.fail_after(10):
                await checking.wait()
            await a.hub.disconnect("alice", code=4100, reason="Banned")
            await a.hub.broadcast_to_all({"type": "AFTER"})
            assert (await recv(bob))["type"] == "AFTER"  # B has handled the disconnect by now
            assert backend_stats(b)["user_channels"] == 1  # (bob's: B follows no alice)
            release.set()
    assert codes == [(4100, "Banned")]


@pytest.mark.parametrize("count", [2, 3])
async def test_clients_hopping_between_nodes_get_every_event_once_in_order(
    serve: ServeFn, connect: Connect, deployment: Deployment, count: int
) -> None:
    """Two clients each of alice and bob connect to a random node, resume from their last id,
    read a random number of frames (none, sometimes), and go elsewhere, again and again, while
    a publisher on each node publishes for both users. Nodes let a user go as soon as its last
    connection there has left, so they unsubscribe and subscribe again all the time, and a
    client often connects to a node while that node's UNSUBSCRIBE of its user is in flight."""
    backend = {"unsubscribe_delay": 0.0}
    servers = await nodes(serve, deployment, n=count, backend=backend, buffer_size=1000)
    seed = random.randrange(2**32)
    users, per_publisher = ("alice", "bob"), 100
    total = per_publisher * count  # each user's events: one share from each publisher
    published: dict[str, list[str]] = {user: [] for user in users}
    received: dict[tuple[str, int], list[str]] = {}
    hops = 0

    async def publisher(node: Server, rng: random.Random) -> None:
        assert node.hub is not None
        for n in range(per_publisher):
            for user in users:
                event_id = await node.hub.broadcast(user, {"type": "T", "payload": n})
                assert event_id is not None
                published[user].append(event_id)
            if rng.random() < 0.3:
                await anyio.lowlevel.checkpoint()  # (let clients in between)

    async def client(user: str, number: int, rng: random.Random) -> None:
        nonlocal hops
        got = received[user, number] = []
        while len(got) < total:
            params = {"token": f"tok-{user}"}
            if got:
                params["lastEventId"] = got[-1]
            else:  # from the start: everything buffered
                params["lastEventTs"] = "2000-01-01T00:00:00Z"
            async with connect(rng.choice(servers).ws_url(**params), V1) as ws:
                hops += 1
                for _ in range(rng.choice([0, 1, 3, 10, 20])):
                    frame = await recv(ws)
                    if frame["type"] == "asgi_events.ready":
                        assert frame["payload"]["recovered"] is True
                        continue
                    got.append(frame["id"])
                    if len(got) == total:
                        break

    unsubscribe = "sunsubscribe" if isinstance(deployment, RedisCluster) else "unsubscribe"
    unsubscribes = await command_calls(deployment, unsubscribe)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            rng = random.Random(seed)
            for node in servers:
                tg.start_soon(publisher, node, random.Random(rng.random()))
            for user in users:
                for number in (1, 2):
                    tg.start_soon(client, user, number, random.Random(rng.random()))
    for user in users:
        ordered = sorted(published[user], key=id_order)
        assert len(set(ordered)) == total
        for number in (1, 2):
            assert received[user, number] == ordered, f"seed {seed}, {user} #{number}"
    assert hops > 4 * count  # (every client hopped)
    assert await command_calls(deployment, unsubscribe) > unsubscribes  # (and nodes let go)
    for node in servers:
        assert redis_backend(node).stats()["backend"]["interruptions"] == 0


async def command_calls(redis: Deployment, command: str) -> int:
    """How many times Redis ran ``command`` since it started (``INFO commandstats``; on a
    cluster, summed over its nodes)."""
    urls = [redis.url]
    if isinstance(redis, RedisCluster):
        urls = [f"redis://127.0.0.1:{port}" for port in redis.live_ports()]
    calls = 0
    for url in urls:
        async with coredis.Redis.from_url(url, decode_responses=True) as client:
            stats: Any = await client.info("commandstats")
        entry = stats.get(f"cmdstat_{command}")
        calls += int(entry["calls"]) if entry else 0
    return calls


def id_order(event_id: str) -> tuple[int, int]:
    ms, _, n = event_id.partition(".")[2].partition("-")
    return int(ms), int(n)
