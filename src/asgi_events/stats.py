"""The hub's counters: plain integers, bumped on the paths that own them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Counters:
    """Cumulative counts since the hub was created."""

    events_published: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    malformed_messages: int = 0
    hook_errors: int = 0
    auth_failures: int = 0
    origin_refusals: int = 0
    rate_limited: int = 0
    oversized_messages: int = 0
    idle_closes: int = 0
    connections_displaced: int = 0
    reconnection_count: int = 0
    replays_incomplete: int = 0
    replayed_events: int = 0
    slow_consumer_closes: int = 0
    transient_shed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
