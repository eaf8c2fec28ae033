"""Several nodes on one Redis: replay buffers in Redis Streams, fan-out through Pub/Sub.

Keys, per user (one hash slot per user, so a Redis Cluster works):

- ``<prefix>:{<user>}:events``: a stream of the user's buffered events, trimmed to the buffer's
  size (``MAXLEN``) and age (``MINID``), expiring ``max_age`` after the last event;
- ``<prefix>:{<user>}:meta``: the user's epoch (a random token), newest id, and the newest id
  trimmed away and why; it outlives the stream by ``meta_ttl``. When Redis loses the data (a
  restart without persistence, a flush), the epoch changes with it, so ids of the lost data
  set are recognised as foreign, never misread.

One channel, ``<prefix>:events``, carries every event to every node. Appending an event to
its stream and publishing it are one Lua script, so every node sees each user's events in
the order of their stream ids. An event's id is ``<epoch>.<stream id>``.

A silent partition (no error, no TCP reset: a frozen Redis, dropped packets) would leave a
subscription that looks alive and delivers nothing. So each node also subscribes to a channel
of its own, ``<prefix>:heartbeat:<node>``, publishes a heartbeat there through its command
connection every ``heartbeat_interval`` seconds, and expects it back on its subscription:
Redis delivers a connection's messages in order, so a heartbeat that comes back proves that
everything published before it came back too. When one does not (or cannot be published), the
subscription is treated as lost, exactly as if it had failed with an error.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import sys
from datetime import datetime, timezone
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .. import codec
from ..auth import Handshake
from ..buffer import GapReason
from ..delivery import TransientMessage, durable_message, text_message
from ..errors import BackendUnavailableError
from .base import Deliver, Lost, Replay

try:
    import coredis
    from coredis.patterns.pubsub import PubSub
    from coredis.retry import NoRetryPolicy
except ImportError as exc:  # pragma: no cover
    raise ImportError("RedisBackend needs coredis: pip install 'asgi-events[redis]'") from exc

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("asgi_events")

# While other messages keep arriving on the subscription (it is alive, only busy), a heartbeat
# may come back later than ``heartbeat_timeout``, but at most this many times it.
_BEAT_GRACE = 5

# Shared by both scripts. A user's meta hash holds its epoch ("e"), its newest id ("l"), the
# newest id trimmed away ("t") and why ("w": evicted by size, expired by age). Redis' own
# max-deleted-entry-id does not count trimming, so the scripts keep "t" themselves; and the
# meta hash outlives the stream, so a user idle past the age bound still resumes exactly.
_LIB = """
local function parts(id)
  local ms, n = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(n)
end
local function newer(a, b)
  local am, an = parts(a)
  local bm, bn = parts(b)
  return am > bm or (am == bm and an > bn)
end
local function meta(key, fresh_epoch)
  local m = redis.call('HMGET', key, 'e', 'l', 't', 'w')
  if not m[1] then
    redis.call('HSET', key, 'e', fresh_epoch, 'l', '0-0', 't', '0-0', 'w', 'evicted')
    return fresh_epoch, '0-0', '0-0', 'evicted'
  end
  return m[1], m[2], m[3], m[4]
end
local function trim(stream, size, max_age_ms, last, trimmed, why)
  if redis.call('EXISTS', stream) == 0 then
    if newer(last, trimmed) then return last, 'expired' end  -- it expired whole
    return trimmed, why
  end
  local len = redis.call('XLEN', stream)
  if size and len > size then
    local cut = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - size)
    trimmed, why = cut[#cut][1], 'evicted'
    redis.call('XTRIM', stream, 'MAXLEN', size)
  end
  local now = redis.call('TIME')
  local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - max_age_ms
  if oldest > 0 then
    local old = redis.call('XREVRANGE', stream, '(' .. oldest .. '-0', '-', 'COUNT', 1)
    if #old > 0 then
      if newer(old[1][1], trimmed) then trimmed, why = old[1][1], 'expired' end
      redis.call('XTRIM', stream, 'MINID', oldest)
    end
  end
  return trimmed, why
end
"""

# KEYS: stream, meta. ARGV: size, max_age_ms, meta_ttl_ms, body, timestamp, channel, header,
# fresh epoch.
_APPEND = (
    _LIB
    + """
local epoch, last, trimmed, why = meta(KEYS[2], ARGV[8])
if redis.call('EXISTS', KEYS[1]) == 0 and newer(last, trimmed) then
  trimmed, why = last, 'expired'
end
local id = redis.call('XADD', KEYS[1], '*', 'b', ARGV[4], 't', ARGV[5])
trimmed, why = trim(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), id, trimmed, why)
redis.call('HSET', KEYS[2], 'l', id, 't', trimmed, 'w', why)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local frame = ARGV[4] .. ',"id":"' .. epoch .. '.' .. id .. '"}'
redis.call('PUBLISH', ARGV[6], ARGV[7] .. '\\n' .. id .. '\\n' .. frame)
return id
"""
)

# KEYS: stream, meta. ARGV: mode (after, all, none), client epoch, after id, max_age_ms,
# fresh epoch, meta_ttl_ms.
_REPLAY = (
    _LIB
    + """
