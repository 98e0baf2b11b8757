"""The `codex` domain: wiki chunks with entity indexes and test questions (a fandom wiki, a company's documents).

Reads `chunks/*.jsonl` ({"text", "filename", "<type>_mentions": [...]}, optional "source", "wiki_type",
"temporal_order"), `indexes/*_index.json` (entries with "filename", "aliases" and "primary_name" — in a mapping the
key when it is absent) and `test_questions.json` ({"questions": [...]} or the bare list of {"question",
"expected_topics"}, optional "category", "difficulty", "question_id", "temporal_limit"). Items are the chunks; an
item's type is the index its file belongs to. A question with a temporal_limit is scored only over the chunks whose
temporal_order is at most that limit (its positives too): later chunks are not its candidates.
- Positive finder: a question's relevant chunks are those whose topic coverage (the 1–5 rubric of stage 06: 1 + 4 ×
  the share of expected topics the chunk names, by index aliases, its mentions or its own entity) reaches
  `min_topic_coverage`; a chunk covering every topic has grade 2. The questions and these labels never train: the
  training queries are synthesised from the indexes (and stage 02 drops any that copies a question).
- Query synthesis (split 'train'): per entity, templates by type ("Who is {name}?") over its names and aliases, and
  "Tell me about {mention}" over what its chunks mention; `synthetic_expansion_factor` queries per entity.
- Hard-negative miner (`meta.negatives` of each training query, cycled hard → medium → easy by stage 02): hard =
  a chunk of another entity sharing a mention with the positives, medium = another entity of the same type,
  easy = another type; never a chunk that names the query's entity."""
from __future__ import annotations

import functools
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from lib.domains.records import DataError, list_field, read_json_file, read_jsonl_rows, require_path, slug, text_field, unique_slugs

TEMPLATES = {
    "person": ["Who is {name}?", "Tell me about {name}.", "What do we know about {name}?", "Describe {name}.",
               "What part does {name} play in the story?"],
    "other": ["What is {name}?", "Tell me about {name}.", "Explain {name}.", "Describe {name}.", "What does {name} mean?"],
}
PERSON_TYPES = ("character", "characters", "person", "people", "npc", "npcs")


def files_in(folder: Path, pattern: str, what: str) -> list[Path]:
    """The files of `folder` matching `pattern`, sorted; a missing folder or no match is a DataError."""
    require_path(folder, f"{folder.name}/{pattern}: {what}", folder=True)
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"{folder}: no {pattern} files; expected {what}")
    return files


def read_indexes(folder: Path) -> list[dict]:
    """Entities of indexes/*_index.json: {type, name, filename, aliases}; primary_name and filename required."""
    index_dir = folder / "indexes"
    files = files_in(index_dir, "*_index.json", "entity indexes such as character_index.json")
    entities = []
    for path in files:
        data = read_json_file(path)
        entries = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise DataError(f"{path}: expected a list (or a mapping) of entries with 'primary_name' and 'filename'")
        keys = list(data) if isinstance(data, dict) else [None] * len(entries)
        kind = path.name.removesuffix("_index.json")
        for n, (key, entry) in enumerate(zip(keys, entries), start=1):
            where = f"entry {n}" if key is None else f"entry {key!r}"
            if not isinstance(entry, dict):
                raise DataError(f"{path}: {where} is not an object")
            if key is not None and not str(entry.get("primary_name") or "").strip():
                entry = {**entry, "primary_name": key}  # a mapping's key is the name unless primary_name says otherwise
            for field in ("primary_name", "filename"):
                if not isinstance(entry.get(field), str) or not entry[field].strip():
                    raise DataError(f"{path}: {where}: missing or empty field {field!r}")
            aliases = entry.get("aliases", [])
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise DataError(f"{path}: {where} ({entry['primary_name']!r}): field 'aliases' must be a list of strings")
            entities.append({"type": kind, "name": entry["primary_name"].strip(), "filename": entry["filename"].strip(),
                             "aliases": [a.strip() for a in aliases if a.strip() and a.strip() != entry["primary_name"].strip()]})
    seen: dict[str, str] = {}
    for e in entities:
        if e["filename"] in seen:
            raise DataError(f"{index_dir}: filename {e['filename']!r} is listed for both {seen[e['filename']]!r} and "
                            f"{e['name']!r}; each file belongs to one entity")
        seen[e["filename"]] = e["name"]
    return entities


