"""The scale curve's report: the saved JSON read back, the Markdown, and the PNG (matplotlib,
Agg backend, as ``chart.py``) of cost against N."""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .chart import COLORS, short
from .common import LOAD_CPU, SERVER_CPU, percent
from .runs import RunResult


def load(path: Path) -> dict[str, Any]:
    """The saved curve; its runs as ``ordered``, (N, ``RunResult``) in the order run, and as
    ``cells[(N, variant)]``, lists of ``RunResult``."""
    data: dict[str, Any] = json.loads(path.read_text())
    data["ordered"], data["cells"] = [], {}
    for row in data["results"]:
        n, _m = row.pop("sockets"), row.pop("events")
        result = RunResult(**row)
        data["ordered"].append((n, result))
        data["cells"].setdefault((n, result.variant), []).append(result)
    return data


def delivered(r: RunResult) -> float:
    return r.deliveries_per_s * r.window_s


def cpu_us(r: RunResult) -> float:
    """Server CPU µs per delivery: the server's CPU seconds over the run / deliveries."""
    return r.server_cpu * r.wall_s / delivered(r) * 1e6 if delivered(r) else float("nan")


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str) -> str:
    """``median (min-max)``; just the median for one run."""
    mid = format(median(values), fmt)
    return mid if len(values) < 2 else f"{mid} ({min(values):{fmt}}-{max(values):{fmt}})"


def count(runs: list[RunResult], flag: str) -> str:
    return f"{sum(getattr(r, flag) for r in runs)}/{len(runs)}"


def report(data: dict[str, Any]) -> str:
    cells: dict[tuple[int, str], list[RunResult]] = data["cells"]
    limit, machine = data["nofile"], data["machine"]
    lines = [
        f"# Scale curve: {data['server']}",
        "",
        f"`{data['command']}` — {data['started']}, Python {data['python']}, asgi-events src "
        f"{data['digest']}, {data['server_description']}, server on CPU {SERVER_CPU}, load on "
        f"CPU {LOAD_CPU} ({data['load']}).",
        "",
        f"RLIMIT_NOFILE: {limit['soft_before']} soft / {limit['hard_before']} hard at start, "
        f"raised to {limit['reached']} for this process, the servers and the C client"
        + (f" ({limit['raise_hard']})" if "raise_hard" in limit else "")
        + f"; fs.nr_open {machine['nr_open']}, local ports {machine['ports']}.",
        "",
        f"fanout.py's burst at each N, runs interleaved over the variants within each N, "
        f"{data['runs']} run(s) per cell; about {data['deliveries']:,} deliveries per run "
        f"(M = {data['deliveries']:,} / N events: "
        + ", ".join(f"N={int(n):,}: {m}" for n, m in data["events"].items())
        + f"), payload {data['payload']} B. Medians (min-max).",
        "",
        "| N | M | variant | deliveries/s | server CPU µs/delivery | p99 ms | server peak RSS MB "
        "| peak RSS / N KB | load-bound | noisy | failed |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (n, variant), runs in cells.items():
        rss = median([r.server_rss_mb for r in runs])
        lines.append(
            f"| {n:,} | {data['events'][str(n)]} | {variant} "
            f"| {spread([r.deliveries_per_s for r in runs], ',.0f')} "
            f"| {spread([cpu_us(r) for r in runs], '.2f')} "
            f"| {median([r.p99_ms for r in runs]):.1f} "
            f"| {spread([r.server_rss_mb for r in runs], '.1f')} | {rss * 1024 / n:.1f} "
            f"| {count(runs, 'load_bound')} | {count(runs, 'noisy')} | {count(runs, 'failed')} |"
        )
    lines += ["", *rss_slopes(cells, data["variants"])]
    for stop in data["stopped"]:
        n = stop["sockets"]
        done = sum(len(runs) for (k, _), runs in cells.items() if k == n)
        what = f"stopped after {done} run(s)" if stop.get("failed_run") else "not run"
        lines += [f"**N={n:,}: {what}** ({stop['why']}).", ""]
    lines += [
        "",
        "Per run, in the order run (server CPU: share of a core from `POST /publish` to the last "
        "delivery; µs/delivery: that CPU time / deliveries):",
        "",
        "| N | run | variant | load client | deliveries/s | deliveries/frame | window s "
        "| server CPU | µs/delivery "
        "| p50 ms | p99 ms | RSS MB | lost | out-of-order | dup | load CPU | load CPU delivering "
        "| other CPU | notes |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---|",
    ]
    for n, r in data["ordered"]:
        lines.append(
            f"| {n:,} | {r.run} | {r.variant} | {r.client} | {r.deliveries_per_s:,.0f} "
            f"| {r.deliveries_per_frame:.1f} | {r.window_s:.3f} | {r.server_cpu:.0%} "
            f"| {cpu_us(r):.2f} | {r.p50_ms:.1f} "
            f"| {r.p99_ms:.1f} | {r.server_rss_mb:.1f} | {r.lost} | {r.out_of_order} "
            f"| {r.duplicates} | {r.load_cpu:.0%} | {percent(r.load_cpu_delivering)} "
            f"| {r.other_cpu:.0%} | {'; '.join(r.notes)} |"
        )
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines) + "\n")


