"""The wire protocol in one place: subprotocols, control messages, ids, resume points, closes.

Everything a client and the server must agree on is named here once; the server, the Python
client and (checked by a test) the browser client all follow it. ``CLOSES`` is the close table:
for each way the server ends or refuses a socket, its code, reason, HTTP status (with
``refusal="http"``), the stats counter it feeds, and what a client should do next.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

SUBPROTOCOL = "asgi-events.v1"
BATCH_SUBPROTOCOL = "asgi-events.v1.batch"  # frames are JSON arrays of messages
SUBPROTOCOLS = (BATCH_SUBPROTOCOL, SUBPROTOCOL)  # preferred first
TOKEN_PROTOCOL_PREFIX = "asgi-events.token."  # a token offered as a subprotocol, never echoed

RESERVED_PREFIX = "asgi_events."  # the types of control messages; events may not use it
READY = "asgi_events.ready"  # after the replay, before live events (subprotocol clients only)

PING = "ping"  # a client's keepalive, answered with PONG (plain text, never JSON)
PONG = "pong"


class Action(enum.Enum):
    """What a client should do after a close."""

    DONE = "done"  # the server is done with this client: stop
    RETRY = "retry"  # reconnect with backoff and full jitter, resuming by id
    REFRESH = "refresh"  # get a fresh token, then reconnect at once
    GIVE_UP = "give_up"  # reconnecting as it is would be refused again: stop and report


@dataclass(frozen=True, slots=True)
class Close:
    """One row of the close table.

    :param code: the WebSocket close code.
    :param reason: the close reason the server sends with it.
    :param action: what a client should do next.
    :param status: the HTTP status of the same refusal in the handshake (``refusal="http"``),
        for refusals only.
    :param refusal: for refusals, the key it is counted under in ``stats()["refusals"]``.
    :param counter: for closes of open streams, the ``stats()`` counter it feeds (besides
        ``closes``, where every close is counted by code).
    """

    code: int
    reason: str
    action: Action
    status: int | None = None
    refusal: str | None = None
    counter: str | None = None


NORMAL = Close(1000, "", Action.DONE)
SHUTDOWN = Close(1001, "Server shutdown", Action.RETRY, 503, "shutdown")
MISSING_TOKEN = Close(1008, "Authentication failed", Action.REFRESH, 401, "missing_token")
AUTH_FAILED = Close(1008, "Authentication failed", Action.REFRESH, 401, "rejected")
ORIGIN_REFUSED = Close(1008, "Origin not allowed", Action.GIVE_UP, 403, "origin")
TOO_MANY_CONNECTIONS = Close(
    1008, "Too many connections", Action.GIVE_UP, counter="connections_displaced"
)
RATE_LIMITED = Close(1008, "Rate limit exceeded", Action.GIVE_UP, counter="rate_limited")
MESSAGE_TOO_BIG = Close(1009, "Message too big", Action.GIVE_UP, counter="oversized_messages")
AUTH_ERROR = Close(1011, "Internal error", Action.RETRY, 500, "error")
AUTH_TIMEOUT = Close(1011, "Authentication timed out", Action.RETRY, 503, "timeout")
SERVICE_RESTART = Close(1012, "Service restart", Action.RETRY, 503, "backend")
SLOW_CONSUMER = Close(1013, "Slow consumer", Action.RETRY, counter="slow_consumer_closes")
TOKEN_EXPIRED = Close(4001, "Token expired", Action.REFRESH, 401, "expired")
IDLE_TIMEOUT = Close(4002, "Idle timeout", Action.RETRY, counter="idle_closes")
DISCONNECTED = Close(4003, "Disconnected", Action.DONE, counter="disconnects")
# Codes a client sees that no asgi-events server sends: the connection broke, or a proxy
# between them failed (1014 "Bad Gateway"). All are worth a retry.
NO_STATUS = Close(1005, "", Action.RETRY)
ABNORMAL = Close(1006, "", Action.RETRY)
BAD_GATEWAY = Close(1014, "", Action.RETRY)

CLOSES: tuple[Close, ...] = (
    NORMAL,
    SHUTDOWN,
    MISSING_TOKEN,
    AUTH_FAILED,
    ORIGIN_REFUSED,
    TOO_MANY_CONNECTIONS,
    RATE_LIMITED,
    MESSAGE_TOO_BIG,
    AUTH_ERROR,
    AUTH_TIMEOUT,
    SERVICE_RESTART,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    IDLE_TIMEOUT,
    DISCONNECTED,
    NO_STATUS,
    ABNORMAL,
    BAD_GATEWAY,
)
"""The close table. ``docs/protocol.md`` shows it; both clients' retry policies follow it."""


