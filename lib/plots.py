"""Stage 06 and report charts: UMAP embedding maps and simple metric plots."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def umap_2d(vectors: np.ndarray, seed: int, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """A seeded 2-D UMAP projection with cosine distance."""
    import umap

    n_neighbors = min(n_neighbors, len(vectors) - 1)
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine", random_state=seed, n_jobs=1)
    return reducer.fit_transform(vectors)


def knn_label_agreement(vectors: np.ndarray, labels: list[str], k: int = 10) -> float:
    """Mean share of each item's k nearest neighbours (cosine) that carry its label."""
    labels_arr = np.array(labels)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(labels) - 1)
    neighbours = np.argpartition(-sims, k, axis=1)[:, :k]
    return float((labels_arr[neighbours] == labels_arr[:, None]).mean())


def scatter_by_label(ax, points: np.ndarray, labels: list[str], title: str, names: list[str] | None = None,
                     landmarks: int = 0) -> None:
    """Scatter 2-D points coloured by label; optionally annotate the first `landmarks` names."""
    palette = plt.get_cmap("tab20").colors
    markers = "o^sDvP*X"
    for n, label in enumerate(sorted(set(labels))):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        ax.scatter(points[idx, 0], points[idx, 1], s=10, alpha=0.75, label=label,
                   color=palette[n % len(palette)], marker=markers[(n // len(palette)) % len(markers)])
    for i in range(min(landmarks, len(names or []))):
        ax.annotate(names[i], points[i], fontsize=7)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def before_after_maps(before: np.ndarray, after: np.ndarray, labels: list[str], title: str):
    """Side-by-side scatter plots of two 2-D projections coloured by label."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    scatter_by_label(axes[0], before, labels, f"{title}: base")
    scatter_by_label(axes[1], after, labels, f"{title}: fine-tuned")
    axes[1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig


def metric_bars(table: dict[str, dict[str, float]], metrics: list[str], title: str):
    """Grouped bars: one group per metric, one bar per system."""
    systems = list(table)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(10, 4))
    for j, system in enumerate(systems):
        ax.bar(x + j * width, [table[system][m] for m in metrics], width, label=system)
    ax.set_xticks(x + width * (len(systems) - 1) / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
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
