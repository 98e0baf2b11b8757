"""Fast local search over items with any encoder: exact cosine search in numpy."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Protocol

import numpy as np


class Encoder(Protocol):
    """Anything with encode(texts) -> normalised (n, d) array (OnnxEncoder, a SentenceTransformer wrapper)."""

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray: ...


class Retriever:
    """index(items) once, then retrieve(query, top_k, types) over monsters, powers or both."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.items: list[dict] = []
        self.vectors = np.zeros((0, 0), dtype=np.float32)

    def index(self, items: list[dict], batch_size: int = 32) -> None:
        """Embed and keep the items (dicts with at least id, type, text)."""
        self.items = list(items)
        self.vectors = self.encoder.encode([i["text"] for i in self.items], batch_size=batch_size)

    def retrieve_many(self, queries: list[str], top_k: int = 5, types: list[str] | None = None) -> list[list[dict]]:
        """Top-k hits per query: [{'id', 'type', 'name', 'score'}], optionally only some item types."""
        if not self.items:
            raise RuntimeError("Retriever is empty: call index(items) first")
        scores = self.encoder.encode(queries) @ self.vectors.T
        if types:
            allowed = np.array([i["type"] in types for i in self.items])
            if not allowed.any():
                raise ValueError(f"no indexed item has a type in {types}")
            scores = np.where(allowed, scores, -np.inf)
        k = min(top_k, int(np.isfinite(scores[0]).sum()))
        results = []
        for row in scores:
            top = np.argsort(-row)[:k]
            results.append([{"id": self.items[i]["id"], "type": self.items[i]["type"],
                             "name": self.items[i].get("name", ""), "score": float(row[i])} for i in top])
        return results

    def retrieve(self, query: str, top_k: int = 5, types: list[str] | None = None) -> list[dict]:
        """Top-k hits for one query."""
        return self.retrieve_many([query], top_k, types)[0]


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m lib.search --run dnd-default "a creature that turns people to stone"."""
    from lib.corpus import load_items
    from lib.export import OnnxEncoder
    from lib.paths import stage_dir

    parser = argparse.ArgumentParser(description="Search a run's items with its exported ONNX model.")
    parser.add_argument("query", nargs="+")
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--types", nargs="*", help="item types to search, e.g. monster power")
    parser.add_argument("--runs-root", default=None)
    args = parser.parse_args(argv)
    onnx_path = stage_dir(args.run, "07_export", args.runs_root) / "model.onnx"
    if not onnx_path.exists():
        raise SystemExit(f"{onnx_path} not found: run `make all` (or `make stage-07`) for run {args.run!r} first")
    retriever = Retriever(OnnxEncoder(onnx_path))
    retriever.index(load_items(stage_dir(args.run, "00_corpus", args.runs_root)))
    for query in args.query:
        print(f"\n{query}")
        for rank, hit in enumerate(retriever.retrieve(query, args.top_k, args.types), 1):
            print(f"  {rank}. {hit['score']:.3f}  [{hit['type']}] {hit['name']}  ({hit['id']})")


if __name__ == "__main__":
    main()