def disconnect_close(code: int, reason: str) -> Close:
    """The close that ``hub.disconnect`` sends: 4003 "Disconnected" by default.

    :raises ValueError: ``code`` is not 1000, 1008 or in 4000-4999, or ``reason`` is longer
        than a close frame allows (123 bytes of UTF-8).
    """
    if code not in (1000, 1008) and not 4000 <= code <= 4999:
        raise ValueError(f"a disconnect's code must be 1000, 1008 or 4000-4999, not {code}")
    if len(reason.encode("utf-8")) > 123:
        raise ValueError("a close reason may have 123 bytes of UTF-8 at most")
    if (code, reason) == (DISCONNECTED.code, DISCONNECTED.reason):
        return DISCONNECTED
    return Close(code, reason, client_action(code, reason), counter="disconnects")


def client_action(code: int, reason: str) -> Action:
    """What a client should do after a close with ``code`` and ``reason``.

    A code whose rows all agree decides alone (1011 is a retry whatever its reason); 1008 is
    decided by its reason. A code or reason not in the table: give up.
    """
    rows = [row for row in CLOSES if row.code == code]
    actions = {row.action for row in rows}
    if len(actions) == 1:
        return actions.pop()
    return next((row.action for row in rows if row.reason == reason), Action.GIVE_UP)


def codes_for(action: Action) -> frozenset[int]:
    """The close codes that mean ``action`` whatever their reason (e.g. the retry set)."""
    return frozenset(
        row.code for row in CLOSES if row.action is action and client_action(row.code, "") is action
    )


# -- ids and resume points ----------------------------------------------------------------

GapReason = Literal["evicted", "expired", "unknown", "epoch"]
"""Why a resume was not complete (the ready message's ``reason``)."""


def make_id(epoch: str, offset: str | int) -> str:
    """An event id: ``<epoch>.<offset>``, where the backend defines what an offset looks like
    (a counter in memory, a stream id on Redis); only equality of epochs is compared here."""
    return f"{epoch}.{offset}"


def split_id(text: str) -> tuple[str, str] | None:
    """``(epoch, offset)`` of an event id; None if it has no epoch or no offset."""
    epoch, dot, offset = text.rpartition(".")
    if not (dot and epoch and offset):
        return None
    return epoch, offset


def parse_timestamp(value: object) -> datetime | None:
    """Parse an ISO 8601 timestamp to an aware datetime (naive means UTC); None if it is not one."""
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return None
    if value[-1] in "Zz":  # Python 3.10's fromisoformat does not take "Z"
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a client asks to resume from, parsed once for every backend.

    Exactly one of: ``epoch`` and ``offset`` (after the event with that id), ``since`` (after
    the events whose own timestamp is strictly later), ``start`` (every buffered event,
    ``recovered``), or ``invalid`` (a value that is neither:
    nothing is replayed, and the ready message says ``recovered: false``, reason ``unknown``).
    """

    epoch: str | None = None
    offset: str | None = None
    since: datetime | None = None
    invalid: bool = False
    start: bool = False
    """Every buffered event, as complete (``hub.history`` with no ``after``)."""

    @classmethod
    def parse(cls, last_event_id: str | None, last_event_ts: str | None) -> ResumePoint | None:
        """The resume point asked for (``lastEventId`` wins over ``lastEventTs``), or None."""
        if last_event_id:
            parts = split_id(last_event_id)
            return cls(*parts) if parts is not None else cls(invalid=True)
        if last_event_ts:
            since = parse_timestamp(last_event_ts)
            return cls(since=since) if since is not None else cls(invalid=True)
        return None
