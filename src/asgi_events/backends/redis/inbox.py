"""What a node does with each message off its subscriptions: decode it, hand events to the
hub, and handle each disconnect once.

A disconnect comes twice (``routing``): on the user's channel, in order with the user's events,
and on the channel of every node. A node handles the first copy that reaches it and drops the
other by its nonce, remembered for ``DISCONNECT_MEMORY`` seconds; and it drops the copy on the
channel of every node while it follows the user, since the user's channel then brings the
copy that is in order with the events published before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from ..base import Deliver, Disconnect
from . import routing
from .routing import Disconnection

logger = logging.getLogger("asgi_events")

DISCONNECT_MEMORY = 60.0
"""Seconds a node remembers the disconnects it handled (far longer than the two copies of one
may come apart)."""


class Inbox:
    """Takes every message this node receives from Redis (heartbeats aside).

    :param channel: the channel of every node.
    :param count: this node's count of a user's streams now.
    :param follows: whether this node's subscription to a user's channel is confirmed.
    """

    def __init__(
        self, channel: str, count: Callable[[str], int], follows: Callable[[str], bool]
    ) -> None:
        self.channel = channel
        self.deliver: Deliver | None = None
        self.disconnect: Disconnect | None = None
        self.events_received = 0
        """Events read off Redis (disconnects aside)."""
        self.events_received_idle = 0
        """Of those, the ones for a user with no stream on this node."""
        self._count = count
        self._follows = follows
        self._handled: dict[str, float] = {}  # disconnects' nonces -> when handled, oldest first

    async def handle(
        self, channel: str, data: str, only: Callable[[str], bool] | None = None
    ) -> None:
        """Deliver or act on one message, received on ``channel`` (``only``: a copy of a
        ``broadcast_to_all`` for the streams of the users it is true of)."""
        message = routing.decode(data)
        if message is None:
            logger.warning("ignored a message on %s not published by asgi-events", channel)
        elif isinstance(message, Disconnection):
            if self._first(message, channel):
                assert self.disconnect is not None
                await self.disconnect(message.user_id, message.code, message.reason)
        else:
            self.events_received += 1
            if message.user_id is not None and not self._count(message.user_id):
                self.events_received_idle += 1
            assert self.deliver is not None
            await self.deliver(message, only)

    def _first(self, message: Disconnection, channel: str) -> bool:
        """Whether this copy of a disconnect is the one to handle (see the module)."""
        if message.nonce in self._handled:
            return False
        if channel == self.channel and self._follows(message.user_id):
            return False
        now = anyio.current_time()
        handled = self._handled
        while handled and next(iter(handled.values())) < now - DISCONNECT_MEMORY:
            del handled[next(iter(handled))]
        handled[message.nonce] = now
        return True
