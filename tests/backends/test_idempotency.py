"""Idempotent publishes (``publish(..., idempotency_key=)``, the contract's *Idempotency*), for
every backend (``subject``: memory and Redis), each on asyncio and trio; and where Redis keeps
the keys."""

from __future__ import annotations

from typing import Any

import anyio
import coredis

from asgi_events import codec, latest
from asgi_events.backends.redis import RedisBackend
from asgi_events.backends.redis.routing import idempotency_key

from ..support.backends import TIMEOUT, Node, Subject, fields_of, point
from ..support.redis_server import RedisServer

SLACK = 0.01  # Redis expires by whole milliseconds; the memory clock adds up float steps


async def publish(
    node: Node, user_id: str, key: str | None, payload: Any = None, *, transient: bool = False
) -> str | None:
    """Publish an event as the hub does, with an idempotency key; what ``publish`` returned."""
    fields = codec.prepare({"type": "T", "payload": payload})
    return await node.backend.publish(user_id, fields, transient, idempotency_key=key)


async def publish_latest(node: Node, user_id: str, key: str, value: Any) -> str | None:
    """Publish a latest value of the slot ``("L", "job")`` with an idempotency key."""
    fields = codec.prepare({"type": "L", "payload": {"key": "job", "value": value}})
    slot = latest.slot("L", fields, "payload.key")
    return await node.backend.publish(user_id, fields, True, slot, idempotency_key=key)


def payloads(delivered: list[Any]) -> list[Any]:
    return [fields_of(published)["payload"] for published in delivered]


async def test_a_retry_with_the_same_key_returns_the_first_id_and_publishes_nothing(
    subject: Subject,
) -> None:
    async with subject.node() as node:
        origin = (await node.replay("alice")).position
        first = await publish(node, "alice", "order-1", "first")
        retries = [await publish(node, "alice", "order-1", f"retry {n}") for n in range(3)]
        delivered = await node.settle()
        buffered = await node.replay("alice", point(origin))
    assert first is not None and retries == [first] * 3
    assert payloads(delivered) == ["first"] and delivered[0].id == first
    assert buffered.events == delivered and buffered.position == first  # one buffered entry


async def test_keys_of_other_users_or_other_keys_are_independent(subject: Subject) -> None:
    async with subject.node() as node:
        ids = [
            await publish(node, "alice", "k1", "alice k1"),
            await publish(node, "alice", "k2", "alice k2"),
            await publish(node, "bob", "k1", "bob k1"),
            await publish(node, "alice", None, "no key"),
            await publish(node, "alice", None, "no key"),  # without a key: every call publishes
        ]
        again = [
            await publish(node, "alice", "k1"),
            await publish(node, "alice", "k2"),
            await publish(node, "bob", "k1"),
        ]
        delivered = await node.settle()
    assert len(set(ids)) == 5 and None not in ids
    assert again == ids[:3]
    assert payloads(delivered) == ["alice k1", "alice k2", "bob k1", "no key", "no key"]
    assert [published.user_id for published in delivered] == ["alice"] * 2 + ["bob"] + ["alice"] * 2


async def test_a_key_publishes_again_once_max_age_has_passed(subject: Subject) -> None:
    """Redis' clock is real, so this polls within a bounded wait; every retry is checked
    against the time it may have taken: the key never goes before ``max_age``."""
    max_age, step = 1.0, 0.05
    async with subject.node(max_age=max_age) as node:

        def now() -> float:
            return node.clock.now if node.clock is not None else anyio.current_time()

        before = now()
        first = await publish(node, "alice", "k", "first")
        with anyio.fail_after(TIMEOUT):
            while True:
                sent = now()
                again = await publish(node, "alice", "k", "again")
                if again != first:
                    break
                await node.elapse(step)
        assert again is not None and now() - before >= max_age - SLACK  # not before max_age
        # The new publish holds the key afresh: a retry of it returns its id, until max_age.
        retry = await publish(node, "alice", "k", "retry")
        assert retry == again or now() - sent >= max_age - SLACK
        delivered = await node.settle()
    assert first is not None and first != again
    expected = ["first", "again"] if retry == again else ["first", "again", "retry"]
    assert payloads(delivered) == expected
    assert [published.id for published in delivered[:2]] == [first, again]


async def test_racing_calls_with_one_key_publish_once_and_return_one_id(
    subject: Subject,
) -> None:
    racers = 20
    async with subject.node() as node:
        origin = (await node.replay("alice")).position
        returned: list[str | None] = []

        async def race(n: int) -> None:
            returned.append(await publish(node, "alice", "once", n))

        async with anyio.create_task_group() as tg:
            for n in range(racers):
                tg.start_soon(race, n)
        delivered = await node.settle()
        buffered = await node.replay("alice", point(origin))
    assert len(returned) == racers and len(set(returned)) == 1 and returned[0] is not None
    assert len(delivered) == 1 and delivered[0].id == returned[0]
    assert buffered.events == delivered


async def test_transient_and_latest_events_with_a_key_publish_once(subject: Subject) -> None:
    async with subject.node() as node:
        transient = [
            await publish(node, "alice", "live", "live 1", transient=True),
            await publish(node, "alice", "live", "live 2", transient=True),
        ]
        kept = [
            await publish_latest(node, "alice", "progress", 10),
            await publish_latest(node, "alice", "progress", 20),  # (would replace 10)
        ]
        delivered = await node.settle()
        values = (await node.backend.replay("alice", None, latest=True)).latest
    assert transient == [None, None] and kept == [None, None]
    assert payloads(delivered) == ["live 1", {"key": "job", "value": 10}]
    assert all(published.transient for published in delivered)
    assert values == delivered[1:]


async def test_a_retry_returns_what_the_first_publish_returned_whatever_its_kind(
    subject: Subject,
) -> None:
    async with subject.node() as node:
        origin = (await node.replay("alice")).position
        buffered = await publish(node, "alice", "a", "buffered")
        as_transient = await publish(node, "alice", "a", "transient", transient=True)
        as_latest = await publish_latest(node, "alice", "a", 1)
        live = await publish(node, "alice", "b", "live", transient=True)
        as_buffered = await publish(node, "alice", "b", "buffered")
        delivered = await node.settle()
        replay = await node.replay("alice", point(origin))
    assert buffered is not None and as_transient == as_latest == buffered
    assert live is None and as_buffered is None
    assert payloads(delivered) == ["buffered", "live"]
    assert replay.events == delivered[:1]


async def test_on_redis_a_key_is_in_the_users_slot_holds_the_id_and_expires(
    redis_server: RedisServer,
) -> None:
    subject, max_age = Subject("redis", redis_server), 60.0
    async with (
        subject.node(max_age=max_age) as node,
        coredis.Redis.from_url(redis_server.url, decode_responses=True) as client,
    ):
        event_id = await publish(node, "alice", "k:{1} é", "buffered")
        await publish(node, "alice", "t", "live", transient=True)
        await publish_latest(node, "alice", "l", 1)
        names = [idempotency_key(subject.prefix, "alice", key) for key in ("k:{1} é", "t", "l")]
        assert names[0] == f"{subject.prefix}:{{alice}}:idem:k:{{1}} é"
        assert isinstance(node.backend, RedisBackend)
        assert node.backend.keys("alice").stream.startswith(f"{subject.prefix}:{{alice}}:")
        assert [await client.get(name) for name in names] == [event_id, "", ""]
        for name in names:
            assert 0 < await client.pttl(name) <= max_age * 1000
