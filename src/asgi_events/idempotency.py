"""Idempotent publishes: which keys a retry may carry, and the memory backend's store of them.

``broadcast(user_id, event, idempotency_key=key)`` publishes at most once per user and key
within ``buffer_max_age`` seconds of the first call that published: a retry with the same key
returns what that call returned (the event's id, or None for a transient or latest-value
event) and publishes nothing. So a publish that failed with ``BackendUnavailableError``, and
may have happened all the same, can be retried without ever delivering it twice.

Sans-IO like ``buffer`` and ``latest``: the caller passes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

MAX_KEY_LENGTH = 200
"""Characters an idempotency key may have at most."""

MAX_KEYS = 100_000
"""Keys the memory backend keeps at most (over every user); past that, the oldest goes first."""


def check_key(key: object) -> str:
    """``key`` if it may be an idempotency key: a non-empty ``str`` of at most
    ``MAX_KEY_LENGTH`` characters that is valid Unicode (encodable as UTF-8).

    :raises ValueError: it is not.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"idempotency_key must be a non-empty str of at most {MAX_KEY_LENGTH} characters"
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("idempotency_key must be valid Unicode (no lone surrogates)") from None
    return key


class Seen(NamedTuple):
    """The first publish of a key: when, and what it returned."""

    at: float
    id: str | None


class IdempotencyKeys:
    """The keys of the publishes of the last ``max_age`` seconds, per user: each with what its
    first publish returned. At most ``max_keys`` of them; past that, the oldest goes first (a
    retry of it after that publishes again).

    Keys are kept in the order they were first published, which is the order they expire in:
    a retry that finds its key neither refreshes it nor moves it.
    """

    def __init__(self, *, max_age: float, max_keys: int = MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_age = max_age
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], Seen] = OrderedDict()  # oldest first

    def get(self, user_id: str, key: str, now: float) -> Seen | None:
        """The first publish of ``key`` for ``user_id``, if it is younger than ``max_age``."""
        seen = self._seen.get((user_id, key))
        if seen is not None and seen.at <= now - self.max_age:
            del self._seen[(user_id, key)]
            return None
        return seen

    def record(self, user_id: str, key: str, event_id: str | None, now: float) -> None:
        """``key`` was published for ``user_id`` now and returned ``event_id``."""
        self._seen.pop((user_id, key), None)
        while len(self._seen) >= self.max_keys:
            self._seen.popitem(last=False)
        self._seen[(user_id, key)] = Seen(now, event_id)

    def prune(self, now: float) -> None:
        """Drop every key older than ``max_age``."""
        cutoff = now - self.max_age
        while self._seen and next(iter(self._seen.values())).at <= cutoff:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
