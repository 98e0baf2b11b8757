"""Stage 07: where the items sit before and after fine-tuning — 2-D maps, label clusters, related and held-out pairs."""
from __future__ import annotations

import numpy as np


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


def stratified_sample(labels: list[str], most: int, seed: int) -> np.ndarray:
    """Sorted row numbers of at most `most` rows, each label keeping its share (at least one row each): all of them
    when there are no more than `most`."""
    if len(labels) <= most:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    rows = {label: np.flatnonzero(labels_arr == label) for label in sorted(set(labels))}
    quota = {label: max(1, round(most * len(r) / len(labels))) for label, r in rows.items()}
    while sum(quota.values()) > most and max(quota.values()) > 1:  # rounding up overshot: the largest gives way
        quota[max(quota, key=quota.get)] -= 1
    return np.sort(np.concatenate([rng.choice(r, quota[label], replace=False) for label, r in rows.items()]))


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


def landmarks(items: list[dict], categories: list[str], names: list[str], most: int = 8) -> dict[int, str]:
    """{row: name} of the items labelled on the maps: those named (any case), else the first item of each category."""
    wanted = {n.lower() for n in names}
    if wanted:
        return {n: i["name"] for n, i in enumerate(items) if i["name"].lower() in wanted}
    first: dict[str, int] = {}
    for n, label in enumerate(categories):
        first.setdefault(label, n)
    return {n: items[n]["name"] for n in list(first.values())[:most]}


def cluster_quality(vectors: dict[str, np.ndarray], labels: list[str]) -> dict[str, float | None]:
    """kNN-10 label agreement and cosine silhouette of each model's vectors under one labelling (None where it has a
    single group)."""
    return {f"{measure} {model}": rounded(fn(v, labels))
            for measure, fn in (("kNN-10 agreement", knn_label_agreement), ("silhouette", silhouette))
            for model, v in vectors.items()}


def related_pair_cosines(items: list[dict], relations: list[dict], vectors: np.ndarray) -> dict[str, float | None]:
    """Mean cosine of the related pairs (head, tail) among `items` against all pairs of the same item types (None
    without relations)."""
    row = {i["id"]: n for n, i in enumerate(items)}
    relations = [r for r in relations if r["head"] in row and r["tail"] in row]  # both ends on the map
    if not relations:
        return {"related pairs": None, "all pairs of those types": None}
    heads, tails = [row[r["head"]] for r in relations], [row[r["tail"]] for r in relations]
    head_types, tail_types = {items[n]["type"] for n in heads}, {items[n]["type"] for n in tails}
    of_types = lambda types: [n for n, i in enumerate(items) if i["type"] in types]
    cross = vectors[of_types(head_types)] @ vectors[of_types(tail_types)].T
    return {"related pairs": round(float((vectors[heads] * vectors[tails]).sum(axis=1).mean()), 4),
            "all pairs of those types": round(float(cross.mean()), 4)}


def pair_separation(cosines: dict[str, list[float]], triplet: float) -> dict[str, float | None]:
    """The held-out rows' mean cosine of anchor to positive and to negatives (pair_similarities), and their triplet
    accuracy, rounded for metrics.json."""
    return {"positive mean": round(float(np.mean(cosines["positive"])), 4),
            "negative mean": round(float(np.mean(cosines["negative"])), 4) if cosines["negative"] else None,
            "triplet accuracy": round(triplet, 4)}
