"""Encode throughput of the fine-tuned student per backend (torch fp32, ONNX fp32, ONNX int8) and batch-1
query latency of the Retriever, on a finished run. Medians of repeated runs in one process; ratios to torch.

    python bench/encode_throughput.py --run dnd-default   (or: make bench)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from lib import corpus, evaluate, export
from lib.io import write_json
from lib.paths import REPO_ROOT, stage_dir
from lib.search import Retriever


class TorchEncoder:
    """SentenceTransformer behind the Encoder protocol."""

    def __init__(self, path: Path, max_seq_length: int):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")
        self.model.max_seq_length = max_seq_length

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--texts", type=int, default=256, help="items encoded per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=256)
    args = parser.parse_args()
    model_dir = stage_dir(args.run, "04_finetune") / "model"
    export_dir = stage_dir(args.run, "07_export")
    if not (export_dir / "model.onnx").exists():
        raise SystemExit(f"{export_dir}/model.onnx not found: run `make all` (PROFILE for run {args.run!r}) first")
    items = corpus.load_items(stage_dir(args.run, "00_corpus"))
    texts = [i["text"] for i in items][: args.texts]
    encoders = {
        "torch-fp32": TorchEncoder(model_dir, args.max_seq_length),
        "onnx-fp32": export.OnnxEncoder(export_dir / "model.onnx", max_seq_length=args.max_seq_length),
        "onnx-int8": export.OnnxEncoder(export_dir / "model-int8.onnx", max_seq_length=args.max_seq_length),
    }
    reference = evaluate.encode(model_dir, texts, max_seq_length=args.max_seq_length)
    results = {}
    for name, encoder in encoders.items():
        seconds = median_seconds(lambda: encoder.encode(texts), args.repeats)
        results[name] = {"texts_per_second": round(len(texts) / seconds, 1),
                         "parity_min_cosine": round(export.parity(reference, encoder.encode(texts))["min_cosine"], 5)}
    for name in results:
        results[name]["ratio_to_torch_fp32"] = round(results[name]["texts_per_second"] / results["torch-fp32"]["texts_per_second"], 2)
    retriever = Retriever(encoders["onnx-fp32"])
    retriever.index(items)
    latencies = []
    for query in ["a creature that turns people to stone", "a fire spell", "undead wizard", "a healing prayer"] * 25:
        start = time.perf_counter()
        retriever.retrieve(query, top_k=10)
        latencies.append((time.perf_counter() - start) * 1000)
    summary = {
        "run": args.run, "texts": len(texts), "repeats": args.repeats, "max_seq_length": args.max_seq_length,
        "machine": f"{platform.machine()} {platform.processor()}", "encode": results,
        "query_latency_ms": {"items": len(items), "p50": round(float(np.percentile(latencies, 50)), 2),
                             "p95": round(float(np.percentile(latencies, 95)), 2)},
    }
    out = REPO_ROOT / "bench" / "results" / "encode_throughput.json"
    write_json(out, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