def read_chunks(folder: Path) -> list[dict]:
    """Chunks of chunks/*.jsonl: {id, text, filename, mentions: {type: [...]}, path, line}."""
    chunk_dir = folder / "chunks"
    files = files_in(chunk_dir, "*.jsonl", 'chunks, one {"text", "filename", ...} per line')
    chunks = []
    for path in files:
        for n, row in read_jsonl_rows(path):
            mentions = {key.removesuffix("_mentions"): list_field(path, n, row, key) for key in row if key.endswith("_mentions")}
            order = row.get("temporal_order")
            if order is not None and (isinstance(order, bool) or not isinstance(order, (int, float))):
                raise DataError(f"{path}:{n}: field 'temporal_order' must be a number (where the chunk sits in the "
                                f"story's time) or null, got {order!r}")
            chunks.append({"id": f"{path.stem}:{n}", "text": text_field(path, n, row, "text"),
                           "filename": text_field(path, n, row, "filename"), "mentions": mentions,
                           "source_type": row.get("wiki_type") if isinstance(row.get("wiki_type"), str) else "",
                           "source": row.get("source") if isinstance(row.get("source"), str) else "",
                           "temporal_order": order, "path": path, "line": n})
    if not chunks:
        raise DataError(f"{chunk_dir}: the chunk files hold no lines")
    return chunks


def optional_text(q: dict, field: str, where: str) -> str:
    """An optional string field of a question ("" when absent or null); a non-string is a DataError."""
    value = q.get(field)
    if value is None:
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}")
    return str(value).strip()


