"""Encoding and evaluation beyond one machine: the corpus encoded and the test queries scored with Ray Data
(`map_batches` over an actor pool, one model replica per actor), for corpora one machine encodes too slowly.
An optional extra: `pip install -e .[ray]`. On a cluster, every node needs this project installed and the run folder
(a shared file system); training across machines stays with torchrun (docs/scaling.md).

    python -m lib.ray_jobs --run dnd-default --replicas 2                  (a local Ray, as the tests run it)
    python -m lib.ray_jobs --run dnd-default --address auto --replicas 16  (on a node of a running cluster)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lib import corpus
from lib.encoders import load_encoder
from lib.evaluate import dense_scores, evaluate_scores, headline_categories, metric_columns
from lib.io import atomic_path
from lib.paths import CORPUS, EXPORT, Run


class EncodeBatch:
    """A Ray Data actor: one encoder replica (lib.encoders.load_encoder) that encodes each batch's texts in one role
    ("document" or "query": each with the model's prompt for it)."""

    def __init__(self, backend: str, model_dir: str, export_dir: str, max_seq_length: int, role: str):
        self.encoder, self.role = load_encoder(backend, model_dir, export_dir, max_seq_length), role

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"row": batch["row"], "vector": self.encoder.encode([str(t) for t in batch["text"]], role=self.role)}


class EvaluateBatch:
    """A Ray Data actor holding the items and their vectors: the per-query metrics of each batch of queries
    (lib.evaluate.evaluate_scores, each query among its own candidates)."""

    def __init__(self, system: str, queries: list[dict], items: list[dict], item_vectors: np.ndarray):
        self.system, self.queries, self.items, self.item_vectors = system, queries, items, item_vectors

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        asked = [self.queries[int(n)] for n in batch["row"]]
        vectors = np.stack(batch["vector"]).astype(np.float32)
        return evaluate_scores(self.system, dense_scores(vectors, self.item_vectors), asked, self.items)


def encode(texts: list[str], backend: str, model_dir: str | Path, export_dir: str | Path, replicas: int,
           batch_size: int = 256, max_seq_length: int = 256, role: str = "document") -> np.ndarray:
    """Normalised embeddings of `texts` as documents or as queries (`role`), encoded by `replicas` actors of the
    connected Ray cluster, in input order."""
    import ray

    dataset = ray.data.from_items([{"row": n, "text": t} for n, t in enumerate(texts)])
    encoded = dataset.map_batches(EncodeBatch, fn_constructor_args=(backend, str(model_dir), str(export_dir), max_seq_length, role),
                                  batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=replicas))
    rows = encoded.to_pandas()
    order = np.argsort(rows["row"].to_numpy())
    return np.stack(rows["vector"].to_numpy()[order]).astype(np.float32)


def evaluate(system: str, queries: list[dict], query_vectors: np.ndarray, items: list[dict], item_vectors: np.ndarray,
             replicas: int, batch_size: int = 64) -> pd.DataFrame:
    """Per-query metrics of `system` on the Ray cluster, as lib.evaluate.evaluate_scores gives them on one machine."""
    import ray

    dataset = ray.data.from_items([{"row": n, "vector": v} for n, v in enumerate(query_vectors)])
    scored = dataset.map_batches(EvaluateBatch, fn_constructor_args=(system, queries, items, item_vectors),
                                 batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=replicas),
                                 batch_format="numpy")
    frame = scored.to_pandas()
    frame = frame.astype({c: float for c in metric_columns(frame)})  # a NaN comes back from Arrow as None
    order = {q["qid"]: n for n, q in enumerate(queries)}
    return frame.sort_values("qid", key=lambda ids: ids.map(order)).reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--runs-root", default="")
    parser.add_argument("--address", default="", help="a running cluster ('auto' on one of its nodes); empty: a local Ray")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas (actors) encoding and scoring at once")
    parser.add_argument("--backend", default="torch-fp32", help="torch-fp32, torch-bf16, onnx-fp32 or onnx-int8")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--out", default="", help="save the item vectors here (.npy), e.g. for an index")
    args = parser.parse_args(argv)
    import ray

    run = Run(args.run, args.runs_root)
    items = corpus.load_items(run.stage(CORPUS))
    queries = corpus.load_queries(run.stage(CORPUS), split="test")
    queries = [q for q in queries if q["category"] in headline_categories(queries)]
    model_dir, export_dir = run.model, run.stage(EXPORT)
    ray.init(address=args.address or None, include_dashboard=False, log_to_driver=False)
    try:
        item_vectors = encode([i["text"] for i in items], args.backend, model_dir, export_dir, args.replicas,
                              max_seq_length=args.max_seq_length)
        query_vectors = encode([q["text"] for q in queries], args.backend, model_dir, export_dir, args.replicas,
                               max_seq_length=args.max_seq_length, role="query")
        frame = evaluate("fine-tuned", queries, query_vectors, items, item_vectors, args.replicas)
    finally:
        ray.shutdown()
    if args.out:
        with atomic_path(args.out) as tmp, open(tmp, "wb") as out:
            np.save(out, item_vectors)
    print(f"{len(items)} items and {len(queries)} headline test queries of {args.run} on Ray ({args.replicas} replicas, "
          f"{args.backend}): NDCG@10 {frame['ndcg@10'].mean():.4f}, MRR@10 {frame['mrr@10'].mean():.4f}"
          + (f"; item vectors → {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
