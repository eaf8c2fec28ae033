from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pytest

from asgi_events import InvalidEventError
from asgi_events.codec import encode, parse_timestamp, prepare, utc_now_iso


def test_prepare_fills_timestamp_and_keeps_fields() -> None:
    fields = prepare({"type": "JOB_STARTED", "payload": {"jobId": "j1"}})
    assert fields["payload"] == {"jobId": "j1"}
    assert fields["timestamp"].endswith("Z")
    assert parse_timestamp(fields["timestamp"]) is not None


def test_prepare_keeps_a_given_timestamp() -> None:
    assert prepare({"type": "T", "timestamp": "2020-01-01T00:00:00Z"})["timestamp"] == (
        "2020-01-01T00:00:00Z"
    )


@pytest.mark.parametrize("bad", [None, "x", 3, ["type"], {"payload": 1}, {"type": 7}])
def test_prepare_rejects_non_events(bad: object) -> None:
    with pytest.raises(InvalidEventError):
        prepare(bad)


@pytest.mark.parametrize("value", [object(), math.nan, {1j: 2}])
def test_encode_rejects_what_is_not_json(value: object) -> None:
    with pytest.raises(InvalidEventError):
        encode({"type": "T", "payload": value})


def test_encode_is_compact_utf8_json() -> None:
    text = encode({"type": "T", "payload": "é"})
    assert text == '{"type":"T","payload":"é"}'
    assert json.loads(text)["payload"] == "é"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05.678Z", datetime(2026, 1, 2, 3, 4, 5, 678000, timezone.utc)),
        ("2026-01-02T03:04:05+00:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("2026-01-02T03:04:05", datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("2026-01-02", datetime(2026, 1, 2, tzinfo=timezone.utc)),
    ],
)
def test_parse_timestamp(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "Z", "1" * 100, None, 5])
def test_parse_timestamp_rejects(text: object) -> None:
    assert parse_timestamp(text) is None


def test_utc_now_iso_looks_like_javascript() -> None:
    now = utc_now_iso()
    assert len(now) == 24 and now[10] == "T" and now.endswith("Z")


@pytest.mark.parametrize(
    "event",
    [
        {"type": "asgi_events.ready", "payload": {}},
        {"type": "T", "id": "x"},
        {"type": "T", "id": 1},
    ],
)
def test_reserved_types_and_the_id_field_are_refused(event: dict[str, object]) -> None:
    with pytest.raises(InvalidEventError):
        prepare(event)
