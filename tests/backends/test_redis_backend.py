"""What is particular to ``RedisBackend``, driven directly (no hub): several nodes, the message
format on the channels and in the stream, foreign messages, losing Redis, the public names, the
keys of latest values, disconnects and presence."""

from __future__ import annotations

import json

import anyio
import coredis
import pytest

from asgi_events import BackendUnavailableError, codec, latest
from asgi_events.backends.base import Published
from asgi_events.backends.redis import RedisBackend
from asgi_events.backends.redis.routing import (
    Disconnection,
    UserKeys,
    decode,
    disconnection,
    unbuffered,
)

from ..support.backends import TIMEOUT, Node, Subject, epoch_of, point
from ..support.redis_server import RedisServer


def redis(node: Node) -> RedisBackend:
    assert isinstance(node.backend, RedisBackend)
    return node.backend


async def test_two_nodes_deliver_one_order(redis_server: RedisServer) -> None:
    subject, total = Subject("redis", redis_server), 40
    async with subject.node(size=1000) as a, subject.node(size=1000) as b:
        async with anyio.create_task_group() as tg:
            for node in (a, b):

                async def publish(node: Node = node) -> None:
                    for n in range(total):
                        await node.publish("alice", [node is a, n])

                tg.start_soon(publish)
        events = {}
        for node in (a, b):
            delivered = await node.settle()
            events[node is a] = [p for p in delivered if p.user_id is not None]
        replay = await b.replay("alice", point(f"{epoch_of(events[True][0].id or '')}.0-0"))
    assert events[True] == events[False] and len(events[True]) == 2 * total
    keys = [p.key for p in events[True]]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert replay.events == events[True] and replay.recovered is True
    for mine in (True, False):  # each node's own events stay in its order
        payloads = [json.loads(p.text)["payload"] for p in events[True]]
        assert [n for by_a, n in payloads if by_a is mine] == list(range(total))


async def test_the_message_and_the_stream_carry_the_event_without_its_id(
    redis_server: RedisServer,
) -> None:
    """A user's messages go on its channel; ``broadcast_to_all`` on the channel of every node;
    a disconnect on both, one right after the other."""
    subject = Subject("redis", redis_server)
    everyone = codec.encode(codec.prepare({"type": "ALL"}))
    async with subject.node() as node:
        alice, every = redis(node).user_channel("alice"), redis(node).channel
        async with (
            coredis.Redis.from_url(redis_server.url, decode_responses=True) as client,
            client.pubsub(channels=[alice, every], ignore_subscribe_messages=True) as pubsub,
        ):
            buffered = await node.publish("alice", "é\n}")
            transient = await node.publish("alice", 1, transient=True)
            await node.backend.publish_to_all(everyone)
            await node.backend.disconnect("alice", 4003, "Disconnected")
            messages: list[tuple[str, str]] = []
            with anyio.fail_after(TIMEOUT):
                async for message in pubsub:
                    messages.append((str(message["channel"]), str(message["data"])))
                    if len(messages) == 5:
                        break
            delivered = await node.settle()
            entries = await client.xrange(redis(node).keys("alice").stream)
    event_id = delivered[0].id
    assert event_id is not None
    bye = messages[3][1]
    assert bye.startswith('!disconnect\n"alice"\n4003\n') and bye.endswith("\nDisconnected")
    assert messages == [
        (alice, f'"alice"\n{event_id}\n{codec.encode(buffered)}'),
        (alice, f'"alice"\n\n{codec.encode(transient)}'),
        (every, f"null\n\n{everyone}"),
        (alice, bye),
        (every, bye),
    ]
    assert [decode(data) for _, data in messages[:3]] == delivered
    assert node.disconnects == [("alice", 4003, "Disconnected")]  # once, of the two copies
    (entry,) = entries
    assert event_id.endswith(f".{entry.identifier!s}")
    assert dict(entry.field_values) == {"b": codec.encode(buffered), "t": buffered["timestamp"]}


