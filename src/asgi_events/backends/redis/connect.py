"""The clients a node runs on, from its URL: straight to one Redis, through Sentinel, or to a
Redis Cluster.

A node has a command client and a subscriber (a client of its own for the Pub/Sub
subscription, see ``single``). On a cluster, the command client is a cluster client and there
is no subscriber: the subscriptions make clients of the nodes they need (``cluster``).

With a Sentinel service name, the URL names the sentinels instead of Redis, ``redis://[[user]:password@]host[:port][,host[:port]...][/db]``
(port 26379 by default), and both clients are Sentinel-managed: each new connection asks the
sentinels for the service's primary, in turn, and checks that it is one (``ROLE``). So after a
failover, the first connection made (the subscription's, made again after its loss; a command's
after its connection failed) reaches the promoted replica. A connection that stays up is never
checked again, so while the clients are open the sentinels are also asked every ``timeout``
seconds which primary they name, and the connections to any other are dropped (the
subscription's too, which is then lost and made again). Without it, after a failover that
leaves the old primary up (a manual ``SENTINEL FAILOVER``, a partition that heals), a node
would stay on it, writing there, until the sentinels demote it and it drops its clients (about
ten seconds). The credentials and the db number of the URL are the primary's; the sentinels
are asked without any.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import coredis
from coredis.connection import TCPLocation
from coredis.retry import NoRetryPolicy

from .links import Client

SENTINEL_PORT = 26379


class Clients:
    """Makes a node's command client and subscriber, on each ``open()``.

    :param url: a Redis URL, or with ``sentinel`` the sentinels' (see the module).
    :param timeout: bounds connecting to Redis and the subscriber's replies, and with
        ``sentinel`` each question to a sentinel.
    :param sentinel: the name of the Sentinel service of the primary, or None.
    :param cluster: whether ``url`` is a node of a Redis Cluster.
    :raises ValueError: with ``sentinel``, a URL that does not name sentinels as above; both
        ``sentinel`` and ``cluster``.
    """

    def __init__(
        self, url: str, *, timeout: float, sentinel: str | None = None, cluster: bool = False
    ) -> None:
        if sentinel is not None and cluster:
            raise ValueError("a Redis Cluster is not managed by Sentinel: give one of the two")
        self.url = url
        self.timeout = timeout
        self.sentinel = sentinel
        self.cluster = cluster
        self._sentinels: list[TCPLocation] = []
        self._primary: dict[str, Any] = {}
        if sentinel is not None:
            self._sentinels, self._primary = parse_sentinel_url(url)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[tuple[Client, coredis.Redis[str] | None]]:
        """The command client and the subscriber, open until the block ends.

        The command client has no retries: appending is not idempotent, and a retry after a
        reply lost on the way could append an event twice; a failed call raises to the caller.
        The subscriber's connect and replies are bounded by ``timeout``, so attempts against a
        frozen Redis fail in time.
        """
        timeout = self.timeout
        if self.cluster:
            parts = urlsplit(self.url)
            node = TCPLocation(parts.hostname or "127.0.0.1", parts.port or 6379)
            async with coredis.RedisCluster[str].from_url(
                self.url,
                decode_responses=True,
                retry_policy=NoRetryPolicy(),
                # (coredis 6.9 makes a deprecated kind of startup node from the URL by itself)
                startup_nodes=[node],
            ) as cluster:
                yield cluster, None
            return
        if self.sentinel is None:
            client = coredis.Redis[str].from_url(
                self.url, decode_responses=True, retry_policy=NoRetryPolicy()
            )
            subscriber = coredis.Redis[str].from_url(
                self.url, decode_responses=True, connect_timeout=timeout, stream_timeout=timeout
            )
            async with client, subscriber:
                yield client, subscriber
            return
        async with coredis.Sentinel(
            self._sentinels,
            # Given explicitly: by default coredis (6.9) gives the sentinels' clients only the
            # primaries' ``connect_timeout``, never a ``stream_timeout``, so a frozen sentinel
            # would hold every connection attempt.
            sentinel_kwargs={"connect_timeout": timeout, "stream_timeout": timeout},
            decode_responses=True,
            retry_policy=NoRetryPolicy(),  # the sentinels' and both primary clients'
        ) as sentinels:
            client = sentinels.primary_for(self.sentinel, **self._primary)
            subscriber = sentinels.primary_for(
                self.sentinel, connect_timeout=timeout, stream_timeout=timeout, **self._primary
            )
            async with client, subscriber, anyio.create_task_group() as tg:
                tg.start_soon(self._watch, sentinels, (client, subscriber))
                yield client, subscriber
                tg.cancel_scope.cancel()

    async def _watch(
        self, sentinels: coredis.Sentinel[str], clients: tuple[coredis.Redis[str], ...]
    ) -> None:
        """Every ``timeout`` seconds, drop the clients' connections to a primary the sentinels
        no longer name (none answering is no news)."""
        assert self.sentinel is not None
        while True:
            await anyio.sleep(self.timeout)
            try:
                with anyio.fail_after(self.timeout):
                    named = TCPLocation(*await sentinels.discover_primary(self.sentinel))
            except (TimeoutError, coredis.exceptions.RedisError, OSError):
                continue
            for client in clients:
                pool = client.connection_pool
                if pool.location is not None and pool.location != named:
                    pool.disconnect()


def parse_sentinel_url(url: str) -> tuple[list[TCPLocation], dict[str, Any]]:
    """The sentinels a URL names, and the primary's connection options (db, credentials).

    :raises ValueError: not ``redis://[[user]:password@]host[:port][,host[:port]...][/db]``.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.query or parts.fragment:
        raise ValueError(
            "with sentinel=, the URL names the sentinels: "
            "redis://[[user]:password@]host[:port][,host[:port]...][/db]"
        )
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for host in hosts.split(","):
        try:
            address = urlsplit(f"//{host}")
            name, port = address.hostname, address.port or SENTINEL_PORT
        except ValueError as exc:
            raise ValueError(f"not a sentinel's host[:port]: {host!r}") from exc
        if not name:
            raise ValueError(f"not a sentinel's host[:port]: {host!r}")
        sentinels.append(TCPLocation(name, port))
    options: dict[str, Any] = {}
    path = parts.path.strip("/")
    if path:
        if not path.isdigit():
            raise ValueError(f"not a db number: {path!r}")
        options["db"] = int(path)
    username, _, password = userinfo.partition(":")
    if username:
        options["username"] = unquote(username)
    if password:
        options["password"] = unquote(password)
    return sentinels, options
