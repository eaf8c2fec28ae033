"""Summarise a ``compare.sh`` directory: per variant, the base and new medians and their ratio.

Burst runs compare deliveries/s; steady runs p99 latency and the server's CPU at the same rate.
Each figure also appears as a ratio to raw within the same invocation, which the machine's mood
affects less than the absolute figures.

    .venv/bin/python benchmarks/compare_summary.py benchmarks/compare/<base>-<new>
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

BURST = ("deliveries/s",)
STEADY = ("p99 ms", "server CPU")  # at the same rate: what a delivery costs, and its latency


def rows(path: Path) -> list[dict[str, str]]:
    """The per-run table of one fanout.py log."""
    header: list[str] | None = None
    found = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| run |"):
            header = cells
        elif header and line.startswith("| ") and cells[0].isdigit():
            found.append(dict(zip(header, cells, strict=False)))
    return found


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("*%"))
    except ValueError:
        return None


def main(folder: Path) -> None:
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    to_raw: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for log in sorted(folder.glob("*.txt")):
        which = log.name.split("-")[0]
        runs = rows(log)
        raw = {r["run"]: r for r in runs if r["variant"] == "raw"}
        metrics = STEADY if runs and "rate" in runs[0] else BURST
        for run in runs:
            for metric in metrics:
                value = number(run.get(metric, ""))
                if value is None:
                    continue
                values[(run["variant"], metric, which)].append(value)
                base = number(raw.get(run["run"], {}).get(metric, ""))
                if base and run["variant"] != "raw":
                    to_raw[(run["variant"], metric, which)].append(value / base)
    print(
        "| variant | metric | base median (range, n) | new median (range, n) | new/base "
        "| variant/raw, base | variant/raw, new |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for variant, metric in sorted({(v, m) for v, m, _ in values}):
        base, new = values.get((variant, metric, "base")), values.get((variant, metric, "new"))
        if not base or not new:
            continue
        shape = "{:,.0f}" if metric == "deliveries/s" else "{:.1f}"

        def cell(xs: list[float], shape: str = shape) -> str:
            low, high = shape.format(min(xs)), shape.format(max(xs))
            return f"{shape.format(statistics.median(xs))} ({low}-{high}, {len(xs)})"

        ratios = [to_raw.get((variant, metric, w)) for w in ("base", "new")]
        shown = [f"{statistics.median(r):.2f}x" if r else "-" for r in ratios]
        ratio = statistics.median(new) / statistics.median(base)
        print(
            f"| {variant} | {metric} | {cell(base)} | {cell(new)} | {ratio:.2f}x "
            f"| {shown[0]} | {shown[1]} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
