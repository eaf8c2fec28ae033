"""A node's subscription on a single Redis: one link for every channel it needs.

One connection subscribes to the channel of every node, to this node's heartbeat channel and to
the channels of the users this node follows. Its loss closes every stream of the node with
1012 (any event may have been missed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import anyio
import coredis
from anyio.abc import TaskStatus

from . import routing
from .following import Following
from .links import Client, Link, PubSubLink
from .subscription import Health, Subscription, Wiring


class SingleLink:
    """This node's subscription on a single Redis.

    :param lost: called when the subscription was lost: every stream must close (1012).
    """

    def __init__(self, wiring: Wiring, lost: Callable[[], Awaitable[None]]) -> None:
        self.health = wiring.health
        self.following = Following(wiring.prefix, wiring.delay, wiring.count)
        self.subscription = wiring.subscription(
            self.health, self.following, wiring.on_message, lost, wiring.subscribed
        )
        self._wiring = wiring
        self._heartbeat = routing.heartbeat_channel(wiring.prefix, wiring.node)

    def route(self, user_id: str) -> tuple[Following, Health]:
        """Where the user's channel is subscribed: its ``Following`` and its link's health."""
        return self.following, self.health

    def followings(self) -> list[Following]:
        return [self.following]

    def subscriptions(self) -> list[Subscription]:
        return [self.subscription]

    async def run(
        self,
        client: Client,
        subscriber: coredis.Redis[str] | None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe through ``subscriber`` and consume until cancelled (see
        ``Subscription.run``); heartbeats are published through ``client``."""
        # The subscription has a client (a pool) of its own: a connection given up after a
        # missed heartbeat is closed without touching commands in flight on the others, and a
        # connection left half-subscribed after a failed attempt never carries commands.
        assert subscriber is not None
        await self.subscription.run(partial(self._open, subscriber, client), task_status)

    @asynccontextmanager
    async def _open(self, subscriber: coredis.Redis[str], client: Client) -> AsyncIterator[Link]:
        channels = [self._wiring.channel]
        if self.subscription.heartbeat_interval is not None:
            channels.append(self._heartbeat)
        async with subscriber.pubsub(
            channels=channels,
            ignore_subscribe_messages=True,
            retry_policy=None,
            subscription_timeout=self._wiring.timeout,
        ) as pubsub:
            yield PubSubLink(pubsub, client, self._heartbeat)