local epoch, last, trimmed, why = meta(KEYS[2], ARGV[5])
trimmed, why = trim(KEYS[1], nil, tonumber(ARGV[4]), last, trimmed, why)
redis.call('HSET', KEYS[2], 't', trimmed, 'w', why)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local entries = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[1] == 'after' and ARGV[2] == epoch then
    entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+')
  elseif ARGV[1] ~= 'none' then
    entries = redis.call('XRANGE', KEYS[1], '-', '+')
  end
end
return {epoch, last, trimmed, why, entries}
"""
)


def _stream_key(text: str) -> tuple[int, int] | None:
    """A stream id's order key; None if ``text`` is not one."""
    ms, dash, n = text.partition("-")
    if not (dash and ms.isascii() and ms.isdigit() and n.isascii() and n.isdigit()):
        return None
    if len(ms) > 20 or len(n) > 20:
        return None
    return int(ms), int(n)


class RedisBackend:
    """Buffers and fan-out in Redis, for several nodes (processes or machines) as one hub.

    :param url: a Redis URL, e.g. ``redis://127.0.0.1:6379/0``.
    :param prefix: the prefix of every key and of the channel.
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
    ) -> None:
        if heartbeat_interval is not None and not heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be positive (or None for no heartbeat)")
        if heartbeat_timeout is not None and not heartbeat_timeout > 0:
            raise ValueError("heartbeat_timeout must be positive")
        self.url = url
        self._prefix = prefix
        self._channel = f"{prefix}:events"
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._meta_ttl_ms = max(int(meta_ttl * 1000), 1)
        self._beat_interval = heartbeat_interval
        self._beat_timeout = heartbeat_timeout if heartbeat_timeout is not None else timeout
        self._beat_channel = f"{prefix}:heartbeat:{secrets.token_hex(8)}"
        self._beats = 0  # heartbeats sent; the newest one's number is the message awaited back
        self._beat_back = anyio.Event()  # set when the newest heartbeat came back
        self._last_seen = 0.0  # when a message last came on the subscription (anyio's clock)
        self._beat_failure: str | None = None  # why the current subscription was given up
        self._size = 200
        self._max_age_ms = 300_000
        self._deliver: Deliver | None = None
        self._lost: Lost | None = None
        self._client: coredis.Redis[str] | None = None  # commands (and heartbeats)
        self._subscriber: coredis.Redis[str] | None = None  # the subscription only
        self._append: Any = None
        self._replay: Any = None
        self.healthy = False
        self._interruptions = 0
        self._last_error: str | None = None

    def bind(
        self, deliver: Deliver, lost: Lost, *, size: int, max_age: float, max_users: int | None
    ) -> None:
        self._deliver, self._lost = deliver, lost
        self._size, self._max_age_ms = size, max(int(max_age * 1000), 1)

    async def start(self, task_group: TaskGroup) -> None:
        # The client lives in a task of the hub's group (its own task group nests there).
        # Returns once subscribed, or after the first failure (then it keeps trying).
        await task_group.start(self._run)

    async def stop(self) -> None:
        self.healthy = False  # the hub then cancels its task group, which closes the client

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # The subscription has a client (a pool) of its own: a connection given up after a
        # missed heartbeat is closed without touching commands in flight on the others, and a
        # connection left half-subscribed after a failed attempt never carries commands. Its
        # connect and handshake are bounded, so attempts against a frozen Redis fail in time.
        subscriber = coredis.Redis[str].from_url(
            self.url,
            decode_responses=True,
            connect_timeout=self._timeout,
            stream_timeout=self._timeout,
        )
        try:
            async with (
                # No retries: appending is not idempotent, and a retry after a reply lost on
                # the way could append an event twice. A failed call raises to the caller.
                coredis.Redis[str].from_url(
                    self.url, decode_responses=True, retry_policy=NoRetryPolicy()
                ) as client,
                subscriber,
            ):
                self._client, self._subscriber = client, subscriber
                self._append = client.register_script(_APPEND)
                self._replay = client.register_script(_REPLAY)
                try:
                    await self._subscribe(task_status)
                finally:
                    self._client = self._subscriber = None
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

    async def publish(self, user_id: str, fields: dict[str, Any], transient: bool) -> None:
        header = json.dumps(user_id)
        if transient:
            await self._call(self._publish, f"{header}\n\n{codec.encode(fields)}")
            return
        body = codec.encode(fields)[:-1]  # the script appends ',"id":"…"}'
        keys = self._keys(user_id)
        args = [
            self._size,
            self._max_age_ms,
            self._meta_ttl_ms,
            body,
            fields["timestamp"] if isinstance(fields["timestamp"], str) else "",
            self._channel,
            header,
            secrets.token_hex(8),
        ]
        await self._call(self._script, self._append, keys, args)

    async def publish_to_all(self, text: str) -> None:
        await self._call(self._publish, f"null\n\n{text}")

    async def replay(self, user_id: str, handshake: Handshake) -> Replay:
        mode, client_epoch, after = "none", "", "0-0"
        since = None
        if handshake.last_event_id is not None:
            client_epoch, _, after = handshake.last_event_id.rpartition(".")
            mode = "after" if client_epoch and _stream_key(after) else "bad"
        elif handshake.last_event_ts is not None:
            since = codec.parse_timestamp(handshake.last_event_ts)
            mode = "all" if since is not None else "bad"
        args: list[str | int] = [mode if mode != "bad" else "none", client_epoch, after]
        args += [self._max_age_ms, secrets.token_hex(8), self._meta_ttl_ms]
        reply = await self._call(self._script, self._replay, self._keys(user_id), args)
        epoch, last, trimmed, why, entries = reply
        last_key = _stream_key(last) or (0, 0)
        trimmed_key = _stream_key(trimmed) or (0, 0)
        reason: GapReason = "expired" if why == "expired" else "evicted"
        position, oldest = f"{epoch}.{last}", f"{epoch}.{trimmed}"
        frames = [
            f'{entry[1][1]},"id":"{epoch}.{entry[0]}"}}'
            for entry in _pairs(entries)
            if since is None or _after(entry[1][3], since)
        ]
        if mode == "bad":
            return Replay([], position, last_key, False, "unknown", oldest)
        if mode == "after":
            after_key = _stream_key(after) or (0, 0)
            if client_epoch != epoch:
                return Replay(frames, position, last_key, False, "epoch", oldest)
            if after_key > last_key:
                return Replay([], position, last_key, False, "unknown", oldest)
            if after_key < trimmed_key:
                return Replay(frames, position, last_key, False, reason, oldest)
        # By time: a trimmed event's stream id carries when it was added (Redis' clock).
        if since is not None and trimmed_key[0] > since.timestamp() * 1000:
            return Replay(frames, position, last_key, False, reason, oldest)
        return Replay(frames, position, last_key)

    async def clear(self) -> None:
        pass  # shared by every node: one node's shutdown must not empty it

    def stats(self) -> dict[str, Any]:
        return {
            "backend": {
                "kind": "redis",
                "healthy": self.healthy,
                "interruptions": self._interruptions,
                "last_error": self._last_error,
            }
        }

    # -- internals -------------------------------------------------------------------------

    def _keys(self, user_id: str) -> list[str]:
        tag = f"{self._prefix}:{{{user_id}}}"
        return [f"{tag}:events", f"{tag}:meta"]

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            with anyio.fail_after(self._timeout):
                return await fn(*args)
        except (TimeoutError, coredis.exceptions.RedisError, OSError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise BackendUnavailableError(f"Redis did not take the request: {exc}") from exc

    async def _publish(self, message: str) -> None:
        if self._client is None:
            raise OSError("the Redis backend is not running (is the hub entered?)")
        await self._client.publish(self._channel, message)

    async def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self._client is None:
            raise OSError("the Redis backend is not running (is the hub entered?)")
        return await script(keys=keys, args=args)

    async def _subscribe(self, task_status: TaskStatus[None]) -> None:
        assert self._subscriber is not None and self._lost is not None
        delay, started = 0.1, False
        while True:
            self._beat_failure = None
            try:
                async with self._subscriber.pubsub(
                    channels=[self._channel]
                    + ([self._beat_channel] if self._beat_interval is not None else []),
                    ignore_subscribe_messages=True,
                    retry_policy=None,
                ) as pubsub:
                    self.healthy, delay = True, 0.1
                    if not started:
                        started = True
                        task_status.started()
                    await self._consume(pubsub)
            except Exception as exc:  # coredis wraps connection errors in exception groups
                cause: BaseException = exc
                while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                    cause = cause.exceptions[0]
                self._last_error = f"{type(cause).__name__}: {cause}"
            if self._beat_failure is not None:  # (the connection closed for it, maybe raising)
                self._last_error = self._beat_failure
            if self.healthy:  # (not when the hub stops: it cancels this task instead)
                self.healthy = False
                self._interruptions += 1
                logger.warning("lost the Redis subscription; closing this node's sockets (1012)")
                await self._lost()
            elif not started:  # Redis is not there yet: the hub starts anyway, refusing sockets
                started = True
                task_status.started()
            await anyio.sleep(random.uniform(0, delay))  # full jitter
            delay = min(delay * 2, self._max_backoff)

    async def _consume(self, pubsub: PubSub[str]) -> None:
        """Deliver what comes on the subscription until it ends or a heartbeat is missed."""
        self._last_seen = anyio.current_time()
        # The watchdog cancels this scope only: never the pubsub's own task group, nor the task.
        async with anyio.create_task_group() as watched:
            if self._beat_interval is not None:
                watched.start_soon(self._watchdog, pubsub, watched.cancel_scope)
            async for message in pubsub:
                self._last_seen = anyio.current_time()
                data = str(message["data"])
                if message["channel"] == self._beat_channel:  # not an event: never delivered
                    if data == str(self._beats):
                        self._beat_back.set()
                    continue
                await self._on_message(data)
            watched.cancel_scope.cancel()  # the subscription ended: the watchdog goes with it

    async def _watchdog(self, pubsub: PubSub[str], scope: anyio.CancelScope) -> None:
        """Heartbeats until one is missed; then give the subscription's connection up."""
        reason = await self._heartbeats()
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

    async def _heartbeats(self) -> str:
        """Send heartbeats and wait for each to come back; return why one did not."""
        assert self._beat_interval is not None
        while True:
            await anyio.sleep(self._beat_interval)
            failure = await self._heartbeat()
            if failure is not None:
                return failure

    async def _heartbeat(self) -> str | None:
        """One heartbeat: None once it came back, or why it did not in time."""
        assert self._client is not None
        client, timeout = self._client, self._beat_timeout
        self._beats += 1
        token, back = str(self._beats), anyio.Event()
        self._beat_back = back
        sent = anyio.current_time()
        failed: list[str] = []

        async def publish() -> None:
            try:
                await client.publish(self._beat_channel, token)
            except (coredis.exceptions.RedisError, OSError, TimeoutError) as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
                back.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            # Late only because the subscription is busy (other messages keep coming): wait on.
            latest = sent + _BEAT_GRACE * timeout
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

    async def _on_message(self, data: str) -> None:
        assert self._deliver is not None
        header, _, rest = data.partition("\n")
        stream_id, _, frame = rest.partition("\n")
        try:
            user_id = json.loads(header)
        except ValueError:
            user_id = 0
        key = _stream_key(stream_id)
        if (
            not (user_id is None or isinstance(user_id, str))
            or not frame
            or (stream_id and not key)
        ):
            logger.warning("ignored a message on %s not published by asgi-events", self._channel)
            return
        if user_id is None:
            await self._deliver(None, text_message(frame))
        elif key is not None:
            await self._deliver(user_id, durable_message(frame, key))
        else:
            await self._deliver(user_id, text_message(frame, TransientMessage))


def _pairs(entries: Any) -> list[tuple[str, list[str]]]:
    """XRANGE's reply as (id, [field, value, ...]) pairs."""
    return [(str(entry[0]), list(entry[1])) for entry in entries]


def _after(text: str, since: datetime) -> bool:
    timestamp = codec.parse_timestamp(text)
    return timestamp is not None and timestamp > since.astimezone(timezone.utc)
