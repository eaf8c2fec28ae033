"""A node's subscriptions on a Redis Cluster: one per shard, and one for every node's channel.

A user's keys and channel share the user's hash slot (``routing``), so the shard that holds the
user's stream also carries its messages: the scripts publish them with ``SPUBLISH`` (sharded
Pub/Sub, Redis 7), which Redis sends to the subscribers of that shard only. So for each shard
(the slots one primary served when the node started) the node has a subscription of its own,
to the primary serving those slots now: a connection with ``SSUBSCRIBE`` for the shard's users
this node follows (its own ``Following``) and heartbeats of its own, on a channel in one of
the shard's slots. Its loss (an error, or a heartbeat that does not come back: a primary
killed, a partition) closes with 1012 the streams of that shard's users only, and the
subscription is made again, with backoff, to whichever node serves the slots by then (the
replica, once promoted): the users of the other shards never notice.

``broadcast_to_all`` is published on a channel of every shard (``routing``), and each shard's
subscription also takes that shard's copy, which the node delivers to the streams of that
shard's users only: each copy comes in order with those users' events. ``<prefix>:events``
(the copy of every disconnect, for nodes that do not follow the user) is a classic channel,
which a cluster forwards to every node: one connection to any node receives it, preferably to
a replica (so that a primary's failure does not touch it). Its loss closes no stream: nothing
a resuming stream would get back was on it. While it is down, new streams are refused with
1012, as on a single Redis.

Resharding (slots moved between primaries while nodes run) is not followed: Redis then
unsubscribes the moved slots' channels, the shard's subscription is lost, and its users' new
streams are refused until the node restarts.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
from anyio.abc import TaskStatus
from coredis.retry import NoRetryPolicy

from . import routing
from .following import Following
from .links import Client, Link, PubSubLink, shard_link
from .subscription import Health, Subscription, Wiring

logger = logging.getLogger("asgi_events")

Affected = Callable[[str], bool]
"""Which users' streams a lost subscription concerns."""


@dataclass
class Shard:
    """The slots one primary served when this node started, and this node's subscription
    there."""

    ranges: list[tuple[int, int]]
    following: Following
    subscription: Subscription
    heartbeat_channel: str
    events_channel: str
    """Where ``broadcast_to_all`` reaches this shard's users (``routing``)."""
    address: str = ""
    """The node the subscription is (or was last) made to, ``host:port``."""

    @property
    def health(self) -> Health:
        return self.subscription.health

    def stats(self) -> dict[str, Any]:
        health = self.health
        return {
            "slots": " ".join(f"{start}-{end}" for start, end in self.ranges),
            "node": self.address,
            "healthy": health.healthy,
            "interruptions": health.interruptions,
            "last_error": health.last_error,
            "followed_users": self.following.users,
            "user_channels": self.following.channels,
        }


