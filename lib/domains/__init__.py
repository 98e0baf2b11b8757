"""Domain adapters: each turns a domain's sources into the canonical corpus (items, queries, relations, background).

`dnd` reads the bundled SRD; the others read the user's files at DATA and validate them before any work."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from lib.domains.records import DataError, inside

ADAPTERS = ("dnd", "prompts", "codex", "beir", "markdown")
DATA_FORMATS = {
    "prompts": "a .csv or .jsonl of prompts (or a folder holding prompts.csv / prompts.jsonl)",
    "codex": "a folder with chunks/*.jsonl, indexes/*_index.json and test_questions.json",
    "beir": "a BEIR folder with corpus.jsonl, queries.jsonl and qrels/test.tsv (train.tsv, dev.tsv optional)",
    "markdown": "a folder of .md files",
}


def adapter(domain: str):
    """The adapter module of a domain; an unknown name is a DataError listing the known ones."""
    if domain not in ADAPTERS:
        raise DataError(f"unknown domain {domain!r}; known domains: {list(ADAPTERS)}")
    return importlib.import_module(f"lib.domains.{domain}")


def build_corpus(domain: str, data_path: str, **options) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items, queries, relations and background of a domain; `data_path` is required for every domain but dnd.
    `options` may hold every stage-00 parameter: each adapter takes the ones its build_corpus names."""
    module = adapter(domain)
    accepted = inspect.signature(module.build_corpus).parameters
    options = {k: v for k, v in options.items() if k in accepted}
    if domain == "dnd":
        if data_path:
            raise DataError("the dnd domain reads the bundled SRD; leave DATA empty (use DOMAIN=markdown for SRD markdown)")
        return module.build_corpus(**options)
    if not data_path:
        raise DataError(f"DOMAIN={domain} needs DATA=<path>: {DATA_FORMATS[domain]}")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: not found; DATA for DOMAIN={domain} is {DATA_FORMATS[domain]}")
    inside(path)
    items, queries, relations, background = module.build_corpus(path, **options)
    blank = next((q for q in queries if not q["text"].strip()), None)
    if blank:
        raise DataError(f"{path}: query {blank['qid']!r} has no text once its answers' names are removed; give that "
                        "record some text of its own")
    if not any(q.get("split") != "train" and q["relevant"] for q in queries):
        raise DataError(f"{path}: no evaluation query: nothing in DATA gives ground truth to test on "
                        f"({DATA_FORMATS[domain]}); see the README's section on DOMAIN={domain}")
    return items, queries, relations, background
