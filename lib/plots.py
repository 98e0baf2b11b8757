"""Stage 06 and report charts: UMAP embedding maps and simple metric plots."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

plt.rcParams["text.parse_math"] = False  # item names are text: "$5 or $10" stays as written, "$\\badmacro$" cannot crash


def umap_2d(vectors: np.ndarray, seed: int, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """A seeded 2-D UMAP projection with cosine distance."""
    import umap

    n_neighbors = min(n_neighbors, len(vectors) - 1)
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine", random_state=seed, n_jobs=1)
    return reducer.fit_transform(vectors)


def align_2d(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """`moving` rotated, reflected, scaled and shifted onto `reference` (orthogonal Procrustes), so two maps of the
    same items can be compared point by point."""
    from scipy.linalg import orthogonal_procrustes

    ref_mean, mov_mean = reference.mean(axis=0), moving.mean(axis=0)
    ref, mov = reference - ref_mean, moving - mov_mean
    rotation, scale = orthogonal_procrustes(mov, ref)
    return mov @ rotation * (scale / (mov**2).sum()) + ref_mean


def category_label(item: dict) -> str:
    """The label that colours an item on the category map: creature type, spell school, first genre, else its type."""
    meta = item.get("meta", {})
    genre = meta.get("genre")
    return meta.get("creature_type") or meta.get("school") or (genre[0] if isinstance(genre, list) and genre else genre) or item["type"]


def rounded(value: float, digits: int = 4) -> float | None:
    """A float rounded for metrics.json, None for NaN (JSON has no NaN)."""
    return None if value != value else round(float(value), digits)


def silhouette(vectors: np.ndarray, labels: list[str]) -> float:
    """Cosine silhouette of the labelled groups (NaN when there are fewer than two groups)."""
    from sklearn.metrics import silhouette_score

    if not 2 <= len(set(labels)) < len(labels):
        return float("nan")
    return float(silhouette_score(vectors, labels, metric="cosine"))


def knn_label_agreement(vectors: np.ndarray, labels: list[str], k: int = 10) -> float:
    """Mean share of each item's k nearest neighbours (cosine) that carry its label."""
    labels_arr = np.array(labels)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(labels) - 1)
    neighbours = np.argpartition(-sims, k, axis=1)[:, :k]
    return float((labels_arr[neighbours] == labels_arr[:, None]).mean())


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


def pair_similarities(rows: list[dict], vectors: np.ndarray, row_of: dict[str, int]) -> dict[str, list[float]]:
    """Cosines of each training-style row's anchor to its positive and to its negatives (texts looked up in
    `row_of` → `vectors`), for the positive-vs-negative histograms."""
    out: dict[str, list[float]] = {"positive": [], "negative": []}
    for r in rows:
        anchor = vectors[row_of[r["anchor"]]]
        out["positive"].append(float(anchor @ vectors[row_of[r["positive"]]]))
        out["negative"] += [float(anchor @ vectors[row_of[r[c]]]) for c in r if c.startswith("negative_") and c[9:].isdigit()]
    return out


def triplet_accuracy(rows: list[dict], vectors: np.ndarray, row_of: dict[str, int]) -> float:
    """Share of rows whose anchor is closer to its positive than to every one of its negatives."""
    wins = 0
    for r in rows:
        anchor = vectors[row_of[r["anchor"]]]
        negatives = [anchor @ vectors[row_of[r[c]]] for c in r if c.startswith("negative_") and c[9:].isdigit()]
        wins += bool(negatives) and anchor @ vectors[row_of[r["positive"]]] > max(negatives)
    return wins / max(len(rows), 1)
