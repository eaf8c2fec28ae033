"""The replay log: per-user buffered frames with ids, size and age bounds, lookups by id and time.

Sans-IO: no awaits, no clock of its own (the caller passes ``now``), so it is tested directly.

Ids are ``"<epoch>.<seq>"``. ``seq`` comes from one counter per log, so ids are strictly
increasing per user and unique within the epoch; the epoch is random per log, so an id from an
earlier server run (or a cleared log) is recognised as foreign instead of being misread.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from .protocol import GapReason, make_id, split_id


@dataclass(frozen=True, slots=True)
class Entry:
    """One buffered event: its sequence number, encoded frame and timing."""

    seq: int
    frame: str
    timestamp: datetime | None  # the event's own timestamp, for lastEventTs
    buffered_at: float  # clock reading, for the age bound


@dataclass(frozen=True, slots=True)
class Resume:
    """What a reconnecting client gets: frames to replay, in order, and whether that is complete.

    When not ``recovered``, ``reason`` says why and ``oldest`` is the oldest id a client could
    still resume from completely.
    """

    entries: list[Entry]
    recovered: bool
    reason: GapReason | None = None
    oldest: str | None = None

    @property
    def frames(self) -> list[str]:
        """The encoded events to replay, in order."""
        return [entry.frame for entry in self.entries]


class _UserLog:
    """Entries of one user, oldest first; a list with a moving head so lookups can bisect."""

    __slots__ = ("dropped_ts", "dropped_upto", "dropped_why", "entries", "head", "last_seq")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.head = 0  # entries[:head] are dropped
        self.last_seq = 0  # newest seq assigned to this user
        self.dropped_upto = 0  # newest seq dropped (by size or age)
        self.dropped_why: GapReason | None = None
        self.dropped_ts: datetime | None = None  # latest timestamp among dropped entries

    def __len__(self) -> int:
        return len(self.entries) - self.head

    def live(self) -> Iterator[Entry]:
        return (self.entries[i] for i in range(self.head, len(self.entries)))

    def drop_oldest(self, why: GapReason) -> None:
        entry = self.entries[self.head]
        self.head += 1
        self.dropped_upto = entry.seq
        self.dropped_why = why
        if entry.timestamp is not None and (
            self.dropped_ts is None or entry.timestamp > self.dropped_ts
        ):
            self.dropped_ts = entry.timestamp
        if self.head > 64 and self.head * 2 > len(self.entries):
            del self.entries[: self.head]
            self.head = 0

    def newest_ts(self) -> datetime | None:
        return max((e.timestamp for e in self.live() if e.timestamp), default=None)

    def after(self, seq: int) -> list[Entry]:
        return self.entries[bisect_right(self.entries, seq, lo=self.head, key=_seq) :]


def _seq(entry: Entry) -> int:
    return entry.seq


@dataclass(frozen=True, slots=True)
class _Forgotten:
    """What is known of the users of one hash bucket whose logs were dropped whole."""

    upto: int  # the newest seq any of them had
    why: GapReason
    latest: datetime | None  # the latest event timestamp any of them had


_NOTHING_FORGOTTEN = _Forgotten(0, "evicted", None)
FORGOTTEN_BUCKETS = 1 << 14


class ReplayLog:
    """Per-user replay buffers bounded by ``size`` events and ``max_age`` seconds, and by
    ``max_users`` users (least recently used first out).

    A user's log is dropped whole when the user is evicted or all its events expired. What
    it had is remembered per hash bucket of user ids (at most ``FORGOTTEN_BUCKETS`` small
    records), so a later resume is still told it lost events; a user sharing a bucket with a
    dropped one may be told so needlessly (conservative, never the other way round).
    """

    def __init__(
        self, *, size: int, max_age: float, max_users: int | None = None, epoch: str | None = None
    ) -> None:
        if size < 0 or max_age < 0 or (max_users is not None and max_users < 1):
            raise ValueError("buffer size and age must not be negative, nor max_users below 1")
        self.size = size
        self.max_age = max_age
        self.max_users = max_users
        self.epoch = epoch or secrets.token_hex(4)
        self._seq = 0
        self._users: dict[str, _UserLog] = {}  # least recently used first
        self._forgotten: dict[int, _Forgotten] = {}

    def make_id(self, seq: int) -> str:
        return make_id(self.epoch, seq)

    def assign(self) -> tuple[int, str]:
        """Take the next sequence number and its id (one left unused is a harmless gap)."""
        self._seq += 1
        return self._seq, self.make_id(self._seq)

    def append(
        self, user_id: str, seq: int, frame: str, timestamp: datetime | None, now: float
    ) -> None:
        """Buffer ``frame`` as event ``seq`` (from ``assign``, newest so far) of ``user_id``."""
        log = self._touch(user_id)
        if log is None:
            log = self._new_log(user_id)
        log.last_seq = seq
        log.entries.append(Entry(seq, frame, timestamp, now))
        while len(log) > self.size:
            log.drop_oldest("evicted")
        self._expire(log, now)

    def position(self, user_id: str) -> str:
        """The id up to which a client that has everything so far is current."""
        return self.make_id(self.last_seq(user_id))

    def last_seq(self, user_id: str) -> int:
        log = self._users.get(user_id)
        return log.last_seq if log is not None else self._forgotten_of(user_id).upto

    def buffered(self, user_id: str, now: float) -> list[Entry]:
        """Every frame buffered for ``user_id`` now, oldest first."""
        log = self._touch(user_id)
        if log is None:
            return []
        self._expire(log, now)
        return list(log.live())

    def since_id(self, user_id: str, last_id: str, now: float) -> Resume:
        """The buffered frames after ``last_id``; ``recovered`` is false if any were lost."""
        epoch, offset = split_id(last_id) or ("", "")
        return self.since(user_id, epoch, offset, now)

    def since(self, user_id: str, epoch: str, offset: str, now: float) -> Resume:
        """The buffered frames after the id ``<epoch>.<offset>`` (see ``since_id``)."""
        log = self._touch(user_id)
        if log is not None:
            self._expire(log, now)
        if log is None:
            forgotten = self._forgotten_of(user_id)
            floor, last_seq, why = forgotten.upto, forgotten.upto, forgotten.why
        else:
            floor, last_seq, why = log.dropped_upto, log.last_seq, log.dropped_why or "evicted"
        oldest = self.make_id(floor)
        if not (epoch and offset.isascii() and offset.isdigit() and len(offset) <= 20):
            return Resume([], recovered=False, reason="unknown", oldest=oldest)
        if epoch != self.epoch:
            # Everything retained is newer than anything of an earlier epoch.
            entries = log.after(0) if log is not None else []
            return Resume(entries, recovered=False, reason="epoch", oldest=oldest)
        seq = int(offset)
        if seq > last_seq:
            return Resume([], recovered=False, reason="unknown", oldest=oldest)
        entries = log.after(seq) if log is not None else []
        if seq < floor:
            return Resume(entries, recovered=False, reason=why, oldest=oldest)
        return Resume(entries, recovered=True)

    def since_timestamp(self, user_id: str, since: datetime, now: float) -> Resume:
        """The buffered frames whose own timestamp is strictly later than ``since``."""
        log = self._touch(user_id)
        if log is None:
            forgotten = self._forgotten_of(user_id)
            if forgotten.latest is not None and forgotten.latest > since:
                oldest = self.make_id(forgotten.upto)
                return Resume([], recovered=False, reason=forgotten.why, oldest=oldest)
            return Resume([], recovered=True)
        self._expire(log, now)
        entries = [e for e in log.live() if e.timestamp is not None and e.timestamp > since]
        if log.dropped_ts is not None and log.dropped_ts > since:
            why = log.dropped_why or "evicted"
            return Resume(entries, False, reason=why, oldest=self.make_id(log.dropped_upto))
        return Resume(entries, recovered=True)

    def prune(self, now: float) -> None:
        """Expire old entries, and drop the logs left empty (lookups also expire lazily)."""
        for user_id, log in list(self._users.items()):
            self._expire(log, now)
            if not len(log):
                self._forget(user_id, log, "expired")

    def held(self, user_id: str) -> int:
        """Entries kept in memory for ``user_id``, dropped ones not yet compacted included."""
        log = self._users.get(user_id)
        return len(log.entries) if log is not None else 0

    def stats(self) -> tuple[int, int]:
        """(buffered events, users with buffered events)."""
        lengths = [len(log) for log in self._users.values()]
        return sum(lengths), sum(1 for n in lengths if n)

    def _touch(self, user_id: str) -> _UserLog | None:
        """The user's log, now the most recently used; None if there is none."""
        log = self._users.pop(user_id, None)
        if log is not None:
            self._users[user_id] = log
        return log

    def _new_log(self, user_id: str) -> _UserLog:
        if self.max_users is not None and len(self._users) >= self.max_users:
            lru = next(iter(self._users))
            self._forget(lru, self._users[lru], "evicted")
        log = self._users[user_id] = _UserLog()
        forgotten = self._forgotten_of(user_id)
        if forgotten.upto:  # this user (or one of its bucket) lost events: say so on resume
            log.last_seq = log.dropped_upto = forgotten.upto
            log.dropped_why = forgotten.why
            log.dropped_ts = forgotten.latest
        return log

    def _forget(self, user_id: str, log: _UserLog, why: GapReason) -> None:
        del self._users[user_id]
        bucket = hash(user_id) & (FORGOTTEN_BUCKETS - 1)
        before = self._forgotten.get(bucket, _NOTHING_FORGOTTEN)
        latest = max(
            (t for t in (before.latest, log.dropped_ts, log.newest_ts()) if t), default=None
        )
        upto = max(before.upto, log.last_seq)
        self._forgotten[bucket] = _Forgotten(upto, "evicted" if before.upto else why, latest)

    def _forgotten_of(self, user_id: str) -> _Forgotten:
        return self._forgotten.get(hash(user_id) & (FORGOTTEN_BUCKETS - 1), _NOTHING_FORGOTTEN)

    def _expire(self, log: _UserLog, now: float) -> None:
        cutoff = now - self.max_age
        while len(log) and log.entries[log.head].buffered_at <= cutoff:
            log.drop_oldest("expired")
