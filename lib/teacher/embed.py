"""The embedding loop: only cache misses are asked for, in batches bounded by texts and tokens, several at once within
the rate limits and the budget, each answer checked and cached as it arrives."""
from __future__ import annotations

import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from lib.progress import bar
from lib.teacher.budget import Budget, RateLimiter, token_batches, token_encoding, truncate_to_tokens
from lib.teacher.cache import TeacherCache, normalize, text_hash
from lib.teacher.clients import EmbedFn, checked_vectors
from lib.teacher.errors import TeacherError

def check_texts(texts: list, ids: list[str], what: str) -> None:
    """Refuse empty or non-string inputs, naming the item: the API would reject the whole batch."""
    for text, item_id in zip(texts, ids):
        if not isinstance(text, str):
            raise ValueError(f"{what} {item_id!r}: text is {type(text).__name__}, not a string; fix it in stage 00's input")
        if not text.strip():
            raise ValueError(f"{what} {item_id!r}: text is empty; give the item a description or drop it in stage 00's input")


def uncached(texts: list[str], cache: TeacherCache, key: tuple) -> tuple[dict[str, np.ndarray], list[str], list[int]]:
    """The cached vectors by text hash, the distinct texts not cached under `key`, and their cl100k token counts."""
    found = cache.get(key, texts)
    missing = list(dict.fromkeys(t for t in texts if text_hash(t) not in found))
    return found, missing, [len(ids) for ids in token_encoding().encode_batch(missing)] if missing else []


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


@dataclass
class Requests:
    """How texts go to an endpoint: texts and tokens per request, the longest input in tokens (0: no cut), requests at
    once, and the rate limits."""

    batch_size: int = 64
    max_batch_tokens: int = 250_000
    max_input_tokens: int = 0
    max_concurrency: int = 1
    limiter: RateLimiter = field(default_factory=RateLimiter)


def embed_cached(texts: list[str], embed: EmbedFn, cache: TeacherCache, key: tuple, requests: Requests | None = None,
                 budget: Budget | None = None, plan: tuple[dict, list[str], list[int]] | None = None,
                 desc: str = "") -> tuple[np.ndarray, dict]:
    """Vectors for `texts` (normalised), asking `embed` only for cache misses in batches bounded by count and tokens,
    up to `requests.max_concurrency` at once within its `limiter`'s rate, committing each batch as it is answered,
    checking the budget (with what is in flight) before each request. When a request fails, the answers of those still
    in flight are committed before the error is raised. `plan` is uncached(texts, cache, key) when the caller has it.

    `requests.max_input_tokens` > 0 truncates longer texts (cl100k tokens, with a counted warning); the cache keys on the full text."""
    budget, requests = budget or Budget(), requests or Requests()
    max_input_tokens, max_concurrency = requests.max_input_tokens, max(1, requests.max_concurrency)
    label = desc or "teacher"
    found, missing, counts = plan or uncached(texts, cache, key)
    requested, truncated = missing, 0
    if max_input_tokens and missing:
        requested, truncated = truncate_to_tokens(missing, counts, max_input_tokens, token_encoding())
        counts = [min(c, max_input_tokens) for c in counts]
    if truncated:
        warnings.warn(f"{label}: {truncated} texts longer than {max_input_tokens} tokens were truncated", stacklevel=2)
    reported, retries, sent = 0, 0, 0
    dim = next(iter(found.values())).shape[0] if found else 0  # the first answer fixes it when nothing is cached
    progress = bar(total=len(missing), desc=label, unit="text", disable=not missing)
    batches = token_batches(counts, requests.batch_size, requests.max_batch_tokens)
    in_flight: dict = {}  # future → (batch, its tokens)
    with ThreadPoolExecutor(max_concurrency, thread_name_prefix="teacher") as pool:
        try:
            while batches or in_flight:
                while batches and len(in_flight) < max_concurrency:  # keep up to max_concurrency requests out
                    batch = batches.pop(0)
                    batch_tokens = sum(counts[n] for n in batch)
                    budget.check(sum(t for _, t in in_flight.values()) + batch_tokens, f"{label}: the next request")
                    requests.limiter.wait(batch_tokens)
                    in_flight[pool.submit(embed, [requested[n] for n in batch])] = (batch, batch_tokens)
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:  # each answer is checked and committed as it arrives, in any order
                    batch, batch_tokens = in_flight.pop(future)
                    answer, usage = future.result()
                    vectors = commit_answer(answer, usage, batch, batch_tokens, key, missing, dim, cache, budget)
                    dim = vectors.shape[1]
                    found.update({text_hash(missing[n]): v for n, v in zip(batch, vectors)})
                    reported, retries, sent = reported + (usage["tokens"] or 0), retries + usage["retries"], sent + 1
                    budget.refuse_past_cap(budget.spent_tokens, "the endpoint's reported usage passed the cap",
                                           "The last answer is cached; nothing more was requested")
                    progress.update(len(batch))
        except BaseException:
            commit_answered(in_flight, key, missing, dim, cache, budget)
            raise
    progress.close()
    stats = {"texts": len(texts), "cache_hits": len(set(texts)) - len(missing), "cache_misses": len(missing),
             "tokens_estimated": sum(counts), "tokens_reported": reported, "truncated": truncated,
             "requests": sent, "retries": retries}
    if not texts:  # e.g. stage 02 asks for queries only
        return np.empty((0, 0), dtype=np.float32), stats
    return normalize(np.stack([found[text_hash(t)] for t in texts])), stats
