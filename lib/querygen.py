"""Training queries written by a chat model behind any OpenAI-compatible endpoint (OpenAI, Ollama, a llama.cpp or
`transformers serve` server): per item a question, keywords and a title-like phrase, from the prompts in
lib/query_prompts/, cached in sqlite so that no prompt is paid for twice."""
from __future__ import annotations

import random
import re
import sqlite3
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lib.teacher import clients
from lib.teacher.cache import text_hash
from lib.progress import bar

PROMPTS_DIR = Path(__file__).parent / "query_prompts"
FORMS = ("question", "keywords", "title")  # cycled per item: the first query is a question
MAX_DOCUMENT_CHARS = 2000  # of an item's text in the prompt
LEAD_IN = re.compile(r"^\s*(?:[-*•]|\d+[.)]|(?:question|query|keywords?|title|phrase|search)\s*:)\s*", re.I)
NOT_A_QUERY = re.compile(  # a refusal, or talk about the task or the document instead of a query
    r"\b(?:i'm sorry|i am sorry|as an ai|i cannot|i can't|i'd need|i would need|please provide|provide the|"
    r"the abstract|this abstract|happy to help|i'd love|i'm glad|what a (?:wonderful|great|fascinating|good)|"
    r"here's a|here is a|(?:this|the) document is titled|keywords for this)\b", re.I)
QUOTES = "\"'`*“”‘’"  # stripped around a query
BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


@dataclass(frozen=True)
class GeneratorSettings:
    """Where the chat model is and how much to ask of it (stage 02's query_generator_* parameters)."""

    model: str
    base_url: str = ""  # "" = api.openai.com
    api_key_env: str = ""  # the variable holding the key (OPENAI_API_KEY for api.openai.com)
    per_item: int = 2  # queries per item, cycling FORMS
    max_items: int = 0  # 0 = every trainable item, else a seeded sample
    max_concurrency: int = 4
    temperature: float = 0.7
    max_tokens: int = 48
    max_retries: int = 6  # the openai client's, with backoff (429, 5xx, timeouts)


def prompt_templates() -> dict[str, str]:
    """The prompt template of each form, from lib/query_prompts/."""
    return {form: (PROMPTS_DIR / f"{form}.txt").read_text(encoding="utf-8") for form in FORMS}


def prompt(template: str, noun: str, text: str) -> str:
    """The chat prompt for one query about one item, from its form's template."""
    return template.format(noun=noun, text=text[:MAX_DOCUMENT_CHARS].strip())


def clean_reply(reply: str) -> str | None:
    """The query in a chat model's reply (its first line of content, lead-ins and quotes dropped; a list after a
    lead-in line joined with commas, as keywords come), or None when the reply is no query (empty, a refusal, talk
    about the task, fewer than 2 or more than 40 words)."""
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    listed = [BULLET.sub("", line) for line in lines[1:6] if BULLET.match(line)]
    if lines and lines[0].rstrip().endswith(":") and len(listed) >= 2:
        lines = [", ".join(part.strip().strip(QUOTES) for part in listed)]
    for line in lines:
        line = LEAD_IN.sub("", line).strip().strip(QUOTES).strip()
        if not line or line.endswith(":"):
            continue
        if NOT_A_QUERY.search(line) or not 2 <= len(line.split()) <= 40:
            return None
        return re.sub(r"\s+", " ", line)
    return None


class ReplyCache:
    """Chat replies by (endpoint, model, prompt, sample) in sqlite, shared across runs (beside the teacher cache)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        self.lock = threading.Lock()

    @staticmethod
    def key(*parts: str) -> str:
        """One hash of everything that decides a reply (the teacher cache's hash)."""
        return text_hash("\x1f".join(parts))

    def get(self, key: str) -> str | None:
        """The stored reply, or None."""
        with self.lock:
            row = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, reply: str) -> None:
        """Store one reply at once (an interrupted run keeps what it paid for)."""
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, reply))


def chosen_items(items: list[dict], exclude: set[str], max_items: int, seed: int) -> list[dict]:
    """The items queries are written for: every one not kept out of training, or a seeded sample of `max_items`."""
    allowed = [item for item in items if item["id"] not in exclude]
    if max_items and len(allowed) > max_items:
        allowed = sorted(random.Random(seed).sample(allowed, max_items), key=lambda item: item["id"])
    return allowed


def generated_queries(items: list[dict], type_nouns: dict[str, str], exclude: set[str], settings: GeneratorSettings,
                      cache_path: str | Path, seed: int) -> tuple[list[dict], dict]:
    """Queries in the synthetic-query form (kind `generated`, the form in `form`, the source item the positive) for
    each chosen item, and the counts: asked, from the cache, unusable replies, kept, tokens spent."""
    from openai import Omit

    url = settings.base_url or clients.OPENAI_URL
    key = clients.api_key_for(settings.base_url, settings.api_key_env, prefix="query_generator")
    client = clients.openai_client(settings.base_url, key, settings.max_retries)
    where = urllib.parse.urlsplit(clients.public_url(url)).netloc
    no_key = {"Authorization": Omit()} if client.api_key == clients.NO_KEY else None  # no header at all without a key
    cache = ReplyCache(cache_path)
    endpoint = clients.endpoint_identity("openai", settings.base_url)
    tasks = [(item, sample) for item in chosen_items(items, exclude, settings.max_items, seed)
             for sample in range(settings.per_item)]
    counts = {"items": len(tasks) // max(settings.per_item, 1), "asked": len(tasks), "from_cache": 0, "unusable": 0,
              "kept": 0, "tokens": 0}

    templates = prompt_templates()
    counted = threading.Lock()

    def reply_to(task: tuple[dict, int]) -> str:
        item, sample = task
        form = FORMS[sample % len(FORMS)]
        named = item["text"] if item["text"].startswith(item["name"]) else f"{item['name']}\n{item['text']}"
        text = prompt(templates[form], type_nouns.get(item["type"], item["type"]), named)
        cache_key = ReplyCache.key(endpoint, settings.model, text, str(settings.temperature), str(settings.max_tokens),
                                   str(seed + sample))
        if (cached := cache.get(cache_key)) is not None:
            with counted:
                counts["from_cache"] += 1
            return cached
        with clients.one_line_errors(where, prefix="query_generator"):
            answer = client.chat.completions.create(
                model=settings.model, messages=[{"role": "user", "content": text}], temperature=settings.temperature,
                max_tokens=settings.max_tokens, seed=seed + sample, extra_headers=no_key)
        reply = answer.choices[0].message.content or ""
        with counted:
            counts["tokens"] += getattr(answer.usage, "total_tokens", 0) or 0
        cache.put(cache_key, reply)
        return reply

    queries, seen = [], set()
    with ThreadPoolExecutor(max(1, settings.max_concurrency)) as pool:
        replies = bar(pool.map(reply_to, tasks), total=len(tasks), desc=f"queries from {settings.model}")
        for (item, sample), reply in zip(tasks, replies):
            query = clean_reply(reply)
            if query is None or (item["id"], query.lower()) in seen:
                counts["unusable"] += 1
                continue
            seen.add((item["id"], query.lower()))
            queries.append({"qid": f"gen:{item['id']}:{sample + 1}", "text": query, "kind": "generated",
                            "form": FORMS[sample % len(FORMS)], "source_id": item["id"], "relevant": [item["id"]],
                            "matches": [item["id"]]})
    counts["kept"] = len(queries)
    return queries, counts
