"""Serve a run's index over HTTP (FastAPI + uvicorn): OpenAI-compatible `POST /v1/embeddings`, `POST /v1/search`
(dense, bm25 or hybrid), `POST /v1/feedback` into the run's feedback.sqlite, a search page at `/`, `GET /health`
and Prometheus metrics at `GET /metrics`. Bound to 127.0.0.1 unless --host is given.

    python -m lib.serve --run dnd-default                 (make serve)
    python -m lib.serve feedback --run dnd-default --export feedback.jsonl
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hmac
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from fastapi import Request  # at module level: the routes' annotations are resolved here

from lib.domains.records import blank, utf8_encodable
from lib.encoders import load_encoder, native_backends, with_prompt
from lib.feedback import FeedbackStore, model_version
from lib.io import read_json, write_jsonl
from lib.leakage import normal_text
from lib.paths import REPO_ROOT, Run
from lib.release import ReleaseError, resolve
from lib.search import SEARCH_MODES, Retriever, truncate
from lib.teacher.budget import token_encoding
from lib.teacher.server import free_port, is_loopback_host

PAGE = Path(__file__).with_name("search_page.html")
OPEN_ROUTES = ("/health", "/")  # no API key needed: the liveness probe and the page's own HTML (its calls need it)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the server answers 4xx and says which limit to respect."""

    max_inputs: int = 2048  # texts per /v1/embeddings request (OpenAI's limit)
    max_input_tokens: int = 8192  # tokens of one text (texts are embedded truncated to the model's max_seq_length)
    max_request_tokens: int = 300_000  # tokens of all texts of one request
    max_top_k: int = 100  # hits per /v1/search request
    max_body_bytes: int = 16 * 1024 * 1024  # request body


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(self.status)
        return {"error": {"message": self.message, "type": kind or ("invalid_request_error" if self.status < 500 else "server_error"),
                          "param": self.param, "code": self.code}}


class MicroBatcher:
    """Texts of requests that arrive together are embedded in one encoder call (one call at a time, on `run`'s
    thread): each request waits at most for the call before it, then shares the next one with whatever else queued.
    A big request goes in slices of `slice_texts`, one after another, so the searches that arrive meanwhile run
    between its slices instead of waiting for all of it."""

    def __init__(self, encode, run, max_batch_texts: int = 256, slice_texts: int = 16):
        self.encode_texts, self.run_on_compute, self.max_batch_texts = encode, run, max_batch_texts
        self.slice_texts = slice_texts
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.calls = 0

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Cancel the worker."""
        if self.worker:
            self.worker.cancel()

    async def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised embeddings of `texts`, computed in batches with the other requests waiting, a slice at a time."""
        parts = []
        for start in range(0, len(texts), self.slice_texts):
            future = asyncio.get_running_loop().create_future()
            await self.queue.put((texts[start:start + self.slice_texts], future))
            parts.append(await future)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def _run(self) -> None:
        held = None  # a job that did not fit into the last batch: it opens the next one
        while True:
            jobs = [held or await self.queue.get()]
            held, size = None, len(jobs[0][0])
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if size + len(job[0]) > self.max_batch_texts:
                    held = job
                    break
                jobs.append(job)
                size += len(job[0])
            texts = [t for job_texts, _ in jobs for t in job_texts]
            try:
                vectors = await self.run_on_compute(self.encode_texts, texts)
                self.calls += 1
            except Exception as error:  # these requests fail, the server goes on
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for job_texts, future in jobs:
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result(vectors[start:start + len(job_texts)])
                start += len(job_texts)


def texts_of(payload: dict, limits: Limits) -> list[str]:
    """The texts of an embeddings request's `input` (a string, a list of strings, or cl100k_base token ids as OpenAI
    clients such as LangChain's send them: a list of ints or a list of such lists, decoded here), or an ApiError saying
    what to change."""
    if "input" not in payload:
        raise ApiError(400, "field 'input' is required: a string or a list of strings", "input")
    value = payload["input"]
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(is_token_id(t) for t in texts):
        texts = [texts]  # one text as token ids
    if not isinstance(texts, list) or not all(isinstance(t, str) or is_token_array(t) for t in texts):
        raise ApiError(400, "field 'input' must be a string, a list of strings, or cl100k_base token ids (a list of "
                       "integers, or a list of such lists)", "input")
    if not texts:
        raise ApiError(400, "field 'input' is an empty list: send at least one text", "input")
    if len(texts) > limits.max_inputs:
        raise ApiError(400, f"field 'input' has {len(texts)} texts; at most {limits.max_inputs} per request: split it", "input")
    if any(not isinstance(t, str) and len(t) > limits.max_input_tokens for t in texts):
        raise ApiError(400, f"field 'input' holds more than {limits.max_input_tokens} token ids in one text: shorten it", "input")
    texts = [t if isinstance(t, str) else decode_token_ids(t, n) for n, t in enumerate(texts)]
    if any(blank(t) for t in texts):
        raise ApiError(400, f"field 'input' holds an empty text (index {next(i for i, t in enumerate(texts) if blank(t))}): "
                       "every text needs at least one non-space character", "input")
    return texts


