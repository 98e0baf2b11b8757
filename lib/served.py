"""Choosing for the search that is served: the NDCG@10 of every search setting (dense, BM25, hybrids by RRF or by a
weighted min-max fusion) from one encode, and the dev evaluator whose main score is the best of them, so that stage
04's weight averaging picks α for what the index will serve. α = 0 (the start model fused with BM25 as well as it can
be) is always a candidate: trained weights ship only when what they serve beats what the start model serves."""
from __future__ import annotations

import numpy as np
from sentence_transformers.base.evaluation import SentenceEvaluator

from lib.encoders import model_prompts, with_prompt
from lib.evaluate import bm25_scores, evaluate_scores
from lib.search import fuse

PRIMARY = "served_ndcg@10"


def search_settings(dense_weights: list[float]) -> list[dict]:
    """The search settings compared, in the order a tie is broken: dense, hybrid by RRF, hybrid weighted by each of
    `dense_weights`, BM25."""
    return ([{"mode": "dense", "fusion": "rrf", "dense_weight": 0.5}, {"mode": "hybrid", "fusion": "rrf", "dense_weight": 0.5}]
            + [{"mode": "hybrid", "fusion": "weighted", "dense_weight": float(w)} for w in dense_weights]
            + [{"mode": "bm25", "fusion": "rrf", "dense_weight": 0.5}])


def setting_scores(dense: np.ndarray, keyword: np.ndarray, setting: dict, rrf_k: int = 60) -> np.ndarray:
    """The (queries × items) scores one search setting serves, from the cosine and BM25 scores."""
    scores = {"dense": dense, "bm25": keyword}.get(setting["mode"])
    return scores if scores is not None else fuse(dense, keyword, setting["fusion"], setting["dense_weight"], rrf_k)


def settings_ndcg(dense: np.ndarray, keyword: np.ndarray, queries: list[dict], items: list[dict], settings: list[dict],
                  rrf_k: int = 60) -> list[np.ndarray]:
    """Per-query NDCG@10 of each setting (each query among its own candidates, as stage 06 scores it)."""
    return [evaluate_scores("served", setting_scores(dense, keyword, s, rrf_k), queries, items)["ndcg@10"].to_numpy()
            for s in settings]


def setting_label(setting: dict) -> str:
    """'dense', 'bm25', 'hybrid rrf' or 'hybrid weighted 0.7'."""
    if setting["mode"] != "hybrid":
        return setting["mode"]
    return "hybrid rrf" if setting["fusion"] == "rrf" else f"hybrid weighted {setting['dense_weight']:g}"


def encode_texts(model, texts: list[str], role: str, batch_size: int = 32) -> np.ndarray:
    """Normalised float32 vectors of `texts` with the model's prompt for `role` (query or document)."""
    prompted = with_prompt(texts, model_prompts(model), role)
    return np.asarray(model.encode(prompted, prompt="", batch_size=batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


class ServedEvaluator(SentenceEvaluator):
    """Dev metrics of a model as served: `dense_evaluator`'s metrics (when given) plus the NDCG@10 of every search
    setting over `items`, its main score the best setting's (`served_ndcg@10`, the setting's index in
    `served_setting`). BM25 is scored once; each call encodes the items and queries once."""

    def __init__(self, queries: list[dict], items: list[dict], dense_weights: list[float], dense_evaluator=None,
                 rrf_k: int = 60):
        super().__init__()
        self.queries, self.items, self.dense_evaluator, self.rrf_k = queries, items, dense_evaluator, rrf_k
        self.settings = search_settings(dense_weights)
        self.keyword = bm25_scores([q["text"] for q in queries], [i["text"] for i in items])
        self.primary_metric = PRIMARY
        self.greater_is_better = True

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        metrics = dict(self.dense_evaluator(model)) if self.dense_evaluator is not None else {}
        dense = (encode_texts(model, [q["text"] for q in self.queries], "query")
                 @ encode_texts(model, [i["text"] for i in self.items], "document").T)
        means = [float(np.mean(s)) for s in settings_ndcg(dense, self.keyword, self.queries, self.items, self.settings, self.rrf_k)]
        best = int(np.argmax(means))  # the first of equals: dense before any hybrid, BM25 last
        return metrics | {PRIMARY: means[best], "served_setting": float(best), "served_dense_ndcg@10": means[0],
                          "served_bm25_ndcg@10": means[-1]}

    def chosen_setting(self, metrics: dict) -> dict:
        """The search setting a metrics dict of this evaluator was served with."""
        return dict(self.settings[int(metrics["served_setting"])])
