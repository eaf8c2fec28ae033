"""One Pub/Sub connection to one Redis server, as the subscription sees it: a ``Link``.

A link subscribes and unsubscribes channels, yields ``(channel, data)`` for each message in the
order the server sent them, sends this node's heartbeats to itself (on a channel it is
subscribed to), and can be given up (``invalidate``). Two kinds:

- ``PubSubLink``: classic Pub/Sub (``SUBSCRIBE``), through coredis' ``PubSub``. On a single
  Redis it carries everything; on a Redis Cluster, the channel of every node (a classic
  ``PUBLISH`` reaches every node of a cluster, so one connection to any node will do).
- ``ShardLink``: sharded Pub/Sub (``SSUBSCRIBE``, Redis 7) on one connection to one cluster
  node, for the channels in the hash slots that node serves. Redis takes the channels of one
  slot per ``SSUBSCRIBE``, and each user's channel has a slot of its own, so a link sends one
  command per channel, all written at once, and then waits for every confirmation.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol

import anyio
import coredis
from coredis.patterns.pubsub import PubSub

Client = coredis.Redis[str] | coredis.RedisCluster[str]
"""A command client: of a single Redis, or of a cluster."""


class Link(Protocol):
    """A live Pub/Sub connection (see the module)."""

    heartbeat_channel: str
    """The channel of this node's heartbeats on this link (subscribed when it opens)."""

    async def subscribe(self, *channels: str) -> None:
        """Return once the server confirmed every channel (raises ``TimeoutError`` if not)."""

    async def unsubscribe(self, *channels: str) -> None:
        """Ask the server to unsubscribe ``channels`` (their messages may still come for a
        moment; a later ``subscribe`` on this link is run after it)."""

    def messages(self) -> AsyncIterator[tuple[str, str]]:
        """``(channel, data)`` of every message, in order, until the link ends (raises)."""

    async def beat(self, token: str) -> None:
        """Publish ``token`` on ``heartbeat_channel``."""

    def invalidate(self, reason: str) -> None:
        """Give the connection up: ``messages`` ends."""


class PubSubLink:
    """Classic Pub/Sub through coredis' ``PubSub``; heartbeats published through ``client``."""

    def __init__(self, pubsub: PubSub[str], client: Any, heartbeat_channel: str) -> None:
        self.heartbeat_channel = heartbeat_channel
        self._pubsub = pubsub
        self._client = client

    async def subscribe(self, *channels: str) -> None:
        await self._pubsub.subscribe(*channels)
        _forget_waiters(self._pubsub)

    async def unsubscribe(self, *channels: str) -> None:
        await self._pubsub.unsubscribe(*channels)
        _forget_waiters(self._pubsub)

    async def messages(self) -> AsyncIterator[tuple[str, str]]:
        async for message in self._pubsub:
            yield str(message["channel"]), str(message["data"])

    async def beat(self, token: str) -> None:
        await self._client.publish(self.heartbeat_channel, token)

    def invalidate(self, reason: str) -> None:
        try:
            self._pubsub.connection.invalidate(reason)
        except coredis.exceptions.ConnectionError:  # (it had no connection left)
            pass


class ShardLink:
    """Sharded Pub/Sub on ``connection`` (to one cluster node, owned by the link); heartbeats
    are published through ``client``, a client of that same node. Use it through
    ``shard_link``, which runs ``pump`` beside it.

    :param timeout: seconds the server may take to confirm a ``subscribe``.
    """

    def __init__(
        self, connection: Any, client: Any, heartbeat_channel: str, timeout: float
    ) -> None:
        self.heartbeat_channel = heartbeat_channel
        self._connection = connection
        self._client = client
        self._timeout = timeout
        self._waiting: dict[str, anyio.Event] = {}  # channels asked for, not confirmed yet
        self._leaving: dict[str, int] = {}  # unsubscriptions asked for, not confirmed yet
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, str]](math.inf)

    async def subscribe(self, *channels: str) -> None:
        waiters = []
        for channel in channels:
            waiter = self._waiting.get(channel)
            if waiter is None:
                waiter = self._waiting[channel] = anyio.Event()
                self._connection.send_command(b"SSUBSCRIBE", channel)
            waiters.append(waiter)
        with anyio.fail_after(self._timeout):
            for waiter in waiters:
                await waiter.wait()

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            self._leaving[channel] = self._leaving.get(channel, 0) + 1
            self._connection.send_command(b"SUNSUBSCRIBE", channel)

    async def messages(self) -> AsyncIterator[tuple[str, str]]:
        async for message in self._receive:
            yield message

    async def pump(self) -> None:
        """Read the connection until it ends (raising): confirmations set their waiters,
        messages go to ``messages``."""
        async with aclosing(self._connection.push_messages) as messages:
            async for message in messages:
                self._take(message)

    def _take(self, message: list[Any]) -> None:
        """One message pushed by the server."""
        kind, channel = str(message[0]), str(message[1])
        if kind == "smessage":
            self._send.send_nowait((channel, str(message[2])))
        elif kind == "ssubscribe":
            waiter = self._waiting.pop(channel, None)
            if waiter is not None:
                waiter.set()
        elif kind == "sunsubscribe":
            left = self._leaving.pop(channel, 0) - 1
            if left < 0:
                # Redis unsubscribes a shard channel by itself when its slot moves to
                # another node (a failover, a resharding): messages would be missed.
                raise coredis.exceptions.ConnectionError(f"Redis unsubscribed {channel}")
            if left:
                self._leaving[channel] = left

    async def beat(self, token: str) -> None:
        await self._client.spublish(self.heartbeat_channel, token)

    def invalidate(self, reason: str) -> None:
        self._connection.invalidate(reason)


@asynccontextmanager
async def shard_link(
    connection: Any, client: Any, channels: list[str], confirm_within: float
) -> AsyncIterator[ShardLink]:
    """A ``ShardLink`` subscribed to ``channels`` (the first one: its heartbeat channel), its
    connection read meanwhile."""
    link = ShardLink(connection, client, channels[0], confirm_within)
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.pump)
        await link.subscribe(*channels)
        yield link
        tg.cancel_scope.cancel()


def _forget_waiters(pubsub: PubSub[str]) -> None:
    """coredis (6.9) keeps, for the pubsub's life, a list of confirmation waiters for every
    channel ever (un)subscribed, emptied but never removed: a few hundred bytes per user a node
    ever followed. Remove the empty ones (few: those emptied since the last call)."""
    for name in ("_subscription_waiters", "_unsubscription_waiters"):
        waiters = getattr(pubsub, name, None)
        if isinstance(waiters, dict):
            for channel in [channel for channel, left in waiters.items() if not left]:
                del waiters[channel]