def is_token_id(value) -> bool:
    """An int that is not a bool (JSON true/false are not token ids)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_token_array(value) -> bool:
    """A non-empty list of token ids."""
    return isinstance(value, list) and bool(value) and all(is_token_id(t) for t in value)


@functools.cache
def cl100k_base():
    """OpenAI's cl100k_base encoding (bundled by bpe-openai: no download), loaded once."""
    return token_encoding()


def decode_token_ids(ids: list[int], index: int) -> str:
    """The text of cl100k_base token ids, or an ApiError naming the text whose ids are not cl100k_base's."""
    encoding = cl100k_base()
    bad = next((t for t in ids if not 0 <= t < encoding.n_vocab), None)
    if bad is not None:
        raise ApiError(400, f"field 'input': text {index} holds token id {bad}, outside cl100k_base (0 to "
                       f"{encoding.n_vocab - 1}); send the text, or ids from tiktoken's cl100k_base", "input")
    try:
        return encoding.decode(ids)
    except Exception as err:  # ids of special tokens or bytes that are not UTF-8
        raise ApiError(400, f"field 'input': text {index}'s token ids do not decode with cl100k_base ({err}); send the text",
                       "input") from None


class Service:
    """What the routes share: the index, its encoder behind a micro-batcher, names, limits, feedback, metrics."""

    def __init__(self, retriever: Retriever, run: str, version: str, feedback: FeedbackStore, aliases: list[str] = (),
                 api_key: str | None = None, limits: Limits = Limits()):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.retriever, self.run, self.version, self.feedback = retriever, run, version, feedback
        self.item_by_id = {item["id"]: item for item in retriever.items}
        self.models = [run, *[a for a in aliases if a != run]]
        self.api_key, self.limits = api_key, limits
        self.max_seq_length = getattr(retriever.encoder, "max_seq_length", 512)  # what usage counts per text
        self.tokenizer = retriever.encoder.tokenizer
        # every computation (token counts, encoding, search) on one thread: a fast tokenizer used by two threads at
        # once fails ("Already borrowed"), and torch's OpenMP pool belongs to the thread that calls it
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.prompts = getattr(retriever.encoder, "prompts", {})  # the model's query and document prefixes
        self.latency_candidates: dict[str, tuple[Path, Path]] = {}  # gated backends to time against the served one
        self.allowed_hosts: set[str] | None = None  # Host names answered (None: any); serve_main sets them from --host
        self.request_seconds = REQUEST_SECONDS  # how long a request's body may take to arrive
        self.feedback_per_minute = FEEDBACK_PER_MINUTE
        self.feedback_times: dict[tuple, list[float]] = {}  # per client or (query, item): its judgements of the last minute
        self.backend_latency_ms: dict[str, float] = {}
        self.backend_chosen_by = "the caller"
        self.batcher = MicroBatcher(lambda texts: retriever.encoder.encode(texts, role="text"), self.on_compute)
        self.registry = CollectorRegistry()
        self.requests = Counter("codex_forge_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram("codex_forge_request_seconds", "Request latency by route", ["route"], registry=self.registry,
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
        self.texts = Counter("codex_forge_embedded_texts", "Texts embedded (embeddings and search queries)", registry=self.registry)

    async def on_compute(self, fn, *args):
        """fn(*args) on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    def check_model(self, payload: dict, required: bool) -> str:
        """The served model a request names (the run or an alias); unknown → 404 naming the ones served."""
        name = payload.get("model")
        if name is None and not required:
            return self.run
        if name is None:
            raise ApiError(400, f"field 'model' is required: use {self.run!r}", "model")
        if name not in self.models:
            raise ApiError(404, f"model {name!r} is not served here; use one of {self.models}", "model", "model_not_found")
        return name

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text (special tokens included, before truncation), checked against the limits; a text too
        long to be within them (over 8 characters per token allowed) is refused before it is tokenised."""
        max_chars = self.limits.max_input_tokens * 8
        too_big = next((i for i, t in enumerate(texts) if len(t) > max_chars), None)
        if too_big is not None:
            raise ApiError(400, f"text {too_big} of 'input' has {len(texts[too_big])} characters; at most {max_chars} "
                           f"({self.limits.max_input_tokens} tokens) per text: shorten it", "input", "context_length_exceeded")
        counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
        too_long = [i for i, n in enumerate(counts) if n > self.limits.max_input_tokens]
        if too_long:
            raise ApiError(400, f"text {too_long[0]} of 'input' has {counts[too_long[0]]} tokens; at most "
                           f"{self.limits.max_input_tokens} per text: shorten it", "input", "context_length_exceeded")
        if sum(counts) > self.limits.max_request_tokens:
            raise ApiError(400, f"the request has {sum(counts)} tokens; at most {self.limits.max_request_tokens} per request: "
                           "send fewer texts per request", "input")
        return counts

    async def embeddings(self, payload: dict) -> dict:
        """The OpenAI embeddings answer."""
        model = self.check_model(payload, required=True)
        texts = texts_of(payload, self.limits)
        encoding = payload.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"field 'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
        role = payload.get("input_type", "document")
        if role not in ("query", "document"):
            raise ApiError(400, f"field 'input_type' must be 'query' or 'document' (the default), got {role!r}", "input_type")
        texts = with_prompt(texts, self.prompts, role)
        dimensions = payload.get("dimensions")
        sizes = getattr(self.retriever, "dimensions", None) or [int(self.retriever.vectors.shape[1])]
        width = max(sizes)  # the model's own width (the index may hold its vectors cut shorter)
        if dimensions is not None and (isinstance(dimensions, bool) or dimensions not in sizes):
            raise ApiError(400, f"field 'dimensions': this model gives {width}-dimensional vectors only; leave it out"
                           if sizes == [width] else f"field 'dimensions': this model was trained (Matryoshka) for "
                           f"{', '.join(map(str, sizes))} dimensions; choose one of them or leave it out", "dimensions")
        counts = await self.on_compute(self.token_counts, texts)
        vectors = truncate(await self.batcher.encode(texts), dimensions or width)
        self.texts.inc(len(texts))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        used = sum(min(n, self.max_seq_length) for n in counts)
        return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": used, "total_tokens": used}}

    async def search(self, payload: dict) -> dict:
        """Hits for one query: ids, names, types, scores (and what they are), texts."""
        self.check_model(payload, required=False)
        query = payload.get("query")
        if not isinstance(query, str) or blank(query):
            raise ApiError(400, "field 'query' must be a non-empty string", "query")
        top_k = payload.get("top_k", 10)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.limits.max_top_k:
            raise ApiError(400, f"field 'top_k' must be an integer from 1 to {self.limits.max_top_k}", "top_k")
        mode = payload.get("mode") or self.retriever.mode
        if mode not in SEARCH_MODES:
            raise ApiError(400, f"field 'mode' must be one of {list(SEARCH_MODES)}, got {mode!r}", "mode")
        types = payload.get("types") or None
        if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
            raise ApiError(400, "field 'types' must be a list of item types", "types")
        known = sorted(set(self.retriever.types))
        if types and not set(types) & set(known):
            raise ApiError(400, f"field 'types': no item has a type in {types}; the index has {known}", "types")
        limit = payload.get("max_temporal_order")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))):
            raise ApiError(400, "field 'max_temporal_order' must be a number: only items whose temporal_order is at "
                           "most that are searched", "max_temporal_order")
        if limit is not None:  # nothing left to search is the caller's to change, said before any work
            try:
                self.retriever.allowed(types, limit)
            except ValueError as err:
                raise ApiError(400, f"field 'max_temporal_order': {err}", "max_temporal_order") from None
        hits = await self.on_compute(self.search_on_compute, query, top_k, types, mode, limit)
        self.texts.inc()
        return {"object": "list", "query": query, "mode": mode, "model": self.run, "model_version": self.version,
                "data": [{"rank": rank, **hit} for rank, hit in enumerate(hits[0], 1)]}

    def search_on_compute(self, query: str, top_k: int, types: list[str] | None, mode: str,
                          limit: float | None) -> list[list[dict]]:
        """One search in one trip to the compute thread: count the query's tokens, embed it with the query prompt
        (not in bm25 mode) and rank."""
        prompted = with_prompt([query], self.prompts, "query")
        self.token_counts(prompted)
        vectors = (self.retriever.encoder.encode(prompted, role="text") if mode != "bm25"
                   else np.zeros((1, 0), dtype=np.float32))
        return self.retriever.hits([query], vectors, top_k, types, mode, limit)

    async def rerank(self, payload: dict) -> dict:
        """The documents of a request ordered by the student's cosine to the query, in the shape Cohere's and Jina's
        rerank APIs answer (and TEI, vLLM and infinity serve): results of index, relevance_score (and document)."""
        model = self.check_model(payload, required=False)
        query = payload.get("query")
        if not isinstance(query, str) or blank(query):
            raise ApiError(400, "field 'query' must be a non-empty string", "query")
        documents = payload.get("documents")
        if not isinstance(documents, list) or not documents:
            raise ApiError(400, "field 'documents' must be a non-empty list of strings (or of {\"text\": ...} objects)",
                           "documents")
        texts = [d.get("text") if isinstance(d, dict) else d for d in documents]
        wrong = next((n for n, t in enumerate(texts) if not isinstance(t, str) or blank(t)), None)
        if wrong is not None:
            raise ApiError(400, f"field 'documents': document {wrong} is not a non-empty string or {{\"text\": ...}}",
                           "documents")
        if len(texts) + 1 > self.limits.max_inputs:
            raise ApiError(400, f"field 'documents' has {len(texts)} documents; at most {self.limits.max_inputs - 1} per "
                           "request: split it", "documents")
        top_n = payload.get("top_n", len(texts))
        if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
            raise ApiError(400, "field 'top_n' must be a positive integer", "top_n")
        return_documents = payload.get("return_documents", False)
        if not isinstance(return_documents, bool):
            raise ApiError(400, "field 'return_documents' must be true or false", "return_documents")
        prompted = with_prompt([query], self.prompts, "query") + with_prompt(texts, self.prompts, "document")
        counts = await self.on_compute(self.token_counts, prompted)
        vectors = await self.batcher.encode(prompted)
        self.texts.inc(len(prompted))
        scores = vectors[1:] @ vectors[0]
        order = np.argsort(-scores, kind="stable")[:top_n]
        results = [{"index": int(n), "relevance_score": float(scores[n]),
                    **({"document": {"text": texts[n]}} if return_documents else {})} for n in order]
        used = sum(min(n, self.max_seq_length) for n in counts)
        return {"object": "list", "model": model, "results": results, "usage": {"total_tokens": used}}

    def over_rate(self, limits: dict[tuple, int]) -> tuple | None:
        """The first key whose per-minute limit one more event would pass; when none would, the event is counted
        under every key and None is returned (a refused event counts nowhere)."""
        now = time.monotonic()
        recent = {key: [t for t in self.feedback_times.get(key, []) if now - t < 60] for key in limits}
        over = next((key for key, per_minute in limits.items() if len(recent[key]) >= per_minute), None)
        self.feedback_times.update({key: times + [now] if over is None else times for key, times in recent.items()})
        if len(self.feedback_times) > 10_000:  # forget keys quiet for a minute
            self.feedback_times = {k: ts for k, ts in self.feedback_times.items() if ts and now - ts[-1] < 60}
        return over

    def add_feedback(self, payload: dict, client: str = "") -> dict:
        """Store one judgement of a shown result (429 past `feedback_per_minute` from one client, or past
        FEEDBACK_PER_PAIR judgements of one query and item in a minute from anyone)."""
        query, item_id, judgement = payload.get("query"), payload.get("item_id"), payload.get("judgement")
        if not isinstance(query, str) or blank(query):
            raise ApiError(400, "field 'query' must be the non-empty query the result was shown for", "query")
        item = self.item_by_id.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise ApiError(400, f"field 'item_id': no item {item_id!r} in this index", "item_id")
        if judgement not in (1, -1) or isinstance(judgement, bool):
            raise ApiError(400, "field 'judgement' must be 1 (a good result) or -1 (a wrong one)", "judgement")
        rank, mode, comment = payload.get("rank"), payload.get("mode"), payload.get("comment")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 1_000_000):
            raise ApiError(400, "field 'rank' must be the 1-based rank the result was shown at", "rank")
        if mode is not None and mode not in SEARCH_MODES:
            raise ApiError(400, f"field 'mode' must be one of {list(SEARCH_MODES)}", "mode")
        if comment is not None and not isinstance(comment, str):
            raise ApiError(400, "field 'comment' must be a string", "comment")
        client_key, pair_key = ("client", client), ("pair", normal_text(query), item_id)
        over = self.over_rate({client_key: self.feedback_per_minute, pair_key: FEEDBACK_PER_PAIR})
        if over == client_key:
            raise ApiError(429, f"more than {self.feedback_per_minute} judgements in a minute from this client: wait a "
                           "minute (the server takes a person's clicks, not a script's)", code="rate_limit_exceeded")
        if over == pair_key:
            raise ApiError(429, f"this result was already judged {FEEDBACK_PER_PAIR} times for this query in the last "
                           "minute: the latest judgement is the one that counts", code="rate_limit_exceeded")
        row = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": self.run,
               "model_version": self.version, "query": query, "item_id": item_id, "item_type": item["type"],
               "judgement": judgement, "rank": rank, "mode": mode or self.retriever.mode, "comment": comment}
        import sqlite3

        try:
            return {"id": self.feedback.add(row), **row}
        except sqlite3.OperationalError as error:  # a full disk, a read-only folder: not the client's mistake, not a crash
            raise ApiError(507, f"the judgement was not stored ({error}): the server's feedback store cannot be written; "
                           "tell its operator (free disk space)") from None

    def index_info(self) -> dict:
        """What the page shows: the run, items, types, the default search and the backend (why it, and the
        single-query times that chose it)."""
        r = self.retriever
        return {"run": self.run, "models": self.models, "model_version": self.version, "items": len(r.items),
                "types": sorted(set(r.types)), "modes": list(SEARCH_MODES), "backend": r.backend,
                "backend_chosen_by": self.backend_chosen_by, "backend_latency_ms": self.backend_latency_ms, **r.settings()}

    def choose_fastest_backend(self, repeats: int = 15) -> None:
        """On the compute thread, once after start: time one query (median of `repeats`) with the served encoder and
        each candidate backend that passed the parity gate (the index's vectors serve them all), and keep the fastest."""
        import statistics

        query = with_prompt(["a creature that turns people to stone"], self.prompts, "query")
        encoders = {self.retriever.backend: self.retriever.encoder}
        for backend, (model_dir, export_dir) in self.latency_candidates.items():
            try:
                encoders[backend] = load_encoder(backend, model_dir, export_dir, self.max_seq_length)
            except (OSError, ValueError) as err:  # a graph a release did not ship: not a candidate
                print(f"backend {backend} not timed: {err}", file=sys.stderr)
        for backend, encoder in encoders.items():
            for _ in range(3):
                encoder.encode(query, role="text")  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                encoder.encode(query, role="text")
                times.append(time.perf_counter() - start)
            self.backend_latency_ms[backend] = round(statistics.median(times) * 1000, 2)
        fastest = min(self.backend_latency_ms, key=self.backend_latency_ms.get)
        if fastest != self.retriever.backend:
            print(f"serving with {fastest}: one query in {self.backend_latency_ms[fastest]} ms here, against "
                  f"{self.backend_latency_ms[self.retriever.backend]} ms with {self.retriever.backend}", file=sys.stderr)
            self.retriever.encoder, self.retriever.backend = encoders[fastest], fastest
            self.tokenizer = encoders[fastest].tokenizer
        self.backend_chosen_by = "single-query latency on this machine, at start"


