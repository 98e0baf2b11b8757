"""Stage 05's backends on a finished run: encode throughput per backend (passages and queries) and its
ratio to torch fp32, set against the bound from the model's FLOPs and the CPU's peak; batch-1 query latency
(encode + search) p50/p95 over 10k and 100k items, exact and HNSW. Medians of repeats in one process.

    make bench      (python bench/encode_throughput.py --run dnd-default)

Latency is measured on the run's queries of at most 32 tokens (what people type). The 10k/100k indexes are random
blends of the run's real item vectors plus a little noise: search cost depends on the count and the dimension,
and the blends keep HNSW's recall honest (exact copies would make ties).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lib import bench, corpus, cpu, export
from lib.encoders import load_encoder, native_backends
from lib.bench import mixed_vectors, percentiles_ms
from lib.facts import ExportFacts
from lib.paths import CORPUS, EXPORT, Run
from lib.search import Retriever


def encoder_flops(config, lengths: list[int]) -> float:
    """Multiply-add FLOPs of a BERT-style encoder over texts of these token lengths (projections, FFN, attention)."""
    h, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return float(sum(layers * (2 * n * (4 * h * h + 2 * h * ffn) + 4 * n * n * h) for n in lengths))


def cpu_peak_gflops() -> dict:
    """fp32 peak of the CPUs this process may use: cores × clock × FLOPs per cycle (two FMA units assumed)."""
    flags = cpu.cpu_flags()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz")]
    cores = len(os.sched_getaffinity(0))
    ghz = max(mhz) / 1000 if mhz else float("nan")
    return {"cores": cores, "ghz": round(ghz, 2), "flops_per_cycle": per_cycle, "gflops": round(cores * ghz * per_cycle, 1),
            "simd": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse",
            "vnni": cpu.has_vnni(flags), "bf16": cpu.bf16_supported(flags)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--texts", type=int, default=256, help="passages (and queries) encoded per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--runs-root", default=None, help="where runs live (default data/runs)")
    args = parser.parse_args()
    run = Run(args.run, args.runs_root)
    model_dir, export_dir, corpus_dir = run.model, run.stage(EXPORT), run.stage(CORPUS)
    if not run.metrics_path(EXPORT).exists():
        raise SystemExit(f"{run.metrics_path(EXPORT)} not found: run `make all` for run {args.run!r} first")
    exported = ExportFacts.read(run.stage(EXPORT))
    items = corpus.load_items(corpus_dir)
    queries = [q["text"] for q in corpus.load_queries(corpus_dir)]
    sets = {"passages": [i["text"] for i in items][: args.texts], "queries": queries[: args.texts]}
    backends = native_backends()[0]
    encoders = {b: load_encoder(b, model_dir, export_dir, args.max_seq_length) for b in backends}
    torch_model = encoders["torch-fp32"].model
    peak = cpu_peak_gflops()

    encode = {}
    for name, texts in sets.items():
        lengths = [len(ids) for ids in torch_model.tokenizer(texts, truncation=True, max_length=args.max_seq_length)["input_ids"]]
        flops = encoder_flops(torch_model[0].auto_model.config, lengths)
        reference = encoders["torch-fp32"].encode(texts)
        rows = {}
        for backend, encoder in tqdm(encoders.items(), desc=f"encode {name}"):
            seconds = bench.median_seconds(lambda: encoder.encode(texts), args.repeats)
            rows[backend] = {"texts_per_second": round(len(texts) / seconds, 1),
                             "gflops": round(flops / seconds / 1e9, 1),
                             "share_of_fp32_peak": round(flops / seconds / 1e9 / peak["gflops"], 2),
                             "parity_min_cosine": round(export.parity(reference, encoder.encode(texts))["min_cosine"], 5)}
        for row in rows.values():
            row["ratio_to_torch_fp32"] = round(row["texts_per_second"] / rows["torch-fp32"]["texts_per_second"], 2)
        bound = peak["gflops"] * 1e9 / (flops / len(texts))
        encode[name] = {"texts": len(texts), "mean_tokens": round(float(np.mean(lengths)), 1),
                        "fp32_bound_texts_per_second": round(bound, 1), "backends": rows}

    default = exported.default_backend
    if default not in encoders:  # e.g. torch-bf16 chosen on an AVX-512 machine, timed here held to AVX2
        passed = [b for b in encoders if exported.passed(b)]
        default = max(passed, key=lambda b: encode["passages"]["backends"][b]["texts_per_second"])
        print(f"{exported.default_backend} (the index's default) does not run natively here: searching with {default}")
    short = [q for q, ids in zip(queries, torch_model.tokenizer(queries)["input_ids"]) if len(ids) <= 32]
    latency_queries = (short * (args.latency_queries // max(len(short), 1) + 1))[: args.latency_queries]
    encode_latency = {}
    for backend, encoder in encoders.items():
        encoder.encode(latency_queries[:5])
        seconds = []
        for q in latency_queries:
            start = time.perf_counter()
            encoder.encode([q])
            seconds.append(time.perf_counter() - start)
        encode_latency[backend] = percentiles_ms(seconds)
    base_vectors = encoders[default].encode([i["text"] for i in items])
    query_vectors = encoders[default].encode(latency_queries, role="query")
    search = {}
    for size in args.sizes:
        vectors = mixed_vectors(base_vectors, size, seed=size)
        blend_items = [{**items[k % len(items)], "id": f"{items[k % len(items)]['id']}#{k}"} for k in range(size)]
        retrievers = {}
        for method, threshold in (("exact", size + 1), ("hnsw", 1)):
            build = time.perf_counter()
            retrievers[method] = retriever = Retriever(encoders[default], hnsw_threshold=threshold)
            retriever.set_vectors(blend_items, vectors)
            build = time.perf_counter() - build
            search_only = []
            for query_vector in query_vectors:
                start = time.perf_counter()
                retriever.search(query_vector[None], top_k=10)
                search_only.append(time.perf_counter() - start)
            total = {}  # one query at a time, encoded by each gated backend (thread pools of torch and numpy interact)
            for backend, encoder in encoders.items():
                seconds = []
                for q in latency_queries:
                    start = time.perf_counter()
                    retriever.search(encoder.encode([q], role="query"), top_k=10)
                    seconds.append(time.perf_counter() - start)
                total[backend] = percentiles_ms(seconds)
            search[f"{size}/{method}"] = {"items": size, "method": method, "build_seconds": round(build, 2),
                                          "search_ms": percentiles_ms(search_only),
                                          "encode_plus_search_ms": total}
        exact, approximate = (retrievers[m].search(query_vectors, 10)[0] for m in ("exact", "hnsw"))
        search[f"{size}/hnsw"]["recall@10_vs_exact"] = round(float(np.mean(
            [len(set(x) & set(y)) / 10 for x, y in zip(exact, approximate)])), 4)

    summary = {
        "run": args.run, "repeats": args.repeats, "max_seq_length": args.max_seq_length,
        "cpu": peak,
        "skipped_backends": exported.skipped_backends, "parity_gate": {b: r["passed"] for b, r in exported.backends.items()},
        "default_backend": default, "index_default_backend": exported.default_backend, "encode": encode, "latency_queries": {"distinct": len(short), "timed": len(latency_queries)},
        "query_encode_latency_ms": encode_latency, "search": search,
    }
    print(json.dumps(summary, indent=1))
    print(f"wrote {bench.write_result('encode_throughput', summary)}")


if __name__ == "__main__":
    main()
