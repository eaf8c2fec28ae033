"""Event validation and one-time JSON encoding; ISO 8601 timestamps."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidEventError

RESERVED_PREFIX = "asgi_events."  # control messages' types
_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def utc_now_iso() -> str:
    """The current time as JavaScript's ``Date.toISOString()`` writes it (ms, ``Z``)."""
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
