"""Pictures of a :class:`flashlite.heads.HeadReport` (matplotlib's Agg canvas, no pyplot state):
a layer × head heatmap per statistic, and the pooled maps of chosen heads."""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence

LABELS = {
    "entropy": "entropy (nats)",
    "norm_entropy": "entropy / ln(keys)  (1 = uniform)",
    "max_prob": "mean max probability",
    "mean_distance": "mean distance |p(i) - j|",
    "sink_mass": "mass on the sink tokens",
    "local_share": "share of queries looking within the local radius",
    "keys": "keys seen",
    "output_norm": "mean |output|",
    "output_variation": "output variation (0 = constant)",
    "importance": "importance |dL/dgate|",
}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover
        raise ImportError("flashlite.heads pictures need matplotlib: pip install matplotlib "
                          "(or 'flashlite[bench]')") from exc
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def heatmaps(report, directory: str, prefix: str = "heads", stats: Optional[Sequence[str]] = None) -> List[str]:
    """One PNG per statistic: layers down, heads across, flagged heads marked (d dead, s sink,
    l local). Returns the paths."""
    names = [s for s in (stats or list(report.stats)) if s in report.stats]
    layers, width = report.stats[names[0]].shape if names else (0, 0)
    marks = {}
    for flag, heads in report.flags().items():
        for h in heads:
            marks[(h.layer, h.head)] = marks.get((h.layer, h.head), "") + flag[0]
    paths = []
    for stat in names:
        values = report.stats[stat].float().numpy()
        figure = _figure(max(4.0, 1.0 + 0.45 * width), max(2.5, 1.2 + 0.4 * layers))
        ax = figure.add_subplot(1, 1, 1)
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
        figure.colorbar(image, ax=ax)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(LABELS.get(stat, stat))
        ax.set_xticks(range(width))
        ax.set_yticks(range(layers))
        if layers * width <= 400:
            finite = values[~(values != values)]
            middle = (float(finite.min()) + float(finite.max())) / 2 if finite.size else 0.0
            for layer in range(layers):
                for head in range(width):
                    v = values[layer, head]
                    if math.isnan(v):
                        continue
                    text = f"{v:.2g}" + (f"\n{marks[(layer, head)]}" if (layer, head) in marks else "")
                    ax.text(head, layer, text, ha="center", va="center", fontsize=7,
                            color="black" if v > middle else "white")
        figure.tight_layout()
        path = os.path.join(directory, f"{prefix}_{stat}.png")
        figure.savefig(path)
        paths.append(path)
    return paths


def map_grid(report, heads, path: str) -> str:
    """The pooled maps (query blocks down, key blocks across; mean mass) of ``heads`` in one PNG."""
    count = len(heads)
    cols = min(4, count)
    rows = -(-count // cols)
    figure = _figure(3.0 * cols, 3.0 * rows)
    for index, h in enumerate(heads):
        ax = figure.add_subplot(rows, cols, index + 1)
        ax.imshow(report.maps[h.layer, h.head].numpy(), aspect="auto", interpolation="nearest", cmap="magma")
        flags = report.head_flags(h)
        ax.set_title(f"{h} {','.join(flags)}".strip() + f"\n{h.name or '(model)'}", fontsize=8)
        ax.set_xlabel("keys", fontsize=7)
        ax.set_ylabel("queries", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.tight_layout()
    figure.savefig(path)
    return path
