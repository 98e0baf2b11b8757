"""Similarity among item vectors, by type: each relation's sampled cosine distribution; nearest neighbours, exact
top-k in memory-bounded blocks or approximate (faiss IVF with an exact rerank) for large types, and how much of the
exact answer the approximate one finds."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

from lib.progress import bar


def type_pairs(types: list[str]) -> list[tuple[str, str]]:
    """Every combination of the item types present, with repeats (monster↔monster, monster↔power, …)."""
    return list(itertools.combinations_with_replacement(sorted(set(types)), 2))


def relation_name(type_a: str, type_b: str) -> str:
    """The relation of two item types, order-free ('monster-power')."""
    return "-".join(sorted((type_a, type_b)))


def sampled_similarities(vectors: np.ndarray, types: list[str], type_a: str, type_b: str, n: int, seed: int) -> np.ndarray:
    """Cosines of `n` random distinct item pairs of two types: the relation's similarity distribution in O(n) memory."""
    rng = np.random.default_rng(seed)
    types_arr = np.asarray(types)
    a = rng.choice(np.flatnonzero(types_arr == type_a), n)
    b = rng.choice(np.flatnonzero(types_arr == type_b), n)
    keep = a != b
    a, b = a[keep], b[keep]
    return np.concatenate([np.einsum("ij,ij->i", vectors[a[start:start + 16384]], vectors[b[start:start + 16384]])
                           for start in range(0, len(a), 16384)] or [np.empty(0, vectors.dtype)])


def relation_similarities(vectors: np.ndarray, types: list[str], seed: int, n: int = 200_000) -> dict[str, np.ndarray]:
    """Each relation's sampled cosine distribution (`n` random pairs per type pair), by relation name."""
    return {relation_name(type_a, type_b): sampled_similarities(vectors, types, type_a, type_b, n, seed)
            for type_a, type_b in type_pairs(types)}


def similarity_summary(vectors: np.ndarray, types: list[str], seed: int, n: int = 200_000) -> dict[str, dict]:
    """Percentiles of each relation's (sampled) cosine distribution, to see where thresholds fall."""
    points = [1, 5, 25, 50, 75, 95, 99]
    return {relation: {f"p{p}": round(float(v), 4) for p, v in zip(points, np.percentile(sims, points))}
            for relation, sims in relation_similarities(vectors, types, seed, n).items()}


