"""The Lua scripts of the Redis backend, and nothing else.

Why the id is assigned here, in Lua: appending an event to its user's stream and publishing it
are one script, which Redis runs atomically. So the order in which events of a user enter the
stream (their stream ids, assigned by ``XADD``) is also the order in which they are published
on the user's channel, and since Redis delivers one channel's messages to every subscriber in
publish order, every node following the user receives its events in id order, whichever node
published them. Assigning the id in
Python, before or after the append, would leave a window in which another node's event could
be appended or published in between, and nodes could then see two orders.

No script touches the event's JSON: the stream and the channel carry the encoding without
``id`` (``codec.encode``), and whoever hands an event to clients adds the id with
``codec.with_id`` (see ``routing`` and ``storage``).

A user's meta hash holds its epoch (``e``), its newest stream id (``l``), the newest stream id
trimmed away (``t``) and why (``w``: ``evicted`` by size, ``expired`` by age). Redis' own
max-deleted-entry-id does not count trimming, so the scripts keep ``t`` themselves; and the meta
hash outlives the stream, so a user idle past the age bound still resumes exactly.

Latest values are kept and published in one script too (``PUBLISH_LATEST``), and read in the
replay's script, so a connecting stream gets either a value (read with its position) or the
live message that replaces it, never neither. ``PRESENCE`` writes one node's presence counts.

Idempotency keys (``routing.idempotency_key``) are read and written by the script that
publishes (``APPEND``, ``PUBLISH_LATEST``, and ``PUBLISH_ONCE`` for a transient event): a key
found means a publish of it already happened, and the script returns what that one returned
and does nothing else; otherwise it publishes and records the key (``PX`` max_age). Being in
the same script, two calls racing with one key publish once, on any nodes.

Every script that publishes an event of a user publishes it on the user's channel
(``routing.user_channel``), with the command it is given: ``PUBLISH``, or ``SPUBLISH`` on a
Redis Cluster, where Redis allows it in a script since the channel is in the hash slot of the
script's keys; ``DISCONNECT`` publishes a disconnect there and on the channel every
node subscribes to, with nothing in between (see ``routing``).
"""

from __future__ import annotations

# Shared by APPEND and REPLAY.
LIB = """
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

# Shared by the scripts of latest values: Redis' clock in microseconds, and a score as Redis
# takes it (Lua's own number formatting would round 16 digits away).
LATEST_LIB = """
local function micros()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000000 + tonumber(now[2])
end
local function score(n)
  return string.format('%.0f', n)
end
"""

APPEND = (
    LIB
    + """
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {seen} end
end
local epoch, last, trimmed, why = meta(KEYS[2], ARGV[8])
if redis.call('EXISTS', KEYS[1]) == 0 and newer(last, trimmed) then
  trimmed, why = last, 'expired'