def read_questions(folder: Path) -> list[dict]:
    """test_questions.json — a list of questions, or {"questions": [...]} — each {question, expected_topics} with
    optional category, difficulty, question_id (kept as the query id) and temporal_limit (a number or null)."""
    path = require_path(folder / "test_questions.json", "test_questions.json: {\"questions\": [{\"question\", "
                        "\"expected_topics\", \"category\", ...}]} or the bare list")
    data = read_json_file(path)
    if isinstance(data, dict) and "questions" in data:
        data = data["questions"]
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected {{\"questions\": [...]}} or a JSON list, non-empty, of question objects")
    questions = []
    for n, q in enumerate(data, start=1):
        where = f"{path}: question {n}"
        if not isinstance(q, dict):
            raise DataError(f"{where} is not an object")
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise DataError(f"{where}: missing or empty field 'question'")
        topics = q.get("expected_topics")
        if not isinstance(topics, list) or not topics or not all(isinstance(t, str) and t.strip() for t in topics):
            raise DataError(f"{where}: field 'expected_topics' must be a non-empty list of names")
        limit = q.get("temporal_limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))):
            raise DataError(f"{where}: field 'temporal_limit' must be a number (the last temporal_order the question "
                            f"may see) or null, got {limit!r}")
        questions.append({"n": n, "id": optional_text(q, "question_id", where) or str(n),
                          "question": q["question"].strip(), "topics": [t.strip() for t in topics],
                          "category": optional_text(q, "category", where) or "question",
                          "difficulty": optional_text(q, "difficulty", where), "temporal_limit": limit})
    first: dict[str, int] = {}
    for q in questions:
        if q["id"] in first:
            raise DataError(f"{path}: question {q['n']}: question_id {q['id']!r} is also question {first[q['id']]}'s; "
                            "ids must be unique")
        first[q["id"]] = q["n"]
    repeated = [q for i, q in enumerate(questions) if q["question"].lower() in {p["question"].lower() for p in questions[:i]}]
    if repeated:
        raise DataError(f"{path}: question {repeated[0]['n']} repeats an earlier question: {repeated[0]['question']!r}")
    return questions


def topic_forms(topics: list[str], entities: list[dict]) -> dict[str, list[str]]:
    """Each topic → the names it may appear under: itself and, when it names an index entity, its name and aliases."""
    names = {}
    for e in entities:
        for form in [e["name"], *e["aliases"]]:
            names.setdefault(form.lower(), [e["name"], *e["aliases"]])
    return {t: list(dict.fromkeys([t, *names.get(t.lower(), [])])) for t in topics}


@functools.lru_cache(maxsize=4096)
def lowered(text: str) -> str:
    """The text in lower case, made once per text (a chunk is searched for every entity)."""
    return text.lower()


def named_in(forms: list[str], text: str) -> bool:
    """Whether any form occurs as whole words in the text (case-insensitive); a plain substring test first, so a long
    text costs one fast scan per form."""
    low = lowered(text)
    return any(f.lower() in low and re.search(rf"(?<!\w){re.escape(f.lower())}(?!\w)", low) for f in forms)


def chunk_coverage(chunk: dict, forms: dict[str, list[str]], entity: dict | None) -> float:
    """1–5: 1 + 4 × the share of topics a chunk names in its text, lists in its mentions, or is about."""
    mentioned = " | ".join(m for values in chunk["mentions"].values() for m in values)
    own = {f.lower() for f in ([entity["name"], *entity["aliases"]] if entity else [])}
    found = sum(named_in(f, chunk["text"]) or named_in(f, mentioned) or bool(own & {x.lower() for x in f})
                for f in forms.values())
    return 1 + 4 * found / len(forms)


def find_positives(question: dict, chunks: list[dict], entities_by_file: dict[str, dict], entities: list[dict],
                   min_topic_coverage: float) -> dict[str, int]:
    """The positive finder: chunk id → grade (2 covers every topic, 1 reaches `min_topic_coverage`)."""
    forms = topic_forms(question["topics"], entities)
    out = {}
    for chunk in chunks:
        score = chunk_coverage(chunk, forms, entities_by_file.get(chunk["filename"]))
        if score >= min_topic_coverage:
            out[chunk["id"]] = 2 if score >= 5 else 1
    return out


def later_chunks(chunks: list[dict], temporal_limit: float | None) -> set[str]:
    """Ids of the chunks a question with `temporal_limit` may not see: those whose temporal_order is past it (a
    chunk without one is always visible; no limit hides nothing)."""
    if temporal_limit is None:
        return set()
    return {c["id"] for c in chunks if c["temporal_order"] is not None and c["temporal_order"] > temporal_limit}


def chunk_item(chunk: dict, entity: dict | None) -> dict:
    """A chunk as a canonical item: named after its entity (or file); its mentions are its tags."""
    mentions = list(dict.fromkeys(m for values in chunk["mentions"].values() for m in values))
    return {"id": chunk["id"], "type": entity["type"] if entity else slug(chunk["source_type"]) or "chunk",
            "name": entity["name"] if entity else Path(chunk["filename"]).stem.replace("_", " "),
            "text": chunk["text"], "aliases": entity["aliases"] if entity else [], "tags": mentions,
            "meta": {"filename": chunk["filename"], "mentions": chunk["mentions"], "file": chunk["path"].name, "line": chunk["line"],
                     **{k: chunk[k] for k in ("source", "temporal_order") if chunk[k] not in ("", None)}}}


def mine_negatives(positives: list[str], entity: dict, items: dict[str, dict], rng: random.Random,
                   per_tier: int = 3) -> list[list[str]]:
    """The hard-negative miner: [[chunk id, tier], …] — hard: another entity sharing a mention with the positives;
    medium: another entity of the same type; easy: another type. Never a chunk naming the query's entity."""
    names = [entity["name"], *entity["aliases"]]
    shared = {m.lower() for p in positives for m in items[p]["tags"]} - {n.lower() for n in names}
    tiers: dict[str, list[str]] = {"hard": [], "medium": [], "easy": []}
    for item_id, item in items.items():
        if item["name"] == entity["name"] or named_in(names, item["text"]):
            continue
        if shared & {m.lower() for m in item["tags"]}:
            tiers["hard"].append(item_id)
        elif item["type"] == entity["type"]:
            tiers["medium"].append(item_id)
        else:
            tiers["easy"].append(item_id)
    return [[i, tier] for tier, ids in tiers.items() for i in rng.sample(ids, min(per_tier, len(ids)))]


def synthetic_queries(entities: list[dict], items: dict[str, dict], expansion_factor: int, positives_per_query: int,
                      seed: int) -> list[dict]:
    """Training queries per entity (split 'train'): type templates over its names, then 'Tell me about {mention}'
    over its chunks' mentions; positives: its chunks, at most `positives_per_query`."""
    rng = random.Random(seed)
    by_name: dict[str, list[str]] = defaultdict(list)
    for item_id, item in items.items():
        by_name[item["name"]].append(item_id)
    queries = []
    for entity in entities:
        chunk_ids = by_name.get(entity["name"], [])
        if not chunk_ids:
            continue
        templates = TEMPLATES["person" if entity["type"].lower() in PERSON_TYPES else "other"]
        texts = [t.format(name=name) for name in [entity["name"], *entity["aliases"]] for t in templates]
        rng.shuffle(texts)
        mentions = sorted({m for i in chunk_ids for m in items[i]["tags"]} - {entity["name"], *entity["aliases"]})
        texts = texts[: max(1, expansion_factor - min(2, len(mentions)))]
        texts += [f"Tell me about {m} and {entity['name']}." for m in rng.sample(mentions, min(2, len(mentions)))]
        for n, text in enumerate(texts[:expansion_factor], start=1):
            positives = rng.sample(chunk_ids, min(positives_per_query, len(chunk_ids)))
            queries.append({"qid": f"syn:{slug(entity['name'])}:{n}", "text": text, "relevant": {p: 1 for p in positives},
                            "expected_topics": [entity["name"]], "category": "synthetic", "split": "train",
                            "meta": {"negatives": mine_negatives(positives, entity, items, rng)}})
    return queries


def build_corpus(data_path: str | Path, max_items: int = 0, min_topic_coverage: float = 3.0,
                 synthetic_expansion_factor: int = 5, positives_per_query: int = 3,
                 seed: int = 42, skipped: Counter | None = None
                 ) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items (chunks), evaluation questions with found positives, synthetic training queries with mined negatives,
    no relations (chunks of one entity share its name, which stage 02 already guards), the chunks as background; a
    question no chunk covers is counted in `skipped` (it cannot be scored)."""
    folder = require_path(Path(data_path), "a codex folder (chunks/, indexes/, test_questions.json)", folder=True)
    entities, chunks, questions = read_indexes(folder), read_chunks(folder), read_questions(folder)
    if max_items:
        chunks = chunks[:max_items]
    by_file = {e["filename"]: e for e in entities}
    items = {c["id"]: chunk_item(c, by_file.get(c["filename"])) for c in chunks}
    queries = []
    for q in questions:
        hidden = later_chunks(chunks, q["temporal_limit"])
        relevant = find_positives(q, [c for c in chunks if c["id"] not in hidden], by_file, entities, min_topic_coverage)
        if relevant:
            queries.append({"qid": f"question:{q['id']}", "text": q["question"], "relevant": relevant,
                            "expected_topics": q["topics"], "category": q["category"], "split": "test",
                            "meta": {"difficulty": q["difficulty"] or "unspecified", "question_id": q["id"],
                                     **({"temporal_limit": q["temporal_limit"], "not_candidates": sorted(hidden)}
                                        if q["temporal_limit"] is not None else {})}})
    if skipped is not None and len(queries) < len(questions):
        skipped["questions_no_chunk_covers"] += len(questions) - len(queries)
    if not queries:
        raise DataError(f"{folder / 'test_questions.json'}: no question found a chunk covering its expected topics "
                        f"(min_topic_coverage {min_topic_coverage}); check the topic names against the chunks and indexes")
    queries += synthetic_queries(entities, items, synthetic_expansion_factor, positives_per_query, seed)
    names = unique_slugs([c["id"] for c in chunks])
    background = {names[c["id"]]: c["text"] for c in chunks}
    return list(items.values()), queries, [], background
