"""Where things are in Redis and how events travel: key and channel names, stream ids, and the
Pub/Sub message format.

Keys, per user (one hash slot per user, so a Redis Cluster works): ``<prefix>:{<user>}:events``
(the stream of buffered events), ``<prefix>:{<user>}:meta`` (epoch, position, what was
trimmed; see ``storage``), ``<prefix>:{<user>}:latest`` (slot -> the text of its latest value),
``<prefix>:{<user>}:latest-at`` (slot -> when it was set; see ``scripts.PUBLISH_LATEST``), and
one string per idempotency key, ``<prefix>:{<user>}:idem:<key>`` (what its first publish
returned: the event's id, empty for a transient one; it expires ``max_age`` after it).
Presence, per node: ``<prefix>:{presence}:node:<node>`` (user -> streams) and the set of nodes
``<prefix>:{presence}:nodes`` (see ``presence``).

Channels:

- ``<prefix>:{<user>}:ch``, one per user, in the user's hash slot (so that sharded Pub/Sub on a
  Redis Cluster could carry it on the shard of the user's keys): every message of that user,
  buffered and transient events, latest values, disconnects. A node subscribes to it while it
  holds a stream of the user, and ``unsubscribe_delay`` seconds more (``following``): so a
  node receives only the events of its own users, however many nodes share the prefix.
- ``<prefix>:events``, which every node subscribes to: ``broadcast_to_all``, and a copy of every
  disconnect (for nodes that do not follow the user: a stream of it may be being admitted
  there; see below).
- ``<prefix>:heartbeat:<node>`` carries one node's heartbeats back to itself (``subscription``);
  on a cluster, each shard has one of the node's, ``<prefix>:heartbeat:{<node>.<n>}`` with the
  first ``n`` whose hash slot the shard serves (``shard_heartbeat_channel``).

On a Redis Cluster (``cluster``) the users' channels are shard channels (``SPUBLISH``, received
with ``SSUBSCRIBE`` from the node serving the user's slot). ``broadcast_to_all`` goes on a shard
channel of every shard, ``<prefix>:events:{<n>}`` (``shard_events_channel``), and a node
delivers each copy to the streams of that shard's users: each copy travels on the same
connection as those users' events, so the order above holds on a cluster too.
``<prefix>:events`` stays a classic channel (a cluster forwards it to every node), for the
copies of disconnects only.

Redis hands a subscriber its messages in the order it ran the publishes, whatever their
channels, so a node receives each user's events in id order, and a ``broadcast_to_all`` after
every event published before it.

A message on the channels of events is an event or a disconnect. An event is three parts
separated by the first two newlines::

    <header>\\n<id>\\n<text>

- ``header``: the user id as JSON (a string; JSON escapes newlines), or ``null`` for every
  stream (``broadcast_to_all``);
- ``id``: a buffered event's id, ``<epoch>.<stream id>``, written by the append script (which
  assigns it: see ``scripts``); empty for a transient event and for ``broadcast_to_all``;
- ``text``: the encoded event. A buffered event's text is its encoding *without* the id (as it
  is stored in the stream): the receiving node adds the id with ``codec.with_id``, so neither
  Lua nor Python splices JSON by hand. Other texts are complete as clients receive them.

A disconnect (``RedisBackend.disconnect``) is five parts separated by the first four
newlines::

    !disconnect\\n<user id as JSON>\\n<code>\\n<nonce>\\n<reason>

where ``code`` is decimal and ``reason`` the rest of the message (it may hold newlines); both are
as ``protocol.disconnect_close`` takes them; ``nonce`` tells one disconnect's copies apart from
another's. One script publishes it on the user's channel, in order with the user's events
(events published before it are handled before it), and the same message on ``<prefix>:events``
right after, so that it also reaches nodes that do not follow the user: those record it for
the streams of the user they are admitting (``revocations``). A node handles the first copy
that reaches it and drops the other by its nonce; and it drops the copy on ``<prefix>:events``
when it follows the user, since the copy on the user's channel is then the one in order with
the user's events (on a cluster the two copies come on different connections, in either
order). (A first part starting with ``!`` is never JSON, so nodes of a version before
disconnects ignore it with a warning.)

Anything else on the channels (published by someone else, or garbled) is ignored with a warning.

Compatibility: nodes of different versions must not share a prefix; upgrade all nodes at once,
or move to a new ``prefix``. Before channels per user, every event went on ``<prefix>:events``:
a node of that version receives no user's event published by a node of this one, and a node of
this one receives every event of that one on the global channel, for every user (correctly
handled, but undoing the routing). Before this message format, a buffered event's message was
``<header>\\n<stream id>\\n<text with id>`` and the stream kept the encoding without its
closing brace: each version would ignore the other's buffered events, and replay what the other
stored wrongly.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from typing import NamedTuple

from ... import codec
from ...protocol import disconnect_close, split_id
from ..base import Published

StreamKey = tuple[int, int]
"""A stream id's order key: (milliseconds, sequence number)."""

ORIGIN = "0-0"
"""The stream id before every event: a user's position before it has one."""
ORIGIN_KEY: StreamKey = (0, 0)

_PART_MAX = 2**64 - 1  # both parts of a stream id are unsigned 64-bit integers


