"""Fast local search over items: dense (any encoder; exact cosine in numpy, faiss HNSW for big indexes), BM25
(bm25s) or the hybrid of both (reciprocal rank fusion, or a weighted sum of normalised scores); save/load; and the
command line `python -m lib.search --run dnd-default "a query"`."""
from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from lib.encoders import TorchEncoder, load_encoder
from lib.io import atomic_dir, read_json, read_jsonl, save_npy, write_json, write_jsonl
from lib.paths import Run, locate
from lib.release import ReleaseError, resolve

SEARCH_MODES = ("dense", "bm25", "hybrid")
FUSIONS = ("rrf", "weighted")
SCORE_TYPES = {"dense": "cosine", "bm25": "bm25", "rrf": "rrf", "weighted": "weighted"}


class Encoder(Protocol):
    """Anything with encode(texts, role=) -> normalised (n, d) array, role "document", "query" or "text" (as given)
    (lib.encoders.OnnxEncoder, TorchEncoder)."""

    def encode(self, texts: list[str], batch_size: int = 32, role: str = "document") -> np.ndarray: ...


def truncate(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Matryoshka vectors cut to their first `dimensions` and renormalised (unchanged at full width)."""
    if dimensions >= vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def hnsw_index(vectors: np.ndarray, neighbours: int = 32, ef_construction: int = 80):
    """A faiss HNSW index (inner product) over normalised vectors."""
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


class Bm25:
    """BM25 over item texts (bm25s; English stop words, Snowball stemming): the keyword half of the hybrid, and the
    BM25 system of stage 06."""

    def __init__(self, texts: list[str] | None = None, index=None):
        import logging

        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # its DEBUG lines would fill the stage logs

        self.index = index if index is not None else bm25s.BM25()
        if texts is not None:
            self.index.index(bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False),
                             show_progress=False)
        self.size = int(self.index.scores["num_docs"])

    @functools.cached_property
    def stemmer(self):
        """The English Snowball stemmer (PyStemmer), built once per index (every search uses it)."""
        import Stemmer

        return Stemmer.Stemmer("english")

    def scores(self, query_texts: list[str]) -> np.ndarray:
        """(queries × items) BM25 scores; a query with no indexed word scores 0 everywhere."""
        import bm25s

        vocab = self.index.vocab_dict
        tokens = bm25s.tokenize(query_texts, stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)
        out = np.zeros((len(query_texts), self.size), dtype=np.float32)
        for row, words in enumerate(tokens):
            known = [w for w in words if w in vocab]
            if known:
                out[row] = self.index.get_scores(known)
        return out

    def save(self, path: Path) -> None:
        """Write the index into a folder (bm25s's own files)."""
        self.index.save(str(path), show_progress=False)

    @classmethod
    def load(cls, path: Path) -> Bm25:
        """An index written by save()."""
        import bm25s

        return cls(index=bm25s.BM25.load(str(path), show_progress=False))


def rrf_scores(score_matrices: list[np.ndarray], k: int = 60) -> np.ndarray:
    """Reciprocal rank fusion: Σ 1 / (k + rank) over the systems' rankings of every item."""
    fused = np.zeros_like(score_matrices[0], dtype=np.float64)
    for scores in score_matrices:
        ranks = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1) + 1
        fused += 1.0 / (k + ranks)
    return fused


def min_max(scores: np.ndarray) -> np.ndarray:
    """Each row scaled to [0, 1] over its finite values (-inf, an item the search did not reach, becomes 0)."""
    finite = np.isfinite(scores)
    low = np.where(finite, scores, np.inf).min(axis=1, keepdims=True)
    high = np.where(finite, scores, -np.inf).max(axis=1, keepdims=True)
    scaled = (scores - low) / np.where(high > low, high - low, 1.0)
    return np.where(finite, scaled, 0.0)


def fuse(dense: np.ndarray, keyword: np.ndarray, fusion: str = "rrf", dense_weight: float = 0.5, rrf_k: int = 60) -> np.ndarray:
    """The hybrid's (queries × items) scores: RRF of both rankings, or dense_weight × normalised cosine +
    (1 − dense_weight) × normalised BM25 (min-max per query)."""
    if fusion == "rrf":
        return rrf_scores([keyword, dense], rrf_k)
    if fusion == "weighted":
        return dense_weight * min_max(dense) + (1 - dense_weight) * min_max(keyword)
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")


def exact_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (argpartition, then a sort of the k)."""
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


class Retriever:
    """index(items) once, then retrieve(query, top_k, types, mode) over every item or some types (D&D: monsters,
    powers), by `mode`: dense (cosine), bm25, or hybrid (both fused by `fusion`: rrf, or weighted with
    `dense_weight`). Exact dense search in numpy below `hnsw_threshold` items, faiss HNSW at or above it."""

    def __init__(self, encoder: Encoder, hnsw_threshold: int = 50_000, ef_search: int = 256, mode: str = "dense",
                 fusion: str = "rrf", dense_weight: float = 0.5, rrf_k: int = 60):
        self.encoder = encoder
        self.hnsw_threshold = hnsw_threshold
        self.ef_search = ef_search
        self.set_mode(mode, fusion, dense_weight, rrf_k)
        self.items: list[dict] = []
        self.types = np.array([], dtype=object)
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self.hnsw = None
        self.bm25: Bm25 | None = None
        self.backend = "custom"

    def set_mode(self, mode: str, fusion: str = "rrf", dense_weight: float = 0.5, rrf_k: int = 60) -> None:
        """The default search: mode, and for the hybrid its fusion, the dense weight and the RRF constant."""
        check_mode(mode)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        if not 0 <= dense_weight <= 1:
            raise ValueError(f"dense_weight must lie in [0, 1], got {dense_weight}")
        self.mode, self.fusion, self.dense_weight, self.rrf_k = mode, fusion, float(dense_weight), int(rrf_k)

    def index(self, items: list[dict], batch_size: int = 32) -> None:
        """Embed and keep the items (dicts with at least id, type, text)."""
        self.set_vectors(list(items), self.encoder.encode([i["text"] for i in items], batch_size=batch_size))

    def set_vectors(self, items: list[dict], vectors: np.ndarray, bm25: Bm25 | None = None) -> None:
        """Keep items with vectors already computed by this retriever's encoder; index their texts for BM25 (unless
        given); build HNSW when it is big."""
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
        self.items = items
        self.types = np.array([i["type"] for i in items], dtype=object)
        self.temporal_order = np.array([float(order) if (order := (i.get("meta") or {}).get("temporal_order")) is not None
                                        else np.nan for i in items], dtype=np.float64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.hnsw = hnsw_index(self.vectors) if len(items) >= self.hnsw_threshold else None
        self.bm25 = bm25 if bm25 is not None else Bm25([i["text"] for i in items])

    def allowed(self, types: list[str] | None, max_temporal_order: float | None = None) -> np.ndarray:
        """Which items have one of `types` (all when None or empty) and, with `max_temporal_order`, a temporal_order
        (meta) at most that (an item without one is always allowed): e.g. chunks up to where a reader has got."""
        if not self.items:
            raise RuntimeError("Retriever is empty: call index(items) first")
        allowed = np.isin(self.types, types) if types else np.ones(len(self.items), dtype=bool)
        if not allowed.any():
            raise ValueError(f"no indexed item has a type in {types}; indexed types: {sorted(set(self.types))}")
        if max_temporal_order is not None:
            allowed &= ~(self.temporal_order > max_temporal_order)  # NaN (no temporal_order) compares False: kept
            if not allowed.any():
                raise ValueError(f"no indexed item{' of those types' if types else ''} has a temporal_order at or "
                                 f"below {max_temporal_order}")
        return allowed

    def search(self, query_vectors: np.ndarray, top_k: int = 5, types: list[str] | None = None,
               max_temporal_order: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dense search: (indices, cosines) of the top-k items per query vector; -1 pads rows with fewer hits."""
        allowed = self.allowed(types, max_temporal_order)
        k = min(top_k, int(allowed.sum()))
        query_vectors = self.fit(query_vectors)
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

    def fit(self, query_vectors: np.ndarray) -> np.ndarray:
        """Query vectors cut to the index's width when the index holds Matryoshka vectors cut shorter (stage 05's
        index_dimensions)."""
        return truncate(query_vectors, self.vectors.shape[1]) if query_vectors.shape[1] > self.vectors.shape[1] else query_vectors

    def dense_scores(self, query_vectors: np.ndarray, depth: int = 1000) -> np.ndarray:
        """(queries × items) cosines: every item with exact search; with HNSW, its `depth` nearest, -inf elsewhere."""
        query_vectors = self.fit(query_vectors)
        if self.hnsw is None:
            return query_vectors @ self.vectors.T
        top, cosines = self._search_hnsw(query_vectors, min(depth, len(self.items)), None)
        scores = np.full((len(query_vectors), len(self.items)), -np.inf, dtype=np.float32)
        for row, (idx, values) in enumerate(zip(top, cosines)):
            scores[row, idx[idx >= 0]] = values[idx >= 0]
        return scores

    def score_matrix(self, query_texts: list[str], query_vectors: np.ndarray, mode: str | None = None) -> np.ndarray:
        """(queries × items) scores of one mode (default: the index's): cosine, BM25, or the fused hybrid."""
        return self._scores(query_texts, query_vectors, check_mode(mode or self.mode))[0]

    def _scores(self, query_texts: list[str], query_vectors: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The mode's (queries × items) scores, and the BM25 scores when the mode used them."""
        if mode == "dense":
            return self.dense_scores(query_vectors), None
        keyword = self.bm25.scores(query_texts)
        if mode == "bm25":
            return keyword, keyword
        return fuse(self.dense_scores(query_vectors), keyword, self.fusion, self.dense_weight, self.rrf_k), keyword

    def hits(self, query_texts: list[str], query_vectors: np.ndarray, top_k: int = 5, types: list[str] | None = None,
             mode: str | None = None, max_temporal_order: float | None = None) -> list[list[dict]]:
        """Top-k hits per query, best first: id, type, name, text, `score` and `score_type` (cosine, bm25, rrf or
        weighted), and in hybrid mode the item's `cosine` and `bm25` beside the fused score; only items `allowed`; in
        BM25 mode only items that share a word with the query (none may)."""
        mode = check_mode(mode or self.mode)
        allowed = self.allowed(types, max_temporal_order)
        query_vectors = self.fit(query_vectors)
        if mode == "dense":
            top, scores = self.search(query_vectors, top_k, types, max_temporal_order)
        else:
            scores, keyword = self._scores(query_texts, query_vectors, mode)
            scores = np.where(allowed, scores, -np.inf)
            top = exact_top_k(scores, min(top_k, int(allowed.sum())))
            scores = np.take_along_axis(scores, top, axis=1)
        score_type = SCORE_TYPES[self.fusion if mode == "hybrid" else mode]
        out = []
        for row, (idx, row_scores) in enumerate(zip(top, scores)):
            hits = []
            for i, score in zip(idx, row_scores):
                if i < 0 or (mode == "bm25" and score <= 0):  # BM25 scores 0 where no query word occurs: no hit
                    continue
                item = self.items[i]
                hit = {"id": item["id"], "type": item["type"], "name": item.get("name", ""), "text": item["text"],
                       "score": float(score), "score_type": score_type}
                if mode == "hybrid":
                    hit |= {"cosine": float(self.vectors[i] @ query_vectors[row]), "bm25": float(keyword[row, i])}
                hits.append(hit)
            out.append(hits)
        return out

    def retrieve_many(self, queries: list[str], top_k: int = 5, types: list[str] | None = None,
                      mode: str | None = None, max_temporal_order: float | None = None) -> list[list[dict]]:
        """Top-k hits per query (see hits()), optionally only some item types or items up to a temporal_order; mode
        defaults to the index's."""
        if not self.items:
            raise RuntimeError("Retriever is empty: call index(items) first")
        vectors = (self.encoder.encode(queries, role="query") if (mode or self.mode) != "bm25"
                   else np.zeros((len(queries), 0)))
        return self.hits(queries, vectors, top_k, types, mode, max_temporal_order)

    def retrieve(self, query: str, top_k: int = 5, types: list[str] | None = None, mode: str | None = None,
                 max_temporal_order: float | None = None) -> list[dict]:
        """Top-k hits for one query."""
        return self.retrieve_many([query], top_k, types, mode, max_temporal_order)[0]

    def self_retrieval(self, items: list[dict]) -> float:
        """Share of `items` whose own text retrieves them first by dense search (a sanity check of index and encoder)."""
        hits = self.retrieve_many([i["text"] for i in items], top_k=1, mode="dense")
        return sum(h[0]["id"] == i["id"] for h, i in zip(hits, items)) / max(len(items), 1)

    def show_examples(self, queries: list[str], top_k: int = 3) -> None:
        """Print the top hits of each query, over all items and within each item type (when there are several)."""
        item_types = sorted({i["type"] for i in self.items})
        for query in queries:
            for types in [None] + ([[t] for t in item_types] if len(item_types) > 1 else []):
                hits = self.retrieve(query, top_k=top_k, types=types)
                print(f"{query!r} in {types or 'all'} ({self.mode}): "
                      + "; ".join(f"{h['name']} ({h['score_type']} {h['score']:.3f})" for h in hits))

    def settings(self) -> dict:
        """The search defaults saved with the index."""
        return {"mode": self.mode, "fusion": self.fusion, "dense_weight": self.dense_weight, "rrf_k": self.rrf_k,
                "hnsw_threshold": self.hnsw_threshold, "ef_search": self.ef_search}

    def save(self, path: str | Path, encoder_spec: dict | None = None) -> None:
        """Write items, vectors, the BM25 index and the settings to a folder (atomically); `encoder_spec` ({backend,
        model_dir, export_dir}, paths relative to the folder where they can be) lets load() rebuild the encoder."""
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
            self.bm25.save(tmp / "bm25")
            write_json(tmp / "retriever.json", {"encoder": spec, **self.settings(), "items": len(self.items),
                                                "dimension": int(self.vectors.shape[1])})

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None, backend: str | None = None,
             max_seq_length: int | None = None, reuse_vectors: bool = False) -> Retriever:
        """A saved Retriever with its search defaults. Its encoder is rebuilt from the saved spec ({backend, model_dir,
        export_dir, max_seq_length}) unless one is given; another `backend` re-embeds the items with that backend,
        unless `reuse_vectors` (both backends passed stage 05's parity gate: their vectors are interchangeable).
        `path` may also be a release (models/<domain>/<version> or models/<domain>/current)."""
        path, where = Path(path), locate(path)
        if where is not None and where.kind == "release":  # a release (make release): its index
            path = resolve(where.path) / "index"
        elif where is not None and where.release is not None:  # a release's index folder: the release is checked first
            resolve(where.release)
        if not (path / "retriever.json").exists():
            raise FileNotFoundError(f"{path}/retriever.json not found: save a Retriever there first (stage 05 does)")
        settings = saved_settings(path)
        spec = settings.get("encoder") or {}
        saved = spec.get("backend", "custom")
        max_seq_length = max_seq_length or spec.get("max_seq_length", 256)  # the tokens the items were embedded with
        if encoder is None:
            if (backend or saved) == "custom":
                raise ValueError(f"{path}/retriever.json: field 'encoder.backend' missing; pass an encoder to load()")
            encoder = load_encoder(backend or saved, path / spec.get("model_dir", "."), path / spec.get("export_dir", "."),
                                   max_seq_length)
        retriever = cls(encoder, settings["hnsw_threshold"], settings["ef_search"], settings["mode"],
                        settings["fusion"], settings["dense_weight"], settings["rrf_k"])
        items = read_jsonl(path / "items.jsonl", {"id": str, "type": str, "text": str})
        bm25 = Bm25.load(path / "bm25") if (path / "bm25").is_dir() else None  # indexes saved before BM25: rebuilt
        if backend and backend != saved and not reuse_vectors:
            width = np.load(path / "vectors.npy", mmap_mode="r").shape[1]  # a Matryoshka index keeps its cut width
            retriever.set_vectors(items, truncate(encoder.encode([i["text"] for i in items]), width), bm25)
        else:
            retriever.set_vectors(items, np.load(path / "vectors.npy"), bm25)
        retriever.backend = backend or saved
        retriever.dimensions = sorted({int(d) for d in spec.get("dimensions") or []} | {int(retriever.vectors.shape[1])})
        return retriever


