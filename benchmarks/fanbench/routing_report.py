"""The routing mode's report: per case, per node, the events received, CPU and deliveries/s,
and the issue's checks (reported as met / NOT met, never asserted)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .common import (
    LOAD_CPU,
    ROUTING_EVEN_GOAL,
    ROUTING_IDLE_GOAL,
    ROUTING_PUBLISH_TASKS,
    ROUTING_STRAY_GOAL,
    SERVER_CPU,
    percent,
)
from .report import verdict
from .routing import CASES, RoutingResult, median
from .runs import redis_cpu_text


def pair(values: Sequence[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


def routing_report(
    args: argparse.Namespace, results: list[RoutingResult], header: list[str]
) -> str:
    first = results[0]
    lines = [
        *header,
        "",
        f"N={args.sockets} sockets of {first.users} users (1, 1, 2, 2, ... sockets per user), "
        f"node A holds {first.node_users[0]} users ({first.node_sockets[0]} sockets), node B "
        f"{first.node_users[1]} ({first.node_sockets[1]}); --events {args.events} (even: per "
        f"user; one-sided: {2 * args.events} per user of node A), payload {args.payload} B; "
        f"{args.runs} run(s) per case, interleaved. Publisher: a third hub node (no sockets) on "
        f"CPU {LOAD_CPU} with the load process, `hub.broadcast(user_id, event)` in "
        f"{ROUTING_PUBLISH_TASKS} concurrent loops. Nodes A and B and Redis on CPU {SERVER_CPU}.",
        "",
        "Medians per case; pairs are node A / node B. Received: `events_received` of the node's "
        "`stats()['backend']` over the run, as a share of the events published; idle: "
        "`events_received_idle`. CPU: the node's main thread over the window (POST to the last "
        "delivery), as a share of a core, in seconds, and per event received (µs; the "
        "figure that does not depend on the rate the publisher reached).",
        "",
        "| case | events | deliveries/s (A / B) | received A / B | idle A / B | CPU A / B "
        "| CPU s A / B | CPU µs/event A / B | publisher CPU | redis CPU | p50 ms | p99 ms | lost "
        "| ooo | dup | misrouted | load-bound runs | noisy runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    checks: list[str] = []
    for case in CASES:
        runs = [r for r in results if r.case == case]
        if not runs:
            continue
        m = medians(runs)
        lines.append(
            f"| {case} | {m['events']:,.0f} | {m['deliveries']:,.0f} "
            f"({pair(m['node_deliveries'], ',.0f')}) "
            f"| {pair(m['share'], '.1%')} | {pair(m['idle'], '.0f')} "
            f"| {percent(m['cpu'][0])} / {percent(m['cpu'][1])} | {pair(m['cpu_s'], '.4f')} "
            f"| {pair(m['us_per_event'], '.0f')} | {percent(m['publisher_cpu'])} "
            f"| {percent(m['redis_cpu'])} "
            f"| {m['p50_ms']:.1f} | {m['p99_ms']:.1f} "
            f"| {sum(r.lost for r in runs)} | {sum(r.out_of_order for r in runs)} "
            f"| {sum(r.duplicates for r in runs)} | {sum(r.misrouted for r in runs)} "
            f"| {sum(r.load_bound for r in runs)}/{len(runs)} "
            f"| {sum(r.noisy for r in runs)}/{len(runs)} |"
        )
        checks += case_checks(case, runs, m)
    lines += [line for text in checks for line in ("", text)]
    lines += [
        "",
        "Per run, in the order run (window: the publisher's first event to the last delivery; "
        "publish s: the publisher's loops; channels: users' channels each node was subscribed "
        "to at the start; load CPU and the publisher share CPU 1, above "
        "90% together the run is LOAD-BOUND; a cluster's redis CPU is its masters' sum, each "
        "master's and the replicas' after it):",
        "",
        "| run | case | load client | events | window s | publish s | deliveries/s A / B "
        "| received A / B | idle A / B | channels A / B | publisher received | CPU A / B "
        "| CPU s A / B | CPU µs/event A / B | publisher CPU | redis CPU | p50 ms | p99 ms "
        "| max ms | lost | ooo | dup | misrouted | closed | load CPU | other CPU | notes |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.run} | {r.case} | {r.client} | {r.events:,} | {r.window_s:.3f} "
            f"| {r.publish_call_s:.3f} | {pair(r.node_deliveries_per_s, ',.0f')} "
            f"| {r.node_received[0]:,} / {r.node_received[1]:,} "
            f"| {pair(r.node_received_idle, 'd')} | {pair(r.node_user_channels, 'd')} "
            f"| {r.publisher_received} | {percent(r.node_cpu[0])} / {percent(r.node_cpu[1])} "
            f"| {pair(r.node_cpu_s, '.4f')} "
            f"| {r.cpu_us_per_event(0):.0f} / {r.cpu_us_per_event(1):.0f} "
            f"| {percent(r.publisher_cpu)} "
            f"| {redis_cpu_text(r.redis_cpu, r.redis_cpu_parts, r.redis_replicas_cpu)} "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} "
            f"| {r.lost} | {r.out_of_order} | {r.duplicates} | {r.misrouted} | {r.closed} "
            f"| {r.load_cpu:.0%} | {r.other_cpu:.0%} | {'; '.join(r.notes)} |"
        )
    return "\n".join(lines) + "\n"


def medians(runs: list[RoutingResult]) -> dict[str, Any]:
    def per_node(get: Any) -> list[float]:
        return [median([float(get(r)[k]) for r in runs]) for k in (0, 1)]

    return {
        "events": median([r.events for r in runs]),
        "deliveries": median([r.deliveries_per_s for r in runs]),
        "node_deliveries": per_node(lambda r: r.node_deliveries_per_s),
        "share": per_node(lambda r: [r.received_share(0), r.received_share(1)]),
        "idle": per_node(lambda r: r.node_received_idle),
        "cpu": per_node(lambda r: r.node_cpu),
        "cpu_s": per_node(lambda r: r.node_cpu_s),
        "us_per_event": per_node(lambda r: [r.cpu_us_per_event(0), r.cpu_us_per_event(1)]),
        "publisher_cpu": median([r.publisher_cpu for r in runs]),
        "redis_cpu": median([r.redis_cpu for r in runs]),
        "p50_ms": median([r.p50_ms for r in runs]),
        "p99_ms": median([r.p99_ms for r in runs]),
    }


def case_checks(case: str, runs: list[RoutingResult], m: dict[str, Any]) -> list[str]:
    """The issue's checks, on the worst run (a median could hide one bad run)."""
    if case == "one-sided":
        worst = max(r.received_share(1) for r in runs)
        idle = max(r.node_cpu[1] for r in runs)
        ratio = m["cpu_s"][1] / m["cpu_s"][0] if m["cpu_s"][0] else float("nan")
        return [
            f"**one-sided: node B received at most {worst:.2%} of the events** "
            f"{verdict(worst <= ROUTING_STRAY_GOAL, f'<= {ROUTING_STRAY_GOAL:.0%}')}",
            f"**one-sided: node B's CPU at most {percent(idle)} of a core** "
            f"{verdict(idle <= ROUTING_IDLE_GOAL, f'near idle, <= {ROUTING_IDLE_GOAL:.0%}')}; "
            f"median {m['cpu_s'][1]:.4f} CPU s against node A's {m['cpu_s'][0]:.4f} "
            f"({ratio:.1%} of A's)",
        ]
    worst = max(max(r.received_share(0), r.received_share(1)) for r in runs)
    return [
        f"**even: each node received at most {worst:.1%} of the events** "
        f"{verdict(worst <= ROUTING_EVEN_GOAL, f'<= {ROUTING_EVEN_GOAL:.0%}')}"
    ]
