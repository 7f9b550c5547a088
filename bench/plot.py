"""PNG plots of a run: time and memory vs sequence length per pattern (log-log), and the
speed-up over the best peer. Only the base line of the sweep is plotted (first head dim, dtype
and batch x heads), so each series varies in sequence length alone.

``make_plots`` returns, for each figure, the series it drew (label, x, y), which the JSON
report stores next to the file name: what a figure shows can be checked without looking at it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

MODES_PLOTTED = ("fwd", "fwd+bwd")


def _series(rows: Sequence[dict], pattern: str, mode: str, value: Callable[[dict], Optional[float]],
            kinds: Sequence[str] = ("flashlite", "peer")) -> List[Dict[str, object]]:
    by_impl: Dict[str, Dict[int, float]] = {}
    for row in rows:
        if row["label"] != pattern or row["mode"] != mode or row["status"] != "ok" or row["kind"] not in kinds:
            continue
        y = value(row)
        if y is None or not (y > 0) or math.isinf(y):
            continue
        by_impl.setdefault(row["impl"], {})[int(row["shape"]["seqlen_k"])] = float(y)
    out = []
    for impl in sorted(by_impl, key=lambda name: (not name.startswith("flashlite"), name)):
        points = sorted(by_impl[impl].items())
        out.append({"label": impl, "x": [p[0] for p in points], "y": [p[1] for p in points]})
    return out


def _style(label: str) -> dict:
    return {"linewidth": 2.2, "marker": "o"} if label.startswith("flashlite") else {"linewidth": 1.2, "marker": ".",
                                                                                     "linestyle": "--"}


def _figure(panels: List[dict], title: str, ylabel: str, path: Path, logy: bool = True,
            hline: Optional[float] = None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    columns = max(1, len({p["title"] for p in panels}))
    rows = max(1, len({p["mode"] for p in panels}))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 1, 3.2 * rows + 0.8), squeeze=False)
    titles = list(dict.fromkeys(p["title"] for p in panels))
    modes = list(dict.fromkeys(p["mode"] for p in panels))
    for ax_row in axes:
        for ax in ax_row:
            ax.set_visible(False)
    for panel in panels:
        ax = axes[modes.index(panel["mode"])][titles.index(panel["title"])]
        ax.set_visible(True)
        overview = panel["title"].startswith("flashlite")
        for series in panel["series"]:
            style = {"linewidth": 1.8, "marker": "o"} if overview else _style(series["label"])
            ax.plot(series["x"], series["y"], label=series["label"], **style)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="grey", linewidth=0.8)
        ax.set_title(f"{panel['title']} — {panel['mode']}", fontsize=9)
        ax.set_xlabel("sequence length (keys)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", linewidth=0.3)
        if panel["series"]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_plots(rows: Sequence[dict], stem: Path, subtitle: str, measure_memory: bool) -> List[Dict[str, object]]:
    """Write ``<stem>-time.png``, ``<stem>-speedup.png`` and (GPU) ``<stem>-memory.png``."""
    rows = [r for r in rows if r.get("base_point")]
    patterns = list(dict.fromkeys(r["label"] for r in rows))
    figures: List[Dict[str, object]] = []
    if not patterns:
        return figures

    # time vs sequence length; first column: every pattern's best flashlite time, to compare slopes
    panels = []
    for mode in MODES_PLOTTED:
        overview = []
        for pattern in patterns:
            best: Dict[int, float] = {}
            for series in _series(rows, pattern, mode, lambda r: r["time_ms"], kinds=("flashlite",)):
                for x, y in zip(series["x"], series["y"]):
                    best[x] = min(best.get(x, y), y)
            if best:
                points = sorted(best.items())
                overview.append({"label": pattern, "x": [p[0] for p in points], "y": [p[1] for p in points]})
        if overview:
            panels.append({"title": "flashlite, all patterns", "mode": mode, "series": overview})
        for pattern in patterns:
            series = _series(rows, pattern, mode, lambda r: r["time_ms"])
            if series or mode == "fwd":
                panels.append({"title": pattern, "mode": mode, "series": series})
    path = Path(f"{stem}-time.png")
    _figure(panels, f"time vs sequence length (log-log) — {subtitle}", "time (ms)", path)
    figures.append({"figure": "time", "file": path.name, "y": "time_ms", "panels": panels})

    if measure_memory:
        panels = []
        for mode in MODES_PLOTTED:
            for pattern in patterns:
                series = _series(rows, pattern, mode, lambda r: r.get("peak_mem_bytes") and r["peak_mem_bytes"] / 2**20)
                if series or mode == "fwd":
                    panels.append({"title": pattern, "mode": mode, "series": series})
        path = Path(f"{stem}-memory.png")
        _figure(panels, f"peak memory beyond the inputs vs sequence length (log-log) — {subtitle}", "MiB", path)
        figures.append({"figure": "memory", "file": path.name, "y": "peak_mem_MiB", "panels": panels})

    panels = []
    for mode in MODES_PLOTTED:
        for pattern in patterns:
            series = _series(rows, pattern, mode, lambda r: r.get("speedup_vs_best_peer"), kinds=("flashlite",))
            if series or mode == "fwd":
                panels.append({"title": pattern, "mode": mode, "series": series})
    path = Path(f"{stem}-speedup.png")
    _figure(panels, f"speed-up over the best peer of the same run (>1: flashlite faster) — {subtitle}",
            "speed-up (x)", path, hline=1.0)
    figures.append({"figure": "speedup", "file": path.name, "y": "speedup_vs_best_peer", "panels": panels})
    return figures