def parse_stream_id(text: str) -> StreamKey | None:
    """A stream id's order key; None if ``text`` is not a stream id Redis would take."""
    ms, dash, n = text.partition("-")
    if not (dash and ms.isascii() and ms.isdigit() and n.isascii() and n.isdigit()):
        return None
    if len(ms) > 20 or len(n) > 20:
        return None
    key = int(ms), int(n)
    return key if max(key) <= _PART_MAX else None


class UserKeys(NamedTuple):
    """The keys of one user's data."""

    stream: str
    """The stream of buffered events."""
    meta: str
    """The hash of epoch, newest id, newest trimmed id and why."""
    latest: str
    """The hash of latest values: slot -> text."""
    latest_at: str
    """The sorted set of latest values' slots, scored by when each was set (microseconds)."""


class Disconnection(NamedTuple):
    """A disconnect as it comes off the channel: close the user's streams on this node."""

    user_id: str
    code: int
    reason: str
    nonce: str = ""


DISCONNECT = "!disconnect"
"""The first part of a disconnect message."""


def user_keys(prefix: str, user_id: str) -> UserKeys:
    tag = f"{prefix}:{{{user_id}}}"
    return UserKeys(f"{tag}:events", f"{tag}:meta", f"{tag}:latest", f"{tag}:latest-at")


def idempotency_key(prefix: str, user_id: str, key: str) -> str:
    """Where the first publish of an idempotency key of ``user_id`` is recorded (in the
    user's hash slot, so the scripts that publish may read and write it)."""
    return f"{prefix}:{{{user_id}}}:idem:{key}"


def presence_keys(prefix: str) -> tuple[str, str]:
    """The set of nodes, and the prefix of each node's hash of counts (one hash slot)."""
    tag = f"{prefix}:{{presence}}"
    return f"{tag}:nodes", f"{tag}:node:"


def events_channel(prefix: str) -> str:
    """The channel every node subscribes to: ``broadcast_to_all``, and disconnects' copies."""
    return f"{prefix}:events"


def user_channel(prefix: str, user_id: str) -> str:
    """The channel of every message of ``user_id`` (in the user's hash slot)."""
    return f"{prefix}:{{{user_id}}}:ch"


def heartbeat_channel(prefix: str, node: str) -> str:
    return f"{prefix}:heartbeat:{node}"


def shard_heartbeat_channel(prefix: str, node: str, serves: Callable[[int], bool]) -> str:
    """A heartbeat channel of ``node`` in a hash slot that ``serves`` (a shard's test)."""
    n = 0
    while not serves(hash_slot(channel := f"{prefix}:heartbeat:{{{node}.{n}}}")):
        n += 1
    return channel


def shard_events_channel(prefix: str, serves: Callable[[int], bool]) -> str:
    """The channel of ``broadcast_to_all`` on a cluster shard: ``<prefix>:events:{<n>}`` with
    the first ``n`` whose hash slot the shard (``serves``) serves."""
    n = 0
    while not serves(hash_slot(channel := f"{prefix}:events:{{{n}}}")):
        n += 1
    return channel


SLOTS = 16384
"""Hash slots in a Redis Cluster."""


def hash_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key``: CRC16 (XMODEM, as ``binascii.crc_hqx``) of its
    hash tag (the part inside its first ``{...}``, if not empty) or of the whole key."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def header(user_id: str | None) -> str:
    """A message's first part: whose streams get it."""
    return json.dumps(user_id)


def unbuffered(user_id: str | None, text: str) -> str:
    """The message of a transient event (``user_id``) or a ``broadcast_to_all`` (None)."""
    return f"{header(user_id)}\n\n{text}"


def disconnection(user_id: str, code: int, reason: str, nonce: str) -> str:
    """The message of a disconnect (``nonce``: a fresh token without newlines).

    :raises ValueError: ``code`` or ``reason`` is not one a disconnect may have.
    """
    disconnect_close(code, reason)
    return f"{DISCONNECT}\n{header(user_id)}\n{code}\n{nonce}\n{reason}"


def decode(data: str) -> Published | Disconnection | None:
    """The event or disconnect a message carries; None if it is not a message of this format."""
    head, _, rest = data.partition("\n")
    if head == DISCONNECT:
        return _disconnection(rest)
    event_id, _, text = rest.partition("\n")
    try:
        user_id = json.loads(head)
    except (ValueError, RecursionError):
        return None
    if not (user_id is None or isinstance(user_id, str)) or not text:
        return None
    if not event_id:
        return Published(user_id, text)
    parts = split_id(event_id)
    key = parse_stream_id(parts[1]) if parts is not None else None
    if user_id is None or key is None or not text.endswith("}"):
        return None
    return Published(user_id, codec.with_id(text, event_id), event_id, key)


def _disconnection(rest: str) -> Disconnection | None:
    head, _, rest = rest.partition("\n")
    code, newline, rest = rest.partition("\n")
    nonce, newline_too, reason = rest.partition("\n")
    try:
        user_id = json.loads(head)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(user_id, str) and newline and newline_too):
        return None
    if not (code.isascii() and code.isdigit()):
        return None
    if len(code) > 4:  # (every valid code has four digits)
        return None
    try:
        disconnect_close(int(code), reason)
    except ValueError:
        return None
    return Disconnection(user_id, int(code), reason, nonce)