def test_routing_decodes_only_its_own_messages() -> None:
    body = '{"type":"T"}'
    assert decode('"alice"\ne1.5-0\n' + body) == Published(
        "alice", '{"type":"T","id":"e1.5-0"}', "e1.5-0", (5, 0)
    )
    assert decode(unbuffered("alice", body)) == Published("alice", body)
    assert decode(unbuffered(None, body)) == Published(None, body)
    assert decode(unbuffered("a\nb", body)) == Published("a\nb", body)
    for junk in [
        "",
        "hello",
        "42\n1-0\n{}",
        '"alice"\nnot-an-id\n{}',
        "[1]\n\n{}",
        '"alice"\n\n',
        '"alice"\n5-0\n{"type":"T","id":"e1.5-0"}',  # the previous format: no epoch
        'null\ne1.5-0\n{"type":"T"}',  # a broadcast has no id
        '"alice"\ne1.5-0\n[1]',  # not an object
        '"alice"\ne1.99999999999999999999-0\n{}',
        "[" * 100_000 + "\n\n{}",
        "!disconnect",
        '!disconnect\n"alice"\n4003\nn',  # no reason part
        '!disconnect\n"alice"\n4003\nx',  # no nonce (the format before nonces)
        '!disconnect\n"alice"\n999\nn\nx',  # not a code a disconnect may have
        '!disconnect\n"alice"\n04003\nn\nx',
        '!disconnect\n"alice"\n' + "9" * 5000 + "\nn\nx",
        '!disconnect\n"alice"\n4003\nn\n' + "x" * 124,  # too long for a close frame
        "!disconnect\nnull\n4003\nn\nx",
        '!disconnect\n["alice"]\n4003\nn\nx',
        '!other\n"alice"\n4003\nn\nx',
    ]:
        assert decode(junk) is None, junk


def test_routing_carries_disconnects() -> None:
    for user_id, code, reason in [("alice", 4003, "Disconnected"), ("a\nb", 1000, "")]:
        message = disconnection(user_id, code, reason, "n1")
        assert decode(message) == Disconnection(user_id, code, reason, "n1")
    bye = disconnection("alice", 4100, "bye\nnow é", "n2")
    assert bye == '!disconnect\n"alice"\n4100\nn2\nbye\nnow é'
    assert decode('!disconnect\n"alice"\n4100\nn3\nbye\nnow') == Disconnection(
        "alice", 4100, "bye\nnow", "n3"
    )
    for code, reason in [(999, ""), (1001, ""), (5000, ""), (4000, "x" * 124)]:
        with pytest.raises(ValueError):
            disconnection("alice", code, reason, "n4")


async def test_foreign_messages_on_the_channel_are_ignored(redis_server: RedisServer) -> None:
    subject = Subject("redis", redis_server)
    async with (
        subject.node() as node,
        coredis.Redis.from_url(redis_server.url, decode_responses=True) as client,
    ):
        for junk in ["", "hello", "42\n1-0\n{}", '"alice"\n5-0\n{"type":"T","id":"e.5-0"}']:
            for channel in (redis(node).channel, redis(node).user_channel("alice")):
                await client.publish(channel, junk)
        await node.publish("alice", "still here")
        delivered = await node.settle()
    assert [json.loads(p.text)["payload"] for p in delivered] == ["still here"]
    assert node.losses == 0 and redis(node).stats()["backend"]["interruptions"] == 0


