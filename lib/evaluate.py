"""Stage 05: retrieval metrics of several systems on held-out queries with independent ground truth."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

KS = (1, 3, 5, 10)


def candidate_mask(queries: list[dict], item_types: list[str]) -> np.ndarray:
    """(queries × items) bool: the items each query may retrieve (meta.target_types, else all)."""
    types = np.array(item_types)
    rows = []
    for q in queries:
        allowed = q.get("meta", {}).get("target_types")
        rows.append(np.isin(types, allowed) if allowed else np.ones(len(types), dtype=bool))
    return np.stack(rows)


def rank_items(query_vecs: np.ndarray, item_vecs: np.ndarray, mask: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the top_k items per query by cosine (vectors are normalised), masked items excluded."""
    scores = query_vecs @ item_vecs.T
    scores = np.where(mask, scores, -np.inf)
    top = np.argpartition(-scores, min(top_k, scores.shape[1] - 1), axis=1)[:, :top_k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def dcg(gains: list[float]) -> float:
    """Discounted cumulative gain (exponential gain for graded relevance)."""
    return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gains))


def query_metrics(ranked: list[str], relevant: dict[str, float]) -> dict[str, float]:
    """P@k, Recall@k, hit@k, MRR@10, NDCG@5/10 and AP@100 of one ranked list."""
    out: dict[str, float] = {}
    hits = [1.0 if i in relevant else 0.0 for i in ranked]
    for k in KS:
        out[f"precision@{k}"] = sum(hits[:k]) / k
        out[f"recall@{k}"] = sum(hits[:k]) / len(relevant)
        out[f"hit@{k}"] = float(any(hits[:k]))
    first = next((i for i, h in enumerate(hits[:10]) if h), None)
    out["mrr@10"] = 0.0 if first is None else 1.0 / (first + 1)
    for k in (5, 10):
        ideal = dcg(sorted(relevant.values(), reverse=True)[:k])
        out[f"ndcg@{k}"] = dcg([relevant.get(i, 0) for i in ranked[:k]]) / ideal if ideal else 0.0
    precisions = [sum(hits[: i + 1]) / (i + 1) for i, h in enumerate(hits[:100]) if h]
    out["map@100"] = sum(precisions) / min(len(relevant), 100)
    return out


def evaluate_system(system: str, query_vecs: np.ndarray, item_vecs: np.ndarray, queries: list[dict],
                    item_ids: list[str], item_types: list[str]) -> pd.DataFrame:
    """Per-query metrics of one system (one row per query)."""
    ranked = rank_items(query_vecs, item_vecs, candidate_mask(queries, item_types), top_k=100)
    rows = []
    for q, idx in zip(queries, ranked):
        ranked_ids = [item_ids[i] for i in idx]
        rows.append({"system": system, "qid": q["qid"], "category": q["category"],
                     "top1": ranked_ids[0], **query_metrics(ranked_ids, q["relevant"])})
    return pd.DataFrame(rows)


def summarize(per_query: pd.DataFrame) -> pd.DataFrame:
    """Mean of every metric per system and category, plus an 'all' category."""
    metrics = [c for c in per_query.columns if "@" in c]
    by_cat = per_query.groupby(["system", "category"])[metrics].mean()
    overall = per_query.groupby("system")[metrics].mean().assign(category="all").set_index("category", append=True)
    return pd.concat([by_cat, overall]).sort_index()


def encode(model_path: str, texts: list[str], batch_size: int = 32, max_seq_length: int | None = None) -> np.ndarray:
    """Normalised embeddings of `texts` from a SentenceTransformer folder."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu")
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=len(texts) > 256)


def headline(summary: pd.DataFrame, systems: list[str], metrics: list[str], category: str = "all") -> dict[str, dict[str, float]]:
    """{system: {metric: value}} for one category ('all' = the numbers the report leads with)."""
    return {s: {m: round(float(summary.loc[(s, category), m]), 4) for m in metrics} for s in systems
            if (s, category) in summary.index}
