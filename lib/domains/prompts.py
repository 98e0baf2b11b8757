"""The `prompts` domain: a prompt library (CSV or JSONL) with genre/theme tags, optionally with a story per prompt.

Items are the prompts. Evaluation queries come from ground truth training never sees:
- `story`: the opening of the story written for a prompt → that prompt (story text is never trained on);
- `tag`: a genre or theme value held out of training (a seeded share of the values) → every prompt carrying it;
- `keywords`: a prompt's own `keywords` field → that prompt, which then stays out of training.
The other genre/theme values and the `tags` field become item tags, so stage 02's synthetic tag queries learn them."""
from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

from lib.domains.records import DataError, list_field, read_table, require_path, text_field, unique_ids

TYPE = "prompt"
FILE_NAMES = ("prompts.jsonl", "prompts.csv")
LABEL_FIELDS = ("genre", "themes")


def prompts_file(path: str | Path) -> Path:
    """The prompts file: DATA itself, or prompts.jsonl / prompts.csv inside the DATA folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in FILE_NAMES if (path / name).is_file()]
        if not found:
            raise DataError(f"{path}: no {' or '.join(FILE_NAMES)} in this folder; give the prompts file or its folder")
        if len(found) > 1:
            raise DataError(f"{path}: both {FILE_NAMES[0]} and {FILE_NAMES[1]}; keep one")
        return found[0]
    return require_path(path, "a prompts .csv or .jsonl file (or a folder holding prompts.csv / prompts.jsonl)")


def read_prompts(path: str | Path) -> list[dict]:
    """Validated prompt records: id, prompt, title, genre, themes, tags, keywords, story (file:line on any problem)."""
    path = prompts_file(path)
    rows = read_table(path)
    if not rows:
        raise DataError(f"{path}: no prompts; add one record per line")
    records = []
    for lineno, row in rows:
        if "id" in row and row["id"] is None:
            raise DataError(f"{path}:{lineno}: field 'id' is null; give every prompt an id or drop the field")
        record = {"line": lineno, "id": text_field(path, lineno, row, "id", required=False) or str(len(records) + 1),
                  "prompt": text_field(path, lineno, row, "prompt"),
                  "title": text_field(path, lineno, row, "title", required=False),
                  "story": text_field(path, lineno, row, "story", required=False)}
        if "id" in row and not record["id"]:
            raise DataError(f"{path}:{lineno}: field 'id' is empty; give every prompt an id or drop the column")
        for field in (*LABEL_FIELDS, "tags", "keywords"):
            record[field] = list_field(path, lineno, row, field)
        records.append(record)
    unique_ids(path, [(r["line"], r["id"]) for r in records], "id")
    if not any(r["story"] or r["keywords"] or r["genre"] or r["themes"] for r in records):
        raise DataError(f"{path}: nothing to evaluate on; give some prompts a 'story', 'keywords', 'genre' or "
                        "'themes' field (the evaluation's ground truth)")
    return records


def display_name(record: dict, words: int = 8) -> str:
    """The title, or the prompt's first words."""
    if record["title"]:
        return record["title"]
    tokens = record["prompt"].split()
    return " ".join(tokens[:words]) + ("…" if len(tokens) > words else "")


