"""The PNG chart (matplotlib, Agg backend), drawn from the saved full results of every server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import (
    CHART_PATH,
    IDLE_GOAL_KB,
    RESULTS_DIR,
    SERVERS,
    STALLED_GOAL,
    STEADY_P99_GOAL,
    VARIANTS,
)
from .report import by_variant, load_results, median_of

COLORS = {
    "raw": "#7f7f7f",
    "asgi-events": "#1f77b4",
    "asgi-events-batch": "#2ca02c",
    "asgi-events-sse": "#d62728",
    "starlette-broadcaster": "#ff7f0e",
    "python-socketio": "#9467bd",
    "asgi-events-redis": "#17becf",
}


def results_path(server: str, mode: str, suffix: str = "", ext: str = "md") -> Path:
    """``fanout-<server>[-<mode>]<suffix>.<ext>``: burst, the first mode, has no mode part."""
    part = "" if mode == "burst" else f"-{mode}"
    return RESULTS_DIR / f"fanout-{server}{part}{suffix}.{ext}"


Values = dict[str, dict[str, float]]  # server -> variant -> value


def collect(mode: str, key: str) -> tuple[Values, list[str], set[tuple[str, str]]]:
    """Per server, the median of ``key`` per variant, from the saved full results; the dates of
    the runs; the (server, variant) pairs with load-bound runs."""
    values: Values = {}
    dates = []
    bound: set[tuple[str, str]] = set()
    for server in SERVERS:
        path = results_path(server, mode, ext="json")
        if not path.exists():
            continue
        meta, results = load_results(path)
        dates.append(str(meta.get("started", "?")))
        bound |= {(server, r.variant) for r in results if getattr(r, "load_bound", False)}
        if mode == "stalled":
            values[server] = stalled_ratios(results)
        else:
            values[server] = {v: median_of(runs, key) for v, runs in by_variant(results).items()}
    return values, dates, bound


def stalled_ratios(results: list[Any]) -> dict[str, float]:
    out = {}
    for variant, runs in by_variant(results).items():
        base = median_of([r for r in runs if not r.stalled], "deliveries_per_s")
        out[variant] = median_of([r for r in runs if r.stalled], "deliveries_per_s") / base
    return out


def bars(
    ax: Any, values: Values, label: str, ratio_to_raw: bool, bound: set[tuple[str, str]]
) -> None:
    """Grouped bars: one group per server, one bar per variant; above each, the ratio to raw
    or the value; ``*`` where the variant had load-bound runs on that server."""
    servers = list(values)
    variants = [v for v in VARIANTS if any(v in values[s] for s in servers)]
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        xs, ys, texts = [], [], []
        for i, server in enumerate(servers):
            if variant not in values[server]:
                continue
            y = values[server][variant]
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(y)
            raw = values[server].get("raw", float("nan"))
            text = f"{short(y / raw)}x" if ratio_to_raw else short(y)
            texts.append(text + ("*" if (server, variant) in bound else ""))
        drawn = ax.bar(xs, ys, width, label=variant, color=COLORS.get(variant))
        ax.bar_label(drawn, texts, fontsize=7, padding=1)
    ax.set_xticks(range(len(servers)), servers)
    ax.set_ylabel(label)


def short(value: float) -> str:
    """Two significant digits, without exponents: 0.94, 1.6, 27, 1023."""
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


def draw_chart(path: Path = CHART_PATH) -> Path | None:
    """Draw every mode that has saved full results; None if there is nothing (or no
    matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("burst", "deliveries_per_s", "burst: deliveries/s (x raw above)", True, None),
        ("steady", "p99_ms", "steady: p99 latency ms (x raw above)", True, STEADY_P99_GOAL),
        ("stalled", "", "stalled: healthy deliveries/s, stalled / not", False, STALLED_GOAL),
        ("idle", "per_socket_kb", "idle: KB per socket", False, None),
    ]
    drawn = [(p, *collect(p[0], p[1])) for p in panels]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    fig, axes = plt.subplots(len(drawn), 1, figsize=(11, 3.4 * len(drawn)), squeeze=False)
    dates: list[str] = []
    for ax, (panel, values, when, bound) in zip(axes[:, 0], drawn, strict=True):
        mode, _key, title, ratio, goal = panel
        bars(ax, values, title.split(": ", 1)[1].split(" (")[0], ratio, bound)
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=10)
        if mode in ("burst", "steady"):
            ax.set_yscale("log")
        if mode == "stalled" and goal:
            ax.axhline(goal, color="red", linewidth=0.8, linestyle="--")
        if mode == "idle":
            note = f"target: asgi-events <= raw + {IDLE_GOAL_KB:g} KB"
            ax.text(0.01, 0.95, note, transform=ax.transAxes, fontsize=7, va="top")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        dates += when
    fig.suptitle(
        f"asgi-events fan-out benchmark, {min(dates)} to {max(dates)}\n2 cores: server on "
        "CPU 0, load on CPU 1; medians of interleaved runs (how many: benchmarks/results);\n"
        "* = load-bound runs (a lower bound)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