FEEDBACK_PER_MINUTE = 30  # judgements one client may store in a minute (a person clicks a few; a script floods)
FEEDBACK_PER_PAIR = 3  # judgements of one (query, item) per minute from all clients (a person changes their mind)
MAX_CONNECTIONS = 512  # connections and requests at once; more are answered 503 at once instead of queueing
REQUEST_SECONDS = 10.0  # a request's head, and then its body, must arrive within this; a slow client is dropped


def slow_client_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline for each request's head: a connection that opens and sends nothing, or
    drips its headers (slowloris), is closed after `seconds` instead of holding a socket for ever. (The body has its
    own deadline in json_body; idle keep-alive connections close after uvicorn's 5 s.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_deadline = None
            self.arm()

        def waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def arm(self) -> None:
            if self.head_deadline is None:
                self.head_deadline = self.loop.call_later(seconds, self.too_slow)

        def disarm(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def data_received(self, data: bytes) -> None:
            if self.waiting_for_head():
                self.arm()
            super().data_received(data)
            if not self.waiting_for_head():  # the head is in: the app runs
                self.disarm()

        def too_slow(self) -> None:
            self.head_deadline = None
            if self.waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return DeadlineH11Protocol


class OncePer(logging.Filter):
    """A log filter passing a repeated message at most once per `seconds` (asyncio logs a failed accept() — out of
    file descriptors under a flood of connections — once per attempt, hundreds of thousands of lines)."""

    def __init__(self, seconds: float = 10.0):
        super().__init__()
        self.seconds, self.last = seconds, {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), record.getMessage()[:200]
        if now - self.last.get(key, -self.seconds) < self.seconds:
            return False
        self.last[key] = now
        return True


def more_open_files() -> None:
    """Raise this process's open-file limit to its hard limit: each client holds one, and the default soft limit
    (often 1,024) is the first to run out under many connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))


class Guard:
    """ASGI middleware around every request: the API key, any unexpected error answered as JSON (the server goes
    on), and the request count and latency per route. (Plain ASGI: FastAPI's @app.middleware costs a millisecond.)"""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.expected = service.api_key.encode() if service.api_key else None

    def authorised(self, headers: dict) -> bool:
        """Whether the request sends the API key as 'Authorization: Bearer <key>' (the scheme in any case)."""
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)

    def cross_site(self, method: str, headers: dict) -> ApiError | None:
        """A request this server must not answer: a Host it does not go by (a DNS-rebinding page reading the API), or
        a write sent by a web page of another origin (a form or fetch forging feedback)."""
        host = headers.get(b"host", b"").decode("latin-1")
        if self.service.allowed_hosts is not None and host_name(host) not in self.service.allowed_hosts:
            return ApiError(421, f"Host {host!r} is not a name this server answers to ({sorted(self.service.allowed_hosts)}): "
                            "start it with --allowed-host <name> for each name clients use")
        origin = headers.get(b"origin")
        if method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            netloc = origin.decode("latin-1").partition("://")[2].rstrip("/")
            if netloc.lower() != host.lower():
                return ApiError(403, f"a {method} from the web page of {origin.decode('latin-1')!r} is refused: only this "
                                "server's own page (or a client that sends no Origin) may write")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        route, start, status = scope["path"], time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            refused = self.cross_site(scope["method"], headers)
            if refused is None and self.expected and route not in OPEN_ROUTES and not self.authorised(headers):
                refused = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
            if refused is not None:
                await JSONResponse(refused.body(), status_code=refused.status)(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as error:  # nothing a request sends may take the server down
            body = ApiError(500, f"internal error: {type(error).__name__}: {error}").body()
            await JSONResponse(body, status_code=500)(scope, receive, send_and_note)
        known = route if route in KNOWN_ROUTES else "other"
        self.service.requests.labels(known, str(status[0])).inc()
        self.service.latency.labels(known).observe(time.perf_counter() - start)


def create_app(service: Service):
    """The FastAPI application of one Service."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def lifespan(app):
        service.batcher.start()
        if service.latency_candidates:  # /health answers meanwhile; requests wait for the compute thread
            choice = asyncio.get_running_loop().run_in_executor(service.compute, service.choose_fastest_backend)
            choice.add_done_callback(lambda f: not f.cancelled() and f.exception() and print(
                f"the backend choice failed ({f.exception()}); serving with {service.retriever.backend}", file=sys.stderr))
        yield
        await service.batcher.stop()
        service.compute.shutdown(wait=False)
        service.feedback.close()

    app = FastAPI(title="codex-forge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def json_body(request: Request) -> dict:
        """The request's JSON object: refused (415) unless sent as application/json (what a web page cannot send to
        another site without asking), and (413) past the size limit before more of it is read."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body is sent as {kind or 'no content type'!r}: send it as JSON with the header "
                           "'Content-Type: application/json'")
        limit = service.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes; at most {limit}: send fewer texts")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(service.request_seconds):  # a body that drips in holds no worker for ever
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"the request body has more than {limit} bytes: send fewer texts")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {service.request_seconds:g} s: send it at "
                           "once") from None
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON ({error}): send a JSON object") from None
        except RecursionError:
            raise ApiError(400, "the body nests JSON too deeply: send a flat JSON object") from None
        except ValueError as error:  # a number with more digits than Python converts
            raise ApiError(400, f"the body holds a number that cannot be read ({error})") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the body must be a JSON object")
        unencodable = next((k for k, v in payload.items() if not utf8_encodable(v)), None)
        if unencodable is not None:
            raise ApiError(400, f"field {unencodable!r} holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), "
                           "which is not text: send valid Unicode", unencodable)
        return payload

    app.add_middleware(Guard, service=service)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(404)
    async def not_found(request: Request, error):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}: see python -m lib.serve --help").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, error):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(), status_code=405)

    @app.get("/health")
    async def health():
        return {"status": "ok", "run": service.run, "items": len(service.retriever.items)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "codex-forge"} for m in service.models]}

    @app.get("/v1/index")
    async def index():
        return service.index_info()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return JSONResponse(await service.embeddings(await json_body(request)))  # a Response skips FastAPI's encoder

    @app.post("/v1/search")
    async def search(request: Request):
        return JSONResponse(await service.search(await json_body(request)))

    @app.post("/v1/rerank")
    async def rerank(request: Request):
        return JSONResponse(await service.rerank(await json_body(request)))

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        return JSONResponse(service.add_feedback(await json_body(request), request.client.host if request.client else ""))

    return app


