"""The server under load: `python -m lib.serve` over a 10k-item hybrid index of a finished run, N concurrent clients
(httpx, 1 / 8 / 32; and one lean http.client caller, whose p50 is the headline) sending `/v1/embeddings` with 1 text and with 32 texts, and `/v1/search` (hybrid, top 10);
throughput and p50/p95/p99 latency per level, beside the same work done in-process (the encoder, Retriever.retrieve),
so the HTTP overhead is visible.

    make bench      (python bench/serve_load.py --run dnd-default)

The 10k items are random blends of the run's real item vectors (lib.bench.mixed_vectors) with the real items' texts
for BM25. The clients run on the same machine as the server: on 2 cores they take CPU from it.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

from lib import bench, corpus
from lib.bench import mixed_vectors, percentiles_ms
from lib.facts import ExportFacts
from lib.paths import CORPUS, EXPORT, METRICS_FILE, Run
from lib.search import Retriever
from lib.serve import serving_backend, single_threaded_blas, start_server


def big_index(run: str, runs_root: str | None, size: int, folder: Path, backend: str | None = None) -> Retriever:
    """The run's index grown to `size` items (blended vectors, real texts), saved in `folder` with the run's encoder."""
    from lib.io import read_json

    stages = Run(run, runs_root)
    index_dir = stages.index
    if not (index_dir / "retriever.json").exists():
        raise SystemExit(f"{index_dir} not found: run `make all` for run {run!r} first")
    spec = read_json(index_dir / "retriever.json")["encoder"]
    exported = ExportFacts.read(stages.stage(EXPORT))
    if backend is None:
        backend, note = serving_backend(spec["backend"], exported)
        print(note or f"backend {backend}: the index's default")
    small = Retriever.load(index_dir, backend=backend)
    items = [{**small.items[k % len(small.items)], "id": f"{small.items[k % len(small.items)]['id']}#{k}"} for k in range(size)]
    grown = Retriever(small.encoder, small.hnsw_threshold, small.ef_search, small.mode, small.fusion, small.dense_weight, small.rrf_k)
    grown.set_vectors(items, mixed_vectors(small.vectors, size, seed=size))
    grown.backend = backend
    grown.save(folder, {"backend": backend, "model_dir": index_dir / spec["model_dir"], "export_dir": index_dir / spec["export_dir"],
                        "max_seq_length": spec.get("max_seq_length", 256)})
    shutil.copy(stages.metrics_path(EXPORT), folder.parent / METRICS_FILE)  # stage 05's gate, as the server reads it
    return grown


def chosen_backend(url: str, model: str) -> dict:
    """/v1/index once the server has chosen its backend: it times the gated backends on its compute thread once after
    start, so a first embedding request answers after the choice."""
    httpx.post(f"{url}/v1/embeddings", json={"input": "warm-up", "model": model}, timeout=300).raise_for_status()
    return httpx.get(f"{url}/v1/index", timeout=30).json()


async def load(url: str, path: str, bodies: list[dict], concurrency: int) -> dict:
    """`concurrency` clients sending `bodies` between them as fast as answers come: requests/s and latency."""
    seconds, failures, queue = [], [], list(bodies)

    async def client(http: httpx.AsyncClient):
        while queue:
            body = queue.pop()
            start = time.perf_counter()
            response = await http.post(path, json=body)
            seconds.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:300]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*[client(http) for _ in range(min(concurrency, 4))])  # warm-up: connections, first batches
        queue[:] = list(bodies)
        seconds.clear()
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests to {path} failed, e.g. {failures[0]}")
    return {"requests": len(bodies), "requests_per_second": round(len(bodies) / wall, 1),
            **percentiles_ms(seconds, (50, 95, 99))}


def one_plain_client(url: str, path: str, bodies: list[dict]) -> dict:
    """One client with the least overhead of its own (Python's http.client, one keep-alive connection), sending
    `bodies` one after another: the server's latency as a lean caller sees it."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    headers = {"Content-Type": "application/json"}

    def send(body: dict) -> float:
        start = time.perf_counter()
        connection.request("POST", path, json.dumps(body), headers)
        response = connection.getresponse()
        text = response.read()
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}: {text[:300]!r}")
        return time.perf_counter() - start

    try:
        for body in bodies[:10]:  # warm-up
            send(body)
        seconds = [send(body) for body in bodies]
    finally:
        connection.close()
    return {"requests": len(bodies), **percentiles_ms(seconds, (50, 95, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--runs-root", default=None, help="where runs live (default data/runs)")
    parser.add_argument("--items", type=int, default=10_000, help="items in the served index")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="requests per level (a quarter of it with 32 texts)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the in-process timings (medians)")
    parser.add_argument("--backend", default=None, help="serve with this backend (--backend) instead of the server's "
                        "own choice (results then go to serve-<backend>.json)")
    args = parser.parse_args()
    single_threaded_blas()  # as the server does
    corpus_dir = Run(args.run, args.runs_root).stage(CORPUS)
    queries = [q["text"] for q in corpus.load_queries(corpus_dir) if len(q["text"]) < 200]
    passages = [i["text"] for i in corpus.load_items(corpus_dir)][:32]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        retriever = big_index(args.run, args.runs_root, args.items, folder / "index", args.backend)
        served = {"backend": retriever.backend, "mode": retriever.mode, "fusion": retriever.fusion,
                  "dense_weight": retriever.dense_weight}
        print(f"{args.items} items, {served}")
        in_process = {  # the same work without HTTP, in this process before the server starts, with the index's backend
            "backend": retriever.backend,
            "embeddings_32_texts_per_second": round(32 / bench.median_seconds(lambda: retriever.encoder.encode(passages), args.repeats), 1),
            "embeddings_1_ms": round(bench.median_seconds(lambda: retriever.encoder.encode(queries[:1]), args.repeats * 10) * 1000, 2),
        }
        search_seconds = []
        retriever.retrieve(queries[0], 10)
        for query in (queries * 2)[:args.requests]:
            start = time.perf_counter()
            retriever.retrieve(query, 10)
            search_seconds.append(time.perf_counter() - start)
        in_process["search"] = percentiles_ms(search_seconds, (50, 95, 99))
        retriever = None  # its memory back before the server loads its own

        server, url = start_server(["--run", args.run, "--runs-root", str(folder / "runs"), "--index", str(folder / "index")]
                                   + (["--backend", args.backend] if args.backend else []), folder / "server.log", timeout=300)
        try:
            if args.backend is None:  # the server's own choice, made after start on this machine
                info = chosen_backend(url, args.run)
                served |= {"backend": info["backend"], "backend_chosen_by": info["backend_chosen_by"],
                           "backend_latency_ms": info["backend_latency_ms"]}
                print(f"the server chose {info['backend']} ({info['backend_chosen_by']}: {info['backend_latency_ms']})")
            model = args.run
            scenarios = {
                "embeddings_1": ("/v1/embeddings", [{"input": q, "model": model} for q in (queries * 4)[:args.requests]]),
                "embeddings_32": ("/v1/embeddings", [{"input": passages, "model": model}] * max(args.requests // 4, 8)),
                "search": ("/v1/search", [{"query": q, "top_k": 10} for q in (queries * 4)[:args.requests]]),
            }
            plain = {name: one_plain_client(url, *scenarios[name]) for name in ("search", "embeddings_1")}
            print("one plain client", plain, flush=True)
            http = {}
            for name, (path, bodies) in scenarios.items():
                http[name] = {}
                for concurrency in args.concurrency:
                    http[name][str(concurrency)] = asyncio.run(load(url, path, bodies, concurrency))
                    print(name, concurrency, http[name][str(concurrency)], flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)

    best_32 = max(level["requests_per_second"] for level in http["embeddings_32"].values()) * 32
    summary = {
        "run": args.run, "items": args.items, **served,
        "in_process": in_process, "http": http, "http_one_plain_client": plain,
        "embeddings_32_texts_per_second_http_best": round(best_32, 1),
        "embeddings_32_http_share_of_in_process": round(best_32 / in_process["embeddings_32_texts_per_second"], 2),
        "search_p50_ms_one_client": plain["search"]["p50"],
        "search_p50_ms_one_httpx_client": http["search"][str(min(args.concurrency))]["p50"],
        "goals": {"search_p50_ms": 10, "embeddings_32_share": 0.8},
    }
    print(json.dumps(summary, indent=1))
    print(f"wrote {bench.write_result('serve' if args.backend is None else f'serve-{args.backend}', summary)}")


if __name__ == "__main__":
    main()
