"""Reading and writing a user's events in Redis: append (and publish), publish, latest values,
replay.

A user's stream ``<prefix>:{<user>}:events`` holds its buffered events, trimmed to the buffer's
size (``MAXLEN``) and age (``MINID``, by Redis' own clock), expiring ``max_age`` after the last
event. Each entry holds the event's encoding without ``id`` (field ``b``) and its own timestamp
(``t``, for ``lastEventTs``). An event's id is ``<epoch>.<stream id>``: the stream id orders it,
the epoch tells the data set apart.

The user's meta hash ``<prefix>:{<user>}:meta`` holds the epoch (a random token), the newest
id, and the newest id trimmed away and why; it outlives the stream by ``meta_ttl``. When Redis
loses the data (a restart without persistence, a flush), the epoch changes with it, so ids of
the lost data set are recognised as foreign, never misread.

A user's latest values are a hash ``<prefix>:{<user>}:latest`` (slot -> the text delivered live)
beside a sorted set ``<prefix>:{<user>}:latest-at`` (slot -> when it was set, by Redis' clock):
at most ``LATEST_PER_USER`` slots (the least recently updated go), none older than ``max_age``.

An idempotency key of a user is a string ``<prefix>:{<user>}:idem:<key>`` holding what its
first publish returned (the id, empty for a transient event), expiring ``max_age`` after it;
the script that publishes reads and writes it (``scripts``). There is no bound on how many
keys Redis holds besides that expiry (and Redis' own ``maxmemory`` policy).

Every message of a user is published on the user's channel; ``broadcast_to_all`` on the channel
of every node, and a disconnect on both (``routing``).
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio

from ... import codec
from ...latest import LATEST_PER_USER
from ...protocol import GapReason, ResumePoint, make_id
from ..base import Published, Replay
from . import routing, scripts
from .routing import ORIGIN, ORIGIN_KEY, StreamKey, UserKeys, parse_stream_id

if TYPE_CHECKING:
    from coredis.commands.script import Script

    from .links import Client


class Storage:
    """One node's access to the shared data, through a command client it is attached to.

    :param prefix: the prefix of every key and channel.
    :param channel: the channel of every node (``broadcast_to_all``, disconnects' copies).
    :param meta_ttl_ms: milliseconds a user's meta hash outlives its last event.
    :param sharded: whether users' channels are shard channels (a Redis Cluster).
    """

    def __init__(self, prefix: str, channel: str, meta_ttl_ms: int, sharded: bool) -> None:
        self.prefix = prefix
        self.channel = channel
        self.sharded = sharded
        self.publish_command = "SPUBLISH" if sharded else "PUBLISH"
        """How a user's channel is published to."""
        self.size = 200
        """Events kept per user (``MAXLEN``)."""
        self.max_age_ms = 300_000
        """Milliseconds an event is kept (``MINID``, and the stream's expiry)."""
        self._meta_ttl_ms = meta_ttl_ms
        self._client: Client | None = None
        self._append: Script[str] | None = None
        self._replay: Script[str] | None = None
        self._latest: Script[str] | None = None
        self._once: Script[str] | None = None
        self._disconnect: Script[str] | None = None

    @property
    def attached(self) -> bool:
        """Whether there is a client to run commands through (the backend is running)."""
        return self._client is not None

    def attach(self, client: Client) -> None:
        """Use ``client`` for every command from now on (until ``detach``)."""
        self._client = client
        self._append = client.register_script(scripts.APPEND)
        self._replay = client.register_script(scripts.REPLAY)
        self._latest = client.register_script(scripts.PUBLISH_LATEST)
        self._once = client.register_script(scripts.PUBLISH_ONCE)
        self._disconnect = client.register_script(scripts.DISCONNECT)

    def detach(self) -> None:
        self._client = self._append = self._replay = self._latest = self._once = None
        self._disconnect = None

    def keys(self, user_id: str) -> UserKeys:
        return routing.user_keys(self.prefix, user_id)

    def idempotency_key(self, user_id: str, key: str) -> str:
        return routing.idempotency_key(self.prefix, user_id, key)

    def user_channel(self, user_id: str) -> str:
        return routing.user_channel(self.prefix, user_id)

    async def append(
        self, user_id: str, fields: dict[str, Any], idempotency_key: str | None = None
    ) -> str | None:
        """Buffer an event and publish it, in one script (which assigns its id); its id. With
        ``idempotency_key``, if that key was published already, what that publish returned
        instead, and nothing is done."""
        timestamp = fields.get("timestamp")
        args: list[str | int] = [
            self.size,
            self.max_age_ms,
            self._meta_ttl_ms,
            codec.encode(fields),
            timestamp if isinstance(timestamp, str) else "",
            self.user_channel(user_id),
            routing.header(user_id),
            secrets.token_hex(8),
            self.publish_command,
        ]
        user_keys = self.keys(user_id)
        keys = [user_keys.stream, user_keys.meta]
        if idempotency_key is not None:
            keys.append(self.idempotency_key(user_id, idempotency_key))
        reply: Any = await _running(self._append)(keys=keys, args=args)
        if len(reply) == 1:  # the key was there
            return _seen(reply[0])
        return make_id(str(reply[0]), str(reply[1]))

    async def publish_latest(
        self, user_id: str, slot: str, text: str, idempotency_key: str | None = None
    ) -> str | None:
        """Keep ``text`` as the user's latest value of ``slot`` and publish it (transient), in
        one script; None. With ``idempotency_key``, if that key was published already, what
        that publish returned instead, and nothing is done."""
        user_keys = self.keys(user_id)
        keys = [user_keys.latest, user_keys.latest_at]
        if idempotency_key is not None:
            keys.append(self.idempotency_key(user_id, idempotency_key))
        args: list[str | int] = [slot, text, self.max_age_ms * 1000, LATEST_PER_USER]
        args += [self.user_channel(user_id), routing.unbuffered(user_id, text), self.max_age_ms]
        args.append(self.publish_command)
        return _seen(await _running(self._latest)(keys=keys, args=args))

    async def publish_once(self, user_id: str, idempotency_key: str, text: str) -> str | None:
        """Publish a transient event of ``user_id`` unless ``idempotency_key`` was published
        already (then return what that publish returned); None."""
        keys = [self.idempotency_key(user_id, idempotency_key)]
        message = routing.unbuffered(user_id, text)
        args: list[str | int] = [self.max_age_ms, self.user_channel(user_id), message]
        args.append(self.publish_command)
        return _seen(await _running(self._once)(keys=keys, args=args))

    async def publish(self, user_id: str | None, text: str) -> None:
        """Publish an event that is not buffered: a transient one of ``user_id`` on its channel,
        or one for every stream (None) on the channel of every node."""
        if self._client is None:
            raise _not_running()
        message = routing.unbuffered(user_id, text)
        if user_id is None:
            await self._client.publish(self.channel, message)
        elif self.sharded:
            await self._client.spublish(self.user_channel(user_id), message)
        else:
            await self._client.publish(self.user_channel(user_id), message)

    async def publish_to_shards(self, channels: list[str], text: str) -> None:
        """Publish an event for every stream on a cluster: on each shard's channel of it, all
        at once (each shard's copy is published even if another's fails; then that failure
        is raised)."""
        client = self._client
        if client is None:
            raise _not_running()
        message = routing.unbuffered(None, text)
        failures: list[Exception] = []

        async def publish(channel: str) -> None:
            try:
                await client.spublish(channel, message)
            except Exception as exc:  # (raised below, after the others)
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for channel in channels:
                tg.start_soon(publish, channel)
        if failures:
            raise failures[0]

    async def disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Publish a disconnect on the user's channel and the channel of every node, in one
        script (see ``routing``).

        :raises ValueError: a code or reason no disconnect may have.
        """
        message = routing.disconnection(user_id, code, reason, secrets.token_hex(8))
        args: list[str | int] = [self.user_channel(user_id), self.channel, message]
        args.append(self.publish_command)
        await _running(self._disconnect)(keys=[self.keys(user_id).meta], args=args)

    async def replay(self, user_id: str, resume: ResumePoint | None, latest: bool) -> Replay:
        """The user's position, what follows ``resume`` and, with ``latest``, its latest values
        (see ``backends.base``)."""
        mode, client_epoch, after = "none", "", ORIGIN
        since: datetime | None = None
        if resume is not None and resume.start:
            mode = "all"
        elif resume is not None and resume.since is not None:
            mode, since = "all", resume.since
        elif resume is not None and resume.epoch and parse_stream_id(resume.offset or ""):
            mode, client_epoch, after = "after", resume.epoch, resume.offset or ORIGIN
        elif resume is not None:  # invalid, or an offset that is not a stream id
            mode = "bad"
        args: list[str | int] = [mode if mode != "bad" else "none", client_epoch, after]
        args += [self.max_age_ms, secrets.token_hex(8), self._meta_ttl_ms]
        args += ["1" if latest else "0", self.max_age_ms * 1000]
        reply: Any = await _running(self._replay)(keys=list(self.keys(user_id)), args=args)
        kept = [Published(user_id, str(text)) for text in reply[5] if text is not None]
        epoch, last, trimmed, why = (str(part) for part in reply[:4])
        last_key = parse_stream_id(last) or ORIGIN_KEY
        trimmed_key = parse_stream_id(trimmed) or ORIGIN_KEY
        reason: GapReason = "expired" if why == "expired" else "evicted"
        position, oldest = make_id(epoch, last), make_id(epoch, trimmed)
        events = [
            _published(user_id, epoch, stream_id, body)
            for stream_id, body, timestamp in _entries(reply[4])
            if since is None or codec.timestamp_after(timestamp, since)
        ]
        gap: GapReason | None = None
        if mode == "bad":
            events, gap = [], "unknown"
        elif mode == "after":
            after_key = parse_stream_id(after) or ORIGIN_KEY
            if client_epoch != epoch:
                gap = "epoch"
            elif after_key > last_key:
                events, gap = [], "unknown"
            elif after_key < trimmed_key:
                gap = reason
        # By time: a trimmed event's stream id carries when it was added (Redis' clock).
        elif since is not None and trimmed_key != ORIGIN_KEY and _added_after(trimmed_key, since):
            gap = reason
        if gap is None:
            return Replay(events, position, last_key, latest=kept)
        return Replay(events, position, last_key, False, gap, oldest, kept)


def _entries(reply: Any) -> list[tuple[str, str, str]]:
    """XRANGE's reply as (stream id, encoded event without id, its timestamp) triples."""
    found = []
    for entry in reply:
        values = [str(value) for value in entry[1]]
        fields = dict(zip(values[::2], values[1::2], strict=False))
        found.append((str(entry[0]), fields.get("b", ""), fields.get("t", "")))
    return found


def _published(user_id: str, epoch: str, stream_id: str, body: str) -> Published:
    event_id = make_id(epoch, stream_id)
    key = parse_stream_id(stream_id) or ORIGIN_KEY
    return Published(user_id, codec.with_id(body, event_id), event_id, key)


def _added_after(key: StreamKey, since: datetime) -> bool:
    return key[0] > since.timestamp() * 1000


def _seen(reply: Any) -> str | None:
    """What an idempotency key holds, as the publish returns it: an id, or None (empty: the
    first publish was transient; nil: there was no key)."""
    return str(reply) if reply else None


def _running(script: Script[str] | None) -> Script[str]:
    if script is None:
        raise _not_running()
    return script


def _not_running() -> OSError:
    return OSError("the Redis backend is not running (is the hub entered?)")
