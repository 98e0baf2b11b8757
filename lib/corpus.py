"""The canonical corpus (items, queries, relations, background text): validation, splits, reading, writing."""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from lib.io import read_jsonl, write_jsonl, write_text

ITEM_FIELDS: dict[str, type] = {"id": str, "type": str, "name": str, "text": str, "aliases": list, "tags": list, "meta": dict}
QUERY_FIELDS: dict[str, type] = {
    "qid": str, "text": str, "relevant": dict, "expected_topics": list, "category": str, "split": str,
}
RELATION_FIELDS: dict[str, type] = {"head": str, "tail": str, "relation": str, "source": str}
SPLITS = ("train", "dev", "test")


def check_corpus(items: list[dict], queries: list[dict], relations: list[dict]) -> None:
    """Raise ValueError if ids repeat, texts are empty, or queries/relations point at unknown items."""
    ids = Counter(item["id"] for item in items)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        raise ValueError(f"item ids must be unique; repeated: {repeated[:5]}")
    for item in items:
        if not item["text"].strip():
            raise ValueError(f"item {item['id']!r}: field 'text' is empty")
    for q in queries:
        unknown = [i for i in q["relevant"] if i not in ids]
        if unknown:
            raise ValueError(f"query {q['qid']!r}: field 'relevant' names unknown items {unknown[:5]}")
        if not q["relevant"]:
            raise ValueError(f"query {q['qid']!r}: field 'relevant' is empty")
        if q["split"] not in SPLITS:
            raise ValueError(f"query {q['qid']!r}: field 'split' must be one of {SPLITS}, got {q['split']!r}")
    for r in relations:
        for end in ("head", "tail"):
            if r[end] not in ids:
                raise ValueError(f"relation {r}: field {end!r} names an unknown item")


def assign_splits(queries: list[dict], dev_fraction: float, seed: int) -> list[dict]:
    """Give each evaluation query a seeded 'dev' or 'test' split, stratified by category (a category whose queries
    carry meta.dev_fraction uses its own); training queries (split 'train') keep theirs. Headline categories draw
    first, those beside the headline (meta.beside_headline) after them, so adding one of those never changes the
    headline's split."""
    rng = random.Random(seed)
    out = [q for q in queries if q["split"] == "train"]
    evaluation = [q for q in queries if q["split"] != "train"]
    beside = {q["category"] for q in evaluation if q.get("meta", {}).get("beside_headline")}
    for category in sorted({q["category"] for q in evaluation}, key=lambda c: (c in beside, c)):
        group = sorted((q for q in evaluation if q["category"] == category), key=lambda q: q["qid"])
        rng.shuffle(group)
        n_dev = round(len(group) * group[0].get("meta", {}).get("dev_fraction", dev_fraction))
        out += [{**q, "split": "dev" if i < n_dev else "test"} for i, q in enumerate(group)]
    return sorted(out, key=lambda q: q["qid"])


def write_corpus(
    out_dir: str | Path,
    items: list[dict],
    queries: list[dict],
    relations: list[dict],
    background: dict[str, str],
) -> None:
    """Write items/queries/relations JSONL and background/<name>.md after checking them."""
    check_corpus(items, queries, relations)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "items.jsonl", items)
    write_jsonl(out_dir / "queries.jsonl", queries)
    write_jsonl(out_dir / "relations.jsonl", relations)
    for name, text in background.items():
        write_text(out_dir / "background" / f"{name}.md", text)


def load_items(corpus_dir: str | Path) -> list[dict]:
    """Read and validate items.jsonl."""
    return read_jsonl(Path(corpus_dir) / "items.jsonl", ITEM_FIELDS)


def load_queries(corpus_dir: str | Path, split: str | None = None) -> list[dict]:
    """Read and validate queries.jsonl, optionally one split."""
    queries = read_jsonl(Path(corpus_dir) / "queries.jsonl", QUERY_FIELDS)
    return [q for q in queries if split is None or q["split"] == split]