end
local id = redis.call('XADD', KEYS[1], '*', 'b', ARGV[4], 't', ARGV[5])
trimmed, why = trim(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), id, trimmed, why)
redis.call('HSET', KEYS[2], 'l', id, 't', trimmed, 'w', why)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[9], ARGV[6], ARGV[7] .. '\\n' .. epoch .. '.' .. id .. '\\n' .. ARGV[4])
if KEYS[3] then redis.call('SET', KEYS[3], epoch .. '.' .. id, 'PX', ARGV[2]) end
return {epoch, id}
"""
)
"""Buffer one event and publish it. KEYS: stream, meta, and the idempotency key if there is
one. ARGV: size, max_age_ms, meta_ttl_ms, the encoded event without id, its timestamp, the
user's channel, the message header (``routing``), a fresh epoch (used if the user has none),
the command that publishes on the user's channel (``PUBLISH``; ``SPUBLISH`` on a cluster). The
stream entry's fields: ``b`` the encoded event without id, ``t`` its own timestamp. Returns
``{epoch, stream id}``: the event's id; or, if the idempotency key was there, ``{what it
holds}`` (the first publish's id, empty if that was transient) and nothing was done."""

REPLAY = (
    LIB
    + LATEST_LIB
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
local values = {}
if ARGV[7] == '1' then
  local cutoff = '(' .. score(micros() - tonumber(ARGV[8]))
  local slots = redis.call('ZRANGEBYSCORE', KEYS[4], cutoff, '+inf')
  if #slots > 0 then values = redis.call('HMGET', KEYS[3], unpack(slots)) end
end
return {epoch, last, trimmed, why, entries, values}
"""
)
"""A user's position and the entries a resume needs, and its latest values if asked for.
KEYS: stream, meta, latest, latest-at. ARGV: mode (``after``: the entries after a stream id of
the client's epoch, else all; ``all``; ``none``), the client's epoch, the stream id it has,
max_age_ms, a fresh epoch, meta_ttl_ms, ``1`` to read the latest values (else they are not
touched), max_age_us. Returns ``{epoch, newest id, newest trimmed id, why trimmed, entries,
latest values' texts (oldest first)}``."""

PUBLISH_LATEST = (
    LATEST_LIB
    + """
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then return seen end
end
local now, max_age = micros(), tonumber(ARGV[3])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', score(now - max_age))
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', score(now - max_age))
end
local at, newest = now, redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if #newest > 0 and tonumber(newest[2]) >= at then at = tonumber(newest[2]) + 1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], score(at), ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  redis.call('HDEL', KEYS[1], unpack(redis.call('ZRANGE', KEYS[2], 0, over - 1)))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
local ttl_ms = score(math.ceil((at - now + max_age) / 1000))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('PEXPIRE', KEYS[2], ttl_ms)
redis.call(ARGV[8], ARGV[5], ARGV[6])
if KEYS[3] then redis.call('SET', KEYS[3], '', 'PX', ARGV[7]) end
return false
"""
)
"""Keep an event as the user's latest value of a slot, and publish it (transient). KEYS:
latest (slot -> text), latest-at (slot -> when set, in microseconds of Redis' clock, strictly
increasing per user so that the order of updates is kept within a microsecond too), and the
idempotency key if there is one. ARGV: the slot, the event's text, max_age_us, the most slots
kept (the least recently updated go), the user's channel, the message (``routing.unbuffered``),
max_age_ms, the command that publishes on the user's channel. Values set ``max_age`` ago or
earlier are dropped; both keys expire with the newest value. Returns nil; or, if the
idempotency key was there, what it holds (and nothing was done)."""

PUBLISH_ONCE = """
local seen = redis.call('GET', KEYS[1])
if seen then return seen end
redis.call('SET', KEYS[1], '', 'PX', ARGV[1])
redis.call(ARGV[4], ARGV[2], ARGV[3])
return false
"""
"""Publish a transient event unless its idempotency key was there. KEYS: the idempotency key.
ARGV: max_age_ms, the user's channel, the message (``routing.unbuffered``), the command that
publishes on the user's channel. Returns nil; or,
if the key was there, what it holds (and nothing was published)."""

DISCONNECT = """
redis.call(ARGV[4], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return false
"""
"""Publish a disconnect on the user's channel and on every node's channel, with nothing in
between. KEYS: a key of the user's (untouched: it sends the script to the user's shard on a
cluster). ARGV: the user's channel, the channel of every node, the message
(``routing.disconnection``), the command that publishes on the user's channel."""

PRESENCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if ARGV[3] == 'leave' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
if ARGV[3] == 'all' then redis.call('DEL', KEYS[1]) end
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '0' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local ttl = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIREAT', KEYS[2], redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2])
return redis.call('HLEN', KEYS[1])
"""
"""Write one node's presence counts. KEYS: the node's hash (user -> streams), the set of nodes
(node -> when it expires, ms of Redis' clock). ARGV: node id, ttl_ms, mode (``all``: replace
every count; ``some``: set these (0 removes); ``leave``: remove the node), then user, count
pairs. Refreshes the TTL of the node's hash and its place in the set, and drops expired nodes
from the set. Returns how many users the node's hash holds."""
