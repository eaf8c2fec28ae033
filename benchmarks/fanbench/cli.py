"""Options, and the interleaving of runs: one server, every variant, one mode per invocation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .cclient import (
    LOAD_CLIENTS,
    choose_load_client,
    deflate_error,
    load_client_description,
    uses_c,
)
from .chart import draw_chart, results_path
from .common import (
    BATCH_VARIANT,
    BENCH_DIR,
    CHILD_MAX_LIFETIME,
    FULL,
    IDLE_SOCKETS,
    LOAD_CPU,
    LOAD_LOOPS,
    MODES,
    QUICK,
    QUICK_IDLE_SOCKETS,
    QUICK_ROUTING_EVENTS,
    QUICK_STALL_MIN_WAIT,
    QUICK_STEADY_DURATION,
    QUICK_STEADY_RATE,
    QUICK_VARIANTS,
    QUIET,
    REDIS_NODES,
    REDIS_VARIANT,
    RESULTS_DIR,
    ROUTING_EVENTS,
    SERVER_CPU,
    SERVERS,
    STALL_MIN_WAIT,
    STALL_WAIT_FACTOR,
    STEADY_DURATION,
    VARIANTS,
    default_load_loop,
    load_loop_description,
    pin_to_cpu,
    raise_nofile,
    run_load,
    variants_for,
    wait_for_quiet,
)
from .procs import REDIS_KINDS, cleanup_on_exit, redis_description
from .report import (
    burst_report,
    idle_report,
    profile_summary,
    save_results,
    source_digest,
    stalled_report,
    steady_report,
)
from .routing import routing_runs
from .routing_report import routing_report
from .runs import IdleResult, RunResult, print_idle, print_run, run_delivery, run_idle
from .serve import UVICORN_WS_CHOICES, serve_main, server_description
from .soak import QUICK_SOAK_DURATION, QUICK_SOAK_RATE, QUICK_SOAK_SOCKETS, SOAK_DURATION
from .soak_report import soak_report
from .soak_run import SoakResult, run_soak

DESCRIPTION = "Fan-out benchmark: asgi-events against a raw ASGI loop and peer libraries."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--server", choices=SERVERS, default="hypercorn-asyncio")
    parser.add_argument("--mode", choices=MODES, default="burst", help="what to measure")
    parser.add_argument(
        "--sockets", type=int, help="N clients, WebSocket or SSE (default 1000; idle 5000)"
    )
    parser.add_argument("--events", type=int, help="M events per burst (default 200)")
    parser.add_argument("--payload", type=int, help="pad bytes per event (default 100)")
    parser.add_argument("--runs", type=int, help="runs per variant (default 3)")
    parser.add_argument("--timeout", type=float, default=120.0, help="delivery wait bound, s")
    parser.add_argument(
        "--rate",
        type=float,
        help="steady: events/s; soak: ticks/s (default: half the raw app's burst rate)",
    )
    parser.add_argument(
        "--duration", type=float, help="steady, soak: seconds of publishing (10; soak 600)"
    )
    parser.add_argument(
        "--uvicorn-ws",
        choices=UVICORN_WS_CHOICES,
        default="auto",
        help="uvicorn's WebSocket implementation (default: uvicorn's own choice)",
    )
    parser.add_argument(
        "--redis",
        choices=REDIS_KINDS,
        default="single",
        help="asgi-events-redis and routing: one redis-server, or a Redis Cluster (3 masters, "
        "3 replicas)",
    )
    parser.add_argument(
        "--load-loop",
        choices=LOAD_LOOPS,
        default=default_load_loop(),
        help="the load process's event loop (default: uvloop where installed)",
    )
    parser.add_argument(
        "--load-client",
        choices=LOAD_CLIENTS,
        default="c",
        help="burst and steady WebSocket runs: the C client (built on first use; default) or "
        "the Python one on --load-loop",
    )
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="the C load client offers permessage-deflate as Chromium does, and inflates",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for the machine to be idle (0: don't)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 20 sockets (idle: 50), 10 events, 1 run, 1 s steady; no Redis but routing",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="burst: cProfile the server from publish to last delivery; print the hot spots",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help="variants to run (default: all that the mode and server support)",
    )
    parser.add_argument(
        "--chart-only", action="store_true", help="redraw the chart from the saved results"
    )
    parser.add_argument(
        "--serve", nargs=3, metavar=("SERVER", "VARIANT", "FD"), help=argparse.SUPPRESS
    )
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--redis-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--redis-cluster", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pin-cpu", type=int, default=SERVER_CPU, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.explicit_variants = args.variants is not None
    args.rate_given = args.rate is not None  # else steady mode calibrates it
    if args.mode == "routing" and set(args.variants or [REDIS_VARIANT]) != {REDIS_VARIANT}:
        parser.error(
            f"routing mode runs {REDIS_VARIANT} only: the other variants are one node without "
            "Redis, with no per-user channels to route"
        )
    args.variants = [v for v in VARIANTS if v in (args.variants or default_variants(args))]
    if args.mode == "soak" and args.variants != ["asgi-events"]:
        parser.error("soak mode runs asgi-events only (the raw loop has no resume)")
    if args.mode not in ("burst", "routing") and REDIS_VARIANT in args.variants:
        parser.error(f"{REDIS_VARIANT} runs in burst and routing modes only")
    if args.redis == "cluster" and not args.serve and not args.chart_only:
        if REDIS_VARIANT not in args.variants:
            parser.error(f"--redis cluster applies to {REDIS_VARIANT} (burst) and routing mode")
    if args.mode != "burst" and args.profile:
        parser.error("--profile is for burst mode")
    apply_defaults(args)
    if deflate_error(args):
        parser.error(str(deflate_error(args)))
    if min(args.sockets, args.events, args.runs) < 1 or args.payload < 0:
        parser.error("--sockets, --events and --runs must be positive, --payload not negative")
    if (args.rate is not None and args.rate <= 0) or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    if args.mode == "soak" and args.duration > CHILD_MAX_LIFETIME - 120:
        parser.error(f"soak --duration: at most {CHILD_MAX_LIFETIME - 120:g} s (server lifetime)")
    return args


def default_variants(args: argparse.Namespace) -> tuple[str, ...]:
    if args.mode == "routing":
        return (REDIS_VARIANT,)
    if args.mode == "soak":
        return ("asgi-events",)
    if args.mode == "idle":  # batching changes nothing on an idle socket
        return tuple(v for v in VARIANTS if v not in (REDIS_VARIANT, BATCH_VARIANT))
    if args.quick or args.mode != "burst":
        return QUICK_VARIANTS
    return VARIANTS


def apply_defaults(args: argparse.Namespace) -> None:
    defaults = QUICK if args.quick else FULL
    if args.mode == "soak":  # one run; --quick: fewer sockets than the other modes' smoke runs
        defaults = (QUICK_SOAK_SOCKETS if args.quick else FULL[0], *defaults[1:3], 1)
    for name, default in zip(("sockets", "events", "payload", "runs"), defaults, strict=True):
        if getattr(args, name) is None:
            if name == "sockets" and args.mode == "idle":
                default = QUICK_IDLE_SOCKETS if args.quick else IDLE_SOCKETS
            if name == "events" and args.mode == "routing":
                default = QUICK_ROUTING_EVENTS if args.quick else ROUTING_EVENTS
            setattr(args, name, default)
    if args.duration is None and args.mode == "soak":
        args.duration = QUICK_SOAK_DURATION if args.quick else SOAK_DURATION
    if args.duration is None:
        args.duration = QUICK_STEADY_DURATION if args.quick else STEADY_DURATION
    args.stall_min_wait = QUICK_STALL_MIN_WAIT if args.quick else STALL_MIN_WAIT


def results_suffix(args: argparse.Namespace) -> str:
    """Quick, profiled, resized or partial runs do not overwrite the real results."""
    suffix = ("-cluster" if args.redis == "cluster" else "") + ("-deflate" if args.deflate else "")
    suffix += "-quick" if args.quick else ""
    suffix += "-profile" if args.profile else ""
    if args.quick:
        return suffix
    sockets = IDLE_SOCKETS if args.mode == "idle" else FULL[0]
    events = ROUTING_EVENTS if args.mode == "routing" else FULL[1]
    if args.mode == "soak":  # (--events means nothing there)
        if (args.sockets, args.payload) != (FULL[0], FULL[2]):
            suffix += f"-n{args.sockets}-p{args.payload}"
    elif (args.sockets, args.events, args.payload) != (sockets, events, FULL[2]):
        suffix += f"-n{args.sockets}-m{args.events}-p{args.payload}"
    if args.server == "uvicorn" and args.uvicorn_ws != "auto":
        suffix += f"-{args.uvicorn_ws}"
    if args.mode in ("steady", "soak") and args.rate_given:
        suffix += f"-r{args.rate:g}"
    if args.mode in ("steady", "soak"):
        default = SOAK_DURATION if args.mode == "soak" else STEADY_DURATION
        suffix += f"-d{args.duration:g}" if args.duration != default else ""
    if args.explicit_variants and args.variants != list(default_variants(args)):
        suffix += "-" + "+".join(args.variants)  # a subset: not the real results either
    return suffix


def report_header(args: argparse.Namespace, pinned: str, nofile: int, digest: str) -> list[str]:
    redis_note = ""
    if REDIS_VARIANT in args.variants:
        publisher = f", a publisher node on CPU {LOAD_CPU}" if args.mode == "routing" else ""
        redis_note = (
            f"; {REDIS_VARIANT}: {REDIS_NODES} nodes and {redis_description(args.redis)}, all "
            f"on CPU {SERVER_CPU}{publisher}"
        )
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.started = started
    command = " ".join(["python", "benchmarks/fanout.py", *sys.argv[1:]])
    return [
        f"# Fan-out {args.mode}: {args.server}{' (quick)' if args.quick else ''}",
        "",
        f"`{command}` — {started}, Python {sys.version.split()[0]}, asgi-events src {digest}, "
        f"{server_description(args.server, args.uvicorn_ws)}, server on CPU {SERVER_CPU}, "
        f"load on {pinned} ({load_loop_description(args.load_loop)}; "
        f"{load_client_description(args)}), "
        f"RLIMIT_NOFILE {nofile}{redis_note}"
        + (", **server under cProfile**" if args.profile else "")
        + ".",
    ]


R = TypeVar("R", RunResult, IdleResult, SoakResult)


def quiet_then(args: argparse.Namespace, run: Callable[[], Coroutine[Any, Any, R]]) -> R:
    """Wait (bounded) for a quiet machine, then run; note it if the machine never was."""
    busy = wait_for_quiet(args.quiet_wait)
    result = run_load(args.load_loop, run())
    if busy > QUIET:
        result.notes.append(f"machine busy before the run ({busy:.0%} of a core)")
    return result


def burst_runs(args: argparse.Namespace, variants: list[str]) -> list[RunResult]:
    results: list[RunResult] = []
    for run in range(1, args.runs + 1):
        for variant in variants:
            paths = profile_paths(args, variant, run) if args.profile else None
            result = quiet_then(args, partial(run_delivery, args.server, variant, run, args, paths))
            results.append(result)
            print_run(result)
    return results


def profile_paths(args: argparse.Namespace, variant: str, run: int) -> list[Path]:
    labels = [variant]
    if variant == REDIS_VARIANT:
        labels = [f"{variant}-node{k}" for k in range(1, REDIS_NODES + 1)]
    paths = [RESULTS_DIR / f"profile-{args.server}-{label}-{run}.pstats.tmp" for label in labels]
    for label, path in zip(labels, paths, strict=True):
        args.profiles.setdefault(label, []).append(path)
    return paths


def calibrate_rate(args: argparse.Namespace) -> str:
    """Steady mode: the rate, unless given, is half the raw app's burst capacity (one burst run
    of raw in this invocation, same N, M and payload)."""
    if args.rate is not None:
        return "Rate given with --rate."
    if args.quick:
        args.rate = QUICK_STEADY_RATE
        return "Quick run: a fixed rate, not calibrated."
    raw = quiet_then(args, partial(run_delivery, args.server, "raw", 0, args))
    print_run(raw)
    args.rate = raw.deliveries_per_s / args.sockets / 2
    flagged = " ".join(n for n in raw.notes if "LOAD-BOUND" in n or "NOISY" in n)
    return (
        f"Rate: half the raw app's capacity, from one burst run of raw in this invocation "
        f"({raw.deliveries_per_s:,.0f} deliveries/s / {args.sockets} sockets / 2)"
        + (f", that run flagged {flagged}" if flagged else "")
        + "."
    )


def soak_rate(args: argparse.Namespace) -> str:
    """Soak mode's rate, unless given: half the raw app's capacity, calibrated as steady mode
    does it (with steady mode's load client); --quick: a fixed low rate."""
    if args.rate is None and args.quick:
        args.rate = QUICK_SOAK_RATE
        return "Quick run: a fixed rate, not calibrated."
    steady = argparse.Namespace(**vars(args))
    steady.mode = "steady"
    if args.rate is None:
        choose_load_client(steady)
    note = calibrate_rate(steady)
    args.rate = steady.rate
    if not args.rate_given:
        client = "the C" if uses_c(steady, "raw") else f"the Python ({args.load_loop})"
        note += f" The calibration run used {client} load client."
    return note


def steady_runs(args: argparse.Namespace, variants: list[str]) -> list[RunResult]:
    events = max(1, round(args.rate * args.duration))
    wait = 3 * args.duration + 30  # far behind schedule: it times out and says so
    results = []
    for run in range(1, args.runs + 1):
        for variant in variants:
            result = quiet_then(
                args,
                partial(
                    run_delivery,
                    args.server,
                    variant,
                    run,
                    args,
                    events=events,
                    rate=args.rate,
                    wait=wait,
                ),
            )
            results.append(result)
            print_run(result)
    return results


def stalled_runs(args: argparse.Namespace, variants: list[str]) -> list[RunResult]:
    """Per variant, pairs of runs without and with stalled clients; the order alternates from
    pair to pair, so that a drift over an invocation favours neither side. A stalled run waits
    a bounded multiple of the window of the latest run without stalled clients."""
    results = []
    for run in range(1, args.runs + 1):
        for variant in variants:
            base_run = partial(run_delivery, args.server, variant, run, args)
            previous = last_base(results, variant)
            hit_first = run % 2 == 0 and previous is not None
            if hit_first:
                hit = stalled_run(args, base_run, previous)
            base = quiet_then(args, base_run)
            print_run(base)
            if not hit_first:
                hit = stalled_run(args, base_run, base)
            results += [base, hit]
    return results


def stalled_run(
    args: argparse.Namespace,
    base_run: Callable[..., Coroutine[Any, Any, RunResult]],
    base: RunResult,
) -> RunResult:
    """``base_run`` with stalled clients, waiting a bounded multiple of ``base``'s window."""
    wait = max(args.stall_min_wait, STALL_WAIT_FACTOR * base.window_s)
    hit = quiet_then(args, partial(base_run, stall=True, wait=wait))
    print_run(hit)
    return hit


def last_base(results: list[RunResult], variant: str) -> RunResult | None:
    runs = [r for r in results if r.variant == variant and not r.stalled]
    return runs[-1] if runs else None


def idle_runs(args: argparse.Namespace, variants: list[str]) -> list[IdleResult]:
    results = []
    for run in range(1, args.runs + 1):
        for variant in variants:
            result = quiet_then(args, partial(run_idle, args.server, variant, run, args))
            results.append(result)
            print_idle(result)
    return results


def write_profiles(args: argparse.Namespace) -> None:
    for label, paths in args.profiles.items():
        text = profile_summary(paths)
        path = RESULTS_DIR / f"profile-{args.server}-{label}.txt"
        path.write_text(text)
        print(f"\n## server profile, {label} (top by tottime, then cumulative)\n")
        print(text[:6000])
        print(f"(full: {path.relative_to(BENCH_DIR.parent)})")
        for p in paths:
            p.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        server, variant, fd = args.serve
        redis = (args.redis_url, args.redis_prefix) if args.redis_url else None
        serve_main(
            server,
            variant,
            int(fd),
            args.profile_to,
            redis,
            args.uvicorn_ws,
            cluster=args.redis_cluster,
            cpu=args.pin_cpu,
        )
        return 0
    if args.chart_only:
        chart = draw_chart()
        print(f"chart: {chart}" if chart else "no saved full results to draw")
        return 0

    variants = variants_for(args.server, args.variants)
    skipped = [v for v in args.variants if v not in variants]
    pinned = pin_to_cpu(LOAD_CPU)
    nofile = raise_nofile(args.sockets + 256)
    choose_load_client(args)
    RESULTS_DIR.mkdir(exist_ok=True)
    digest = source_digest()
    header = report_header(args, pinned, nofile, digest)
    if skipped:
        header += ["", f"Not run on {args.server} (asyncio libraries): {', '.join(skipped)}."]
    print("\n".join(header), flush=True)
    args.profiles = {}

    rate_note = ""
    with cleanup_on_exit():
        if args.mode == "burst":
            results: list[Any] = burst_runs(args, variants)
        elif args.mode == "steady":
            rate_note = calibrate_rate(args)
            print(f"  {rate_note}", flush=True)
            results = steady_runs(args, variants)
        elif args.mode == "stalled":
            results = stalled_runs(args, variants)
        elif args.mode == "routing":
            results = routing_runs(args)
        elif args.mode == "soak":
            rate_note = soak_rate(args)
            print(f"  {rate_note}", flush=True)
            results = [quiet_then(args, partial(run_soak, args))]
        else:
            results = idle_runs(args, variants)

    if source_digest() != digest:
        header += ["", f"**Warning: src/asgi_events changed during the runs ({digest} at start).**"]
    report = make_report(args, results, header, rate_note)
    print()
    print(report)
    suffix = results_suffix(args)
    out = results_path(args.server, args.mode, suffix)
    out.write_text(report)
    if not args.quick:  # quick runs' output is git-ignored (*-quick.md): no JSON for them
        save_results(
            results_path(args.server, args.mode, suffix, "json"),
            args.server,
            args.mode,
            run_meta(args),
            results,
        )
    print(f"written to {out.relative_to(BENCH_DIR.parent)}")
    if not suffix and args.mode != "soak":  # a full run: redraw the chart with it
        chart = draw_chart()
        if chart is not None:
            print(f"chart: {chart.relative_to(BENCH_DIR.parent)}")
    if args.profile:
        write_profiles(args)
    return 1 if any(r.failed for r in results) else 0


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """What the saved JSON records besides the runs."""
    keys = "started sockets events payload runs rate duration uvicorn_ws redis deflate".split()
    return {key: getattr(args, key) for key in keys}


def make_report(
    args: argparse.Namespace, results: list[Any], header: list[str], rate_note: str
) -> str:
    if args.mode == "burst":
        return burst_report(args, results, header)
    if args.mode == "steady":
        return steady_report(args, results, header, rate_note)
    if args.mode == "stalled":
        return stalled_report(args, results, header)
    if args.mode == "routing":
        return routing_report(args, results, header)
    if args.mode == "soak":
        return soak_report(args, results, header, rate_note)
    return idle_report(args, results, header)
