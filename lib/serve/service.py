"""What the server does, without HTTP: the request limits, the API's errors, texts (and token ids) out of a
request, the micro-batcher that encodes many requests' texts in one pass, and Service (embed, search, rerank, feedback,
the fastest backend)."""
from __future__ import annotations

import asyncio
import base64
import functools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lib.domains.records import blank
from lib.encoders import load_encoder, with_prompt
from lib.feedback import FeedbackStore
from lib.leakage import normal_text
from lib.search import SEARCH_MODES, Retriever, truncate
from lib.teacher.budget import token_encoding

FEEDBACK_PER_MINUTE = 30  # judgements one client may store in a minute (a person clicks a few; a script floods)
FEEDBACK_PER_PAIR = 3  # judgements of one (query, item) per minute from all clients (a person changes their mind)
REQUEST_SECONDS = 10.0  # a request's head, and then its body, must arrive within this; a slow client is dropped


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

    def add_feedback(self, payload: dict, client: str = "", trusted: bool = False) -> dict:
        """Store one judgement of a shown result (429 past `feedback_per_minute` from one client, or past
        FEEDBACK_PER_PAIR judgements of one query and item in a minute from anyone). `trusted`: the client sent the
        server's API key; its judgements are marked so and train in full (stage 02)."""
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
               "judgement": judgement, "rank": rank, "mode": mode or self.retriever.mode, "comment": comment,
               "trusted": int(trusted)}
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
