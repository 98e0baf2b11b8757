"""The `markdown` domain: a folder of .md files, one entity per file (or one per heading), as items and background.

Item type: the file's top folder ('page' for files at the root). Name: the first '# ' heading, else the file name.
Evaluation ground truth the training never sees:
- `references`: a page that links to other pages ([text](Other.md), [[Other]]) or names them in emphasis
  (*Other*, **Other**) → its text with those names removed finds them; the page itself stays out of training;
- `user`: an optional queries.jsonl in the folder, {"query", "relevant": ["file.md", …]} per line."""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from lib.corpus import remove_names
from lib.domains.records import DataError, blank, read_jsonl_rows, read_text, require_path, slug, text_field, unique_ids, unique_slugs

QUERIES_FILE = "queries.jsonl"


def markdown_files(folder: Path, skipped: Counter | None = None) -> list[Path]:
    """Every .md file under the folder, sorted; folders ending in '(Alt)' (re-groupings of the same text) left out, and
    hidden files and folders ('.trash/', '.obsidian/': deleted or tool notes) left out and counted in `skipped`."""
    files, hidden = [], 0
    for p in sorted(folder.rglob("*.md")):
        parts = p.relative_to(folder).parts
        if p.is_dir() or any(part.endswith("(Alt)") for part in parts):  # a folder "X.md" is no page
            continue
        if any(part.startswith(".") for part in parts):
            hidden += 1
            continue
        files.append(p)
    if skipped is not None and hidden:
        skipped["hidden_files"] += hidden
    if not files:
        raise DataError(f"{folder}: no .md files{' outside hidden folders' if hidden else ''}; give a folder of markdown "
                        "pages")
    return files


def without_front_matter(text: str) -> tuple[str, str]:
    """(the text without a leading YAML front matter block '---' … '---', the block's `title:` or '')."""
    match = re.match(r"---[ \t]*\r?\n(.*?\r?\n)?(---|\.\.\.)[ \t]*(\r?\n|$)", text, flags=re.S)
    if not match:
        return text, ""
    title = re.search(r"^title:[ \t]*(.+?)[ \t]*$", match.group(1) or "", flags=re.M)
    return text[match.end():], (title.group(1).strip("'\"").strip() if title else "")


def heading(line: str, level: int) -> str | None:
    """The text of a `level` heading line ('## Title ##' → 'Title'), else None; linear in the line's length."""
    if not line.startswith("#" * level) or line[level:level + 1] not in (" ", "\t"):
        return None
    return line[level:].strip().rstrip("#").strip() or None


def page_title(text: str, path: Path, fallback: str = "") -> str:
    """The first level-1 heading, else `fallback` (a front matter title), else the file name without extension."""
    return next((t for line in text.splitlines() if (t := heading(line, 1))), fallback or path.stem)


