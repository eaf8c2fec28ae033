"""Following users (the contract's *Following*), and how ``RedisBackend`` routes a user's events
to the nodes that follow it only: a channel per user, subscribed from ``follow`` until the
node's count of the user has been 0 for ``unsubscribe_delay``, SUBSCRIBEs batched, and every
followed user subscribed again after a lost subscription. Each test runs on asyncio and trio;
Redis ones on a real redis-server (one of the test's own where Redis' command counts are read).
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import coredis

from asgi_events import codec, latest
from asgi_events.backends.redis import RedisBackend

from ..support.backends import TIMEOUT, Node, Subject, epoch_of, fields_of, make_id, point
from ..support.redis_server import RedisServer

QUIET: dict[str, Any] = {"heartbeat_interval": None}  # (no SUBSCRIBE but the node's own)


def redis(node: Node) -> RedisBackend:
    assert isinstance(node.backend, RedisBackend)
    return node.backend


def payloads(node: Node, user_id: str) -> list[Any]:
    return [fields_of(p)["payload"] for p in node.delivered if p.user_id == user_id]


async def command_calls(url: str, command: str) -> int:
    """How many times Redis ran ``command`` since it started (``INFO commandstats``)."""
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        stats: Any = await client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0


async def subscribers(url: str, channels: list[str]) -> list[int]:
    """How many connections subscribe to each of ``channels`` (``PUBSUB NUMSUB``)."""
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        counts = await client.pubsub_numsub(*channels)
    return [int(counts[channel]) for channel in channels]


async def until_subscribers(url: str, channel: str, expected: int) -> None:
    """Wait (bounded) until Redis counts ``expected`` subscribers of ``channel``: an UNSUBSCRIBE
    is sent in the background, and nothing tells a test when Redis has run it."""
    with anyio.fail_after(TIMEOUT):
        while (await subscribers(url, [channel]))[0] != expected:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_a_followed_users_events_reach_the_node(subject: Subject) -> None:
    async with subject.node(follow=()) as node:
        node.backend.present("alice", 1)
        await node.backend.follow("alice")
        await node.backend.follow("alice")  # (again: at once)
        await node.publish("alice", 1)
        await node.publish("alice", 2, transient=True)
        delivered = await node.settle()
    assert [fields_of(p)["payload"] for p in delivered] == [1, 2]


async def test_a_node_receives_none_of_the_events_of_a_user_it_does_not_follow(
    redis_server: RedisServer,
) -> None:
    subject = Subject("redis", redis_server)
    async with subject.node(follow=()) as here, subject.node(follow=("alice",)) as there:
        # Every kind of message of alice, from both nodes: buffered, transient, latest,
        # idempotent transient.
        for node in (here, there):
            await node.publish("alice", "buffered")
            await node.publish("alice", "transient", transient=True)
            fields = codec.prepare({"type": "L", "payload": "latest"})
            await node.backend.publish("alice", fields, True, latest.slot("L", fields, "payload"))
            fields = codec.prepare({"type": "T", "payload": "once"})
            await node.backend.publish("alice", fields, True, idempotency_key=f"k{id(node)}")
        await here.backend.disconnect("alice", 4003, "Disconnected")
        delivered = [p for p in await there.settle() if p.user_id == "alice"]
        # (after there's broadcast to all: here has received it too)
        assert [p for p in await here.settle() if p.user_id is not None] == []
        # The buffer and the replay do not depend on following.
        origin = make_id(epoch_of(delivered[0].id or ""), "0-0")
        replay = await here.replay("alice", point(origin))
        values = (await here.backend.replay("alice", None, latest=True)).latest
        stats = redis(here).stats()["backend"]
    assert payloads(there, "alice") == ["buffered", "transient", "latest", "once"] * 2
    assert [fields_of(p)["payload"] for p in replay.events] == ["buffered"] * 2
    assert replay.events == [p for p in delivered if not p.transient]
    assert [fields_of(p)["payload"] for p in values] == ["latest"]
    # A disconnect reaches every node, once (here: a stream of alice may be being admitted).
    assert here.disconnects == there.disconnects == [("alice", 4003, "Disconnected")]
    assert there.disconnected_after == [8]
    # The two settle() broadcasts to all are all it received.
    assert stats["events_received"] == 2 and stats["events_received_idle"] == 0
    assert stats["user_channels"] == 0


async def test_following_starts_with_the_events_published_after_it(
    redis_server: RedisServer,
) -> None:
    subject = Subject("redis", redis_server)
    async with subject.node(follow=()) as node:
        await node.publish("alice", "before")
        node.backend.present("alice", 1)
        await node.backend.follow("alice")
        await node.publish("alice", "after")
        await node.settle()
        stats = redis(node).stats()["backend"]
    assert payloads(node, "alice") == ["after"]
    assert stats["user_channels"] == 1
    assert stats["events_received"] == 2 and stats["events_received_idle"] == 0


async def test_a_user_is_let_go_once_its_count_stayed_0_for_the_delay(
    redis_server: RedisServer,
) -> None:
    subject = Subject("redis", redis_server)
    async with subject.node(follow=(), unsubscribe_delay=3600.0) as node:
        backend, url = redis(node), redis_server.url
        channel = backend.user_channel("alice")
        backend.present("alice", 1)
        await backend.follow("alice")
        backend.present("alice", 0)  # the last stream left: still followed for the delay
        await node.publish("alice", "within the delay")
        await node.settle()
        assert payloads(node, "alice") == ["within the delay"]
        assert backend.stats()["backend"]["events_received_idle"] == 1
        assert await subscribers(url, [channel]) == [1]
        backend.unsubscribe_delay = 0.05  # (applies at once: it has been idle longer)
        await until_subscribers(url, channel, 0)
        assert backend.stats()["backend"]["user_channels"] == 0
        await node.publish("alice", "after the delay")
        await node.settle()
        assert payloads(node, "alice") == ["within the delay"]
        # A new stream of alice: followed again.
        backend.present("alice", 1)
        await backend.follow("alice")
        await node.publish("alice", "again")
        await node.settle()
    assert payloads(node, "alice") == ["within the delay", "again"]


async def test_a_user_back_within_the_delay_stays_subscribed(own_redis: RedisServer) -> None:
    """alice leaves and comes back at once; bob leaves after her and stays away. Once bob is
    unsubscribed, alice's delay (from before bob's) is over too: she must still be subscribed,
    with no SUBSCRIBE or UNSUBSCRIBE of her meanwhile."""
    subject, url = Subject("redis", own_redis), own_redis.url
    async with subject.node(follow=(), unsubscribe_delay=0.2, **QUIET) as node:
        backend = redis(node)
        for user in ("alice", "bob"):
            backend.present(user, 1)
            await backend.follow(user)
        subscribes = await command_calls(url, "subscribe")
        backend.present("alice", 0)
        backend.present("alice", 1)  # a new stream of alice within the delay
        await backend.follow("alice")  # (at once: she is subscribed)
        backend.present("bob", 0)
        await until_subscribers(url, backend.user_channel("bob"), 0)
        assert await subscribers(url, [backend.user_channel("alice")]) == [1]
        assert await command_calls(url, "subscribe") == subscribes
        assert await command_calls(url, "unsubscribe") == 1  # bob's
        await node.publish("alice", "still here")
        await node.settle()
        assert backend.stats()["backend"]["user_channels"] == 1
    assert payloads(node, "alice") == ["still here"]


async def test_a_user_followed_while_its_unsubscribe_is_in_flight_ends_subscribed(
    own_redis: RedisServer,
) -> None:
    """Redis is frozen (SIGSTOP) while the node sends alice's UNSUBSCRIBE, and she is followed
    again before Redis has run it (as soon as the node lets her go: mostly while it still
    waits for that UNSUBSCRIBE's confirmation): the follow returns only once the SUBSCRIBE that
    follows is confirmed, and she is subscribed in the end."""
    subject, url = Subject("redis", own_redis), own_redis.url
    async with subject.node(follow=(), unsubscribe_delay=0.05, timeout=5.0, **QUIET) as node:
        backend = redis(node)
        channel = backend.user_channel("alice")
        backend.present("alice", 1)
        await backend.follow("alice")
        followed = anyio.Event()
        own_redis.pause()
        try:
            backend.present("alice", 0)
            with anyio.fail_after(TIMEOUT):  # she is let go, her UNSUBSCRIBE sent (poll)
                while backend.stats()["backend"]["followed_users"]:  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            backend.present("alice", 1)

            async def follow() -> None:
                await backend.follow("alice")
                followed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await anyio.lowlevel.checkpoint()
                assert not followed.is_set()  # Redis has confirmed nothing
                own_redis.resume()
        finally:
            own_redis.resume()
        assert followed.is_set()
        assert await subscribers(url, [channel]) == [1]
        assert await command_calls(url, "unsubscribe") == 1
        await node.publish("alice", "subscribed")
        await node.settle()
        assert backend.stats()["backend"]["user_channels"] == 1
    assert payloads(node, "alice") == ["subscribed"]


async def test_a_follow_storm_is_one_subscribe_and_leaving_one_unsubscribe(
    own_redis: RedisServer,
) -> None:
    subject, url, total = Subject("redis", own_redis), own_redis.url, 500
    users = [f"user-{n}" for n in range(total)]
    async with subject.node(follow=(), unsubscribe_delay=3600.0, **QUIET) as node:
        backend = redis(node)
        channels = [backend.user_channel(user) for user in users]
        subscribes = await command_calls(url, "subscribe")  # (the node's own, at its start)
        async with anyio.create_task_group() as tg:
            for user in users:  # as many streams joining at once

                async def join(user: str = user) -> None:
                    backend.present(user, 1)
                    await backend.follow(user)

                tg.start_soon(join)
        # Every follow has returned: every channel is confirmed, in one command.
        assert await command_calls(url, "subscribe") == subscribes + 1
        assert await subscribers(url, channels) == [1] * total
        assert backend.stats()["backend"]["user_channels"] == total
        for user in users:  # every stream leaves
            backend.present(user, 0)
        backend.unsubscribe_delay = 0  # (and each has stayed away for that long)
        with anyio.fail_after(TIMEOUT):  # (unsubscribed in the background: poll)
            while await subscribers(url, channels) != [0] * total:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert await command_calls(url, "unsubscribe") == 1
        assert backend.stats()["backend"]["user_channels"] == 0


async def test_a_new_subscription_subscribes_every_followed_user_at_once(
    own_redis: RedisServer,
) -> None:
    subject, url, total = Subject("redis", own_redis), own_redis.url, 200
    users = [f"user-{n}" for n in range(total)]
    async with subject.node(follow=(), timeout=1.0, **QUIET) as node:
        backend = redis(node)
        for user in users:
            backend.present(user, 1)
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for user in users:
                    tg.start_soon(backend.follow, user)
        own_redis.stop()
        while node.losses == 0:
            await node.changed()
        assert backend.stats()["backend"]["user_channels"] == 0
        own_redis.start()  # (its command counts start again at 0)
        with anyio.fail_after(TIMEOUT):  # it subscribes again by itself (no event: poll)
            while not backend.healthy:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        # Up only once every followed user is subscribed: the node's own channels, then the
        # users' in one SUBSCRIBE.
        assert backend.stats()["backend"]["user_channels"] == total
        assert await command_calls(url, "subscribe") == 2
        channels = [backend.user_channel(user) for user in users]
        assert await subscribers(url, channels) == [1] * total
        await node.publish(users[-1], "after")
        await node.settle()
    assert payloads(node, users[-1]) == ["after"]
