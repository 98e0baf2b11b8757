"""The `beir` domain: any BEIR-format folder — corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv.

Documents are the items. Test qrels (and dev qrels, else a seeded share of the test queries) are the evaluation;
they never feed training. With qrels/train.tsv the run is supervised: stage 02 turns those queries into training
rows. Without it the run adapts from the corpus alone (stage 02's mined pairs and synthetic queries)."""
from __future__ import annotations

from pathlib import Path

from lib.domains.records import DataError, read_jsonl_rows, read_text, require_path, text_field, unique_ids

TYPE = "document"
SPLITS = ("train", "dev", "test")


def read_documents(folder: Path) -> list[dict]:
    """corpus.jsonl as {id, title, text, line}; `_id` and `text` required, ids unique."""
    path = require_path(folder / "corpus.jsonl", "the BEIR corpus: one {\"_id\", \"title\", \"text\"} per line")
    docs = [{"id": text_field(path, n, row, "_id"), "title": text_field(path, n, row, "title", required=False),
             "text": text_field(path, n, row, "text"), "line": n} for n, row in read_jsonl_rows(path)]
    if not docs:
        raise DataError(f"{path}: no documents")
    unique_ids(path, [(d["line"], d["id"]) for d in docs], "_id")
    return docs


def read_query_texts(folder: Path) -> dict[str, str]:
    """queries.jsonl as {_id: text}; `_id` and `text` required, ids unique."""
    path = require_path(folder / "queries.jsonl", "the BEIR queries: one {\"_id\", \"text\"} per line")
    rows = read_jsonl_rows(path)
    unique_ids(path, [(n, text_field(path, n, row, "_id")) for n, row in rows], "_id")
    return {text_field(path, n, row, "_id"): text_field(path, n, row, "text") for n, row in rows}


def read_qrels(path: Path, query_ids: set[str], doc_ids: set[str]) -> dict[str, dict[str, int]]:
    """A qrels TSV (optional header 'query-id corpus-id score') → {query id: {doc id: grade > 0}}."""
    relevant: dict[str, dict[str, int]] = {}
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        cells = [c.strip() for c in line.split("\t")]
        if not line.strip() or n == 1 and cells[0] == "query-id":
            continue
        if len(cells) != 3 or not cells[2].lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score' (an integer score), got {line!r}")
        qid, doc, score = cells[0], cells[1], int(cells[2])
        if qid not in query_ids:
            raise DataError(f"{path}:{n}: field 'query-id' {qid!r} is not in queries.jsonl")
        if doc not in doc_ids:
            raise DataError(f"{path}:{n}: field 'corpus-id' {doc!r} is not in corpus.jsonl")
        if score > 0:
            relevant.setdefault(qid, {})[doc] = score
    return relevant


def read_beir(folder: str | Path, eval_split: str = "test") -> tuple[list[dict], dict[str, str], dict[str, dict[str, dict[str, int]]]]:
    """Validated documents, query texts and qrels by split; the `eval_split` qrels are required, and a query sits
    in one split only."""
    folder = require_path(Path(folder), f"a BEIR folder (corpus.jsonl, queries.jsonl, qrels/{eval_split}.tsv)", folder=True)
    docs = read_documents(folder)
    texts = read_query_texts(folder)
    require_path(folder / "qrels" / f"{eval_split}.tsv", "the evaluation qrels (query-id, corpus-id, score)")
    qrels = {split: read_qrels(folder / "qrels" / f"{split}.tsv", set(texts), {d["id"] for d in docs})
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
    """A BEIR document as a canonical item (name: its title, else its first words)."""
    name = doc["title"] or " ".join(doc["text"].split()[:8])
    text = f"{doc['title']}. {doc['text']}" if doc["title"] else doc["text"]
    return {"id": doc["id"], "type": TYPE, "name": name, "text": text, "aliases": [], "tags": [], "meta": {"line": doc["line"]}}


def keep_documents(docs: list[dict], qrels: dict[str, dict[str, dict[str, int]]], max_items: int) -> list[dict]:
    """A slice of `max_items` documents (0 = all): those judged for evaluation queries first, in file order."""
    if not max_items:
        return docs
    judged = {d for split in ("test", "dev") for rel in qrels.get(split, {}).values() for d in rel}
    picked = {d["id"] for d in sorted(docs, key=lambda d: (d["id"] not in judged, d["line"]))[:max_items]}
    return [d for d in docs if d["id"] in picked]


def build_corpus(data_path: str | Path, max_items: int = 0) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items, queries (train/dev/test as in the qrels files; without dev.tsv every evaluation query is 'test' and
    stage 00 draws dev from them), no relations, the documents as background text."""
    docs, texts, qrels = read_beir(data_path)
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
