"""Searches while a big embeddings request runs: the server slices a request into batches of 16 texts, so a search
waits for one slice, not for the whole request. `python -m lib.serve` on 127.0.0.1 over a hybrid index of an SRD slice
(torch fp32, the bundled student); a 2,048-text request (~100 tokens a text) in one thread, a search every 0.1 s in
another until it is done; search latency alone and meanwhile (median, max).

    make bench      (python bench/search_during_big_request.py)
"""
from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from lib.bench import write_result
from lib.domains import dnd
from lib.encoders import TorchEncoder
from lib.paths import Run, base_student_path
from lib.search import Retriever
from lib.serve import start_server

RUN = "dnd-bench"


def timed_search(url: str) -> float:
    """Seconds one hybrid search takes over HTTP."""
    began = time.monotonic()
    httpx.post(f"{url}/v1/search", json={"query": "a fire spell"}, timeout=120).raise_for_status()
    return time.monotonic() - began


def main() -> None:
    items = dnd.build_corpus(max_monsters=30, max_spells=40, max_background_docs=3, attribute_queries_per_category=8)[0]
    texts = [f"{i} " + " ".join(item["text"] for item in items[i % 20:i % 20 + 3])[:480] for i in range(2048)]
    with tempfile.TemporaryDirectory() as tmp:
        retriever = Retriever(TorchEncoder(base_student_path()), mode="hybrid")
        retriever.index(items)
        retriever.save(Run(RUN, tmp).index, {"backend": "torch-fp32", "model_dir": base_student_path()})
        server, url = start_server(["--run", RUN, "--runs-root", tmp], Path(tmp) / "server.log")
        try:
            alone = [timed_search(url) for _ in range(10)]
            big: dict[str, float] = {}

            def embed_all() -> None:
                began = time.monotonic()
                httpx.post(f"{url}/v1/embeddings", json={"input": texts, "model": RUN}, timeout=1200).raise_for_status()
                big["seconds"] = time.monotonic() - began

            worker = threading.Thread(target=embed_all)
            worker.start()
            time.sleep(1)
            meanwhile = []
            while worker.is_alive():
                meanwhile.append(timed_search(url))
                time.sleep(0.1)
            worker.join()
        finally:
            server.terminate()
    out = {"texts": len(texts), "big_request_s": round(big["seconds"], 1), "searches_meanwhile": len(meanwhile),
           "search_alone_p50_ms": round(statistics.median(alone) * 1000, 1),
           "search_meanwhile_p50_ms": round(statistics.median(meanwhile) * 1000, 1),
           "search_meanwhile_max_ms": round(max(meanwhile) * 1000, 1)}
    print(out)
    print(f"wrote {write_result('search_during_big_request', out)}")


if __name__ == "__main__":
    main()