def rss_slopes(cells: dict[tuple[int, str], list[RunResult]], variants: list[str]) -> list[str]:
    """Peak RSS added per socket between consecutive N: the server's own per-socket memory,
    without its base RSS (which peak RSS / N still holds)."""
    out = []
    for variant in variants:
        points = sorted(
            (n, median([r.server_rss_mb for r in runs]))
            for (n, v), runs in cells.items()
            if v == variant
        )
        steps = [
            f"{a:,}→{b:,}: {(rb - ra) * 1024 / (b - a):.1f} KB"
            for (a, ra), (b, rb) in itertools.pairwise(points)
        ]
        if steps:
            out += [f"Peak RSS added per socket, {variant}: " + ", ".join(steps) + ".", ""]
    return out


def human(value: float) -> str:
    """Short labels: 0.94, 18, 250, 58k, 1.2M."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    return f"{value / 1e3:.3g}k" if abs(value) >= 1e4 else short(value)


Metric = Callable[[RunResult], float]
PANELS: list[tuple[str, Metric, bool]] = [  # title, value per run, min-max error bars
    ("server CPU µs per delivery", cpu_us, True),
    ("deliveries/s", lambda r: r.deliveries_per_s, True),
    ("server peak RSS MB", lambda r: r.server_rss_mb, False),
]


def draw(data: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric, N on the x axis (log), one line per variant: the medians, the
    min-max range of the runs as error bars; ``*`` where a cell had load-bound runs."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    cells: dict[tuple[int, str], list[RunResult]] = data["cells"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.6), squeeze=False)
    for ax, (title, metric, ranged) in zip(axes[0], PANELS, strict=True):
        for variant in data["variants"]:
            points = sorted((n, runs) for (n, v), runs in cells.items() if v == variant)
            if not points:
                continue
            xs = [n for n, _ in points]
            values = [[metric(r) for r in runs] for _, runs in points]
            ys = [median(v) for v in values]
            errors = None
            if ranged:
                errors = [
                    [y - min(v) for y, v in zip(ys, values, strict=True)],
                    [max(v) - y for y, v in zip(ys, values, strict=True)],
                ]
            ax.errorbar(
                xs, ys, yerr=errors, marker="o", capsize=3, label=variant, color=COLORS[variant]
            )
            for x, y, (_, runs) in zip(xs, ys, points, strict=True):
                star = "*" if any(r.load_bound for r in runs) else ""
                ax.annotate(
                    human(y) + star, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N sockets (log)")
        ax.set_title(title + " (log)", fontsize=10)
        ax.set_xticks(data["sockets_list"], [f"{n:,}" for n in data["sockets_list"]])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(ticker.FuncFormatter(lambda v, _: human(v)))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    stopped = "".join(f"; stopped at N={s['sockets']:,}" for s in data["stopped"][:1])
    runs = [r for _, r in data["ordered"]]
    noisy = (
        f"; {sum(r.noisy for r in runs)} of {len(runs)} runs NOISY"
        if any(r.noisy for r in runs)
        else ""
    )
    events = ", ".join(f"{m}" for m in data["events"].values())
    fig.suptitle(
        f"asgi-events scale curve, {data['server']}, {data['started']}: the fan-out burst, about "
        f"{data['deliveries']:,} deliveries per run (M = {events}){stopped}\n2 cores: server on "
        f"CPU 0, C load client on CPU 1; medians of {data['runs']} interleaved run(s), bars "
        f"min-max; * = load-bound runs (deliveries/s a lower bound){noisy}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
