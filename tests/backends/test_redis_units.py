"""Pure units of the Redis backend: the hash slot, a disconnect's two copies handled once, and
a sharded link's bookkeeping of (un)subscriptions (on a fake connection)."""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import coredis
import pytest

from asgi_events.backends.base import Published
from asgi_events.backends.redis.inbox import Inbox
from asgi_events.backends.redis.links import shard_link
from asgi_events.backends.redis.routing import (
    disconnection,
    hash_slot,
    shard_events_channel,
    shard_heartbeat_channel,
    user_channel,
)

from ..support.redis_cluster import hash_slot as harness_hash_slot

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


def test_hash_slot_is_redis_cluster_keyslot() -> None:
    # (values from CLUSTER KEYSLOT on Redis 7.0)
    assert [hash_slot(k) for k in ("foo", "{}x", "a{b}c", "p:{u1}:ch")] == [
        12182,
        10595,
        3300,
        4574,
    ]
    for key in ("", "{", "}{", "{a", "a}", "x{y}{z}", "é{ü}", "asgi-events:{alice}:ch"):
        assert hash_slot(key) == harness_hash_slot(key), key


def test_shard_channels_fall_in_the_shard() -> None:
    def serves(slot: int) -> bool:
        return 5461 <= slot <= 10922

    for channel in (
        shard_heartbeat_channel("p", "node1", serves),
        shard_events_channel("p", serves),
    ):
        assert serves(hash_slot(channel)), channel
    assert shard_events_channel("p", serves) == shard_events_channel("p", serves)


class Recorder:
    def __init__(self) -> None:
        self.disconnects: list[tuple[str, int, str]] = []
        self.delivered: list[Published] = []
        self.following: set[str] = set()

    async def deliver(self, event: Published, only: Any = None) -> None:
        self.delivered.append(event)

    async def disconnect(self, user_id: str, code: int, reason: str) -> None:
        self.disconnects.append((user_id, code, reason))

    def inbox(self) -> Inbox:
        inbox = Inbox("p:events", lambda user: 0, self.following.__contains__)
        inbox.deliver, inbox.disconnect = self.deliver, self.disconnect
        return inbox


async def test_a_disconnect_is_handled_once_whichever_copy_comes_first() -> None:
    recorder = Recorder()
    inbox, alice = recorder.inbox(), user_channel("p", "alice")
    first = disconnection("alice", 4003, "Disconnected", "n1")
    # On one Redis: the user's copy, then the global one.
    await inbox.handle(alice, first)
    await inbox.handle("p:events", first)
    # On a cluster, not following: the global copy may come first.
    second = disconnection("alice", 4003, "Disconnected", "n2")
    await inbox.handle("p:events", second)
    await inbox.handle(alice, second)
    assert recorder.disconnects == [("alice", 4003, "Disconnected")] * 2
    # Following: the global copy is left to the user's, which is in order with its events.
    recorder.following.add("alice")
    third = disconnection("alice", 4100, "Banned", "n3")
    await inbox.handle("p:events", third)
    assert len(recorder.disconnects) == 2
    await inbox.handle(alice, third)
    assert recorder.disconnects[-1] == ("alice", 4100, "Banned")
    assert len(recorder.disconnects) == 3


class FakeConnection:
    """What ``ShardLink`` uses of a coredis connection: ``send_command``, ``push_messages``,
    ``invalidate``; the test plays the server."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str]] = []
        self._in, self._out = anyio.create_memory_object_stream[list[Any]](math.inf)

    def send_command(self, command: bytes, *args: Any) -> None:
        self.sent.append((command, str(args[0])))

    def server(self, *message: Any) -> None:
        self._in.send_nowait(list(message))

    @property
    async def push_messages(self) -> AsyncIterator[list[Any]]:
        async for message in self._out:
            yield message

    def invalidate(self, reason: str | None = None) -> None:
        self._in.close()


async def test_a_shard_link_confirms_subscriptions_and_knows_its_own_unsubscriptions() -> None:
    connection = FakeConnection()
    connection.server("ssubscribe", "hb", 1)  # (read once the link asked for it)
    with anyio.fail_after(5), pytest.raises(BaseExceptionGroup) as ended:
        async with shard_link(connection, None, ["hb"], 5.0) as link:
            messages = link.messages()
            # An unsubscription asked for, then a subscription again before its reply came:
            # that late reply is the link's own, not Redis dropping the channel.
            await link.unsubscribe("alice")
            connection.server("sunsubscribe", "alice", 0)
            connection.server("ssubscribe", "alice", 1)
            connection.server("smessage", "alice", "hello")
            await link.subscribe("alice")  # (returns once confirmed)
            assert await anext(messages) == ("alice", "hello")
            assert connection.sent == [
                (b"SSUBSCRIBE", "hb"),
                (b"SUNSUBSCRIBE", "alice"),
                (b"SSUBSCRIBE", "alice"),
            ]
            # Redis dropping a channel by itself (its slot moved): the link ends, raising.
            connection.server("sunsubscribe", "alice", 0)
            await anyio.sleep_forever()
    assert ended.value.subgroup(coredis.exceptions.ConnectionError) is not None
