"""Reports: Markdown per mode, and the results saved as JSON (what the chart is drawn from)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pstats
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import (
    BATCH_GOAL,
    BATCH_SUBPROTOCOL,
    BATCH_VARIANT,
    BROADCASTER_VARIANT,
    IDLE_GOAL_KB,
    LOAD_BOUND,
    LOAD_CPU,
    PLAIN_GOAL,
    REDIS_GOAL,
    REDIS_VARIANT,
    SERVER_CPU,
    SOCKETIO_VARIANT,
    SRC_DIR,
    SSE_GOAL,
    SSE_VARIANT,
    STALL_RCVBUF,
    STALL_WAIT_FACTOR,
    STALLED_GOAL,
    STEADY_P99_GOAL,
    VARIANTS,
    percent,
)
from .runs import IdleResult, RunResult, redis_cpu_text
from .wire import bytes_text, report_lines

GOALS = {"asgi-events": PLAIN_GOAL, BATCH_VARIANT: BATCH_GOAL, SSE_VARIANT: SSE_GOAL}


MEDIAN_KEYS = (
    "deliveries_per_s",
    "frames_per_s",
    "deliveries_per_frame",
    "wire_bytes_per_event",
    "p50_ms",
    "p99_ms",
    "server_cpu",
    "server_gc",
    "server_rss_mb",
    "load_cpu",
    "load_cpu_delivering",
    "other_cpu",
)


def median_result(results: list[RunResult]) -> dict[str, float]:
    medians = {k: statistics.median(getattr(r, k) for r in results) for k in MEDIAN_KEYS}
    redis = [r.redis_cpu for r in results if r.redis_cpu is not None]
    medians["redis_cpu"] = statistics.median(redis) if redis else float("nan")
    return medians


def ratio_lines(
    medians: dict[str, dict[str, float]], load_bound: dict[str, int] | None = None
) -> list[str]:
    """The ratios of median deliveries/s: to raw, batched frames to plain ones, and two Redis
    nodes to one node in memory. ``load_bound``: load-bound runs per variant (then the ratio
    says more about the load process than about the server)."""
    rate = {variant: m["deliveries_per_s"] for variant, m in medians.items()}
    bound = load_bound or {}

    def caveat(*variants: str) -> str:
        flagged = [v for v in variants if bound.get(v)]
        if not flagged:
            return ""
        return (
            " — **LOAD-BOUND runs in " + ", ".join(flagged) + ": the load process limited "
            "the rate (a lower bound for the server), not a server figure**"
        )

    def verdict(ratio: float, goal: float) -> str:
        return f" (goal >= {goal:g}x: {'met' if ratio >= goal else 'NOT met'})"

    lines = []
    for variant in VARIANTS[1:]:
        if "raw" in rate and variant in rate:
            ratio = rate[variant] / rate["raw"]
            goal = verdict(ratio, GOALS[variant]) if variant in GOALS else ""
            lines.append(
                f"**{variant} / raw deliveries/s: {ratio:.2f}x**{goal}{caveat(variant, 'raw')}"
            )
    if "asgi-events" in rate and BATCH_VARIANT in rate:
        ratio = rate[BATCH_VARIANT] / rate["asgi-events"]
        lines.append(
            f"**{BATCH_VARIANT} / asgi-events deliveries/s (batched frames / one message per "
            f"frame, same server): {ratio:.2f}x**{caveat(BATCH_VARIANT, 'asgi-events')}"
        )
    if BATCH_VARIANT in rate and SSE_VARIANT in rate:
        ratio = rate[SSE_VARIANT] / rate[BATCH_VARIANT]
        lines.append(
            f"**{SSE_VARIANT} / {BATCH_VARIANT} deliveries/s (SSE body chunks / WebSocket batch "
            f"frames, same server): {ratio:.2f}x**{caveat(SSE_VARIANT, BATCH_VARIANT)}"
        )
    if "asgi-events" in rate and REDIS_VARIANT in rate:
        ratio = rate[REDIS_VARIANT] / rate["asgi-events"]
        lines.append(
            f"**{REDIS_VARIANT} / asgi-events deliveries/s (two nodes on Redis / one node in "
            f"memory, same clients): {ratio:.2f}x**{verdict(ratio, REDIS_GOAL)}"
            f"{caveat(REDIS_VARIANT, 'asgi-events')}"
        )
    return [line for text in lines for line in ("", text)]


def burst_report(args: argparse.Namespace, results: list[RunResult], header: list[str]) -> str:
    lines = [
        *header,
        "",
        f"Median of {args.runs} run(s) per variant; N={args.sockets} sockets, "
        f"M={args.events} events/burst, payload {args.payload} B.",
        "",
        "| variant | deliveries/s (min-max) | frames/s | deliveries/frame | wire B/event "
        "| p50 ms | p99 ms | lost | out-of-order | server CPU | server GC | server peak RSS MB "
        "| redis CPU | load CPU | load CPU delivering | load-bound runs | noisy runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, dict[str, float]] = {}
    load_bound: dict[str, int] = {}
    for variant in VARIANTS:
        runs = [r for r in results if r.variant == variant]
        if not runs:
            continue
        m = medians[variant] = median_result(runs)
        load_bound[variant] = sum(r.load_bound for r in runs)
        rates = [r.deliveries_per_s for r in runs]
        lines.append(
            f"| {variant} | {m['deliveries_per_s']:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {m['frames_per_s']:,.0f} | {m['deliveries_per_frame']:.1f} "
            f"| {bytes_text(m['wire_bytes_per_event'])} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} "
            f"| {sum(r.lost for r in runs)} | {sum(r.out_of_order for r in runs)} "
            f"| {m['server_cpu']:.0%} | {m['server_gc']:.0%} | {m['server_rss_mb']:.1f} "
            f"| {percent(m['redis_cpu'])} "
            f"| {m['load_cpu']:.0%} | {percent(m['load_cpu_delivering'])} "
            f"| {sum(r.load_bound for r in runs)}/{len(runs)} "
            f"| {sum(r.noisy for r in runs)}/{len(runs)} |"
        )
    lines += ratio_lines(medians, load_bound)
    lines += report_lines(args, results)
    if BATCH_VARIANT in medians:
        lines += [
            "",
            f"{BATCH_VARIANT}: the asgi-events server (one node, in memory); its clients offer "
            f"`{BATCH_SUBPROTOCOL.decode()}`, so every frame is a JSON array of the messages "
            "queued for the socket (up to 64 KiB). Deliveries count events, as in the other "
            "variants; frames/s counts the frames that carried events (deliveries/frame is 1 "
            "without batching).",
        ]
    lines += sse_notes(medians)
    lines += peer_notes(medians)
    if REDIS_VARIANT in medians and args.redis == "cluster":
        lines += [
            "",
            f"{REDIS_VARIANT}: two server processes (nodes) on a Redis Cluster (three masters, "
            "a replica each; the nodes use `RedisBackend(url, cluster=True)`), half the clients "
            "on each; node 1 publishes the burst with `broadcast_to_all` (one copy per shard), "
            "node 2 gets it through Redis. Both nodes and all six redis-server processes share "
            f"CPU {SERVER_CPU} (the "
            f"load is on CPU {LOAD_CPU}). Its server CPU, GC and peak RSS are both nodes' sums; "
            "redis CPU is the sum of the three masters' main threads (per run: each master's, "
            "and the replicas' sum, which is not in the redis CPU).",
        ]
    elif REDIS_VARIANT in medians:
        lines += [
            "",
            f"{REDIS_VARIANT}: two server processes (nodes) on one redis-server, half the "
            "clients on each; node 1 publishes the burst with `broadcast_to_all`, node 2 gets "
            f"it through Redis. Both nodes and redis-server share CPU {SERVER_CPU} (the load "
            f"is on CPU {LOAD_CPU}): the same one core as the single in-memory node, so this "
            "is a conservative setup (two real nodes would have a core each). Its server CPU, "
            "GC and peak RSS are both nodes' sums; redis CPU is redis-server's main thread.",
        ]
    lines += [
        "",
        "Per run, in the order run (window: publish start to last delivery; publish call: time "
        "inside the server's publish loop; GC runs: the server's collections per generation; "
        "load CPU delivering: the load process from the first delivery to the last, when it "
        f"has frames to read; above {LOAD_BOUND:.0%} in either load column the run is "
        "LOAD-BOUND; two nodes: CPU and GC summed, RSS per node):",
        "",
        "| run | variant | load client | deliveries/s | frames/s | deliveries/frame "
        "| wire B/event | window s | publish call ms | p50 ms | p99 ms | lost | out-of-order | dup "
        "| closed | server CPU | server GC | GC runs | RSS MB | redis CPU | load CPU "
        "| load CPU delivering | softirq | other CPU | notes |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---"
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rss = "+".join(f"{x:.1f}" for x in r.node_rss_mb)
        lines.append(
            f"| {r.run} | {r.variant} | {r.client or '-'} | {r.deliveries_per_s:,.0f} "
            f"| {r.frames_per_s:,.0f} "
            f"| {r.deliveries_per_frame:.1f} | {bytes_text(r.wire_bytes_per_event)} "
            f"| {r.window_s:.3f} "
            f"| {r.call_ms:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.lost} | {r.out_of_order} "
            f"| {r.duplicates} | {r.closed} | {r.server_cpu:.0%} | {r.server_gc:.0%} "
            f"| {'/'.join(map(str, r.gc_runs))} | {rss} "
            f"| {redis_cpu_text(r.redis_cpu, r.redis_cpu_parts, r.redis_replicas_cpu)} "
            f"| {r.load_cpu:.0%} | {percent(r.load_cpu_delivering)} "
            f"| {r.softirq_cpu:.0%} | {r.other_cpu:.0%} "
            f"| {'; '.join(r.notes)} |"
        )
    return "\n".join(lines) + "\n"


def source_digest() -> str:
    """A short hash of src/asgi_events/**/*.py (backends included), to tell which version of the
    package was measured."""
    digest = hashlib.sha256()
    for path in sorted(SRC_DIR.rglob("*.py")):
        digest.update(path.relative_to(SRC_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def profile_summary(paths: list[Path], limit: int = 25) -> str:
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return "(no profile was written)\n"
    out = io.StringIO()
    stats = pstats.Stats(existing[0], stream=out)
    for path in existing[1:]:
        stats.add(path)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    out.write("\n")
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def sse_notes(variants: dict[str, Any]) -> list[str]:
    if SSE_VARIANT not in variants:
        return []
    return [
        "",
        f"{SSE_VARIANT}: the asgi-events server (one node, in memory); its clients read Server-"
        "Sent Events (`GET /ws?token=…` with `Accept: text/event-stream`) instead of a "
        "WebSocket. The server writes everything queued for a stream as one body chunk (up to "
        "64 KiB; HTTP/1.1 chunked encoding): frames/s counts the chunks that carried events. "
        "The baseline is the same raw WebSocket loop as for the other variants.",
    ]


def peer_notes(medians: dict[str, Any]) -> list[str]:
    lines = []
    if BROADCASTER_VARIANT in medians:
        lines += [
            "",
            f"{BROADCASTER_VARIANT}: a Starlette WebSocket endpoint and `broadcaster` "
            "(`memory://`), as in broadcaster's README: each socket's task subscribes to one "
            "channel and forwards every message with `send_text`; an event is one `publish` "
            "of the pre-encoded JSON text.",
        ]
    if SOCKETIO_VARIANT in medians:
        lines += [
            "",
            f"{SOCKETIO_VARIANT}: `socketio.AsyncServer(async_mode='asgi')` in `socketio.ASGIApp`"
            "; an event is one `emit` to all; the clients speak Engine.IO v4 over a plain "
            'WebSocket (`42["bench.tick",{...}]` frames, pings answered).',
        ]
    return lines


def median_of(runs: list[Any], key: str) -> float:
    values = [getattr(r, key) for r in runs]
    values = [v for v in values if v == v]  # without NaN
    return statistics.median(values) if values else float("nan")


def by_variant(results: list[Any]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for variant in VARIANTS:
        runs = [r for r in results if r.variant == variant]
        if runs:
            grouped[variant] = runs
    return grouped


def flags(runs: list[Any]) -> str:
    """Load-bound and noisy runs of a variant, e.g. ``1/3 load-bound``; empty if none."""
    out = []
    bound = sum(getattr(r, "load_bound", False) for r in runs)
    noisy = sum(r.noisy for r in runs)
    if bound:
        out.append(f"**{bound}/{len(runs)} LOAD-BOUND**")
    if noisy:
        out.append(f"{noisy}/{len(runs)} noisy")
    return ", ".join(out)


def verdict(ok: bool, goal: str) -> str:
    return f"(goal {goal}: {'met' if ok else 'NOT met'})"


def per_run_table(results: list[RunResult], extra: list[str]) -> list[str]:
    """Every run, in the order run; ``extra``: the mode's own columns (RunResult fields)."""
    head = ["run", "variant", "load client", "deliveries/s", "window s", *extra]
    head += ["p50 ms", "p99 ms", "max ms"]
    head += ["lost", "out-of-order", "dup", "closed", "server CPU", "server peak RSS MB"]
    head += ["load CPU", "load CPU delivering", "other CPU", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r.run), r.variant, r.client or "-", f"{r.deliveries_per_s:,.0f}"]
        cells += [f"{r.window_s:.3f}"]
        cells += [format_extra(r, name) for name in extra]
        cells += [f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.max_ms:.1f}"]
        cells += [str(r.lost), str(r.out_of_order), str(r.duplicates), str(r.closed)]
        cells += [f"{r.server_cpu:.0%}", f"{r.server_rss_mb:.1f}", f"{r.load_cpu:.0%}"]
        cells += [percent(r.load_cpu_delivering), f"{r.other_cpu:.0%}", "; ".join(r.notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_extra(r: RunResult, name: str) -> str:
    if name == "stalled":
        return str(r.stalled)
    if name == "rate":
        return f"{r.rate:,.1f}"
    if name == "lag p99/max ms":
        return f"{r.lag_p99_ms:.1f} / {r.lag_max_ms:.1f}"
    if name == "publish call ms":
        return f"{r.call_ms:.1f}"
    if name == "wire B/event":
        return bytes_text(r.wire_bytes_per_event)
    raise ValueError(name)


def steady_report(
    args: argparse.Namespace, results: list[RunResult], header: list[str], rate_note: str
) -> str:
    """Latency at a steady publish rate: p50/p99/max per variant, p99 ratios to raw."""
    grouped = by_variant(results)
    lines = [
        *header,
        "",
        f"Median of {args.runs} run(s) per variant; N={args.sockets} sockets, open-loop "
        f"publishing at {args.rate:,.1f} events/s for {args.duration:g} s "
        f"({round(args.rate * args.duration)} events), payload {args.payload} B. {rate_note}",
        "",
        "Latency: receive time minus the time the event was *due* (start + i/rate), so a publisher "
        "that falls behind adds its lateness (the *publish lag*) to the latency, as it would "
        "for a real application.",
        "",
        "| variant | deliveries/s | wire B/event | p50 ms | p99 ms (min-max) | max ms "
        "| p99 / raw p99 | publish lag p99 / max ms | lost | out-of-order | server CPU | load CPU "
        "| flags |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    raw_p99 = median_of(grouped["raw"], "p99_ms") if "raw" in grouped else float("nan")
    for variant, runs in grouped.items():
        p99 = median_of(runs, "p99_ms")
        p99s = [r.p99_ms for r in runs]
        lines.append(
            f"| {variant} | {median_of(runs, 'deliveries_per_s'):,.0f} "
            f"| {bytes_text(median_of(runs, 'wire_bytes_per_event'))} "
            f"| {median_of(runs, 'p50_ms'):.1f} | {p99:.1f} ({min(p99s):.1f}-{max(p99s):.1f}) "
            f"| {median_of(runs, 'max_ms'):.1f} | {p99 / raw_p99:.2f}x "
            f"| {median_of(runs, 'lag_p99_ms'):.1f} / {median_of(runs, 'lag_max_ms'):.1f} "
            f"| {sum(r.lost for r in runs)} | {sum(r.out_of_order for r in runs)} "
            f"| {median_of(runs, 'server_cpu'):.0%} | {median_of(runs, 'load_cpu'):.0%} "
            f"| {steady_flags(runs, args.sockets * args.rate)} |"
        )
    if "raw" in grouped and "asgi-events" in grouped:
        ratio = median_of(grouped["asgi-events"], "p99_ms") / raw_p99
        lines += [
            "",
            f"**asgi-events p99 / raw p99: {ratio:.2f}x** "
            f"{verdict(ratio <= STEADY_P99_GOAL, f'<= {STEADY_P99_GOAL:g}x')}",
        ]
    if "raw" in grouped and SSE_VARIANT in grouped:
        ratio = median_of(grouped[SSE_VARIANT], "p99_ms") / raw_p99
        lines += ["", f"**{SSE_VARIANT} p99 / raw (WebSocket) p99: {ratio:.2f}x** (no goal set)"]
    lines += report_lines(args, results)
    lines += sse_notes(grouped)
    lines += peer_notes(grouped)
    lines += ["", "Per run, in the order run:", ""]
    lines += per_run_table(results, ["rate", "lag p99/max ms", "wire B/event"])
    return "\n".join(lines) + "\n"


def steady_flags(runs: list[RunResult], offered: float) -> str:
    """``flags``, and **FELL BEHIND** when the variant delivered under 95% of N x rate (then its
    latency grew through the run: it is not a latency at that rate)."""
    out = [flags(runs)] if flags(runs) else []
    behind = sum(r.deliveries_per_s < 0.95 * offered for r in runs)
    if behind:
        out.append(f"**{behind}/{len(runs)} FELL BEHIND**")
    return ", ".join(out)


def stalled_report(args: argparse.Namespace, results: list[RunResult], header: list[str]) -> str:
    """Healthy clients' deliveries/s with stalled clients against the same run without."""
    grouped = by_variant(results)
    stalled = max((r.stalled for r in results), default=0)
    lines = [
        *header,
        "",
        f"Median of {args.runs} pair(s) of runs per variant (without, then with stalled "
        f"clients); N={args.sockets} sockets, of which {stalled} stall (stop reading once open, "
        f"SO_RCVBUF {STALL_RCVBUF} B) in the stalled runs; M={args.events} events/burst, "
        f"payload {args.payload} B. Deliveries/s counts the healthy clients only; a stalled run "
        f"waits at most max({args.stall_min_wait:g} s, {STALL_WAIT_FACTOR:g}x the run without) "
        "and, if it times out, its window ends there.",
        "",
        "| variant | deliveries/s, no stalled clients | healthy deliveries/s, stalled clients "
        "| ratio | timed-out stalled runs | lost (healthy) | flags |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    ratios: dict[str, float] = {}
    for variant, runs in grouped.items():
        base = [r for r in runs if not r.stalled]
        hit = [r for r in runs if r.stalled]
        ratio = median_of(hit, "deliveries_per_s") / median_of(base, "deliveries_per_s")
        ratios[variant] = ratio
        lines.append(
            f"| {variant} | {median_of(base, 'deliveries_per_s'):,.0f} "
            f"| {median_of(hit, 'deliveries_per_s'):,.0f} | {ratio:.2f}x "
            f"| {sum(r.timed_out for r in hit)}/{len(hit)} | {sum(r.lost for r in hit)} "
            f"| {flags(runs)} |"
        )
    if "asgi-events" in ratios:
        ok = ratios["asgi-events"] >= STALLED_GOAL
        raw = f" (raw: {ratios['raw']:.2f}x)" if "raw" in ratios else ""
        lines += [
            "",
            f"**asgi-events, stalled / not stalled: {ratios['asgi-events']:.2f}x**{raw} "
            f"{verdict(ok, f'>= {STALLED_GOAL:g}x')}",
        ]
    if SSE_VARIANT in ratios:
        lines += [
            "",
            f"**{SSE_VARIANT}, stalled / not stalled: {ratios[SSE_VARIANT]:.2f}x** (no goal set; "
            "the stalled SSE clients stop reading their sockets, as the WebSocket ones do)",
        ]
    lines += sse_notes(grouped)
    lines += peer_notes(grouped)
    lines += ["", "Per run, in the order run (stalled: clients that stopped reading):", ""]
    lines += per_run_table(results, ["stalled", "publish call ms"])
    return "\n".join(lines) + "\n"


def idle_report(args: argparse.Namespace, results: list[IdleResult], header: list[str]) -> str:
    """Memory per idle socket: (RSS with N idle sockets - RSS empty) / N."""
    grouped = by_variant(results)
    lines = [
        *header,
        "",
        f"Median of {args.runs} run(s) per variant; N={args.sockets} idle sockets. RSS is the "
        "server's `VmRSS` after `gc.collect()`: empty (after a warm-up of "
        "a few sockets and a small burst, all closed) and with the N sockets connected and "
        "registered.",
        "",
        "| variant | RSS empty MB | RSS with N sockets MB | KB per socket (min-max) "
        "| minus raw, KB per socket | flags |",
        "|---|---:|---:|---:|---:|---|",
    ]
    raw = median_of(grouped["raw"], "per_socket_kb") if "raw" in grouped else float("nan")
    for variant, runs in grouped.items():
        per = [r.per_socket_kb for r in runs]
        lines.append(
            f"| {variant} | {median_of(runs, 'empty_kb') / 1024:.1f} "
            f"| {median_of(runs, 'full_kb') / 1024:.1f} "
            f"| {statistics.median(per):.1f} ({min(per):.1f}-{max(per):.1f}) "
            f"| {statistics.median(per) - raw:+.1f} | {flags(runs)} |"
        )
    if "raw" in grouped and "asgi-events" in grouped:
        extra = median_of(grouped["asgi-events"], "per_socket_kb") - raw
        lines += [
            "",
            f"**asgi-events minus raw: {extra:+.1f} KB per idle socket** "
            f"{verdict(extra <= IDLE_GOAL_KB, f'<= {IDLE_GOAL_KB:g} KB')}",
        ]
    if "raw" in grouped and SSE_VARIANT in grouped:
        extra = median_of(grouped[SSE_VARIANT], "per_socket_kb") - raw
        lines += [
            "",
            f"**{SSE_VARIANT} minus raw (WebSocket): {extra:+.1f} KB per idle stream** (no goal "
            "set; an SSE stream is an HTTP/1.1 response kept open, raw's is a WebSocket)",
        ]
    lines += sse_notes(grouped)
    lines += peer_notes(grouped)
    lines += [
        "",
        "Per run, in the order run:",
        "",
        "| run | variant | load client | RSS empty kB | RSS with N sockets kB | KB per socket "
        "| other CPU | notes |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.run} | {r.variant} | {r.client or '-'} | {r.empty_kb:,} | {r.full_kb:,} "
            f"| {r.per_socket_kb:.2f} "
            f"| {r.other_cpu:.0%} | {'; '.join(r.notes)} |"
        )
    return "\n".join(lines) + "\n"


# -- saved results ----------------------------------------------------------------------------


def save_results(
    path: Path,
    server: str,
    mode: str,
    meta: dict[str, Any],
    results: list[RunResult] | list[IdleResult] | list[Any],
) -> None:
    """The runs as JSON next to the Markdown: what ``--chart-only`` draws from."""
    data = {"server": server, "mode": mode, **meta, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_results(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """The saved metadata and runs (``RunResult``, ``IdleResult`` or ``RoutingResult``)."""
    data = json.loads(path.read_text())
    kind: type[Any] = IdleResult if data["mode"] == "idle" else RunResult
    if data["mode"] == "routing":
        from .routing import RoutingResult

        kind = RoutingResult
    return data, [kind(**r) for r in data.pop("results")]
