"""The Pub/Sub subscription of one node: consuming it, proving it alive, getting it back.

One connection subscribes to the channel of every node, to this node's heartbeat channel, and
to the channels of the users this node follows (``following``, whose task runs beside the
consumer and sends every further SUBSCRIBE and UNSUBSCRIBE on it).

A silent partition (no error, no TCP reset: a frozen Redis, dropped packets) would leave a
subscription that looks alive and delivers nothing. So each node also subscribes to a channel
of its own, ``<prefix>:heartbeat:<node>``, publishes a heartbeat there through its command
connection every ``heartbeat_interval`` seconds, and expects it back on its subscription:
Redis delivers a connection's messages in order, so a heartbeat that comes back proves that
everything published before it came back too. When one does not (or cannot be published), the
subscription is treated as lost, exactly as if it had failed with an error: the node is marked
unhealthy, told (``lost``), and subscribes again with exponential backoff and full jitter. A
new subscription counts as up once every followed user's channel is subscribed again.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import coredis
from anyio.abc import TaskStatus
from coredis.patterns.pubsub import PubSub

from .following import Following

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("asgi_events")

# While other messages keep arriving on the subscription (it is alive, only busy), a heartbeat
# may come back later than ``heartbeat_timeout``, but at most this many times it.
BEAT_GRACE = 5


@dataclass
class Health:
    """What ``stats()["backend"]`` shows of a node's link to Redis."""

    healthy: bool = False
    """True while subscribed (and heartbeats come back)."""
    interruptions: int = 0
    """Subscriptions lost since the start."""
    last_error: str | None = None
    """The newest failure, of a command or of the subscription."""

    def failed(self, exc: BaseException) -> None:
        """Record ``exc`` (the one error inside single-error exception groups)."""
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        self.last_error = f"{type(exc).__name__}: {exc}"


@contextmanager
def closing_quietly() -> Iterator[None]:
    """Around a client's life: errors as it closes are logged (debug) and dropped, and a
    cancellation goes on bare, out of any exception group."""
    try:
        yield
    except BaseException as exc:
        # Cancelled at shutdown, coredis may fail to unsubscribe on a connection it already
        # closed (seen on trio): nothing is left to clean up, so only the cancellation goes on.
        if not isinstance(exc, BaseExceptionGroup):
            if isinstance(exc, Exception):
                logger.debug("the Redis client closed with %s", type(exc).__name__)
                return
            raise
        errors, rest = exc.split(Exception)
        if errors is not None:
            logger.debug("the Redis client closed with %s", errors.exceptions)
        if rest is not None:  # only the cancellation is left: raise it bare, as it came
            cancelled: BaseException = rest
            while isinstance(cancelled, BaseExceptionGroup):
                cancelled = cancelled.exceptions[0]
            raise cancelled from None


