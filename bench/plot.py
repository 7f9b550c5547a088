"""PNG plots of a run: time (and, on a GPU, memory) vs sequence length per pattern, and the
speed-up over the best peer. Only the base line of the sweep is plotted (first head dim, dtype
and batch x heads), so each series varies in sequence length alone.

Figures are laid out to be read at screen size (about 1400 px wide, text 11-14 pt): one column per
mode (forward, backward, forward+backward), one row per pattern. The prefill patterns (full,
causal, window, block-sparse, top-k) share the time and speed-up figures; decode (one query over
a KV cache: forward only, a different regime) has a figure of its own. Time and memory axes are
log-log; the speed-up axis is linear from 0, with the 1x line marked.

``make_plots`` returns, for each figure, the series it drew (label, x, y), which the JSON
report stores next to the file name: what a figure shows can be checked without looking at it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

MODES_PLOTTED = ("fwd", "bwd", "fwd+bwd")
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward + backward"}
DECODE = "decode"
FONT = {"base": 11, "title": 12, "suptitle": 14, "legend": 9.5}
PANEL_INCHES = (4.6, 3.3)  # one panel, at DPI: about 460 x 330 px
DPI = 100


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


def _style(label: str, overview: bool) -> dict:
    if overview:
        return {"linewidth": 2.0, "marker": "o", "markersize": 5}
    if label.startswith("flashlite"):
        return {"linewidth": 2.4, "marker": "o", "markersize": 6}
    return {"linewidth": 1.4, "marker": "s", "markersize": 4, "linestyle": "--"}


def _figure(panels: List[dict], title: str, ylabel: str, path: Path, linear: bool = False,
            hline: Optional[float] = None, xlabel: str = "sequence length (keys)") -> None:
    """Panels on a grid: one row per distinct ``row`` (in order), one column per mode present."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

    rows = list(dict.fromkeys(p["row"] for p in panels))
    modes = [m for m in MODES_PLOTTED if any(p["mode"] == m for p in panels)]
    width, height = PANEL_INCHES
    with plt.rc_context({"font.size": FONT["base"], "axes.titlesize": FONT["title"],
                         "axes.labelsize": FONT["base"], "legend.fontsize": FONT["legend"],
                         "xtick.labelsize": FONT["base"] - 1, "ytick.labelsize": FONT["base"] - 1}):
        fig, axes = plt.subplots(len(rows), len(modes), figsize=(width * len(modes) + 0.4, height * len(rows) + 0.9),
                                 squeeze=False)
        for ax_row in axes:
            for ax in ax_row:
                ax.set_visible(False)
        for panel in panels:
            ax = axes[rows.index(panel["row"])][modes.index(panel["mode"])]
            ax.set_visible(True)
            overview = panel.get("overview", False)
            xs = sorted({x for series in panel["series"] for x in series["x"]})
            for series in panel["series"]:
                ax.plot(series["x"], series["y"], label=series["label"], **_style(series["label"], overview))
            ax.set_xscale("log", base=2)
            # ticks at the measured lengths, written out (256, 1024, ... not 2^8)
            if xs:
                ax.xaxis.set_major_locator(FixedLocator(xs))
                ax.set_xticklabels([f"{x // 1024}k" if x >= 4096 and x % 1024 == 0 else str(x) for x in xs])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_minor_formatter(NullFormatter())
                if len(xs) == 1:
                    ax.set_xlim(xs[0] / 1.5, xs[0] * 1.5)
            if linear:
                ax.set_ylim(bottom=0, top=max([1.2] + [1.1 * y for s in panel["series"] for y in s["y"]]))
                ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
            else:
                ax.set_yscale("log")
                _plain_log_axis(ax)
            if hline is not None:
                ax.axhline(hline, color="black", linewidth=1.0, linestyle=":")
            ax.set_title(f"{panel['title']} — {MODE_TITLES.get(panel['mode'], panel['mode'])}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", linewidth=0.5, alpha=0.6)
            if panel["series"]:
                ax.legend(loc="best", framealpha=0.85)
            else:
                ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(title, fontsize=FONT["suptitle"])
        fig.tight_layout()  # leaves room for the suptitle (matplotlib >= 3.3)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)


