"""Which users' channels a node subscribes to: from its first stream of a user until
``unsubscribe_delay`` seconds after its last.

Every message of a user travels on the user's channel (``routing``), so a node receives the
events of the users it *follows* and no others. ``follow`` (the hub calls it as a stream joins,
before its replay is read) returns once the subscription to the user's channel is confirmed by
Redis: every event published from then on reaches this node. A node stops following a user once
its count of the user's streams (``present``, which the hub reports on every change) has stayed
0 for ``delay`` seconds, so that clients reconnecting (a deploy, a flaky network) do not make a
node unsubscribe and subscribe again and again.

One task per live subscription (``run``) sends every SUBSCRIBE and UNSUBSCRIBE, so many users
joining at once cost one SUBSCRIBE of many channels (at most ``BATCH`` a command); those that
join while one is in flight go in the next. A user to let go is taken out of the confirmed set
*before* its UNSUBSCRIBE is sent: a ``follow`` of it meanwhile waits for the next SUBSCRIBE,
which Redis runs after the UNSUBSCRIBE, so the user ends subscribed and its new stream's replay
is read only after that (nothing published in between is missed). After a lost subscription,
the new one subscribes to every followed user (``resubscribe``) before it counts as up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import anyio.lowlevel

from . import routing
from .links import Link

BATCH = 1000
"""Channels per SUBSCRIBE or UNSUBSCRIBE command: Redis takes many more, but confirming each
channel costs the client about 40 µs, and a command's confirmation must arrive within the
subscription's timeout (coredis waits 0.1 s for an UNSUBSCRIBE's before it logs a warning)."""


class Following:
    """The users this node follows, and the task that keeps the subscription in line with them.

    :param prefix: the prefix of every channel.
    :param delay: seconds a user's count stays 0 before its channel is unsubscribed.
    :param count: this node's count of a user's streams now.
    """

    def __init__(self, prefix: str, delay: float, count: Callable[[str], int]) -> None:
        self.prefix = prefix
        self._delay = delay
        self._count = count
        self._followed: set[str] = set()  # users whose channel this node wants subscribed
        self._pending: set[str] = set()  # of those, the ones for the next SUBSCRIBE
        self._confirmed: set[str] = set()  # subscribed on the live subscription, confirmed
        self._idle: dict[str, float] = {}  # followed users with no stream here: since when
        self._waiters: dict[str, anyio.Event] = {}  # set once the user's channel is confirmed
        self._wake = anyio.Event()

    @property
    def delay(self) -> float:
        """Seconds a user's count stays 0 before its channel is unsubscribed."""
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        self._delay = value
        self._wake.set()  # (the task may wait for a deadline of the old delay)

    @property
    def users(self) -> int:
        """Users followed: subscribed, to be, or idle but within ``delay``."""
        return len(self._followed)

    def follows(self, user_id: str) -> bool:
        """Whether this node follows the user (every user it holds a stream of, and the ones
        within ``delay`` of their last)."""
        return user_id in self._followed

    def confirmed(self, user_id: str) -> bool:
        """Whether the live subscription has the user's channel, confirmed."""
        return user_id in self._confirmed

    @property
    def channels(self) -> int:
        """Users' channels the live subscription is confirmed to have."""
        return len(self._confirmed)

    async def follow(self, user_id: str) -> None:
        """Return once this node receives every event of ``user_id`` published from now on (a
        caller that gives up leaves it followed: it is subscribed once it can be)."""
        if self._count(user_id) == 0:  # (not the hub's way: it has counted the stream first)
            self._idle_from_now(user_id)
        if user_id in self._confirmed:
            return
        if user_id not in self._followed:
            self._followed.add(user_id)
            self._pending.add(user_id)
        waiter = self._waiters.get(user_id)
        if waiter is None:
            waiter = self._waiters[user_id] = anyio.Event()
        self._wake.set()
        await waiter.wait()

    def present(self, user_id: str, count: int) -> None:
        """This node now holds ``count`` streams of ``user_id``."""
        if count > 0:
            self._idle.pop(user_id, None)
        elif user_id in self._followed:
            self._idle_from_now(user_id)

    def _idle_from_now(self, user_id: str) -> None:
        self._idle.pop(user_id, None)  # (to the end: the dict stays ordered by time)
        self._idle[user_id] = anyio.current_time()
        if len(self._idle) == 1:  # the task may be waiting with no deadline
            self._wake.set()

    async def resubscribe(self, link: Link) -> None:
        """On a new subscription: subscribe to every followed user's channel (but those idle
        for ``delay`` by now)."""
        self._confirmed.clear()
        self._expired(anyio.current_time())
        self._pending = set(self._followed)
        await self._subscribe(link)

    def detach(self) -> None:
        """The subscription is gone: no channel is confirmed any more."""
        self._confirmed.clear()

    async def run(self, link: Link) -> None:
        """(Un)subscribe on ``link`` as users come and go, until cancelled; a command that
        fails raises (the subscription is then lost and made again)."""
        while True:
            await anyio.lowlevel.checkpoint()  # (a round may have nothing to send)
            await self._next_round()
            gone = self._expired(anyio.current_time())
            for users in _batches(gone):
                await link.unsubscribe(*self._channels(users))
            await self._subscribe(link)

    async def _next_round(self) -> None:
        """Wait until a user is to be subscribed, or the first idle one's delay is over."""
        while True:
            self._wake = anyio.Event()
            if self._pending:
                return
            now = anyio.current_time()
            first = next(iter(self._idle.values()), None)
            deadline = float("inf") if first is None else first + self.delay
            if deadline <= now:
                return
            with anyio.move_on_after(deadline - now):
                await self._wake.wait()

    def _expired(self, now: float) -> list[str]:
        """Stop following the users idle for ``delay``; those whose channel to unsubscribe."""
        gone, waited = [], []
        while self._idle:
            user_id, since = next(iter(self._idle.items()))
            if since + self.delay > now:
                break
            del self._idle[user_id]
            if self._count(user_id) > 0:  # (never so: ``present`` takes a counted user out)
                continue
            if user_id in self._waiters:  # a ``follow`` waits for it: idle from now on
                waited.append(user_id)
                continue
            self._followed.discard(user_id)
            self._pending.discard(user_id)
            if user_id in self._confirmed:  # (out first: a follow from now on resubscribes)
                self._confirmed.discard(user_id)
                gone.append(user_id)
        for user_id in waited:
            self._idle[user_id] = now
        return gone

    async def _subscribe(self, link: Link) -> None:
        """Subscribe to the pending users' channels, in batches, and confirm them."""
        while self._pending:
            users = [self._pending.pop() for _ in range(min(len(self._pending), BATCH))]
            await link.subscribe(*self._channels(users))  # (returns once Redis confirmed)
            for user_id in users:
                if user_id in self._followed:
                    self._confirmed.add(user_id)
                waiter = self._waiters.pop(user_id, None)
                if waiter is not None:
                    waiter.set()

    def _channels(self, users: list[str]) -> list[str]:
        return [routing.user_channel(self.prefix, user_id) for user_id in users]


def _batches(users: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(users), BATCH):
        yield users[start : start + BATCH]
