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
from typing import Literal

GapReason = Literal["evicted", "expired", "unknown", "epoch"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One buffered event: its sequence number, encoded frame and timing."""

    seq: int
    frame: str
    timestamp: datetime | None  # the event's own timestamp, for lastEventTs
    buffered_at: float  # clock reading, for the age bound


@dataclass(frozen=True, slots=True)
class Resume:
    """What a reconnecting client gets: frames to replay, in order, and whether that is complete."""

    frames: list[str]
    recovered: bool
    reason: GapReason | None = None


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

    def frames_after(self, seq: int) -> list[str]:
        start = bisect_right(self.entries, seq, lo=self.head, key=_seq)
        return [e.frame for e in self.entries[start:]]


def _seq(entry: Entry) -> int:
    return entry.seq


class ReplayLog:
    """Per-user replay buffers bounded by ``size`` events and ``max_age`` seconds."""

    def __init__(self, *, size: int, max_age: float, epoch: str | None = None) -> None:
        if size < 0 or max_age < 0:
            raise ValueError("buffer size and age must not be negative")
        self.size = size
        self.max_age = max_age
        self.epoch = epoch or secrets.token_hex(4)
        self._seq = 0
        self._users: dict[str, _UserLog] = {}

    def make_id(self, seq: int) -> str:
        return f"{self.epoch}.{seq}"

    def assign(self) -> tuple[int, str]:
        """Take the next sequence number and its id (one left unused is a harmless gap)."""
        self._seq += 1
        return self._seq, self.make_id(self._seq)

    def append(
        self, user_id: str, seq: int, frame: str, timestamp: datetime | None, now: float
    ) -> None:
        """Buffer ``frame`` as event ``seq`` (from ``assign``, newest so far) of ``user_id``."""
        log = self._users.get(user_id)
        if log is None:
            log = self._users[user_id] = _UserLog()
        log.last_seq = seq
        log.entries.append(Entry(seq, frame, timestamp, now))
        while len(log) > self.size:
            log.drop_oldest("evicted")
        self._expire(log, now)

    def position(self, user_id: str) -> str:
        """The id up to which a client that has everything so far is current."""
        log = self._users.get(user_id)
        return self.make_id(log.last_seq if log else 0)

    def since_id(self, user_id: str, last_id: str, now: float) -> Resume:
        """The buffered frames after ``last_id``; ``recovered`` is false if any were lost."""
        epoch, _, digits = last_id.rpartition(".")
        log = self._users.get(user_id)
        if log is not None:
            self._expire(log, now)
        if not (epoch and digits.isascii() and digits.isdigit() and len(digits) <= 20):
            return Resume([], recovered=False, reason="unknown")
        if epoch != self.epoch:
            # Everything retained is newer than anything of an earlier epoch.
            return Resume(log.frames_after(0) if log else [], recovered=False, reason="epoch")
        seq = int(digits)
        last_seq = log.last_seq if log else 0
        if seq > last_seq:
            return Resume([], recovered=False, reason="unknown")
        if log is None:
            return Resume([], recovered=True)
        frames = log.frames_after(seq)
        if seq < log.dropped_upto:
            return Resume(frames, recovered=False, reason=log.dropped_why)
        return Resume(frames, recovered=True)

    def since_timestamp(self, user_id: str, since: datetime, now: float) -> Resume:
        """The buffered frames whose own timestamp is strictly later than ``since``."""
        log = self._users.get(user_id)
        if log is None:
            return Resume([], recovered=True)
        self._expire(log, now)
        frames = [e.frame for e in log.live() if e.timestamp is not None and e.timestamp > since]
        if log.dropped_ts is not None and log.dropped_ts > since:
            return Resume(frames, recovered=False, reason=log.dropped_why)
        return Resume(frames, recovered=True)

    def prune(self, now: float) -> None:
        """Drop every expired entry (lookups and appends also expire lazily)."""
        for log in self._users.values():
            self._expire(log, now)

    def stats(self) -> tuple[int, int]:
        """(buffered events, users with buffered events)."""
        lengths = [len(log) for log in self._users.values()]
        return sum(lengths), sum(1 for n in lengths if n)

    def _expire(self, log: _UserLog, now: float) -> None:
        cutoff = now - self.max_age
        while len(log) and log.entries[log.head].buffered_at <= cutoff:
            log.drop_oldest("expired")
