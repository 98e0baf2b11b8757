"""The `beir` domain: any BEIR-format folder — corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv.

Documents are the items. Test qrels (and dev qrels, else a seeded share of the test queries) are the evaluation;
they never feed training. With qrels/train.tsv the run is supervised: stage 02 turns those queries into training
rows. Without it the run adapts from the corpus alone (stage 02's mined pairs and synthetic queries).

Real downloads are taken as they come: a document with a title and no text is its title; a document with neither,
and a qrels line naming a document or query the folder lacks, are skipped and counted (`skipped`). What would be
ambiguous stops the run: a repeated id, a broken line."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from lib.domains.records import DataError, read_jsonl_rows, read_text, require_path, text_field, unique_ids

TYPE = "document"
SPLITS = ("train", "dev", "test")


def read_documents(folder: Path, skipped: Counter) -> list[dict]:
    """corpus.jsonl as {id, title, text, line}; `_id` required and unique; a document with neither title nor text
    is counted in `skipped` and left out."""
    path = require_path(folder / "corpus.jsonl", "the BEIR corpus: one {\"_id\", \"title\", \"text\"} per line")
    docs = [{"id": text_field(path, n, row, "_id"), "title": text_field(path, n, row, "title", required=False),
             "text": text_field(path, n, row, "text", required=False), "line": n} for n, row in read_jsonl_rows(path)]
    unique_ids(path, [(d["line"], d["id"]) for d in docs], "_id")
    kept = [d for d in docs if d["title"] or d["text"]]
    skipped["empty_documents"] += len(docs) - len(kept)
    if not kept:
        raise DataError(f"{path}: no document with a title or text")
    return kept


def read_query_texts(folder: Path) -> dict[str, str]:
    """queries.jsonl as {_id: text}; `_id` and `text` required, ids unique."""
    path = require_path(folder / "queries.jsonl", "the BEIR queries: one {\"_id\", \"text\"} per line")
    rows = read_jsonl_rows(path)
    unique_ids(path, [(n, text_field(path, n, row, "_id")) for n, row in rows], "_id")
    return {text_field(path, n, row, "_id"): text_field(path, n, row, "text") for n, row in rows}


def read_qrels(path: Path, query_ids: set[str], doc_ids: set[str], skipped: Counter) -> dict[str, dict[str, int]]:
    """A qrels TSV (optional header 'query-id corpus-id score') → {query id: {doc id: grade > 0}}; a line naming a
    query or document that is not there (or an empty document) is counted in `skipped` and left out."""
    relevant: dict[str, dict[str, int]] = {}
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        cells = [c.strip() for c in line.split("\t")]
        if not line.strip() or n == 1 and cells[0] == "query-id":
            continue
        if len(cells) != 3 or not cells[2].lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score' (an integer score), got {line!r}")
        qid, doc, score = cells[0], cells[1], int(cells[2])
        if qid not in query_ids:
            skipped["qrels_unknown_query"] += 1
        elif doc not in doc_ids:
            skipped["qrels_unknown_document"] += 1
        elif score > 0:
            relevant.setdefault(qid, {})[doc] = score
    return relevant


def read_beir(folder: str | Path, eval_split: str = "test", skipped: Counter | None = None
              ) -> tuple[list[dict], dict[str, str], dict[str, dict[str, dict[str, int]]]]:
    """Validated documents, query texts and qrels by split; the `eval_split` qrels are required, and a query sits
    in one split only. What is skipped is counted in `skipped`."""
    skipped = Counter() if skipped is None else skipped
    folder = require_path(Path(folder), f"a BEIR folder (corpus.jsonl, queries.jsonl, qrels/{eval_split}.tsv)", folder=True)
    docs = read_documents(folder, skipped)
    texts = read_query_texts(folder)
    require_path(folder / "qrels" / f"{eval_split}.tsv", "the evaluation qrels (query-id, corpus-id, score)")
    qrels = {split: read_qrels(folder / "qrels" / f"{split}.tsv", set(texts), {d["id"] for d in docs}, skipped)
             for split in {*SPLITS, eval_split} if (folder / "qrels" / f"{split}.tsv").is_file()}
    if not qrels[eval_split]:
        raise DataError(f"{folder / 'qrels' / f'{eval_split}.tsv'}: no query has a relevant document (score > 0)")
    for split in ("train", "dev"):
        shared = sorted(set(qrels.get(split, {})) & set(qrels.get("test", {})))
        if shared:
            raise DataError(f"{folder / 'qrels' / f'{split}.tsv'}: query {shared[0]!r} is also in test.tsv; "
                            "a query must sit in one split (test queries never train)")
    return docs, texts, qrels


def document_item(doc: dict) -> dict:
    """A BEIR document as a canonical item (name: its title, else its first words; text: title and text)."""
    name = doc["title"] or " ".join(doc["text"].split()[:8])
    text = ". ".join(part for part in (doc["title"], doc["text"]) if part)
    return {"id": doc["id"], "type": TYPE, "name": name, "text": text, "aliases": [], "tags": [], "meta": {"line": doc["line"]}}


def keep_documents(docs: list[dict], qrels: dict[str, dict[str, dict[str, int]]], max_items: int) -> list[dict]:
    """A slice of `max_items` documents (0 = all): those judged for evaluation queries first, in file order."""
    if not max_items:
        return docs
    judged = {d for split in ("test", "dev") for rel in qrels.get(split, {}).values() for d in rel}
    picked = {d["id"] for d in sorted(docs, key=lambda d: (d["id"] not in judged, d["line"]))[:max_items]}
    return [d for d in docs if d["id"] in picked]


def build_corpus(data_path: str | Path, max_items: int = 0, skipped: Counter | None = None
                 ) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items, queries (train/dev/test as in the qrels files; without dev.tsv every evaluation query is 'test' and
    stage 00 draws dev from them), no relations, the documents as background text; what the folder holds but the
    run cannot use is counted in `skipped`."""
    docs, texts, qrels = read_beir(data_path, skipped=skipped)
    docs = keep_documents(docs, qrels, max_items)
    ids = {d["id"] for d in docs}
    queries = []
    for split, judged in qrels.items():
        for qid, rel in sorted(judged.items()):
            rel = {d: g for d, g in rel.items() if d in ids}
            if rel:
                queries.append({"qid": qid, "text": texts[qid], "relevant": rel, "expected_topics": [],
                                "category": "supervised" if split == "train" else "beir", "split": split, "meta": {}})
    items = [document_item(d) for d in docs]
    background = {"corpus": "\n\n".join(i["text"] for i in items)}
    return items, queries, [], background