def saved_settings(index_dir: str | Path) -> dict:
    """An index's retriever.json, with the Retriever's defaults for what an older index did not record."""
    defaults = {"mode": "dense", "fusion": "rrf", "dense_weight": 0.5, "rrf_k": 60}
    return defaults | read_json(Path(index_dir) / "retriever.json")


def check_mode(mode: str) -> str:
    """`mode` if it is a search mode, else a ValueError naming them."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; choose one of {', '.join(SEARCH_MODES)}")
    return mode


class PromptRetriever:
    """index_prompts(prompts) once, then retrieve(query, top_k): keyword → prompt search with any SentenceTransformer
    folder (e.g. data/runs/prompts-default/04_finetune/model) from stage 04."""

    def __init__(self, model_path: str | Path, batch_size: int = 32):
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
    parser = argparse.ArgumentParser(description="Search a run's items with its exported student (stage 05's index).")
    parser.add_argument("query", nargs="+", help="one or more queries")
    parser.add_argument("--run", default="dnd-default", help="run folder under data/runs, e.g. dnd-default")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--types", type=lambda text: [t for t in text.split(",") if t],
                        help="comma-separated item types to search, e.g. monster or monster,power (default: all)")
    parser.add_argument("--mode", choices=SEARCH_MODES, help="dense, bm25 or hybrid (default: the index's, chosen on dev by stage 05)")
    parser.add_argument("--backend", help="override the index's backend: torch-fp32, torch-bf16, onnx-fp32, onnx-int8")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--index", default=None, help="a saved index or a release (models/<domain>/current) instead of the run's")
    args = parser.parse_args(argv)
    index_dir = Path(args.index) if args.index else Run(args.run, args.runs_root).index
    if not args.index and not (index_dir / "retriever.json").exists():
        raise SystemExit(f"{index_dir} not found: run `make all` (stage 05) for run {args.run!r} first")
    try:
        retriever = Retriever.load(index_dir, backend=args.backend)
    except ReleaseError as error:
        raise SystemExit(f"error: {error}") from None
    mode = args.mode or retriever.mode
    fusion = f" ({retriever.fusion}" + (f", dense weight {retriever.dense_weight:g})" if retriever.fusion == "weighted" else ")")
    print(f"{len(retriever.items)} items, backend {retriever.backend}, mode {mode}{fusion if mode == 'hybrid' else ''}")
    for query, hits in zip(args.query, retriever.retrieve_many(args.query, args.top_k, args.types, mode)):
        print(f"\n{query}")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit['score_type']} {hit['score']:.3f}  [{hit['type']}] {hit['name']}  ({hit['id']})")


if __name__ == "__main__":
    main()
