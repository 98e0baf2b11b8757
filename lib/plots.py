"""Charts of the stages and the report: embedding maps, metric bars, curves, histograms (matplotlib)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

plt.rcParams["text.parse_math"] = False  # item names are text: "$5 or $10" stays as written, "$\\badmacro$" cannot crash


def scatter_by_label(ax, points: np.ndarray, labels: list[str], title: str,
                     landmarks: dict[int, str] | None = None) -> None:
    """Scatter 2-D points coloured by label; annotate the `landmarks` ({point index: name})."""
    palette = plt.get_cmap("tab20").colors
    markers = "o^sDvP*X"
    for n, label in enumerate(sorted(set(labels))):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        ax.scatter(points[idx, 0], points[idx, 1], s=10, alpha=0.75, label=label,
                   color=palette[n % len(palette)], marker=markers[(n // len(palette)) % len(markers)])
    for i, name in (landmarks or {}).items():
        ax.scatter(*points[i], s=40, facecolors="none", edgecolors="black", linewidths=0.8)
        ax.annotate(name, points[i], xytext=(4, 4), textcoords="offset points", fontsize=8, weight="bold")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def before_after_maps(before: np.ndarray, after: np.ndarray, labels: list[str], title: str,
                      landmarks: dict[int, str] | None = None):
    """Side-by-side scatter plots of two aligned 2-D projections coloured by label, with the same axes."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharex=True, sharey=True)
    scatter_by_label(axes[0], before, labels, f"{title}: base", landmarks)
    scatter_by_label(axes[1], after, labels, f"{title}: fine-tuned", landmarks)
    axes[1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig


def metric_bars(table: dict[str, dict[str, float]], metrics: list[str], title: str,
                intervals: dict[str, dict[str, list[float]]] | None = None):
    """Grouped bars: one group per metric, one bar per system; whiskers from `intervals` ({system: {metric:
    [mean, low, high]}}) when given."""
    systems = list(table)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(11, 4))
    for j, system in enumerate(systems):
        values = [table[system][m] for m in metrics]
        whiskers = None
        if intervals and system in intervals:
            ci = [intervals[system].get(m, [v, v, v]) for m, v in zip(metrics, values)]
            whiskers = np.array([[v - c[1] for v, c in zip(values, ci)], [c[2] - v for v, c in zip(values, ci)]]).clip(min=0)
        ax.bar(x + j * width, values, width, label=system, yerr=whiskers, capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(x + width * (len(systems) - 1) / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    return fig


def line_plot(xs: list, ys: list, title: str, xlabel: str, ylabel: str):
    """A single line chart (e.g. a training loss curve)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, ys, marker=".")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return fig


def histograms(groups: dict[str, dict[str, list[float]]], title: str, xlabel: str):
    """One panel per group, overlaid histograms of its named value lists (e.g. positive vs negative cosines)."""
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.3), squeeze=False)
    for ax, (group, series) in zip(axes[0], groups.items()):
        for name, values in series.items():
            if values:
                ax.hist(values, bins=30, alpha=0.55, label=f"{name} (n={len(values)})")
        ax.set(title=group, xlabel=xlabel)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
