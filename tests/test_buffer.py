"""The replay log, synchronously: ids, bounds, lookups by id and by time."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from asgi_events.buffer import ReplayLog

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def fill(log: ReplayLog, user: str, n: int, *, now: float = 0.0, ts: datetime = T0) -> list[str]:
    ids = []
    for _ in range(n):
        seq, event_id = log.assign()
        log.append(user, seq, json.dumps({"id": event_id}), ts, now)
        ids.append(event_id)
    return ids


def ids_of(frames: list[str]) -> list[str]:
    return [json.loads(f)["id"] for f in frames]


def test_ids_increase_per_user_and_are_unique() -> None:
    log = ReplayLog(size=10, max_age=60)
    a = fill(log, "a", 3)
    b = fill(log, "b", 3)
    assert len(set(a + b)) == 6
    seqs = [int(i.rsplit(".", 1)[1]) for i in a]
    assert seqs == sorted(seqs)


@pytest.mark.parametrize("after", [0, 1, 5, 9, 10])
def test_since_id_returns_exactly_what_follows(after: int) -> None:
    log = ReplayLog(size=10, max_age=60)
    ids = fill(log, "a", 10)
    last = ids[after - 1] if after else log.make_id(0)
    resume = log.since_id("a", last, now=0)
    assert resume.recovered
    assert ids_of(resume.frames) == ids[after:]


def test_size_eviction_is_reported_only_when_the_gap_was_evicted() -> None:
    log = ReplayLog(size=3, max_age=60)
    ids = fill(log, "a", 5)
    assert log.since_id("a", ids[0], now=0).reason == "evicted"  # ids[1] is gone
    complete = log.since_id("a", ids[1], now=0)  # ids[2..4] are all still there
    assert complete.recovered and ids_of(complete.frames) == ids[2:]


def test_age_eviction() -> None:
    log = ReplayLog(size=10, max_age=5)
    old = fill(log, "a", 2, now=0)
    new = fill(log, "a", 2, now=4)
    resume = log.since_id("a", old[0], now=5.5)
    assert not resume.recovered and resume.reason == "expired"
    assert ids_of(resume.frames) == new
    assert log.since_id("a", old[1], now=5.5).recovered


def test_foreign_epoch_replays_everything_but_is_not_recovered() -> None:
    earlier = ReplayLog(size=10, max_age=60)
    foreign = fill(earlier, "a", 1)[0]
    log = ReplayLog(size=10, max_age=60)
    ids = fill(log, "a", 2)
    resume = log.since_id("a", foreign, now=0)
    assert (resume.recovered, resume.reason, ids_of(resume.frames)) == (False, "epoch", ids)


@pytest.mark.parametrize("bad", ["", "nodot", "x.y", ".5", "e.-1", "e.1e3", "e.²", "e." + "9" * 30])
def test_malformed_ids_replay_nothing(bad: str) -> None:
    log = ReplayLog(size=10, max_age=60, epoch="e")
    fill(log, "a", 2)
    resume = log.since_id("a", bad, now=0)
    assert (resume.frames, resume.recovered, resume.reason) == ([], False, "unknown")


def test_id_from_the_future_or_another_user_is_unknown() -> None:
    log = ReplayLog(size=10, max_age=60)
    ids = fill(log, "a", 2)
    assert log.since_id("a", log.make_id(99), now=0).reason == "unknown"
    assert log.since_id("b", ids[0], now=0).reason == "unknown"  # b never had an event
    assert log.since_id("b", log.make_id(0), now=0).recovered


def test_position_is_the_newest_id_or_the_origin() -> None:
    log = ReplayLog(size=2, max_age=60)
    assert log.position("a") == log.make_id(0)
    ids = fill(log, "a", 3)
    assert log.position("a") == ids[-1]


def test_since_timestamp_is_strictly_after() -> None:
    log = ReplayLog(size=10, max_age=60)
    ids = [fill(log, "a", 1, ts=T0 + timedelta(seconds=i))[0] for i in range(4)]
    resume = log.since_timestamp("a", T0 + timedelta(seconds=1), now=0)
    assert resume.recovered and ids_of(resume.frames) == ids[2:]


def test_since_timestamp_reports_evicted_newer_events() -> None:
    log = ReplayLog(size=2, max_age=60)
    for i in range(4):
        fill(log, "a", 1, ts=T0 + timedelta(seconds=i))
    assert not log.since_timestamp("a", T0, now=0).recovered
    assert log.since_timestamp("a", T0 + timedelta(seconds=1), now=0).recovered


def test_prune_and_stats() -> None:
    log = ReplayLog(size=10, max_age=5)
    fill(log, "a", 3, now=0)
    fill(log, "b", 1, now=3)
    assert log.stats() == (4, 2)
    log.prune(now=6)
    assert log.stats() == (1, 1)


def test_long_runs_compact_and_stay_bounded() -> None:
    log = ReplayLog(size=5, max_age=60)
    ids = fill(log, "a", 1000)
    assert log.stats() == (5, 1)
    assert ids_of(log.since_id("a", ids[-3], now=0).frames) == ids[-2:]
    assert log.held("a") < 200
