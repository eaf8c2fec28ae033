"""Prometheus metrics for a hub (extra ``metrics``: prometheus-client).

Nothing is counted on the hot path for this: the collector reads the hub's own counters when
Prometheus scrapes. Expose them on your app's ``/metrics`` with ``instrument(hub)`` (the default
registry), or mount ``metrics_app(hub)``, an ASGI app, wherever you like.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client import CollectorRegistry, make_asgi_app
    from prometheus_client.core import (
        REGISTRY,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover
    raise ImportError("metrics need prometheus-client: pip install 'asgi-events[metrics]'") from exc

if TYPE_CHECKING:
    from .hub import EventHub
    from .types import ASGIApp

_COUNTERS = {
    "events_published": "Events published with broadcast or broadcast_to_all.",
    "messages_sent": "Frames sent to sockets (events, replays, control messages, pongs).",
    "messages_received": "Frames received from clients.",
    "transient_shed": "Transient events dropped for sockets under pressure.",
    "slow_consumer_closes": "Sockets closed with 1013 for not keeping up.",
    "stalled_sends": "Sends stuck for stall_timeout (their sender was replaced).",
    "connections_displaced": "Sockets closed because their user opened too many.",
    "rate_limited": "Sockets closed for sending too many messages.",
    "oversized_messages": "Sockets closed for a message over the size limit.",
    "malformed_messages": "Client messages ignored as not a JSON object.",
    "replayed_events": "Events replayed to reconnecting sockets.",
    "hook_errors": "Calls of the application's hooks that raised.",
    "disconnects": "Sockets closed by hub.disconnect.",
}


class HubCollector(Collector):
    """Reads ``hub.stats()`` and its broadcast latency histogram on each scrape."""

    def __init__(self, hub: EventHub, namespace: str = "asgi_events") -> None:
        self._hub = hub
        self._ns = namespace

    def collect(self) -> Iterator[Metric]:
        ns, hub = self._ns, self._hub
        stats = hub.stats()
        yield GaugeMetricFamily(f"{ns}_sockets", "Open sockets.", stats["total_connections"])
        yield GaugeMetricFamily(f"{ns}_users", "Users with an open socket.", stats["active_users"])
        if "buffered_events" in stats:
            yield GaugeMetricFamily(
                f"{ns}_buffered_events", "Events buffered for replay.", stats["buffered_events"]
            )
        if "latest_values" in stats:
            yield GaugeMetricFamily(
                f"{ns}_latest_values", "Latest values kept (latest_types).", stats["latest_values"]
            )
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"{ns}_{name}", doc, stats[name])
        replays = CounterMetricFamily(
            f"{ns}_replays", "Sockets that asked to resume, by outcome.", labels=["outcome"]
        )
        incomplete = stats["replays_incomplete"]
        replays.add_metric(["complete"], stats["reconnection_count"] - incomplete)
        replays.add_metric(["incomplete"], incomplete)
        yield replays
        refusals = CounterMetricFamily(
            f"{ns}_refusals", "Sockets refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats["refusals"].items()):
            refusals.add_metric([reason], count)
        yield refusals
        closes = CounterMetricFamily(
            f"{ns}_closes", "Close frames sent, by close code.", labels=["code"]
        )
        for code, count in sorted(stats["closes"].items()):
            closes.add_metric([str(code)], count)
        yield closes
        latency = hub.broadcast_latency
        buckets, total = [], 0
        for bound, count in zip((*latency.bounds, float("inf")), latency.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        yield HistogramMetricFamily(
            f"{ns}_broadcast_seconds",
            "Time a broadcast call takes (publishing, buffering and queueing to sockets).",
            buckets=buckets,
            sum_value=latency.sum,
        )


def instrument(
    hub: EventHub, registry: CollectorRegistry = REGISTRY, namespace: str = "asgi_events"
) -> HubCollector:
    """Register the hub's metrics in ``registry`` (prometheus-client's default one)."""
    collector = HubCollector(hub, namespace)
    registry.register(collector)
    return collector


def metrics_app(hub: EventHub, namespace: str = "asgi_events") -> ASGIApp:
    """An ASGI app serving the hub's metrics in Prometheus' text format, on its own registry."""
    registry = CollectorRegistry(auto_describe=True)
    instrument(hub, registry, namespace)
    app: ASGIApp = make_asgi_app(registry)
    return app
