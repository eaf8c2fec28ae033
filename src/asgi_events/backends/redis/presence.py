"""Presence across nodes: how many streams of each user every live node holds.

Each node counts its own streams locally (``set``, exact and never blocking) and a background
task writes the changes to Redis (``run``): changed users are collected in a dirty set, and one
flush (the ``PRESENCE`` script) writes them all, woken by the first change, with no fixed delay.
A node's counts are a hash ``<prefix>:{presence}:node:<node>`` (user -> streams) with a TTL of
``ttl``, and the node is in the sorted set ``<prefix>:{presence}:nodes``, scored by when its
entry expires. Every flush refreshes both; a node with nothing to write flushes every ``ttl / 3``
anyway. So a node that dies without saying goodbye stops counting at most ``ttl`` after its last
flush (Redis' clock expires the hash); a clean stop deletes it at once (``leave``). Both keys
share one hash slot, so a flush is one script in a Redis Cluster too.

A flush that fails is logged and recorded (``Health.last_error``), and the next one (on the next
change, or the next refresh) rewrites every count, since it is not known what the failed one
left. Each flush also compares how many users Redis holds for the node with its own count, so
counts lost with Redis' data (a restart without persistence) are rewritten at the next refresh;
``resync`` (on a new subscription) has them rewritten at once.

``read`` sums the counts: this node's from memory, the others' from Redis in one pipelined round
trip (the set of nodes, and the hash of each node seen last time; a node never seen before costs
a second round trip, once).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import anyio

from . import routing, scripts
from .subscription import Health

if TYPE_CHECKING:
    from coredis.commands.script import Script

    from .links import Client

logger = logging.getLogger("asgi_events")


class Presence:
    """One node's presence counts, and its view of the other nodes'.

    :param health: where a failed flush is recorded.
    :param prefix: the prefix of every key.
    :param node: this node's id.
    :param ttl: seconds the node's counts outlive its last flush in Redis.
    :param timeout: seconds a flush or a read may take.
    """

    def __init__(self, health: Health, prefix: str, node: str, ttl: float, timeout: float) -> None:
        self.health = health
        self.node = node
        self.ttl = ttl
        self.timeout = timeout
        self.nodes_key, self._node_prefix = routing.presence_keys(prefix)
        self._counts: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._rewrite = True  # the first flush writes everything
        self._wake = anyio.Event()
        self._lock = anyio.Lock()  # one write at a time: flushes, and the goodbye
        self._left = False
        self._others: list[str] = []  # the other nodes seen by the last read
        self._client: Client | None = None
        self._script: Script[str] | None = None
        self._failing = False

    def key(self, node: str) -> str:
        """The hash of ``node``'s counts."""
        return f"{self._node_prefix}{node}"

    def count(self, user_id: str) -> int:
        """This node's streams of ``user_id`` now."""
        return self._counts.get(user_id, 0)

    def set(self, user_id: str, count: int) -> None:
        """This node now holds ``count`` streams of ``user_id`` (written in the background)."""
        if count > 0:
            self._counts[user_id] = count
        else:
            self._counts.pop(user_id, None)
        self._dirty.add(user_id)
        self._wake.set()

    def resync(self) -> None:
        """Have every count rewritten at once (the data in Redis may be gone)."""
        self._rewrite = True
        self._wake.set()

    async def run(self, client: Client) -> None:
        """Flush changes through ``client`` until cancelled: at once after a change, and every
        ``ttl / 3`` seconds at most."""
        self._client, self._script = client, client.register_script(scripts.PRESENCE)
        self._left = False
        try:
            while True:
                await self.flush()
                with anyio.move_on_after(self.ttl / 3):
                    await self._wake.wait()
                self._wake = anyio.Event()  # changes from here on wake the next round
        finally:
            self._client = self._script = None

    async def flush(self) -> None:
        """Write the changes (everything after a failure) and refresh the TTL; a failure is
        logged and recorded, never raised."""
        async with self._lock:
            if self._left or self._script is None:
                return
            rewrite, dirty = self._rewrite, self._dirty
            self._rewrite, self._dirty = False, set()
            counts = self._counts
            if rewrite:
                pairs: list[str | int] = [x for item in counts.items() for x in item]
            else:
                pairs = [x for user in dirty for x in (user, counts.get(user, 0))]
            expected = len(counts)
            try:
                with anyio.fail_after(self.timeout):
                    held = await self._write("all" if rewrite else "some", pairs)
            except Exception as exc:  # never fatal: retried, rewriting everything
                self._rewrite = True
                self.health.failed(exc)
                log = logger.debug if self._failing else logger.warning
                log("could not write presence counts to Redis: %s", self.health.last_error)
                self._failing = True
                return
            self._failing = False
            if held != expected:  # Redis lost some (a restart without persistence)
                self.resync()

    async def leave(self) -> None:
        """Say goodbye: remove this node's counts from Redis at once (no flush follows). Within
        ``timeout``; a failure is logged, never raised (the counts expire anyway)."""
        self._left = True
        try:
            with anyio.fail_after(self.timeout):
                async with self._lock:  # (after a flush in flight)
                    if self._script is not None:
                        await self._write("leave", [])
        except Exception as exc:
            logger.debug("could not remove this node's presence counts: %r", exc)

    async def read(self, user_ids: Collection[str]) -> dict[str, int]:
        """Streams of each of ``user_ids`` on every live node (0 for unknown users).

        :raises OSError: the backend is not running.
        """
        users = list(dict.fromkeys(user_ids))
        totals = {user: self._counts.get(user, 0) for user in users}
        client = self._client
        if client is None:
            raise OSError("the Redis backend is not running (is the hub entered?)")
        if not users:
            return totals
        live, counts = await self._read(client, users, self._others)
        unseen = [node for node in live if node not in counts]
        if unseen:
            counts.update((await self._read(client, users, unseen))[1])
        self._others = live
        for node in live:
            for user, count in zip(users, counts[node], strict=True):
                totals[user] += int(count) if str(count).isdigit() else 0
        return totals

    async def _read(
        self, client: Client, users: list[str], nodes: list[str]
    ) -> tuple[list[str], dict[str, list[Any]]]:
        """The nodes in the set (this one aside), and the counts of ``users`` on ``nodes``."""
        async with client.pipeline(transaction=False) as pipe:
            members = pipe.zrange(self.nodes_key, 0, -1)
            reads = [pipe.hmget(self.key(node), users) for node in nodes]
        live = [str(node) for node in await members if node != self.node]
        counts = {node: list(await read) for node, read in zip(nodes, reads, strict=True)}
        return live, counts

    async def _write(self, mode: str, pairs: list[str | int]) -> int:
        assert self._script is not None
        args: list[str | int] = [self.node, max(int(self.ttl * 1000), 1), mode, *pairs]
        reply: Any = await self._script(keys=[self.key(self.node), self.nodes_key], args=args)
        return int(reply)