def sections(text: str, level: int) -> list[tuple[str, str]]:
    """(heading, body) of each heading of `level` ('##' for 2); the text before the first one is dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        title = heading(line, level)
        if title:
            out.append((title, []))
        elif out:
            out[-1][1].append(line)
    return [(title, "\n".join(body).strip()) for title, body in out]


def read_pages(folder: str | Path, split_level: int = 0, skipped: Counter | None = None) -> list[dict]:
    """Validated pages {id, type, name, text, path}: one per file, or one per heading of `split_level`; YAML front
    matter is dropped, and a page (or section) with no text is left out and counted in `skipped`."""
    folder = require_path(Path(folder), "a folder of .md files", folder=True)
    skipped = Counter() if skipped is None else skipped
    pages = []
    for path in markdown_files(folder, skipped):
        rel = path.relative_to(folder)
        text, front_title = without_front_matter(read_text(path))
        kind = slug(rel.parts[0]) if len(rel.parts) > 1 else "page"
        title = page_title(text, path, front_title)
        parts = sections(text, split_level) if split_level else [(title, text)]
        for heading, body in parts:
            name = heading if not split_level else f"{title} › {heading}"
            page_id = f"{rel.as_posix()}#{slug(heading)}" if split_level else rel.as_posix()
            pages.append({"id": page_id, "type": kind, "name": name, "title": heading, "text": body.strip(), "path": path})
    kept = [p for p in pages if not blank(plain_text(p["text"]))]
    if len(kept) < len(pages):
        skipped["empty_sections" if split_level else "empty_pages"] += len(pages) - len(kept)
    if not kept:
        raise DataError(f"{folder}: every {'section' if split_level else 'page'} is empty; write some text in the pages")
    seen: dict[str, Path] = {}
    for p in kept:
        if p["id"] in seen:
            raise DataError(f"{p['path']}: duplicate item id {p['id']!r}; give each section a distinct heading")
        seen[p["id"]] = p["path"]
    return kept


def plain_text(markdown: str) -> str:
    """Markdown without headings, link targets and emphasis markers."""
    text = re.sub(r"^#+\s.*$", "", markdown, flags=re.M)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\[\[([^\]|]*)(\|([^\]]*))?\]\]", lambda m: m.group(3) or m.group(1), text)
    return re.sub(r"[*_]{1,3}([^*_\n]+?)[*_]{1,3}", r"\1", text).strip()


def references(pages: list[dict]) -> list[dict]:
    """Page → page relations from links ([x](Other.md), [[Other]]) and emphasised names (*Other*, **Other**)."""
    by_key: dict[str, str] = {}
    for p in pages:
        by_key.setdefault(p["title"].lower(), p["id"])
        by_key.setdefault(Path(p["id"].split("#")[0]).stem.lower(), p["id"])
    out = []
    for p in pages:
        found = re.findall(r"\]\(([^)#]+?)\.md\)", p["text"]) + re.findall(r"\[\[([^\]|#]+)", p["text"])
        found = [Path(f.replace("%20", " ")).stem for f in found]
        found += re.findall(r"(?<![*_\w])[*_]{1,2}([^*_\n]{3,60}?)[*_]{1,2}(?![*_\w])", p["text"])
        targets = {by_key[f.strip().lower()] for f in found if f.strip().lower() in by_key} - {p["id"]}
        out += [{"head": p["id"], "tail": t, "relation": "references", "source": "markdown links and emphasis"}
                for t in sorted(targets)]
    return out


def reference_queries(pages: list[dict], relations: list[dict], share: float, max_relevant: int, seed: int) -> list[dict]:
    """For a seeded share of the pages that reference 1..max_relevant others: the page text with the referenced
    names removed → the referenced pages, among pages of their types (category 'references'; the page is the
    query's source: kept out of training and out of its own candidates)."""
    names = {p["id"]: p["title"] for p in pages}
    targets: dict[str, list[str]] = {}
    for r in relations:
        targets.setdefault(r["head"], []).append(r["tail"])
    candidates = sorted(head for head, tails in targets.items() if len(tails) <= max_relevant)
    picked = random.Random(seed).sample(candidates, round(len(candidates) * share))
    by_id = {p["id"]: p for p in pages}
    queries = []
    for head in sorted(picked):
        removed = remove_names(plain_text(by_id[head]["text"]), [names[t] for t in targets[head]] + [by_id[head]["title"]])
        if not re.search(r"\w", removed):  # a page of links only: no text of its own to query with
            continue
        queries.append({"qid": f"references:{head}", "text": removed, "relevant": {t: 1 for t in targets[head]},
                        "expected_topics": [names[t] for t in targets[head]], "category": "references",
                        "split": "test", "meta": {"source_item": head, "not_candidates": [head],
                                                  "target_types": sorted({by_id[t]["type"] for t in targets[head]})}})
    return queries


def user_queries(folder: Path, ids: set[str]) -> list[dict]:
    """queries.jsonl of the folder (if any): {"query", "relevant": [page id, …], "expected_topics"?} per line."""
    path = folder / QUERIES_FILE
    if not path.is_file():
        return []
    rows = read_jsonl_rows(path)
    out = []
    for n, row in rows:
        relevant = row.get("relevant")
        if not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) for r in relevant):
            raise DataError(f"{path}:{n}: field 'relevant' must be a non-empty list of page ids (e.g. 'Monsters/Lich.md')")
        unknown = [r for r in relevant if r not in ids]
        if unknown:
            raise DataError(f"{path}:{n}: field 'relevant' names {unknown[0]!r}, which is not a page of {folder}")
        out.append({"qid": f"user:{n}", "text": text_field(path, n, row, "query"), "relevant": {r: 1 for r in relevant},
                    "expected_topics": [t for t in row.get("expected_topics", []) if isinstance(t, str)],
                    "category": "user", "split": "test", "meta": {}, "line": n})
    unique_ids(path, [(q.pop("line"), q["text"].lower()) for q in out], "query")
    return out


def build_corpus(data_path: str | Path, split_level: int = 0, max_items: int = 0, reference_query_fraction: float = 0.5,
                 max_relevant: int = 25, seed: int = 42, skipped: Counter | None = None
                 ) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items (pages), evaluation queries (references, user), page→page relations, the pages as background; hidden
    and empty pages are counted in `skipped`."""
    folder = Path(data_path)
    pages = read_pages(folder, split_level, skipped)
    if max_items:
        pages = pages[:max_items]
    ids = {p["id"] for p in pages}
    queries = user_queries(folder, ids)
    relations = references(pages)
    queries += reference_queries(pages, relations, reference_query_fraction, max_relevant, seed)
    if not queries:
        raise DataError(f"{folder}: nothing to evaluate on; link pages to each other ([x](Other.md), [[Other]], "
                        f"*Other*) or add a {QUERIES_FILE} of {{\"query\", \"relevant\": [page ids]}}")
    items = [{"id": p["id"], "type": p["type"], "name": p["name"], "text": p["text"], "aliases": [], "tags": [],
              "meta": {"path": str(p["path"].relative_to(folder))}} for p in pages]
    sources = {q["meta"]["source_item"] for q in queries if q["meta"].get("source_item")}
    names = unique_slugs([p["id"] for p in pages])  # "A b.md" and "a-b.md" get two background files
    background = {names[p["id"]]: p["text"] for p in pages if p["id"] not in sources}  # query texts never pre-train
    return items, queries, relations, background
