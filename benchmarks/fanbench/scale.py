"""The scale curve behind ``benchmarks/scale.py``: ``fanout.py``'s burst run (``run_delivery``,
the C load client) at several N, for raw, asgi-events and asgi-events-batch, interleaved within
each N; cost per delivery, deliveries/s, p99 and server RSS against N (``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from .cclient import LOAD_CLIENTS, choose_load_client, load_client_description
from .cli import parse_args as fanout_args
from .cli import quiet_then
from .common import (
    BATCH_VARIANT,
    BENCH_DIR,
    LOAD_CPU,
    RESULTS_DIR,
    SERVERS,
    load_loop_description,
    pin_to_cpu,
    raise_nofile,
)
from .procs import cleanup_on_exit
from .report import source_digest
from .runs import print_run, run_delivery
from .scale_report import draw, load, report
from .serve import server_description

VARIANTS = ("raw", "asgi-events", BATCH_VARIANT)
SOCKETS, QUICK_SOCKETS = (1000, 5000, 10000), (20, 50)
# Deliveries per run (N x M) held about constant across N: M = round(DELIVERIES / N).
DELIVERIES, QUICK_DELIVERIES = 200_000, 1_000
RUNS, PAYLOAD = 3, 100
FD_MARGIN = 256  # file descriptors beside the N sockets, as fanout.py asks for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Scale curve: the fan-out burst at several N.")
    parser.add_argument("--server", nargs="+", choices=SERVERS, help="(default hypercorn-asyncio)")
    parser.add_argument("--sockets-list", nargs="+", type=int, help="N values (1000 5000 10000)")
    parser.add_argument("--deliveries", type=int, help="N x M per run (200000): M = this / N")
    parser.add_argument("--runs", type=int, help="runs per variant and N (3)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="(all three)")
    parser.add_argument("--payload", type=int, default=PAYLOAD, help="pad bytes per event")
    parser.add_argument("--timeout", type=float, default=120.0, help="delivery wait bound, s")
    parser.add_argument("--load-client", choices=LOAD_CLIENTS, default="c")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="as fanout.py's")
    parser.add_argument("--quick", action="store_true", help="smoke: N 20 and 50, M 50/20, 1 run")
    parser.add_argument("--chart-only", action="store_true", help="redraw from the saved JSON")
    opts = parser.parse_args(argv)
    opts.sockets_list = tuple(
        sorted(set(opts.sockets_list or (QUICK_SOCKETS if opts.quick else SOCKETS)))
    )
    opts.deliveries = opts.deliveries or (QUICK_DELIVERIES if opts.quick else DELIVERIES)
    opts.runs = opts.runs or (1 if opts.quick else RUNS)
    opts.variants = [v for v in VARIANTS if v in (opts.variants or VARIANTS)]
    if min(*opts.sockets_list, opts.deliveries, opts.runs) < 1 or opts.payload < 0:
        parser.error("sockets, deliveries and runs must be positive, payload not negative")
    return opts


def events_for(deliveries: int, sockets: int) -> int:
    return max(1, round(deliveries / sockets))


def suffix(opts: argparse.Namespace) -> str:
    """Quick or resized runs do not overwrite the real results (as fanout.py's names)."""
    sockets, deliveries = (QUICK_SOCKETS, QUICK_DELIVERIES) if opts.quick else (SOCKETS, DELIVERIES)
    out = "-quick" if opts.quick else ""
    out += "-n" + "+".join(map(str, opts.sockets_list)) if opts.sockets_list != sockets else ""
    out += f"-d{opts.deliveries}" if opts.deliveries != deliveries else ""
    out += f"-p{opts.payload}" if opts.payload != PAYLOAD else ""
    out += "-" + "+".join(opts.variants) if opts.variants != list(VARIANTS) else ""
    return out


def path_for(server: str, tail: str, ext: str) -> Path:
    return RESULTS_DIR / f"scale-{server}{tail}.{ext}"


def raise_file_limit(needed: int) -> dict[str, Any]:
    """RLIMIT_NOFILE as far as it goes, for this process and its children (servers, the C
    client): where permitted (root) the hard limit up to ``needed`` (at most fs.nr_open), then
    the soft one to the hard one. What was reached, and why the hard limit stayed, if it did."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {"soft_before": soft, "hard_before": hard, "needed": needed}
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError) as exc:
            out["raise_hard"] = f"hard limit not raised to {needed}: {exc}"
    out["reached"] = raise_nofile(0)  # the soft limit to the hard one, as fanout.py does
    return out


def machine_limits() -> dict[str, str]:
    """Other ceilings on N, for the report: the file and port ranges of the kernel."""
    out = {}
    for key, name in (("nr_open", "fs/nr_open"), ("ports", "net/ipv4/ip_local_port_range")):
        try:
            out[key] = " ".join(Path(f"/proc/sys/{name}").read_text().split())
        except OSError:
            out[key] = "?"
    return out


def curve(opts: argparse.Namespace, server: str, limit: dict[str, Any]) -> dict[str, Any]:
    """Every N in order; within one, runs interleaved over the variants. A run that raises
    (sockets that would not open, a server that would not start) stops the curve there."""
    base = fanout_args(["--server", server, "--variants", *opts.variants, "--runs", "1"])
    base.payload, base.timeout, base.quiet_wait = opts.payload, opts.timeout, opts.quiet_wait
    base.load_client = opts.load_client
    choose_load_client(base)
    data: dict[str, Any] = {
        "server": server,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "python": sys.version.split()[0],
        "digest": source_digest(),
        "server_description": server_description(server, base.uvicorn_ws),
        "load": f"{load_loop_description(base.load_loop)}; {load_client_description(base)}",
        "nofile": limit,
        "machine": machine_limits(),
        **{k: getattr(opts, k) for k in ("deliveries", "payload", "runs", "variants")},
        "sockets_list": list(opts.sockets_list),
        "events": {str(n): events_for(opts.deliveries, n) for n in opts.sockets_list},
        "results": [],
        "stopped": [],
    }
    stop = ""
    for n in opts.sockets_list:
        m = events_for(opts.deliveries, n)
        if not stop and n + FD_MARGIN > limit["reached"]:
            stop = f"RLIMIT_NOFILE {limit['reached']} < N + {FD_MARGIN} = {n + FD_MARGIN}"
        if stop:
            data["stopped"].append({"sockets": n, "why": stop})
            print(f"N={n}: not run ({stop})", flush=True)
            continue
        args = argparse.Namespace(**vars(base))
        args.sockets, args.events = n, m
        print(f"\nN={n} sockets, M={m} events ({n * m:,} deliveries per run)", flush=True)
        for run in range(1, opts.runs + 1):
            for variant in opts.variants:
                try:
                    result = quiet_then(args, partial(run_delivery, server, variant, run, args))
                except Exception as exc:  # e.g. the C client could not open every socket
                    stop = f"N={n}, {variant} run {run}: {type(exc).__name__}: {exc}"
                    data["stopped"].append({"sockets": n, "why": stop, "failed_run": True})
                    print(f"  stopped: {stop}", flush=True)
                    break
                print_run(result)
                data["results"].append({"sockets": n, "events": m, **asdict(result)})
            if stop:
                break
    return data


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    tail = suffix(opts)
    if opts.chart_only:
        servers = [s for s in opts.server or SERVERS if path_for(s, tail, "json").exists()]
        missing = [s for s in opts.server or () if s not in servers]
        for server in missing or ([] if servers else ["<server>"]):
            print(f"no saved curve: {path_for(server, tail, 'json')}")
        for server in servers:
            chart = draw(load(path_for(server, tail, "json")), path_for(server, tail, "png"))
            print(f"chart: {chart}" if chart else "no chart (no matplotlib)")
        return 1 if missing or not servers else 0
    pin_to_cpu(LOAD_CPU)
    limit = raise_file_limit(max(opts.sockets_list) + FD_MARGIN)
    print(
        f"RLIMIT_NOFILE {limit['reached']} (at start {limit['soft_before']} soft, "
        f"{limit['hard_before']} hard; {limit['needed']} needed for N={max(opts.sockets_list)})",
        flush=True,
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    failed = False
    for server in opts.server or ["hypercorn-asyncio"]:
        with cleanup_on_exit():
            data = curve(opts, server, limit)
        out = path_for(server, tail, "json")
        out.write_text(json.dumps(data, indent=1) + "\n")
        data = load(out)
        text = report(data)
        print("\n" + text)
        path_for(server, tail, "md").write_text(text)
        chart = draw(data, path_for(server, tail, "png"))
        for path in (out.with_suffix(".md"), out, chart):
            if path is not None:
                print(f"written: {path.relative_to(BENCH_DIR.parent)}")
        failed |= bool(
            data["stopped"] or any(r.failed for rs in data["cells"].values() for r in rs)
        )
    return 1 if failed else 0
