"""What the teacher may spend: cl100k token counts, request batches, the dollar price, the run's Budget and the
endpoint's rate limits."""
from __future__ import annotations

import time
from dataclasses import dataclass

from lib.teacher.clients import is_openai_api
from lib.teacher.errors import BudgetExceeded

# USD per million input tokens (openai.com/api/pricing); models on other endpoints cost what teacher_price_per_million says
PRICE_PER_MILLION = {"text-embedding-ada-002": 0.10, "text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13}


def token_encoding():
    """OpenAI's cl100k_base tokenizer (every OpenAI embedding model's), bundled by bpe-openai: no download."""
    import bpe_openai

    return bpe_openai.get_encoding("cl100k_base")


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


def price_per_million(backend: str, model: str, base_url: str, override: float = -1.0) -> float:
    """USD per million tokens: `override` when >= 0, OpenAI's list price on api.openai.com, else 0 (local, self-hosted)."""
    if override >= 0:
        return override
    if backend == "openai" and is_openai_api(base_url):
        if model not in PRICE_PER_MILLION:
            raise ValueError(f"no list price known for {model!r}; set teacher_price_per_million (USD) so the budget works")
        return PRICE_PER_MILLION[model]
    return 0.0
