"""The hub's counters: plain integers, bumped on the paths that own them."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import Any

from .protocol import Close

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


@dataclass
class Counters:
    """Cumulative counts since the hub was created."""

    events_published: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    malformed_messages: int = 0
    hook_errors: int = 0
    rate_limited: int = 0
    oversized_messages: int = 0
    idle_closes: int = 0
    disconnects: int = 0  # streams closed by ``hub.disconnect``
    connections_displaced: int = 0
    reconnection_count: int = 0
    replays_incomplete: int = 0
    replayed_events: int = 0
    slow_consumer_closes: int = 0
    transient_shed: int = 0
    stalled_sends: int = 0  # sends that made no progress for stall_timeout
    refusals: dict[str, int] = field(default_factory=dict)  # sockets refused, by kind
    closes: dict[int, int] = field(default_factory=dict)  # close frames sent, by code

    def count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1

    def closed(self, close: Close) -> None:
        """A stream was sent ``close``: count it by code, and in its own counter if any."""
        self.count(self.closes, close.code)
        if close.counter is not None:
            setattr(self, close.counter, getattr(self, close.counter) + 1)

    def refused(self, close: Close) -> None:
        """A stream was refused with ``close`` before it opened: count it by kind."""
        self.count(self.refusals, close.refusal or str(close.code))

    def as_dict(self) -> dict[str, Any]:
        counts = asdict(self)
        # Derived from the refusals by kind, so that nothing is counted twice.
        not_auth = ("origin", "shutdown", "backend")
        counts["auth_failures"] = sum(n for k, n in self.refusals.items() if k not in not_auth)
        counts["origin_refusals"] = self.refusals.get("origin", 0)
        return counts


class Histogram:
    """Counts of observations per upper bound (``LATENCY_BUCKETS``, then +Inf) and their sum."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
