"""The Lua scripts of the Redis backend, and nothing else.

Why the id is assigned here, in Lua: appending an event to its user's stream and publishing it
are one script, which Redis runs atomically. So the order in which events of a user enter the
stream (their stream ids, assigned by ``XADD``) is also the order in which they are published,
and since Redis delivers one channel's messages to every subscriber in publish order, every node
receives each user's events in id order, whichever node published them. Assigning the id in
Python, before or after the append, would leave a window in which another node's event could
be appended or published in between, and nodes could then see two orders.

Neither script touches the event's JSON: the stream and the channel carry the encoding without
``id`` (``codec.encode``), and whoever hands an event to clients adds the id with
``codec.with_id`` (see ``routing`` and ``storage``).

A user's meta hash holds its epoch (``e``), its newest stream id (``l``), the newest stream id
trimmed away (``t``) and why (``w``: ``evicted`` by size, ``expired`` by age). Redis' own
max-deleted-entry-id does not count trimming, so the scripts keep ``t`` themselves; and the meta
hash outlives the stream, so a user idle past the age bound still resumes exactly.
"""

from __future__ import annotations

# Shared by both scripts.
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

APPEND = (
    LIB
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
redis.call('PUBLISH', ARGV[6], ARGV[7] .. '\\n' .. epoch .. '.' .. id .. '\\n' .. ARGV[4])
return id
"""
)
"""Buffer one event and publish it. KEYS: stream, meta. ARGV: size, max_age_ms, meta_ttl_ms,
the encoded event without id, its timestamp, the channel, the message header (``routing``),
a fresh epoch (used if the user has none). The stream entry's fields: ``b`` the encoded event
without id, ``t`` its own timestamp. Returns the stream id."""

REPLAY = (
    LIB
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
"""A user's position and the entries a resume needs. KEYS: stream, meta. ARGV: mode (``after``:
the entries after a stream id of the client's epoch, else all; ``all``; ``none``), the client's
epoch, the stream id it has, max_age_ms, a fresh epoch, meta_ttl_ms. Returns
``{epoch, newest id, newest trimmed id, why trimmed, entries}``."""