def _plain_log_axis(ax) -> None:
    """Plain numbers on a log y axis (0.1, 1, 10, not 10^-1): the decades, plus 2 and 5 times
    them when the axis spans less than a decade and a half."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def plain(y, _pos=None):
        return f"{y:g}"

    low, high = ax.get_ylim()
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    if high / max(low, 1e-300) < 30:
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(plain))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _time_panels(rows: Sequence[dict], patterns: Sequence[str], value: Callable[[dict], Optional[float]],
                 overview: bool) -> List[dict]:
    panels = []
    for mode in MODES_PLOTTED:
        if overview and len(patterns) > 1:  # every pattern's best flashlite time, to compare slopes
            lines = []
            for pattern in patterns:
                best: Dict[int, float] = {}
                for series in _series(rows, pattern, mode, value, kinds=("flashlite",)):
                    for x, y in zip(series["x"], series["y"]):
                        best[x] = min(best.get(x, y), y)
                if best:
                    points = sorted(best.items())
                    lines.append({"label": pattern, "x": [p[0] for p in points], "y": [p[1] for p in points]})
            if lines:
                panels.append({"title": "flashlite, all patterns", "row": "overview", "mode": mode, "series": lines,
                               "overview": True})
        for pattern in patterns:
            series = _series(rows, pattern, mode, value)
            if series or mode == "fwd":
                panels.append({"title": pattern, "row": pattern, "mode": mode, "series": series})
    return panels


def make_plots(rows: Sequence[dict], stem: Path, subtitle: str, measure_memory: bool) -> List[Dict[str, object]]:
    """Write ``<stem>-time.png``, ``<stem>-speedup.png``, ``<stem>-decode.png`` (when decode ran) and
    (GPU) ``<stem>-memory.png``."""
    rows = [r for r in rows if r.get("base_point")]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    prefill = [label for label in labels if label != DECODE]
    figures: List[Dict[str, object]] = []

    def speedup(row: dict) -> Optional[float]:
        return row.get("speedup_vs_best_peer")

    def time_ms(row: dict) -> Optional[float]:
        return row["time_ms"]

    if prefill:
        panels = _time_panels(rows, prefill, time_ms, overview=True)
        path = Path(f"{stem}-time.png")
        _figure(panels, f"time vs sequence length (log-log) — {subtitle}", "time (ms)", path)
        figures.append({"figure": "time", "file": path.name, "y": "time_ms", "panels": panels})

        if measure_memory:
            panels = _time_panels(rows, prefill, lambda r: r.get("peak_mem_bytes") and r["peak_mem_bytes"] / 2**20,
                                  overview=False)
            path = Path(f"{stem}-memory.png")
            _figure(panels, f"peak memory beyond the inputs (log-log) — {subtitle}", "MiB", path)
            figures.append({"figure": "memory", "file": path.name, "y": "peak_mem_MiB", "panels": panels})

        panels = []
        for pattern in prefill:
            for mode in MODES_PLOTTED:
                series = _series(rows, pattern, mode, speedup, kinds=("flashlite",))
                if series or mode == "fwd":
                    panels.append({"title": pattern, "row": pattern, "mode": mode, "series": series})
        path = Path(f"{stem}-speedup.png")
        _figure(panels, f"speed-up over the best peer, same run (above 1: flashlite faster) — {subtitle}",
                "speed-up (x)", path, linear=True, hline=1.0)
        figures.append({"figure": "speedup", "file": path.name, "y": "speedup_vs_best_peer", "panels": panels})

    if DECODE in labels:  # one query over a KV cache: its own figure, time and speed-up side by side
        time_series = _series(rows, DECODE, "fwd", time_ms)
        speed_series = _series(rows, DECODE, "fwd", speedup, kinds=("flashlite",))
        panels = [{"title": "decode time (ms, log-log)", "row": "time", "mode": "fwd", "series": time_series},
                  {"title": "decode speed-up (x)", "row": "speedup", "mode": "fwd", "series": speed_series}]
        path = Path(f"{stem}-decode.png")
        _decode_figure(panels, f"decode: 1 query per head over a KV cache — {subtitle}", path)
        figures.append({"figure": "decode", "file": path.name, "y": ["time_ms", "speedup_vs_best_peer"],
                        "panels": panels})
    return figures


def _decode_figure(panels: List[dict], title: str, path: Path) -> None:
    """Time (log-log) and speed-up (linear) of decode, side by side."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

    width, height = PANEL_INCHES
    with plt.rc_context({"font.size": FONT["base"], "axes.titlesize": FONT["title"],
                         "legend.fontsize": FONT["legend"]}):
        fig, axes = plt.subplots(1, 2, figsize=(2 * width + 0.4, height + 0.9))
        for ax, panel, linear in zip(axes, panels, (False, True)):
            xs = sorted({x for s in panel["series"] for x in s["x"]})
            for series in panel["series"]:
                ax.plot(series["x"], series["y"], label=series["label"], **_style(series["label"], False))
            ax.set_xscale("log", base=2)
            if xs:
                ax.xaxis.set_major_locator(FixedLocator(xs))
                ax.set_xticklabels([str(x) for x in xs])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_minor_formatter(NullFormatter())
            if linear:
                ax.set_ylim(bottom=0, top=max([1.2] + [1.1 * y for s in panel["series"] for y in s["y"]]))
                ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
                ax.axhline(1.0, color="black", linewidth=1.0, linestyle=":")
            else:
                ax.set_yscale("log")
                _plain_log_axis(ax)
            ax.set_title(panel["title"])
            ax.set_xlabel("KV cache length (keys)")
            ax.grid(True, linewidth=0.5, alpha=0.6)
            if panel["series"]:
                ax.legend(loc="best", framealpha=0.85)
            else:
                ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(title, fontsize=FONT["suptitle"])
        fig.tight_layout()  # leaves room for the suptitle (matplotlib >= 3.3)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
