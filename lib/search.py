"""Fast local search over items with any encoder: exact cosine search in numpy, faiss HNSW for big indexes;
save/load; and the command line `python -m lib.search --run dnd-default "a query"`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from lib.io import atomic_dir, read_json, read_jsonl, save_npy, write_json, write_jsonl


class Encoder(Protocol):
    """Anything with encode(texts) -> normalised (n, d) array (lib.export.OnnxEncoder, TorchEncoder)."""

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray: ...


def hnsw_index(vectors: np.ndarray, neighbours: int = 32, ef_construction: int = 80):
    """A faiss HNSW index (inner product) over normalised vectors."""
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def exact_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (argpartition, then a sort of the k)."""
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


class Retriever:
    """index(items) once, then retrieve(query, top_k, types) over every item or some types (D&D: monsters, powers).

    Exact search in numpy below `hnsw_threshold` items, faiss HNSW at or above it."""

    def __init__(self, encoder: Encoder, hnsw_threshold: int = 50_000, ef_search: int = 256):
        self.encoder = encoder
        self.hnsw_threshold = hnsw_threshold
        self.ef_search = ef_search
        self.items: list[dict] = []
        self.types = np.array([], dtype=object)
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self.hnsw = None
        self.backend = "custom"

    def index(self, items: list[dict], batch_size: int = 32) -> None:
        """Embed and keep the items (dicts with at least id, type, text)."""
        self.set_vectors(list(items), self.encoder.encode([i["text"] for i in items], batch_size=batch_size))

    def set_vectors(self, items: list[dict], vectors: np.ndarray) -> None:
        """Keep items with vectors already computed by this retriever's encoder; build HNSW when it is big."""
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
        self.items = items
        self.types = np.array([i["type"] for i in items], dtype=object)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.hnsw = hnsw_index(self.vectors) if len(items) >= self.hnsw_threshold else None

    def search(self, query_vectors: np.ndarray, top_k: int = 5, types: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the top-k items per query vector; -1 pads rows with fewer hits."""
        if not self.items:
            raise RuntimeError("Retriever is empty: call index(items) first")
        allowed = np.isin(self.types, types) if types else np.ones(len(self.items), dtype=bool)
        if not allowed.any():
            raise ValueError(f"no indexed item has a type in {types}; indexed types: {sorted(set(self.types))}")
        k = min(top_k, int(allowed.sum()))
        if self.hnsw is not None:
            return self._search_hnsw(query_vectors, k, None if allowed.all() else np.flatnonzero(allowed))
        scores = query_vectors @ self.vectors.T
        if not allowed.all():
            scores[:, ~allowed] = -np.inf
        top = exact_top_k(scores, k)
        return top, np.take_along_axis(scores, top, axis=1)

    def _search_hnsw(self, query_vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """HNSW search, restricted to `allowed_ids` with a faiss ID selector."""
        import faiss

        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(allowed_ids.astype(np.int64))
            params.sel = selector
        scores, top = self.hnsw.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k, params=params)
        return top, scores

    def retrieve_many(self, queries: list[str], top_k: int = 5, types: list[str] | None = None) -> list[list[dict]]:
        """Top-k hits per query: [{'id', 'type', 'name', 'score'}], optionally only some item types."""
        if not self.items:
            raise RuntimeError("Retriever is empty: call index(items) first")
        top, scores = self.search(self.encoder.encode(queries), top_k, types)
        return [[{"id": self.items[i]["id"], "type": self.items[i]["type"], "name": self.items[i].get("name", ""),
                  "score": float(s)} for i, s in zip(row, row_scores) if i >= 0]
                for row, row_scores in zip(top, scores)]

    def retrieve(self, query: str, top_k: int = 5, types: list[str] | None = None) -> list[dict]:
        """Top-k hits for one query."""
        return self.retrieve_many([query], top_k, types)[0]

    def self_retrieval(self, items: list[dict]) -> float:
        """Share of `items` whose own text retrieves them first (a sanity check of index and encoder)."""
        hits = self.retrieve_many([i["text"] for i in items], top_k=1)
        return sum(h[0]["id"] == i["id"] for h, i in zip(hits, items)) / max(len(items), 1)

    def show_examples(self, queries: list[str], top_k: int = 3) -> None:
        """Print the top hits of each query, over all items and within each item type (when there are several)."""
        item_types = sorted({i["type"] for i in self.items})
        for query in queries:
            for types in [None] + ([[t] for t in item_types] if len(item_types) > 1 else []):
                hits = self.retrieve(query, top_k=top_k, types=types)
                print(f"{query!r} in {types or 'all'}: " + "; ".join(f"{h['name']} ({h['score']:.2f})" for h in hits))

    def save(self, path: str | Path, encoder_spec: dict | None = None) -> None:
        """Write items, vectors and settings to a folder (atomically); `encoder_spec` ({backend, model_dir,
        export_dir}, paths relative to the folder where they can be) lets load() rebuild the encoder."""
        if not self.items:
            raise RuntimeError("Retriever is empty: call index(items) before save()")
        path = Path(path)
        spec = dict(encoder_spec or {})
        for key in ("model_dir", "export_dir"):
            if key in spec:
                spec[key] = os.path.relpath(Path(spec[key]).resolve(), path.resolve())
        with atomic_dir(path) as tmp:
            write_jsonl(tmp / "items.jsonl", self.items)
            save_npy(tmp / "vectors.npy", self.vectors)
            write_json(tmp / "retriever.json", {"encoder": spec, "hnsw_threshold": self.hnsw_threshold,
                                                "ef_search": self.ef_search, "items": len(self.items),
                                                "dimension": int(self.vectors.shape[1])})

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None, backend: str | None = None,
             max_seq_length: int = 256) -> Retriever:
        """A saved Retriever. Its encoder is rebuilt from the saved spec unless one is given; another `backend`
        re-embeds the items with that backend."""
        from lib.export import load_encoder

        path = Path(path)
        if not (path / "retriever.json").exists():
            raise FileNotFoundError(f"{path}/retriever.json not found: save a Retriever there first (stage 05 does)")
        settings = read_json(path / "retriever.json")
        spec = settings.get("encoder") or {}
        saved = spec.get("backend", "custom")
        if encoder is None:
            if (backend or saved) == "custom":
                raise ValueError(f"{path}/retriever.json: field 'encoder.backend' missing; pass an encoder to load()")
            encoder = load_encoder(backend or saved, path / spec.get("model_dir", "."), path / spec.get("export_dir", "."),
                                   max_seq_length)
        retriever = cls(encoder, settings["hnsw_threshold"], settings["ef_search"])
        items = read_jsonl(path / "items.jsonl", {"id": str, "type": str, "text": str})
        if backend and backend != saved:
            retriever.index(items)
        else:
            retriever.set_vectors(items, np.load(path / "vectors.npy"))
        retriever.backend = backend or saved
        return retriever


class PromptRetriever:
    """index_prompts(prompts) once, then retrieve(query, top_k): keyword → prompt search with any SentenceTransformer
    folder (e.g. data/runs/prompts-default/04_finetune/model) from stage 04."""

    def __init__(self, model_path: str | Path, batch_size: int = 32):
        from lib.export import TorchEncoder

        self.retriever = Retriever(TorchEncoder(str(model_path)))
        self.batch_size = batch_size

    def index_prompts(self, prompts: list[str] | list[dict]) -> int:
        """Embed the prompts (strings, or dicts with at least 'text'); return how many are indexed."""
        items = [p if isinstance(p, dict) else {"text": p} for p in prompts]
        items = [{"id": str(n), "type": "prompt", "name": "", **p} for n, p in enumerate(items)]
        self.retriever.index(items, batch_size=self.batch_size)
        self.texts = {i["id"]: i["text"] for i in items}
        return len(items)

    def retrieve(self, query: str, top_k: int = 5) -> list[dict]:
        """The top_k prompts for a query, best first: {'id', 'text', 'score'} (cosine)."""
        return [{"id": hit["id"], "text": self.texts[hit["id"]], "score": hit["score"]}
                for hit in self.retriever.retrieve(query, top_k)]


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m lib.search --run dnd-default "a creature that turns people to stone"."""
    from lib.paths import stage_dir

    parser = argparse.ArgumentParser(description="Search a run's items with its exported student (stage 05's index).")
    parser.add_argument("query", nargs="+", help="one or more queries")
    parser.add_argument("--run", default="dnd-default", help="run folder under data/runs, e.g. dnd-default")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--types", type=lambda text: [t for t in text.split(",") if t],
                        help="comma-separated item types to search, e.g. monster or monster,power (default: all)")
    parser.add_argument("--backend", help="override the index's backend: torch-fp32, torch-bf16, onnx-fp32, onnx-int8")
    parser.add_argument("--runs-root", default=None)
    args = parser.parse_args(argv)
    index_dir = stage_dir(args.run, "05_export", args.runs_root) / "index"
    if not (index_dir / "retriever.json").exists():
        raise SystemExit(f"{index_dir} not found: run `make all` (stage 05) for run {args.run!r} first")
    retriever = Retriever.load(index_dir, backend=args.backend)
    print(f"{len(retriever.items)} items, backend {retriever.backend}")
    for query, hits in zip(args.query, retriever.retrieve_many(args.query, args.top_k, args.types)):
        print(f"\n{query}")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit['score']:.3f}  [{hit['type']}] {hit['name']}  ({hit['id']})")


if __name__ == "__main__":
    main()