KNOWN_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/index", "/v1/embeddings", "/v1/search", "/v1/rerank",
                "/v1/feedback")


def gate_passed(gate: dict, backend: str) -> bool:
    """Whether stage 05's parity gate ({backend: {passed, ...}}) passed this backend."""
    return bool(gate.get(backend, {}).get("passed"))


def serving_backend(saved: str, gate: dict) -> tuple[str, str]:
    """The backend to serve with on this machine: the index's, if this CPU runs it natively; else the fastest other
    backend that passed stage 05's gate ({backend: {passed, items_per_second}}). Returns it and a note ("" if saved)."""
    native, why_not = native_backends()
    if saved in native or saved == "custom":
        return saved, ""
    passed = [b for b in native if gate_passed(gate, b)] or ["onnx-fp32"]
    chosen = max(passed, key=lambda b: gate.get(b, {}).get("items_per_second", 0))
    return chosen, f"the index's backend {saved} does not run natively here ({why_not.get(saved, 'not available')}): serving with {chosen}"


def load_service(run: str, runs_root: str | None = None, index_dir: str | None = None, aliases: list[str] = (),
                 api_key_env: str | None = None, backend: str | None = None, limits: Limits = Limits(),
                 max_seq_length: int | None = None) -> Service:
    """A Service over a run's saved index (05_export/index; or `index_dir`), feedback in <run>/feedback.sqlite; or over
    a release (`index_dir` = models/<domain>/<version> or …/current): its index, served as the model named by its
    version, feedback in models/<domain>/feedback.sqlite (shared by the domain's versions, each row naming its own)."""
    folder = Run(run, runs_root).path
    index = Path(index_dir) if index_dir else folder / "05_export" / "index"
    gate_file = index.parent / "metrics.json"
    if (index / "manifest.json").exists() or index.name == "current":
        release = resolve(index)
        run, folder, index, gate_file = release.name, release.parent, release / "index", release / "evaluation" / "export.json"
    if not (index / "retriever.json").exists():
        raise SystemExit(f"{index}/retriever.json not found: run `make all` (stage 05) for run {run!r} first")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise SystemExit(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is empty or unset")
    spec = read_json(index / "retriever.json").get("encoder", {})
    gate = read_json(gate_file).get("backends", {}) if gate_file.exists() else {}
    saved, backend_given = spec.get("backend", "custom"), backend is not None
    if backend is None:
        backend, note = serving_backend(saved, gate)
        if note:
            print(note, file=sys.stderr)
    reuse = backend != saved and gate_passed(gate, backend) and gate_passed(gate, saved)
    if reuse:
        print(f"serving with {backend} over the index's {saved} vectors: both passed stage 05's parity gate, so the "
              "corpus is not embedded again", file=sys.stderr)
    chosen_by = "--backend" if backend_given else ("the index" if backend == saved else "this CPU (the index's does not run here)")
    retriever = Retriever.load(index, backend=backend, max_seq_length=max_seq_length, reuse_vectors=reuse)
    version = model_version(index / spec.get("model_dir", "."))
    service = Service(retriever, run, version, FeedbackStore(folder / "feedback.sqlite"), aliases, api_key, limits)
    service.backend_chosen_by = chosen_by
    if not backend_given and gate_passed(gate, backend):  # after start, the fastest gated backend for one query
        others = [b for b in native_backends()[0] if b != backend and gate_passed(gate, b)]
        service.latency_candidates = {b: (index / spec.get("model_dir", "."), index / spec.get("export_dir", "."))
                                      for b in others}
    return service


def single_threaded_blas() -> None:
    """numpy's BLAS on one thread: the server's matrix products are small, and BLAS threads spinning after each one
    take the cores from the encoder (measured: one hybrid query over 10k items 24 → 13 ms with torch bf16)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def host_name(header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(bind: str, names: list[str]) -> set[str] | None:
    """The Host names the server answers to: the bound address (and localhost's names when it is loopback) and the
    names the operator lists; None (any) when bound to every interface with no names listed."""
    if bind in ("0.0.0.0", "::") and not names:
        return None
    hosts = {host_name(bind), *(host_name(n) for n in names)}
    return hosts | {"127.0.0.1", "localhost", "::1"} if is_loopback_host(bind) else hosts


def start_server(args: list[str], log_path: str | Path, timeout: float = 180, env: dict | None = None):
    """`python -m lib.serve <args>` on a free 127.0.0.1 port in a subprocess (output to `log_path`), returned with its
    URL once /health answers; a RuntimeError with the log's tail if it exits or does not answer within `timeout`."""
    import subprocess

    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "lib.serve", *args, "--port", str(port)], cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    process.wait()
    raise RuntimeError(f"the server did not answer /health (exit code {process.returncode}): "
                       f"{Path(log_path).read_text()[-2000:]}")


def serve_main(argv: list[str]) -> None:
    """CLI: start the server."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m lib.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="dnd-default", help="run folder under the runs root, e.g. dnd-default")
    parser.add_argument("--runs-root", default=None, help="where runs live (default data/runs)")
    parser.add_argument("--index", default=None, help="a saved Retriever folder instead of the run's 05_export/index, or "
                        "a release (models/<domain>/current or models/<domain>/<version>)")
    parser.add_argument("--host", default=None, help="address to bind; without it 127.0.0.1 (this machine only). "
                        "0.0.0.0 opens it to the network: set --api-key-env too")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-alias", action="append", default=[], help="another name clients may send as 'model' "
                        "(e.g. text-embedding-3-small, to repoint an application unchanged); repeatable")
    parser.add_argument("--api-key-env", default=None, help="name of an environment variable holding the API key that "
                        "every route but /health and the page must send as 'Authorization: Bearer <key>'")
    parser.add_argument("--allowed-host", action="append", default=[], help="a name clients reach the server by (the "
                        "Host header) besides the bound address, e.g. a reverse proxy's; repeatable. Other names are refused "
                        "(a web page rebinding its DNS to this machine)")
    parser.add_argument("--backend", default=None, help="override the index's backend: torch-fp32, torch-bf16, onnx-fp32, onnx-int8")
    parser.add_argument("--max-seq-length", type=int, default=None, help="tokens per text (default: the index's)")
    parser.add_argument("--feedback-per-minute", type=int, default=FEEDBACK_PER_MINUTE, help="judgements one client "
                        "address may store in a minute (more answer 429); behind a proxy every client shares one address")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="connections and requests served "
                        "at once; beyond it new requests are answered 503 at once")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_SECONDS, help="seconds a client has to send a "
                        "request's head, and then its body, before the connection is closed (408 for a body)")
    args = parser.parse_args(argv)
    host = args.host or "127.0.0.1"  # only --host opens the server beyond this machine
    single_threaded_blas()
    try:
        service = load_service(args.run, args.runs_root, args.index, args.model_alias, args.api_key_env, args.backend,
                               max_seq_length=args.max_seq_length)
    except ReleaseError as error:
        raise SystemExit(f"error: {error}") from None
    service.allowed_hosts = allowed_hosts(host, args.allowed_host)
    service.request_seconds = args.request_timeout
    service.feedback_per_minute = args.feedback_per_minute
    r = service.retriever
    print(f"serving {service.run}: {len(r.items)} items, backend {r.backend}, search {r.mode}"
          f"{f' ({r.fusion})' if r.mode == 'hybrid' else ''}, model version {service.version}", flush=True)
    print(f"  page http://{host}:{args.port}/ · OpenAI base_url http://{host}:{args.port}/v1 · "
          f"API key {'required' if service.api_key else 'not required'}", flush=True)
    if not is_loopback_host(host) and not service.api_key:
        print(f"  warning: {host} is reachable from the network and no API key is set (--api-key-env)", file=sys.stderr)
    more_open_files()
    logging.getLogger("asyncio").addFilter(OncePer(10.0))
    uvicorn.run(create_app(service), host=host, port=args.port, log_level="warning", access_log=False,
                http=slow_client_protocol(args.request_timeout), limit_concurrency=args.max_connections)


def feedback_main(argv: list[str]) -> None:
    """CLI: export the run's feedback as JSONL."""
    parser = argparse.ArgumentParser(prog="python -m lib.serve feedback", description="The judgements the search page and "
                                     "POST /v1/feedback stored for a run.")
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--export", nargs="?", const="-", required=True, metavar="PATH",
                        help="write every judgement as JSONL to PATH (default: standard output)")
    args = parser.parse_args(argv)
    path = Run(args.run, args.runs_root).path / "feedback.sqlite"
    if not path.exists():
        raise SystemExit(f"{path} not found: no feedback was given for run {args.run!r} yet (python -m lib.serve --run {args.run})")
    store = FeedbackStore(path)
    rows = store.rows()
    store.close()
    if args.export == "-":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        write_jsonl(args.export, rows)
        print(f"{len(rows)} judgements → {args.export}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """python -m lib.serve [--run …] | python -m lib.serve feedback --export [PATH]."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["feedback"]:
        feedback_main(argv[1:])
    else:
        serve_main(argv[1:] if argv[:1] == ["serve"] else argv)


if __name__ == "__main__":
    main()