def held_out_labels(records: list[dict], eval_label_fraction: float, seed: int) -> set[tuple[str, str]]:
    """A seeded share of the (field, value) genre/theme labels carried by at least two prompts: evaluation only."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        for field in LABEL_FIELDS:
            for value in set(r[field]):
                counts[(field, value.lower())] += 1
    candidates = sorted(label for label, n in counts.items() if n >= 2)
    rng = random.Random(seed)
    return set(rng.sample(candidates, round(len(candidates) * eval_label_fraction)))


def common_tags(records: list[dict], max_share: float = 0.5) -> set[str]:
    """`tags` values carried by more than `max_share` of the prompts (e.g. r/WritingPrompts' 'WP'): they tell
    prompts apart no better than nothing, so training queries leave them out."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        for tag in set(r["tags"]):
            counts[tag] += 1
    return {tag for tag, n in counts.items() if n > max_share * len(records)}


def prompt_item(record: dict, held_out: set[tuple[str, str]], common: set[str] = frozenset()) -> dict:
    """A prompt as a canonical item: tags are its `tags` (but the common ones) and its genre/theme values not held out."""
    labels = [v for field in LABEL_FIELDS for v in record[field] if (field, v.lower()) not in held_out]
    text = f"{record['title']}. {record['prompt']}" if record["title"] else record["prompt"]
    return {"id": f"prompt:{record['id']}", "type": TYPE, "name": display_name(record), "text": text, "aliases": [],
            "tags": list(dict.fromkeys([t for t in record["tags"] if t not in common] + labels)),
            "meta": {"line": record["line"], "genre": record["genre"], "themes": record["themes"]}}


def story_opening(story: str, min_words: int = 40, max_words: int = 80) -> str:
    """The first sentences of a story, at least `min_words` words (cut at a sentence end before `max_words`)."""
    words = re.sub(r"\s+", " ", story).strip().split(" ")
    opening = " ".join(words[:max_words])
    ends = [m.end() for m in re.finditer(r"[.!?][\"'”’)]*(?= )", opening)]
    cut = next((e for e in ends if len(opening[:e].split()) >= min_words), None)
    return opening[:cut] if cut else opening


def story_queries(records: list[dict]) -> list[dict]:
    """Story opening → the prompt it was written for."""
    return [{"qid": f"story:{r['id']}", "text": story_opening(r["story"]), "relevant": {f"prompt:{r['id']}": 1},
             "expected_topics": [], "category": "story", "split": "test", "meta": {}}
            for r in records if len(r["story"].split()) >= 10]


def label_queries(records: list[dict], held_out: set[tuple[str, str]], max_relevant_share: float = 0.25) -> list[dict]:
    """A held-out genre or theme → every prompt carrying it (skipped when it fits more than the given share)."""
    owners: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in records:
        for field in LABEL_FIELDS:
            for value in set(v.lower() for v in r[field]):
                owners[(field, value)].append(f"prompt:{r['id']}")
    queries = []
    for field, value in sorted(held_out):
        ids = owners[(field, value)]
        if len(ids) > max(2, max_relevant_share * len(records)):
            continue
        text = f"a {value} writing prompt" if field == "genre" else f"a writing prompt about {value}"
        queries.append({"qid": f"{field}:{value}", "text": text, "relevant": {i: 1 for i in sorted(ids)},
                        "expected_topics": [], "category": field, "split": "test", "meta": {}})
    return queries


def keyword_queries(records: list[dict], share: float, seed: int) -> list[dict]:
    """A seeded share of the prompts with a `keywords` field: the keywords → the prompt (kept out of training)."""
    with_keywords = [r for r in records if len(r["keywords"]) >= 2]
    picked = random.Random(seed).sample(with_keywords, round(len(with_keywords) * share))
    return [{"qid": f"keywords:{r['id']}", "text": ", ".join(r["keywords"]), "relevant": {f"prompt:{r['id']}": 1},
             "expected_topics": [], "category": "keywords", "split": "test",
             "meta": {"source_item": f"prompt:{r['id']}"}} for r in sorted(picked, key=lambda r: r["line"])]


def build_corpus(data_path: str | Path, max_items: int = 0, eval_label_fraction: float = 0.5,
                 keyword_query_fraction: float = 0.3, seed: int = 42) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items, evaluation queries (split 'test' until assigned), no relations, and the prompts as background text."""
    records = read_prompts(data_path)
    if max_items:
        records = records[:max_items]
    held_out = held_out_labels(records, eval_label_fraction, seed)
    common = common_tags(records)
    items = [prompt_item(r, held_out, common) for r in records]
    queries = story_queries(records) + label_queries(records, held_out) + keyword_queries(records, keyword_query_fraction, seed)
    background = {"prompts": "\n\n".join(i["text"] for i in items)}
    return items, queries, [], background
