"""Several nodes on one Redis: replay buffers in Redis Streams, fan-out through Pub/Sub.

Each user's buffered events are a stream, ``<prefix>:{<user>}:events``, beside a meta hash of
its epoch and position (``storage``). Each user has a channel, ``<prefix>:{<user>}:ch``, which
carries its events and disconnects; a node subscribes to it while it holds a stream of the user
(``following``), so it receives its own users' events only, and ``<prefix>:events`` carries
``broadcast_to_all`` to every node. Appending an event to its stream and publishing it are one
Lua script (``scripts``), which assigns the event's id, ``<epoch>.<stream id>``: so every node
sees each user's events in id order. The message carries ``<user as JSON>\\n<id>\\n<text>``,
where a buffered event's text is its encoding without the id, which the receiving node adds
(``routing``; that module also says why nodes of earlier versions must not share a prefix with
these). Each node proves its subscription alive with heartbeats on a channel of its own, and
gets it back with backoff after any loss (``subscription``).

On a Redis Cluster (``cluster=True``) users' channels are shard channels, so a user's events
travel through the shard of its hash slot only, and a node has a subscription per shard
(``cluster``): losing one closes the streams of that shard's users only.

Modules: ``scripts`` (the Lua source), ``routing`` (key and channel names, stream ids, the
message format), ``storage`` (append, publish, latest values, replay), ``links`` (one Pub/Sub
connection, classic or sharded), ``subscription`` (consuming a link: heartbeat watchdog,
reconnection), ``single`` and ``cluster`` (a node's links), ``following`` (which users'
channels to subscribe to on a link, batched, with hysteresis), ``inbox`` (what a node does with
each message), ``presence`` (every node's counts, written in the background), ``connect`` (the
clients, from a URL, through Sentinel, or of a cluster), and here ``RedisBackend``, which wires
them together.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable, Collection
from typing import Any, ParamSpec, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

try:
    import coredis
except ImportError as exc:  # pragma: no cover
    raise ImportError("RedisBackend needs coredis: pip install 'asgi-events[redis]'") from exc

from ... import codec
from ...errors import BackendUnavailableError
from ...protocol import ResumePoint
from ..base import Deliver, Disconnect, Lost, Replay
from . import routing
from .cluster import ClusterLinks
from .connect import Clients
from .inbox import Inbox
from .presence import Presence
from .routing import UserKeys
from .single import SingleLink
from .storage import Storage
from .subscription import Health, Wiring, closing_quietly

__all__ = ("RedisBackend",)

_P = ParamSpec("_P")
_T = TypeVar("_T")


class RedisBackend:
    """Buffers and fan-out in Redis, for several nodes (processes or machines) as one hub.

    A node receives the events of the users it holds streams of, and no others: each user's
    events travel on a channel of the user's, which a node subscribes to as the user's first
    stream joins it (the stream's replay is read once Redis has confirmed it) and unsubscribes
    from ``unsubscribe_delay`` seconds after its last one left. So adding nodes spreads the
    events over them instead of sending every event to every node. ``broadcast_to_all`` reaches
    every node on a channel they all share. Nodes of a version before channels per user must
    not share a ``prefix`` with these: upgrade all nodes at once, or change the prefix.

    :param url: a Redis URL, e.g. ``redis://127.0.0.1:6379/0``; with ``sentinel``, the
        sentinels', e.g. ``redis://10.0.0.1:26379,10.0.0.2:26379/0`` (the db number and any
        credentials are the primary's).
    :param prefix: the prefix of every key and channel.
    :param timeout: seconds a publish or a replay read may take before it fails with
        ``BackendUnavailableError`` (a socket being replayed is closed with 1012).
    :param max_backoff: the longest wait, in seconds, between attempts to get the subscription
        back after Redis was lost.
    :param meta_ttl: seconds a user's epoch and position outlive their last event (a user idle
        longer resumes into a new epoch: ``recovered: false``, reason ``epoch``).
    :param heartbeat_interval: seconds between heartbeats: the node publishes one on a channel
        of its own and expects it back on its subscription, which proves the subscription alive
        end to end (a silent partition, with no error and no TCP reset, is found this way).
        ``None`` turns heartbeats off (then only errors are noticed).
    :param heartbeat_timeout: seconds a heartbeat may take to come back (publishing included)
        before the subscription is treated as lost: this node's sockets are closed with 1012,
        ``stats()["backend"]`` shows it unhealthy with ``last_error`` "heartbeat timeout ...",
        and the subscription is made again with backoff. Defaults to ``timeout``. A silent
        partition is noticed within ``heartbeat_interval + heartbeat_timeout`` (3 s with the
        defaults). While other messages keep arriving the subscription is alive, only busy: a
        heartbeat may then be late, up to five times ``heartbeat_timeout``.
    :param presence_ttl: seconds a node's presence counts live in Redis after it last wrote
        them; a running node writes them at once on every change, and every ``presence_ttl /
        3`` seconds anyway. So a node that ends without saying goodbye (killed, or cut off from
        Redis) stops counting in ``presence()`` at most ``presence_ttl`` seconds later (Redis'
        clock); one cut off counts again once its next write gets through. A clean ``stop()``
        removes its counts at once. Keep it a few times ``timeout``: a live node whose writes
        fail for two thirds of it drops out until one gets through.
    :param unsubscribe_delay: seconds this node stays subscribed to a user's channel after its
        last stream of the user left, so that clients that reconnect soon (after a deploy, a
        network blip, a page reload) do not make it unsubscribe and subscribe again. Meanwhile
        the user's events still reach this node, to no stream (``events_received_idle`` in
        ``stats()["backend"]``). Subscribing costs Redis about 210 bytes per channel.
    :param sentinel: the name of a Sentinel service (e.g. ``"mymaster"``): ``url`` then names
        its sentinels, and every connection goes to the primary they name when it is made. A
        failover is a loss of Redis like any other (sockets closed with 1012, the subscription
        made again with backoff), and the subscription comes back on the promoted replica.
        Events the old primary acknowledged but had not yet replicated are lost with it.
    :param cluster: ``url`` is any node of a Redis Cluster (7.0 or newer; set
        ``cluster-require-full-coverage no`` on its nodes). Users' channels are then shard
        channels, and this node keeps a subscription (with heartbeats) per shard: a shard lost
        closes the streams of its users only (1012), and refuses their new ones until the
        subscription is back on the shard's new primary. ``stats()["backend"]["shards"]`` shows
        each; the top-level health is that of the subscription to every node's channel, whose
        loss closes no stream (only ``broadcast_to_all`` travels there, never replayed).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "asgi-events",
        timeout: float = 2.0,
        max_backoff: float = 5.0,
        meta_ttl: float = 86_400.0,
        heartbeat_interval: float | None = 1.0,
        heartbeat_timeout: float | None = None,
        presence_ttl: float = 15.0,
        unsubscribe_delay: float = 30.0,
        cluster: bool = False,
        sentinel: str | None = None,
    ) -> None:
        if heartbeat_interval is not None and not heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be positive (or None for no heartbeat)")
        if heartbeat_timeout is not None and not heartbeat_timeout > 0:
            raise ValueError("heartbeat_timeout must be positive")
        if not (presence_ttl > 0 and math.isfinite(presence_ttl)):
            raise ValueError("presence_ttl must be a positive number of seconds")
        if not (unsubscribe_delay >= 0 and math.isfinite(unsubscribe_delay)):
            raise ValueError("unsubscribe_delay must be a number of seconds, 0 or more")
        self.url = url
        # (checks the URL, and that at most one of cluster and sentinel is given)
        self._clients = Clients(url, timeout=timeout, sentinel=sentinel, cluster=cluster)
        self._timeout = timeout
        self._lost: Lost | None = None
        self._health = Health()
        self._delay = unsubscribe_delay
        channel, node = routing.events_channel(prefix), secrets.token_hex(8)
        self._storage = Storage(prefix, channel, max(int(meta_ttl * 1000), 1), sharded=cluster)
        self._presence = Presence(self._health, prefix, node, presence_ttl, timeout)
        self._inbox = Inbox(channel, self._presence.count, self._follows)
        wiring = Wiring(
            url=url,
            health=self._health,
            prefix=prefix,
            node=node,
            channel=channel,
            timeout=timeout,
            delay=unsubscribe_delay,
            count=self._presence.count,
            on_message=self._inbox.handle,
            subscribed=self._subscribed,
            max_backoff=max_backoff,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout if heartbeat_timeout is not None else timeout,
        )
        self._links = (
            ClusterLinks(wiring, self._on_lost) if cluster else SingleLink(wiring, self._on_lost)
        )

    # -- public, read-only views (for operators and tests) ---------------------------------

    @property
    def healthy(self) -> bool:
        """False while the subscription is down (new sockets are refused with 1012)."""
        return self._health.healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._health.healthy = value

    @property
    def prefix(self) -> str:
        """The prefix of every key and channel."""
        return self._storage.prefix

    @property
    def channel(self) -> str:
        """The channel every node subscribes to: ``broadcast_to_all``, and a copy of every
        disconnect."""
        return self._storage.channel

    def user_channel(self, user_id: str) -> str:
        """The channel of ``user_id``'s events and disconnects."""
        return self._storage.user_channel(user_id)

    @property
    def unsubscribe_delay(self) -> float:
        """Seconds this node stays subscribed to a user's channel after its last stream left;
        may be changed at run time (at once for every idle user, counted from when it left)."""
        return self._delay

    @unsubscribe_delay.setter
    def unsubscribe_delay(self, value: float) -> None:
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError("unsubscribe_delay must be a number of seconds, 0 or more")
        self._delay = value
        for following in self._links.followings():
            following.delay = value

    def keys(self, user_id: str) -> UserKeys:
        """The keys of ``user_id``'s data: ``.stream`` (its buffered events), ``.meta``,
        ``.latest`` and ``.latest_at`` (its latest values)."""
        return self._storage.keys(user_id)

    @property
    def node(self) -> str:
        """This node's id (in its heartbeat channel and its presence key)."""
        return self._presence.node

    def presence_key(self, node: str) -> str:
        """The hash of a node's presence counts (user -> streams)."""
        return self._presence.key(node)

    @property
    def heartbeats_sent(self) -> int:
        """Heartbeats this node has sent so far on its subscription to every node's channel
        (0 with ``heartbeat_interval=None``)."""
        return self._links.subscription.heartbeats_sent

    @property
    def heartbeat_timeout(self) -> float:
        """Seconds a heartbeat may take to come back; may be changed at run time (it applies
        from the next heartbeat)."""
        return self._links.subscription.heartbeat_timeout

    @heartbeat_timeout.setter
    def heartbeat_timeout(self, value: float) -> None:
        if not value > 0:
            raise ValueError("heartbeat_timeout must be positive")
        for subscription in self._links.subscriptions():
            subscription.heartbeat_timeout = value

    # -- the backend contract --------------------------------------------------------------

    def bind(
        self,
        deliver: Deliver,
        lost: Lost,
        *,
        disconnect: Disconnect,
        size: int,
        max_age: float,
        max_users: int | None,
    ) -> None:
        # ``max_users`` does not apply: users' keys expire in Redis by themselves.
        self._lost, self._inbox.deliver, self._inbox.disconnect = lost, deliver, disconnect
        self._storage.size, self._storage.max_age_ms = size, max(int(max_age * 1000), 1)

    async def start(self, task_group: TaskGroup) -> None:
        # The client lives in a task of the hub's group (its own task group nests there).
        # Returns once subscribed, or after the first failure (then it keeps trying).
        await task_group.start(self._run)

    async def stop(self) -> None:
        for subscription in self._links.subscriptions():  # (its end is no loss)
            subscription.health.healthy = False
        # the hub then cancels its task group, which closes the clients
        await self._presence.leave()

    async def publish(
        self,
        user_id: str,
        fields: dict[str, Any],
        transient: bool,
        latest: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str | None:
        """Buffer (unless transient) and publish, in one script (see ``backends.base``). An
        idempotency key is read and recorded by that script (``PX`` the buffer's max age)."""
        storage, key = self._storage, idempotency_key
        if latest is not None:
            text = codec.encode(fields)
            return await self._call(storage.publish_latest, user_id, latest, text, key)
        if transient and key is not None:
            return await self._call(storage.publish_once, user_id, key, codec.encode(fields))
        if transient:
            await self._call(storage.publish, user_id, codec.encode(fields))
            return None
        return await self._call(storage.append, user_id, fields, key)

    async def publish_to_all(self, text: str) -> None:
        """On a cluster, one copy per shard (each delivered to that shard's users' streams):
        if a shard fails, the copies already published are delivered."""
        if isinstance(self._links, ClusterLinks):
            channels = self._links.events_channels()
            if not channels:
                raise BackendUnavailableError("the Redis Cluster's layout is not known yet")
            await self._call(self._storage.publish_to_shards, channels, text)
        else:
            await self._call(self._storage.publish, None, text)

    async def replay(
        self, user_id: str, resume: ResumePoint | None, latest: bool = False
    ) -> Replay:
        return await self._call(self._storage.replay, user_id, resume, latest)

    async def disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Each node (this one too) closes the user's streams when the message reaches it, after
        the events published before it: this may return before.

        :raises ValueError: a code or reason no disconnect may have (``disconnect_close``).
        :raises BackendUnavailableError: Redis did not take it.
        """
        await self._call(self._storage.disconnect, user_id, code, reason)

    async def follow(self, user_id: str) -> None:
        """Subscribe to the user's channel, if this node is not subscribed yet (with others
        joining meanwhile, in one SUBSCRIBE), and return once Redis confirmed it. The node
        unsubscribes ``unsubscribe_delay`` seconds after its count of the user (``present``)
        is 0 and stays so.

        :raises BackendUnavailableError: not confirmed within ``timeout`` (it is subscribed
            once it can be), or the backend is not running.
        """
        if not self._storage.attached:
            raise BackendUnavailableError("the Redis backend is not running (is the hub entered?)")
        route = self._links.route(user_id)
        if route is None or not route[1].healthy:
            raise BackendUnavailableError("the subscription to this user's Redis shard is down")
        try:
            with anyio.fail_after(self._timeout):
                await route[0].follow(user_id)
        except TimeoutError as exc:
            raise BackendUnavailableError(
                f"Redis did not confirm the subscription within {self._timeout:g} s"
            ) from exc

    def present(self, user_id: str, count: int) -> None:
        self._presence.set(user_id, count)
        route = self._links.route(user_id)
        if route is not None:
            route[0].present(user_id, count)

    async def presence(self, user_ids: Collection[str]) -> dict[str, int]:
        return await self._call(self._presence.read, user_ids)

    async def clear(self) -> None:
        pass  # shared by every node: one node's shutdown must not empty it

    def stats(self) -> dict[str, Any]:
        health, followings = self._health, self._links.followings()
        inbox = self._inbox
        stats: dict[str, Any] = {
            "kind": "redis",
            "healthy": health.healthy,
            "interruptions": health.interruptions,
            "last_error": health.last_error,
            "events_received": inbox.events_received,
            "events_received_idle": inbox.events_received_idle,
            "followed_users": sum(following.users for following in followings),
            "user_channels": sum(following.channels for following in followings),
        }
        if isinstance(self._links, ClusterLinks):
            stats["node"] = self._links.address
            stats["shards"] = [shard.stats() for shard in self._links.shards]
        return {"backend": stats}

    # -- internals -------------------------------------------------------------------------

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with closing_quietly():
            async with self._clients.open() as (client, subscriber):
                self._storage.attach(client)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._presence.run, client)
                        await self._links.run(client, subscriber, task_status)
                finally:
                    self._storage.detach()

    async def _call(
        self, fn: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """``fn(...)`` within ``timeout``; any failure is ``BackendUnavailableError``."""
        try:
            with anyio.fail_after(self._timeout):
                return await fn(*args, **kwargs)
        except (TimeoutError, coredis.exceptions.RedisError, OSError) as exc:
            self._health.last_error = f"{type(exc).__name__}: {exc}"
            raise BackendUnavailableError(f"Redis did not take the request: {exc}") from exc

    def _follows(self, user_id: str) -> bool:
        route = self._links.route(user_id)
        return route is not None and route[0].confirmed(user_id)

    def _subscribed(self) -> None:
        self._presence.resync()

    async def _on_lost(self, affected: Callable[[str], bool] | None = None) -> None:
        assert self._lost is not None
        await self._lost(affected)
