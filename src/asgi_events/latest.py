"""Latest-value events: which slot an event fills, and the memory store of the values.

An event of a type in ``latest_types`` is live only (no id, never replayed), but the hub keeps
the newest one per user, type and key, its *slot*; a connecting client gets the values kept
after its replay. Sans-IO like ``buffer``: the caller passes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from . import codec

LATEST_PER_USER = 100
"""Slots kept per user at most; past that, the least recently updated one goes first."""

_MISSING = object()


def slot(event_type: str, fields: Mapping[str, Any], path: str) -> str:
    """The slot of an event: its type and the value at the dotted ``path`` of its fields
    (``"payload.jobId"``), or None where the path does not resolve; encoded as JSON.

    :raises InvalidEventError: the value is not JSON.
    """
    value: Any = fields
    for part in path.split(".") if path else ():
        value = value.get(part, _MISSING) if isinstance(value, Mapping) else _MISSING
        if value is _MISSING:
            value = None
            break
    return codec.encode({"type": event_type, "key": value})


class LatestValues:
    """The latest value of each slot of each user, for ``max_age`` seconds at most, at most
    ``LATEST_PER_USER`` slots per user and ``max_users`` users (least recently updated out)."""

    def __init__(self, *, max_age: float, max_users: int | None = None) -> None:
        self.max_age = max_age
        self.max_users = max_users
        # user -> slot -> (when set, text); both least recently updated first
        self._users: OrderedDict[str, OrderedDict[str, tuple[float, str]]] = OrderedDict()

    def set(self, user_id: str, slot: str, text: str, now: float) -> None:
        """Keep ``text`` as the latest value of ``slot``."""
        values = self._users.pop(user_id, None)
        if values is None:
            values = OrderedDict()
            if self.max_users is not None and len(self._users) >= self.max_users:
                self._users.popitem(last=False)
        self._users[user_id] = values
        values.pop(slot, None)
        values[slot] = (now, text)
        if len(values) > LATEST_PER_USER:
            values.popitem(last=False)

    def of(self, user_id: str, now: float) -> list[str]:
        """The user's values younger than ``max_age``, oldest first."""
        values = self._users.get(user_id)
        if values is None:
            return []
        self._expire(user_id, values, now)
        return [text for _, text in values.values()]

    def prune(self, now: float) -> None:
        """Drop every value older than ``max_age``."""
        for user_id, values in list(self._users.items()):
            self._expire(user_id, values, now)

    def __len__(self) -> int:
        return sum(len(values) for values in self._users.values())

    def _expire(
        self, user_id: str, values: OrderedDict[str, tuple[float, str]], now: float
    ) -> None:
        cutoff = now - self.max_age
        while values and next(iter(values.values()))[0] <= cutoff:
            values.popitem(last=False)
        if not values:
            del self._users[user_id]
