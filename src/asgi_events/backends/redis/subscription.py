"""A Pub/Sub subscription of one node: consuming it, proving it alive, getting it back.

A subscription consumes one link (``links``): one connection, subscribed to its own channels
(on a single Redis: the channel of every node and this node's heartbeat channel; on a cluster,
one subscription per shard, see ``cluster``), and to the channels of the users this node
follows there (``following``, whose task runs beside the consumer and sends every further
SUBSCRIBE and UNSUBSCRIBE on it).

A silent partition (no error, no TCP reset: a frozen Redis, dropped packets) would leave a
subscription that looks alive and delivers nothing. So each link has a heartbeat channel of
this node's, ``<prefix>:heartbeat:<node>`` (a cluster shard's: in a slot of that shard), the
node publishes a heartbeat there every ``heartbeat_interval`` seconds, and expects it back on
its subscription:
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
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass

import anyio
import coredis
from anyio.abc import TaskStatus

from .following import Following
from .links import Link

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


@dataclass(frozen=True)
class Wiring:
    """What every subscription of a node shares (``single``, ``cluster``)."""

    url: str
    health: Health
    """The node-wide health: of the one subscription, or of the one to every node's channel."""
    prefix: str
    node: str
    channel: str
    """The channel of every node."""
    timeout: float
    """Seconds Redis may take to connect, answer, or confirm a subscription."""
    delay: float
    """``unsubscribe_delay``."""
    count: Callable[[str], int]
    """This node's count of a user's streams now."""
    on_message: Callable[..., Awaitable[None]]
    """``Inbox.handle``."""
    subscribed: Callable[[], None]
    max_backoff: float
    heartbeat_interval: float | None
    heartbeat_timeout: float

    def subscription(
        self,
        health: Health,
        following: Following | None,
        on_message: Callable[[str, str], Awaitable[None]],
        lost: Callable[[], Awaitable[None]],
        subscribed: Callable[[], None] = lambda: None,
    ) -> Subscription:
        """A subscription with this node's backoff and heartbeats."""
        return Subscription(
            health,
            following=following,
            max_backoff=self.max_backoff,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            on_message=on_message,
            lost=lost,
            subscribed=subscribed,
        )


class Subscription:
    """Consumes a link (its channels, its heartbeats and the followed users' channels) until
    cancelled, opening it again after every loss.

    :param health: updated as the subscription comes and goes.
    :param following: the users whose channels to subscribe to on the link, and its task
        (None: only the link's own channels).
    :param max_backoff: the longest wait, in seconds, between attempts to subscribe.
    :param heartbeat_interval: seconds between heartbeats; None for none.
    :param heartbeat_timeout: seconds a heartbeat may take to come back.
    :param on_message: called with the channel and data of each message but heartbeats, in
        order.
    :param lost: called (and awaited) after a subscription that was up is lost.
    :param subscribed: called each time the subscription is (again) up.
    """

    def __init__(
        self,
        health: Health,
        *,
        following: Following | None,
        max_backoff: float,
        heartbeat_interval: float | None,
        heartbeat_timeout: float,
        on_message: Callable[[str, str], Awaitable[None]],
        lost: Callable[[], Awaitable[None]],
        subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        self.health = health
        self.following = following
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
        open_link: Callable[[], AbstractAsyncContextManager[Link]],
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open a link (subscribed to its own channels) and consume it, again and again,
        until cancelled. ``task_status`` is started once subscribed, or after the first
        failure (the caller goes on while this keeps trying)."""
        health, started = self.health, False
        delay = 0.1

        def up() -> None:
            nonlocal started, delay
            health.healthy, delay = True, 0.1
            self._subscribed()
            if not started:
                started = True
                task_status.started()

        while True:
            self._beat_failure = None
            try:
                async with open_link() as link:
                    try:
                        await self._consume(link, up)
                    finally:
                        if self.following is not None:
                            self.following.detach()
            except Exception as exc:  # coredis wraps connection errors in exception groups
                health.failed(exc)
            if self._beat_failure is not None:  # (the connection closed for it, maybe raising)
                health.last_error = self._beat_failure
            if health.healthy:  # (not when the hub stops: it cancels this task instead)
                health.healthy = False
                health.interruptions += 1
                await self._lost()
            elif not started:  # Redis is not there yet: the hub starts anyway, refusing sockets
                started = True
                task_status.started()
            await anyio.sleep(random.uniform(0, delay))  # full jitter
            delay = min(delay * 2, self.max_backoff)

    async def _consume(self, link: Link, up: Callable[[], None]) -> None:
        """Subscribe the followed users' channels, then deliver what comes on the link until
        it ends or a heartbeat is missed."""
        self._last_seen = anyio.current_time()
        # The watchdog cancels this scope only: never the link's own tasks, nor this task.
        async with anyio.create_task_group() as watched:
            watched.start_soon(self._read, link, watched.cancel_scope)
            if self.following is not None:
                await self.following.resubscribe(link)
            up()
            if self.heartbeat_interval is not None:
                watched.start_soon(self._watchdog, link, watched.cancel_scope)
            if self.following is not None:
                watched.start_soon(self.following.run, link)

    async def _read(self, link: Link, scope: anyio.CancelScope) -> None:
        async for channel, data in link.messages():
            self._last_seen = anyio.current_time()
            if channel == link.heartbeat_channel:  # not an event: never delivered
                if data == str(self.heartbeats_sent):
                    self._beat_back.set()
                continue
            await self._on_message(channel, data)
        scope.cancel()  # the subscription ended: the watchdog goes with it

    async def _watchdog(self, link: Link, scope: anyio.CancelScope) -> None:
        """Heartbeats until one is missed; then give the subscription's connection up."""
        reason = await self._heartbeats(link)
        self._beat_failure = reason
        logger.warning("Redis subscription: %s", reason)
        # It cannot be trusted any more: close it (rather than hand it back to the pool, still
        # subscribed, or wait for its unsubscription), then stop consuming. coredis then either
        # raises its ConnectionError out of the pubsub, or the pubsub exits quietly.
        link.invalidate(reason)
        scope.cancel()

    async def _heartbeats(self, link: Link) -> str:
        """Send heartbeats and wait for each to come back; return why one did not."""
        assert self.heartbeat_interval is not None
        while True:
            await anyio.sleep(self.heartbeat_interval)
            failure = await self._heartbeat(link)
            if failure is not None:
                return failure

    async def _heartbeat(self, link: Link) -> str | None:
        """One heartbeat: None once it came back, or why it did not in time."""
        timeout = self.heartbeat_timeout
        self.heartbeats_sent += 1
        token, back = str(self.heartbeats_sent), anyio.Event()
        self._beat_back = back
        sent = anyio.current_time()
        failed: list[str] = []

        async def publish() -> None:
            try:
                await link.beat(token)
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