async def test_the_public_names(redis_server: RedisServer) -> None:
    subject = Subject("redis", redis_server)
    async with subject.node(heartbeat_interval=0.01) as node:
        backend = redis(node)
        assert backend.prefix == subject.prefix
        assert backend.channel == f"{subject.prefix}:events"
        assert backend.user_channel("alice") == f"{subject.prefix}:{{alice}}:ch"
        assert backend.unsubscribe_delay == 3600.0  # (the harness's: see support.backends)
        tag = f"{subject.prefix}:{{alice}}"
        assert backend.keys("alice") == UserKeys(
            f"{tag}:events", f"{tag}:meta", f"{tag}:latest", f"{tag}:latest-at"
        )
        presence = f"{subject.prefix}:{{presence}}:node:{backend.node}"
        assert backend.presence_key(backend.node) == presence
        await node.publish("alice", 1)
        await node.publish("alice", 2, transient=True)
        await node.settle()
        async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
            assert await client.xlen(backend.keys("alice").stream) == 1  # not the transient
            assert await client.hget(backend.keys("alice").meta, "l") is not None
        with anyio.fail_after(TIMEOUT):  # heartbeats go round (no event to wait on: poll)
            while backend.heartbeats_sent < 3:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert backend.heartbeat_timeout == 2.0  # ``timeout`` by default
        backend.heartbeat_timeout = 0.7
        assert backend.heartbeat_timeout == 0.7
        with pytest.raises(ValueError, match="heartbeat_timeout"):
            backend.heartbeat_timeout = 0
        stats = backend.stats()["backend"]
        assert stats == {
            "kind": "redis",
            "healthy": True,
            "interruptions": 0,
            "last_error": None,
            "events_received": 3,  # alice's two, and settle()'s broadcast to all
            "events_received_idle": 2,  # (no stream of alice is counted here)
            "followed_users": 3,  # alice, bob and carol: see support.backends
            "user_channels": 3,
        }
    async with subject.node(heartbeat_interval=None) as quiet:
        await quiet.publish("alice", 3)
        await quiet.settle()
        assert redis(quiet).heartbeats_sent == 0


async def test_not_running_or_not_answering_is_unavailable(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, timeout=0.5, heartbeat_interval=None)
    with pytest.raises(BackendUnavailableError):
        await backend.publish("alice", codec.prepare({"type": "T"}), False)
    with pytest.raises(BackendUnavailableError):
        await backend.replay("alice", None)
    with pytest.raises(BackendUnavailableError):
        await backend.disconnect("alice", 4003, "Disconnected")
    with pytest.raises(BackendUnavailableError):
        await backend.presence(["alice"])
    with pytest.raises(BackendUnavailableError):
        await backend.follow("alice")
    backend.present("alice", 1)  # (never blocks, never fails: written once running)
    assert backend.stats()["backend"]["healthy"] is False
    subject = Subject("redis", own_redis)
    async with subject.node(timeout=0.5, heartbeat_interval=None) as node:
        own_redis.pause()
        try:
            with anyio.fail_after(0.5 + 2), pytest.raises(BackendUnavailableError):
                await node.publish("alice", "frozen")
            with anyio.fail_after(0.5 + 2), pytest.raises(BackendUnavailableError):
                await node.replay("alice")
            with anyio.fail_after(0.5 + 2), pytest.raises(BackendUnavailableError):
                await node.backend.disconnect("alice", 4003, "Disconnected")
            with anyio.fail_after(0.5 + 2), pytest.raises(BackendUnavailableError):
                await node.backend.presence(["alice"])
            with anyio.fail_after(0.5 + 2), pytest.raises(BackendUnavailableError):
                await node.backend.follow("dave")  # (its SUBSCRIBE is not confirmed)
        finally:
            own_redis.resume()
        # (a timeout, or a new connection that could not be made in time)
        assert redis(node).stats()["backend"]["last_error"] is not None


async def test_redis_lost_and_back_is_a_new_epoch(own_redis: RedisServer) -> None:
    subject = Subject("redis", own_redis)
    async with subject.node(timeout=1.0) as node:
        await node.publish("alice", "before")
        (before,) = await node.settle()
        own_redis.stop()
        while node.losses == 0:
            await node.changed()
        assert node.losses == 1 and node.backend.healthy is False
        with anyio.fail_after(TIMEOUT), pytest.raises(BackendUnavailableError):
            await node.publish("alice", "lost")
        own_redis.start()  # without its data
        with anyio.fail_after(TIMEOUT):  # it subscribes again by itself (no event: poll)
            while not node.backend.healthy:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        await node.publish("alice", "after")
        after = [p for p in await node.settle() if p.user_id is not None][-1]
        replay = await node.replay("alice", point(before.id or ""))
        stats = redis(node).stats()["backend"]
    assert epoch_of(after.id or "") != epoch_of(before.id or "")
    assert replay.events == [after] and (replay.recovered, replay.reason) == (False, "epoch")
    assert stats["interruptions"] == 1 and stats["healthy"] is True
    assert stats["last_error"] is not None