def topk_by_block(rows: np.ndarray, cols: np.ndarray, k: int, block_elements: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """The k highest cosines of every row among `cols` (scores, column positions; best first), computed a block of
    rows at a time so no similarity matrix larger than `block_elements` is ever held."""
    k = min(k, len(cols))
    scores = np.empty((len(rows), k), np.float32)
    index = np.empty((len(rows), k), np.int32)
    step = max(1, block_elements // max(1, len(cols)))
    for start in range(0, len(rows), step):
        sims = rows[start:start + step] @ cols.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sims, part, 1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        index[start:start + step] = np.take_along_axis(part, order, 1)
        scores[start:start + step] = np.take_along_axis(part_scores, order, 1)
    return scores, index


def exact_top_k_among(rows: np.ndarray, vectors: np.ndarray, cols: np.ndarray, k: int,
                      chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """topk_by_block among `vectors[cols]`, reading a chunk of columns at a time (never a copy of them all)."""
    scores, positions = np.empty((len(rows), 0), np.float32), np.empty((len(rows), 0), np.int64)
    for start in range(0, len(cols), chunk):
        part_scores, part = topk_by_block(rows, vectors[cols[start:start + chunk]], k)
        scores, positions = np.hstack([scores, part_scores]), np.hstack([positions, part + start])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, positions = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
    return scores, positions


def ann_top_k(rows: np.ndarray, vectors: np.ndarray, cols: np.ndarray, k: int, nprobe: int = 16, rerank: int = 4,
              seed: int = 0, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Approximately the k highest cosines of every row among `vectors[cols]` (scores, positions in `cols`; best
    first): a faiss IVF index with 4-bit product-quantised fast scan proposes k·`rerank` candidates per row, exact
    cosines rank them. Memory: the index's codes (dims/8 bytes per column) and one block of candidates; the columns'
    vectors are read in place, never copied whole."""
    import faiss

    dims = vectors.shape[1]
    k = min(k, len(cols))
    lists = int(np.clip(2 * np.sqrt(len(cols)), 16, 65536))
    subquantizers = dims // 4 if dims % 4 == 0 else dims // 2 if dims % 2 == 0 else dims
    index = faiss.index_factory(dims, f"IVF{lists},PQ{subquantizers}x4fs", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(len(cols), min(len(cols), 40 * lists), replace=False)
    index.train(np.ascontiguousarray(vectors[cols[np.sort(sample)]], dtype=np.float32))
    for start in range(0, len(cols), 65536):
        index.add(np.ascontiguousarray(vectors[cols[start:start + 65536]], dtype=np.float32))
    faiss.extract_index_ivf(index).nprobe = min(nprobe, lists)
    database = np.ascontiguousarray(vectors, dtype=np.float32)  # the same array when it is float32 already
    scores = np.empty((len(rows), k), np.float32)
    positions = np.empty((len(rows), k), np.int32)
    for start in bar(range(0, len(rows), block), desc=f"approximate neighbours among {len(cols):,}", leave=False):
        part = np.ascontiguousarray(rows[start:start + block], dtype=np.float32)
        _, candidates = index.search(part, min(len(cols), k * rerank))
        exact = inner_products_by_index(part, database, cols[np.maximum(candidates, 0)])
        exact[candidates < 0] = -np.inf  # fewer candidates than asked: the rest are empty
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores[start:start + block] = np.take_along_axis(exact, order, 1)
        positions[start:start + block] = np.take_along_axis(candidates, order, 1)
    return scores, positions


def inner_products_by_index(queries: np.ndarray, database: np.ndarray, index: np.ndarray) -> np.ndarray:
    """[i, j] = queries[i] · database[index[i, j]], computed by faiss without gathering the rows (float32, C order)."""
    import faiss

    index = np.ascontiguousarray(index, dtype=np.int64)
    out = np.empty(index.shape, np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(queries), faiss.swig_ptr(database),
                                     faiss.swig_ptr(index), database.shape[1], index.shape[0], index.shape[1])
    return out


def approximate_types(types: list[str], ann_threshold: int) -> list[str]:
    """The item types whose nearest lists `neighbours_by_type` searches approximately (at least `ann_threshold` items)."""
    counts = Counter(types)
    return sorted(t for t, n in counts.items() if ann_threshold and n >= ann_threshold)


def neighbours_by_type(vectors: np.ndarray, types: list[str], k: int, block_elements: int = 1 << 24,
                       ann_threshold: int = 0, ann_nprobe: int = 16, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For every item, its k nearest other items of each type: type → (cosines [n, k], item indices [n, k]). Exact,
    except for a type with at least `ann_threshold` items (0: never), searched approximately (`ann_top_k`)."""
    types_arr = np.asarray(types)
    approximate = approximate_types(types, ann_threshold)
    out = {}
    for t in bar(sorted(set(types)), desc="nearest neighbours per type", leave=False):
        cols = np.flatnonzero(types_arr == t)
        if t in approximate:
            scores, pos = ann_top_k(vectors, vectors, cols, min(k + 1, len(cols)), ann_nprobe, seed=seed)
        else:
            scores, pos = topk_by_block(vectors, vectors[cols], min(k + 1, len(cols)), block_elements)
        out[t] = without_self(scores, pos, cols.astype(np.int32))
    return out


def without_self(scores: np.ndarray, positions: np.ndarray, cols: np.ndarray,
                 chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Row i's k+1 nearest (scores, positions in `cols`) as its k nearest other items (scores, item indices): item i
    dropped where present, else the last. Rewritten in place a chunk of rows at a time (at 1M items a copy is 400 MB);
    the returned arrays are views of the given ones."""
    scores, positions = np.ascontiguousarray(scores), np.ascontiguousarray(positions)  # so that reshape(-1) is a view
    rows, width = positions.shape[0], positions.shape[1] - 1
    flat_scores, flat_index = scores.reshape(-1), positions.reshape(-1)
    for start in range(0, rows, chunk):
        index = cols[positions[start:start + chunk]]
        is_self = index == np.arange(start, start + len(index))[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        kept_scores = scores[start:start + chunk][~is_self]  # copies, read before the writes below
        kept_index = index[~is_self]
        # row r's k entries go to flat[r·k:(r+1)·k], never past the rows still to be read (which start at r·(k+1))
        flat_scores[start * width:start * width + kept_scores.size] = kept_scores
        flat_index[start * width:start * width + kept_index.size] = kept_index
    return flat_scores[:rows * width].reshape(rows, width), flat_index[:rows * width].reshape(rows, width)


def ann_recall(vectors: np.ndarray, types: list[str], neighbours: dict[str, tuple[np.ndarray, np.ndarray]],
               k: int = 10, sample: int = 1000, seed: int = 0) -> float:
    """Recall@k of the nearest lists against exact search, on `sample` random items (mean over types)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), min(sample, len(vectors)), replace=False))
    types_arr = np.asarray(types)
    recalls = []
    for t, (_, index) in neighbours.items():
        cols = np.flatnonzero(types_arr == t)
        width = min(k, index.shape[1])
        _, pos = exact_top_k_among(vectors[rows], vectors, cols, width + 1)
        for row, exact in zip(rows, cols[pos]):
            truth = [c for c in exact if c != row][:width]
            recalls.append(len(set(truth) & set(index[row, :width].tolist())) / max(1, len(truth)))
    return float(np.mean(recalls))


def approximate_neighbours_check(vectors: np.ndarray, types: list[str], neighbours: dict, ann_threshold: int,
                                 seed: int, sample: int = 1000) -> dict:
    """For the types searched approximately: their names, recall@10 against exact search on `sample` items and that
    sample's size (empty when every type was searched exactly); prints it, with a hint when recall is low."""
    approximate = approximate_types(types, ann_threshold)
    if not approximate:
        return {}
    recall = ann_recall(vectors, types, {t: neighbours[t] for t in approximate}, sample=sample, seed=seed)
    checked = {"types": approximate, "recall@10": round(recall, 4), "sample": min(sample, len(vectors))}
    print(f"nearest lists of {', '.join(approximate)} are approximate: recall@10 against exact {recall:.3f} "
          f"on {checked['sample']} items" + (" — low: raise ann_nprobe" if recall < 0.9 else ""))
    return checked
