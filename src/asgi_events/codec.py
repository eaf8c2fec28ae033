"""The JSON wire format: event validation, encoding once per broadcast, decoding, batch frames.

One codec per format: a second one (say msgpack on a subprotocol of its own) would offer the
same functions. Events are encoded as JSON objects whose last character is ``}``; an id is added
to an encoded event without decoding it again (``with_id``), so a backend that assigns ids
where the event is stored (Redis assigns them inside its append script) stores and publishes the
encoding without the id, and every node adds it here, in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidEventError
from .protocol import PONG, RESERVED_PREFIX, parse_timestamp

__all__ = (
    "decode_frame",
    "decode_message",
    "encode",
    "encode_batch",
    "parse_timestamp",
    "prepare",
    "timestamp_after",
    "utc_now_iso",
    "with_id",
    "with_latest",
)

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_quote = json.JSONEncoder(ensure_ascii=False).encode


def utc_now_iso() -> str:
    """The current time as JavaScript's ``Date.toISOString()`` writes it (ms, ``Z``)."""
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def prepare(event: object) -> dict[str, Any]:
    """Check an event and return its fields with ``timestamp`` filled in when absent.

    :raises InvalidEventError: not a mapping with a string ``type``, a reserved type
        (``asgi_events.*``), or an ``id`` field (the protocol's resume point).
    """
    if not isinstance(event, Mapping):
        raise InvalidEventError(f"an event must be a mapping, not {type(event).__name__}")
    kind = event.get("type")
    if not isinstance(kind, str):
        raise InvalidEventError("an event needs a string 'type'")
    if kind.startswith(RESERVED_PREFIX):
        raise InvalidEventError(f"types starting with {RESERVED_PREFIX!r} are asgi-events' own")
    if "id" in event:
        raise InvalidEventError("'id' is reserved: asgi-events gives buffered events their id")
    fields = dict(event)
    if fields.get("timestamp") is None:
        fields["timestamp"] = utc_now_iso()
    return fields


def encode(message: Mapping[str, Any]) -> str:
    """Serialise one message to the JSON text of a frame.

    :raises InvalidEventError: a value is not JSON (or is NaN/Infinity, which browsers reject).
    """
    try:
        return _encoder.encode(message)
    except (TypeError, ValueError) as exc:
        raise InvalidEventError(f"event is not JSON-serialisable: {exc}") from None


def with_id(encoded: str, event_id: str) -> str:
    """``encoded`` (an object from ``encode`` with no ``id``) with ``"id": event_id`` added last."""
    return f"{encoded[:-1]},{_quote('id')}:{_quote(event_id)}}}"


def with_latest(encoded: str) -> str:
    """``encoded`` with ``"latest": true`` added last: a latest value sent on connect."""
    return f"{encoded[:-1]},{_quote('latest')}:true}}"


def encode_batch(texts: Iterable[str]) -> str:
    """One batch frame (``asgi-events.v1.batch``): a JSON array of encoded messages."""
    return f"[{','.join(texts)}]"


def decode_frame(text: str, batch: bool) -> list[dict[str, Any]]:
    """The messages in one received frame: none for ``pong`` or anything that is not JSON
    objects, each element of a batch frame's array, else the one object."""
    if text == PONG:
        return []
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return []
    items = data if batch and isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict)]


def decode_message(text: object) -> dict[str, Any] | None:
    """A client message: the JSON object in ``text``; None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def timestamp_after(text: str, since: datetime) -> bool:
    """Whether the ISO 8601 ``text`` is strictly later than ``since`` (False if unreadable)."""
    timestamp = parse_timestamp(text)
    return timestamp is not None and timestamp > since.astimezone(timezone.utc)