def load_relations(corpus_dir: str | Path) -> list[dict]:
    """Read and validate relations.jsonl."""
    return read_jsonl(Path(corpus_dir) / "relations.jsonl", RELATION_FIELDS)


def load_background(corpus_dir: str | Path, extra_dir: str | Path | None = None) -> dict[str, str]:
    """Background markdown of the corpus (and of an optional extra folder, recursively) by file name."""
    docs = {p.name: p.read_text(encoding="utf-8") for p in sorted((Path(corpus_dir) / "background").glob("*.md"))}
    if extra_dir:
        extra = Path(extra_dir)
        if not extra.is_dir():
            raise FileNotFoundError(f"background_dir {str(extra)!r} is not a folder of .md files")
        docs.update({str(p.relative_to(extra)): p.read_text(encoding="utf-8") for p in sorted(extra.rglob("*.md"))})
    return docs


def held_out_items(queries: list[dict]) -> set[str]:
    """Items an evaluation query was built from or judged by (meta.source_item, meta.source_items): they must stay
    out of training. Training queries (split 'train') hold none."""
    out = set()
    for q in queries:
        meta = q.get("meta", {})
        if q["split"] != "train":
            out |= ({meta["source_item"]} if meta.get("source_item") else set()) | set(meta.get("source_items", []))
    return out


def remove_names(text: str, names: list[str]) -> str:
    """Delete whole-word, case-insensitive occurrences of `names` and tidy the leftover punctuation."""
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?i)\b{re.escape(name)}\b\*?", "", text)
    text = re.sub(r"(,\s*)+(?=[,\n]|$)", "", text, flags=re.M)  # dangling commas
    text = re.sub(r":\s*,\s*", ": ", text)
    return re.sub(r"[ \t]{2,}", " ", text)


def slug(text: str) -> str:
    """Lower-case words joined by '-' ('Acid Arrow' → 'acid-arrow'): the readable part of a query id."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def with_article(word: str) -> str:
    """'a word' or 'an word' by its first letter."""
    return f"an {word}" if word[:1].lower() in "aeiou" else f"a {word}"


def catalogue_name(name: str) -> str | None:
    """The index-card form of a two- or three-word name ('Adult Red Dragon' → 'dragon, adult red'), else None."""
    words = name.split()
    if not 2 <= len(words) <= 3 or not all(w.isalpha() and w[0].isupper() for w in words):
        return None
    words = [w.lower() for w in words]
    return f"{words[-1]}, {' '.join(words[:-1])}"


def name_queries(items: list[dict], paraphrases_per_type: int, seed: int) -> list[dict]:
    """Name-lookup queries: every alias (category 'alias') and a seeded sample of catalogue-form names per item
    type (category 'name_paraphrase'); relevant = the items with that name or alias."""
    rng = random.Random(seed)
    owners: dict[str, set[str]] = {}
    for item in items:
        for name in [item["name"], *item["aliases"]]:
            owners.setdefault(name.lower(), set()).add(item["id"])
    queries = []
    for item in items:
        for alias in item["aliases"]:
            queries.append({"qid": f"alias:{slug(alias)}", "text": alias, "relevant": {i: 1 for i in sorted(owners[alias.lower()])},
                            "expected_topics": [item["name"]], "category": "alias", "split": "test",
                            "meta": {"source_item": item["id"]}})
    aliased = {i for q in queries for i in q["relevant"]}
    for kind in sorted({i["type"] for i in items}):
        candidates = [i for i in items if i["type"] == kind and i["id"] not in aliased and catalogue_name(i["name"])]
        for item in rng.sample(candidates, min(paraphrases_per_type, len(candidates))):
            text = catalogue_name(item["name"])
            queries.append({"qid": f"paraphrase:{slug(item['name'])}", "text": text, "relevant": {item["id"]: 1},
                            "expected_topics": [item["name"]], "category": "name_paraphrase", "split": "test",
                            "meta": {"source_item": item["id"]}})
    unique = {q["qid"]: q for q in queries}  # one query per alias text
    return sorted(unique.values(), key=lambda q: q["qid"])