class Subscription:
    """Consumes ``channel``, the heartbeat channel and the followed users' channels until
    cancelled, resubscribing after every loss.

    :param health: updated as the subscription comes and goes.
    :param channel: the channel of every node.
    :param following: the users whose channels to subscribe to, and its task.
    :param heartbeat_channel: this node's own channel for heartbeats.
    :param max_backoff: the longest wait, in seconds, between attempts to subscribe.
    :param heartbeat_interval: seconds between heartbeats; None for none.
    :param heartbeat_timeout: seconds a heartbeat may take to come back.
    :param timeout: seconds Redis may take to confirm a SUBSCRIBE.
    :param on_message: called with the channel and data of each message but heartbeats, in
        order.
    :param lost: called (and awaited) after a subscription that was up is lost.
    :param subscribed: called each time the subscription is (again) up.
    """

    def __init__(
        self,
        health: Health,
        *,
        channel: str,
        following: Following,
        heartbeat_channel: str,
        max_backoff: float,
        heartbeat_interval: float | None,
        heartbeat_timeout: float,
        timeout: float,
        on_message: Callable[[str, str], Awaitable[None]],
        lost: Callable[[], Awaitable[None]],
        subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        self.health = health
        self.channel = channel
        self.following = following
        self.timeout = timeout
        self.heartbeat_channel = heartbeat_channel
        self.max_backoff = max_backoff
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        """Read at every heartbeat, so it may be changed at run time."""
        self.heartbeats_sent = 0
        """Heartbeats sent so far; the newest one's number is the message awaited back."""
        self._on_message = on_message
        self._lost = lost
        self._subscribed = subscribed
        self._beat_back = anyio.Event()  # set when the newest heartbeat came back
        self._last_seen = 0.0  # when a message last came on the subscription (anyio's clock)
        self._beat_failure: str | None = None  # why the current subscription was given up

    async def run(
        self,
        client: coredis.Redis[str],
        subscriber: coredis.Redis[str],
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe through ``subscriber`` (heartbeats are published through ``client``) and
        consume, again and again, until cancelled. ``task_status`` is started once subscribed,
        or after the first failure (the caller goes on while this keeps trying)."""
        health, delay, started = self.health, 0.1, False
        channels = [self.channel]
        if self.heartbeat_interval is not None:
            channels.append(self.heartbeat_channel)
        while True:
            self._beat_failure = None
            try:
                async with subscriber.pubsub(
                    channels=channels,
                    ignore_subscribe_messages=True,
                    retry_policy=None,
                    subscription_timeout=self.timeout,
                ) as pubsub:
                    try:
                        await self.following.resubscribe(pubsub)
                        health.healthy, delay = True, 0.1
                        self._subscribed()
                        if not started:
                            started = True
                            task_status.started()
                        await self._consume(client, pubsub)
                    finally:
                        self.following.detach()
            except Exception as exc:  # coredis wraps connection errors in exception groups
                health.failed(exc)
            if self._beat_failure is not None:  # (the connection closed for it, maybe raising)
                health.last_error = self._beat_failure
            if health.healthy:  # (not when the hub stops: it cancels this task instead)
                health.healthy = False
                health.interruptions += 1
                logger.warning("lost the Redis subscription; closing this node's sockets (1012)")
                await self._lost()
            elif not started:  # Redis is not there yet: the hub starts anyway, refusing sockets
                started = True
                task_status.started()
            await anyio.sleep(random.uniform(0, delay))  # full jitter
            delay = min(delay * 2, self.max_backoff)

    async def _consume(self, client: coredis.Redis[str], pubsub: PubSub[str]) -> None:
        """Deliver what comes on the subscription until it ends or a heartbeat is missed."""
        self._last_seen = anyio.current_time()
        # The watchdog cancels this scope only: never the pubsub's own task group, nor the task.
        async with anyio.create_task_group() as watched:
            if self.heartbeat_interval is not None:
                watched.start_soon(self._watchdog, client, pubsub, watched.cancel_scope)
            watched.start_soon(self.following.run, pubsub)
            async for message in pubsub:
                self._last_seen = anyio.current_time()
                data, channel = str(message["data"]), str(message["channel"])
                if channel == self.heartbeat_channel:  # not an event: never delivered
                    if data == str(self.heartbeats_sent):
                        self._beat_back.set()
                    continue
                await self._on_message(channel, data)
            watched.cancel_scope.cancel()  # the subscription ended: the watchdog goes with it

    async def _watchdog(
        self, client: coredis.Redis[str], pubsub: PubSub[str], scope: anyio.CancelScope
    ) -> None:
        """Heartbeats until one is missed; then give the subscription's connection up."""
        reason = await self._heartbeats(client)
        self._beat_failure = reason
        logger.warning("Redis subscription: %s", reason)
        # It cannot be trusted any more: close it (rather than hand it back to the pool, still
        # subscribed, or wait for its unsubscription), then stop consuming. coredis then either
        # raises its ConnectionError out of the pubsub, or the pubsub exits quietly.
        try:
            pubsub.connection.invalidate(reason)
        except coredis.exceptions.ConnectionError:  # (it had no connection left)
            pass
        scope.cancel()

    async def _heartbeats(self, client: coredis.Redis[str]) -> str:
        """Send heartbeats and wait for each to come back; return why one did not."""
        assert self.heartbeat_interval is not None
        while True:
            await anyio.sleep(self.heartbeat_interval)
            failure = await self._heartbeat(client)
            if failure is not None:
                return failure

    async def _heartbeat(self, client: coredis.Redis[str]) -> str | None:
        """One heartbeat: None once it came back, or why it did not in time."""
        timeout = self.heartbeat_timeout
        self.heartbeats_sent += 1
        token, back = str(self.heartbeats_sent), anyio.Event()
        self._beat_back = back
        sent = anyio.current_time()
        failed: list[str] = []

        async def publish() -> None:
            try:
                await client.publish(self.heartbeat_channel, token)
            except (coredis.exceptions.RedisError, OSError, TimeoutError) as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
                back.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            # Late only because the subscription is busy (other messages keep coming): wait on.
            latest = sent + BEAT_GRACE * timeout
            while not back.is_set():
                deadline = min(max(sent, self._last_seen) + timeout, latest)
                if anyio.current_time() >= deadline:
                    break
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await back.wait()
            tg.cancel_scope.cancel()  # a publish still waiting for its reply goes
        if failed:
            return f"heartbeat publish failed: {failed[0]}"
        if not back.is_set():
            return f"heartbeat timeout: none came back within {timeout:g} s"
        return None