class ClusterLinks:
    """This node's subscriptions on a Redis Cluster (see the module).

    ``wiring.url`` is the URL of any node of the cluster (its credentials and options are used
    for every node).

    :param lost: called with the users whose streams must close (1012) when a shard's
        subscription was lost.
    """

    def __init__(self, wiring: Wiring, lost: Callable[[Affected], Awaitable[None]]) -> None:
        self.health = wiring.health
        """The subscription to every node's channel."""
        self.shards: list[Shard] = []
        self._wiring, self._lost = wiring, lost
        self.subscription = wiring.subscription(
            self.health, None, wiring.on_message, self._everyone_lost, wiring.subscribed
        )
        self._slots = array("H", [0]) * routing.SLOTS  # slot -> index of its shard in ``shards``
        self._attempts = 0  # connections tried for every node's channel (to rotate nodes)
        self.address = ""
        """The node the subscription to every node's channel is (or was last) made to."""

    def shard_of(self, user_id: str) -> Shard | None:
        """The shard of the user's slot; None before the cluster's layout is known."""
        if not self.shards:
            return None
        slot = routing.hash_slot(routing.user_channel(self._wiring.prefix, user_id))
        return self.shards[self._slots[slot]]

    def route(self, user_id: str) -> tuple[Following, Health] | None:
        """Where the user's channel is subscribed: its shard's ``Following`` and link health
        (None before the cluster's layout is known)."""
        shard = self.shard_of(user_id)
        return None if shard is None else (shard.following, shard.health)

    def followings(self) -> list[Following]:
        return [shard.following for shard in self.shards]

    def subscriptions(self) -> list[Subscription]:
        return [self.subscription, *(shard.subscription for shard in self.shards)]

    async def run(
        self,
        client: Client,
        subscriber: coredis.Redis[str] | None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Learn the shards (trying until the cluster answers), then keep a subscription to
        each and to every node's channel until cancelled; started once all were tried once."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.subscription.run, partial(self._open_every_node, client))
            delay = 0.1
            while not self.shards:
                try:
                    self._learn(await _layout(client, self._wiring.timeout))
                except (coredis.exceptions.RedisError, OSError, TimeoutError) as exc:
                    self.health.failed(exc)
                    task_status.started()
                    task_status = anyio.TASK_STATUS_IGNORED
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self._wiring.max_backoff)
            for shard in self.shards:
                await tg.start(shard.subscription.run, partial(self._open_shard, client, shard))
            task_status.started()

    def _learn(self, layout: list[Placement]) -> None:
        """Make one shard per primary of ``layout``."""
        for index, ranges in enumerate(placement.ranges for placement in layout):
            for start, end in ranges:
                self._slots[start : end + 1] = array("H", [index]) * (end - start + 1)
            wiring = self._wiring
            following = Following(wiring.prefix, wiring.delay, wiring.count)
            serves = partial(_within, ranges=ranges)
            shard = Shard(
                ranges,
                following,
                wiring.subscription(
                    Health(),
                    following,
                    partial(self._on_shard_message, index),
                    partial(self._shard_lost, index),
                ),
                routing.shard_heartbeat_channel(wiring.prefix, wiring.node, serves),
                routing.shard_events_channel(wiring.prefix, serves),
            )
            self.shards.append(shard)

    def events_channels(self) -> list[str]:
        """The channels of ``broadcast_to_all``, one per shard (none before the layout is
        known)."""
        return [shard.events_channel for shard in self.shards]

    async def _on_shard_message(self, index: int, channel: str, data: str) -> None:
        shard = self.shards[index]
        if channel == shard.events_channel:  # for the streams of this shard's users
            await self._wiring.on_message(channel, data, shard.following.follows)
        else:
            await self._wiring.on_message(channel, data)

    async def _shard_lost(self, index: int) -> None:
        shard = self.shards[index]
        logger.warning(
            "lost the Redis subscription to the shard of slots %s (%s); closing its users' "
            "sockets on this node (1012)",
            shard.stats()["slots"],
            shard.health.last_error,
        )
        await self._lost(lambda user_id: self.shard_of(user_id) is shard)

    async def _everyone_lost(self) -> None:
        logger.warning(
            "lost the Redis subscription to every node's channel (%s): broadcasts to all may "
            "be missed until it is back; new sockets are refused meanwhile",
            self.health.last_error,
        )

    @asynccontextmanager
    async def _open_shard(self, client: Any, shard: Shard) -> AsyncIterator[Link]:
        """A link to the primary serving the shard's slots now."""
        layout = await _layout(client, self._wiring.timeout)
        first = shard.ranges[0][0]
        placement = next(p for p in layout if _within(first, p.ranges))
        if placement.primary is None:
            raise coredis.exceptions.ConnectionError(f"no primary serves slot {first} now")
        if shard.address and placement.primary != shard.address:
            # A failover: the command client would learn the new primary only after a few
            # more failed commands; have it learn now, so the shard's users' commands go
            # there once this subscription is back.
            with anyio.fail_after(self._wiring.timeout):
                await client.connection_pool.cluster_layout.initialize()
        shard.address = placement.primary
        async with (
            self._client(shard.address) as node_client,
            node_client.connection_pool.acquire() as connection,
        ):
            try:
                async with shard_link(
                    connection,
                    node_client,
                    [shard.heartbeat_channel, shard.events_channel],
                    self._wiring.timeout,
                ) as link:
                    yield link
            finally:
                connection.invalidate("the shard's subscription ended")  # never reused

    @asynccontextmanager
    async def _open_every_node(self, client: Any) -> AsyncIterator[Link]:
        """A link for every node's channel, to a node of the cluster (replicas first, a
        different one at each attempt)."""
        layout = await _layout(client, self._wiring.timeout)
        replicas = [address for placement in layout for address in placement.replicas]
        primaries = [placement.primary for placement in layout if placement.primary]
        candidates = replicas + primaries
        address = self.address = candidates[self._attempts % len(candidates)]
        self._attempts += 1
        heartbeat = routing.heartbeat_channel(self._wiring.prefix, self._wiring.node)
        async with (
            self._client(address) as node_client,
            node_client.pubsub(
                channels=[self._wiring.channel, heartbeat],
                ignore_subscribe_messages=True,
                retry_policy=None,
                subscription_timeout=self._wiring.timeout,
            ) as pubsub,
        ):
            yield PubSubLink(pubsub, node_client, heartbeat)

    def _client(self, address: str) -> coredis.Redis[str]:
        """A client of one node (its own pool), bounded in connecting and reading."""
        return coredis.Redis[str].from_url(
            _node_url(self._wiring.url, address),
            decode_responses=True,
            connect_timeout=self._wiring.timeout,
            stream_timeout=self._wiring.timeout,
            retry_policy=NoRetryPolicy(),
        )


class Placement(NamedTuple):
    """Where a shard's slots are served now."""

    ranges: list[tuple[int, int]]
    primary: str | None
    """``host:port`` of its primary (None while none is up: a failover is under way)."""
    replicas: list[str]
    """``host:port`` of its replicas not known to have failed."""


async def _layout(client: Any, limit: float) -> list[Placement]:
    """The cluster's shards as ``CLUSTER SHARDS`` shows them now."""
    with anyio.fail_after(limit):
        shards: list[dict[str, Any]] = await client.cluster_shards()
    layout = []
    for shard in shards:
        slots = [int(slot) for slot in shard["slots"]]
        if not slots:  # (a primary with no slots serves no user)
            continue
        primary, replicas = None, []
        for node in shard["nodes"]:
            if node.get("health") == "fail":  # (Redis 7.0 shows replicas in sync "loading")
                continue
            address = f"{node['ip']}:{node['port']}"
            if node.get("role") == "master":
                primary = address
            else:
                replicas.append(address)
        ranges = sorted(zip(slots[::2], slots[1::2], strict=True))
        layout.append(Placement(ranges, primary, replicas))
    return sorted(layout)


def _within(slot: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= slot <= end for start, end in ranges)


def _node_url(url: str, address: str) -> str:
    """``url`` with its host and port replaced by ``address`` (credentials kept)."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    host, _, port = address.rpartition(":")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{userinfo}{at}{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
