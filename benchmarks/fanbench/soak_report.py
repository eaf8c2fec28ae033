"""Soak mode's results (per bucket, per run) and report: the verdicts (issue 15, item 7) and
the table per bucket."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .common import STALL_RCVBUF, percent
from .report import verdict
from .soak import OFFLINE_S, STALL_MSS


@dataclass
class Bucket:
    """One bucket of the run (a minute; 10 s in short runs), measured at its end."""

    index: int
    end_s: float  # its end, in seconds since the publish request (the last one: after the drain)
    deliveries: int  # live events the healthy clients received in it (replays apart)
    p50_ms: float
    p99_ms: float
    max_ms: float
    published: int  # events the hub published in it (one per user and tick)
    drops: int  # healthy clients we reset
    resumes: int  # reconnections that got their ready message
    replayed: int  # events replayed to them
    server_closed: int  # healthy connections the server closed
    stall_closes: int  # stalled connections found closed by the hub or the server (load side)
    slow_closes: int  # the hub's slow_consumer_closes (1013)
    incomplete: int  # the hub's replays_incomplete (resumes it could not serve completely)
    rss_mb: float  # the server's VmRSS at its end
    sockets: int  # socket file descriptors of the server process at its end
    connections: int  # the hub's total_connections at its end
    server_cpu: float
    load_cpu: float
    other_cpu: float
    lag_p99_ms: float = float("nan")  # how late the publisher's ticks were (by due time)
    lag_max_ms: float = float("nan")


@dataclass
class SoakResult:
    variant: str
    run: int
    client: str
    sockets: int
    healthy: int
    stalled: int
    drops_per_s: int
    events: int  # per healthy client: one per tick
    rate: float
    duration: float
    bucket_s: int
    buckets: list[Bucket]
    lost: int  # events a healthy client never got (stalled clients are not checked)
    out_of_order: int
    duplicates: int
    unexpected: int  # frames that were neither one of our events nor a ready message
    drops: int
    resumes: int
    incomplete: int  # ready messages with recovered false
    replayed: int
    replay_max_ms: float
    reconnect_errors: int  # connection attempts that failed (each retried)
    server_closed: dict[str, int]  # healthy connections the server closed, by close code
    stall_closes: int
    closes: dict[str, int]  # close frames the hub sent over the run, by code
    timed_out: bool
    call_s: float
    server_gc: float  # share of the run the server spent in the garbage collector
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """A healthy or resuming client lost, doubled or reordered an event, a resume was
        incomplete, or the clients were not complete within the drain wait."""
        return bool(
            self.lost or self.out_of_order or self.duplicates or self.incomplete or self.timed_out
        )


def print_bucket(b: Bucket) -> None:
    print(
        f"  bucket {b.index:>2} (to {b.end_s:6.1f} s) {b.deliveries:>9,} deliveries  "
        f"p50 {b.p50_ms:6.1f} ms  p99 {b.p99_ms:7.1f} ms  max {b.max_ms:7.1f} ms  "
        f"published {b.published:,}  drops {b.drops}  resumes {b.resumes} "
        f"(replayed {b.replayed})  server-closed {b.server_closed}  stall closes "
        f"{b.stall_closes} (hub 1013s {b.slow_closes})  RSS {b.rss_mb:.1f} MB  sockets "
        f"{b.sockets} (hub {b.connections})  server CPU {b.server_cpu:.0%}  load CPU "
        f"{b.load_cpu:.0%}  other CPU {percent(b.other_cpu)}",
        flush=True,
    )


RSS_GROWTH_GOAL = 0.05  # after the first bucket (minute), RSS grows by at most 5%
P99_SPREAD_GOAL = 2.0  # p99 per bucket after the first: max / min at most 2x


def soak_verdicts(r: SoakResult) -> list[str]:
    """The three targets, each met or NOT met."""
    first, rest = r.buckets[0], r.buckets[1:]
    lines = []
    if rest:
        growth = r.buckets[-1].rss_mb / first.rss_mb - 1
        peak = max(b.rss_mb for b in rest) / first.rss_mb - 1
        lines.append(
            f"**RSS after the first bucket: {growth:+.1%}** ({first.rss_mb:.1f} MB at the end of "
            f"bucket 1, {r.buckets[-1].rss_mb:.1f} MB at the end; peak {peak:+.1%}) "
            + verdict(growth <= RSS_GROWTH_GOAL, f"<= +{RSS_GROWTH_GOAL:.0%}")
        )
        p99s = [b.p99_ms for b in rest]
        spread = max(p99s) / min(p99s)
        alone = " (one bucket after the first: trivially)" if len(rest) == 1 else ""
        lines.append(
            f"**p99 per bucket after the first, max / min: {spread:.2f}x** ({min(p99s):.1f}-"
            f"{max(p99s):.1f} ms){alone} " + verdict(spread <= P99_SPREAD_GOAL, "<= 2x")
        )
    else:
        lines.append("RSS growth and p99 spread: no bucket after the first (run longer)")
    wrong = r.lost + r.duplicates + r.out_of_order + r.incomplete
    lines.append(
        f"**Events lost / duplicated / out of order, healthy and resuming clients: {r.lost} / "
        f"{r.duplicates} / {r.out_of_order}**; incomplete resumes {r.incomplete} "
        + verdict(wrong == 0 and not r.timed_out, "all 0")
    )
    return lines


def soak_report(
    args: argparse.Namespace, results: list[SoakResult], header: list[str], rate_note: str
) -> str:
    lines = list(header)
    for r in results:
        lines += soak_summary(r, rate_note)
    return "\n".join(lines) + "\n"


def soak_summary(r: SoakResult, rate_note: str) -> list[str]:
    codes = ", ".join(f"{n} x {code}" for code, n in sorted(r.server_closed.items())) or "none"
    hub_closes = ", ".join(f"{n} x {code}" for code, n in sorted(r.closes.items())) or "none"
    lines = [
        "",
        f"N={r.sockets} clients, one per user ({r.healthy} healthy, {r.stalled} stalled); open "
        f"loop at {r.rate:,.1f} ticks/s for {r.duration:g} s, a tick being one buffered event "
        f"per user (`hub.broadcast`): {r.rate * r.sockets:,.0f} events/s, {r.events:,} per "
        f"client. {rate_note} Every second {r.drops_per_s} healthy client(s) reset their TCP "
        f"connection (RST, no close frame) and reconnect {OFFLINE_S[0]:g}-{OFFLINE_S[1]:g} s "
        f"later with `?lastEventId=`; the stalled clients (SO_RCVBUF {STALL_RCVBUF} B, MSS "
        f"{STALL_MSS}) never read, and one the hub or the server closed is reset, reopened and "
        "stalls again. "
        f"Buckets of {r.bucket_s} s; load client {r.client}.",
        "",
        *[f"- {line}" for line in soak_verdicts(r)],
        "",
        f"Drops {r.drops:,}, resumes {r.resumes:,} ({r.replayed:,} events replayed, the latest "
        f"{r.replay_max_ms:.1f} ms after it was due); healthy connections the server closed: "
        f"{codes}; stalled connections found closed (then reset and reopened): {r.stall_closes}; "
        "close frames the "
        f"hub sent: {hub_closes}; failed connection attempts {r.reconnect_errors}; publisher "
        f"{r.call_s:.1f} s; server GC {percent(r.server_gc)} of the run.",
        "",
        "| bucket | to s | deliveries | p50 ms | p99 ms | max ms | publish lag p99/max ms "
        "| published | drops | resumes | replayed | server-closed | stalled closed "
        "| hub 1013 | incomplete | RSS MB | sockets | hub connections | server CPU | load CPU "
        "| other CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---:|---:|---:|---:|",
    ]
    for b in r.buckets:
        lines.append(
            f"| {b.index} | {b.end_s:.1f} | {b.deliveries:,} | {b.p50_ms:.1f} | {b.p99_ms:.1f} "
            f"| {b.max_ms:.1f} | {b.lag_p99_ms:.1f} / {b.lag_max_ms:.1f} | {b.published:,} "
            f"| {b.drops} | {b.resumes} | {b.replayed} | {b.server_closed} | {b.stall_closes} "
            f"| {b.slow_closes} | {b.incomplete} | {b.rss_mb:.1f} | {b.sockets} "
            f"| {b.connections} | {b.server_cpu:.0%} | {b.load_cpu:.0%} "
            f"| {percent(b.other_cpu)} |"
        )
    if r.notes:
        lines += ["", "Notes: " + "; ".join(r.notes) + "."]
    return lines