async def test_a_disconnect_with_a_code_no_close_may_have_is_refused(
    redis_server: RedisServer,
) -> None:
    async with Subject("redis", redis_server).node() as node:
        with pytest.raises(ValueError, match="code"):
            await node.backend.disconnect("alice", 1001, "")
        await node.settle()
    assert node.disconnects == []


def test_presence_ttl_must_be_a_positive_number(redis_server: RedisServer) -> None:
    for ttl in [0.0, -1.0, float("inf"), float("nan")]:
        with pytest.raises(ValueError, match="presence_ttl"):
            RedisBackend(redis_server.url, presence_ttl=ttl)


def test_unsubscribe_delay_must_be_0_or_more_seconds(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, unsubscribe_delay=0)
    assert RedisBackend(redis_server.url).unsubscribe_delay == 30.0
    for delay in [-1.0, float("inf"), float("nan")]:
        with pytest.raises(ValueError, match="unsubscribe_delay"):
            RedisBackend(redis_server.url, unsubscribe_delay=delay)
        with pytest.raises(ValueError, match="unsubscribe_delay"):
            backend.unsubscribe_delay = delay
    assert backend.unsubscribe_delay == 0


async def test_latest_values_are_in_the_users_slot_and_expire(redis_server: RedisServer) -> None:
    subject, max_age = Subject("redis", redis_server), 60.0
    async with (
        subject.node(max_age=max_age) as node,
        coredis.Redis.from_url(redis_server.url, decode_responses=True) as client,
    ):
        fields = codec.prepare({"type": "L", "payload": 1})
        slot = latest.slot("L", fields, "payload")
        await node.backend.publish("alice", fields, True, latest=slot)
        keys = redis(node).keys("alice")
        assert await client.hgetall(keys.latest) == {slot: codec.encode(fields)}
        assert list(await client.zrange(keys.latest_at, 0, -1)) == [slot]
        for key in (keys.latest, keys.latest_at):
            assert 0 < await client.pttl(key) <= max_age * 1000
        assert await client.exists([keys.stream]) == 0  # (transient: not buffered)


async def test_presence_keys_expire_and_a_clean_stop_removes_them(
    redis_server: RedisServer,
) -> None:
    subject, ttl = Subject("redis", redis_server), 30.0
    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        async with subject.node(presence_ttl=ttl) as node:
            backend = redis(node)
            backend.present("alice", 2)
            key, nodes = backend.presence_key(backend.node), f"{subject.prefix}:{{presence}}:nodes"
            with anyio.fail_after(TIMEOUT):  # written in the background (no event: poll)
                while await client.hget(key, "alice") != "2":  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert backend.node in await client.zrange(nodes, 0, -1)
            for name in (key, nodes):  # a node that dies leaves nothing behind
                assert 0 < await client.pttl(name) <= ttl * 1000
        assert await client.exists([key]) == 0
        assert backend.node not in await client.zrange(nodes, 0, -1)


async def test_presence_is_written_again_after_redis_lost_it(own_redis: RedisServer) -> None:
    subject = Subject("redis", own_redis)
    async with subject.node(timeout=1.0) as node:
        backend = redis(node)
        key = backend.presence_key(backend.node)
        backend.present("alice", 2)
        async with coredis.Redis.from_url(own_redis.url, decode_responses=True) as client:
            with anyio.fail_after(TIMEOUT):  # (no event: poll)
                while await client.hget(key, "alice") != "2":  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        own_redis.stop()
        while node.losses == 0:
            await node.changed()
        backend.present("bob", 1)  # its write fails: recorded, retried, never raised
        own_redis.start()  # without its data
        with anyio.fail_after(TIMEOUT):
            while not backend.healthy:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        async with coredis.Redis.from_url(own_redis.url, decode_responses=True) as client:
            with anyio.fail_after(TIMEOUT):  # every count, not only the one changed since
                while await client.hgetall(key) != {"alice": "2", "bob": "1"}:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        assert await backend.presence(["alice", "bob"]) == {"alice": 2, "bob": 1}
