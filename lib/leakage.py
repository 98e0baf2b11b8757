"""Keeping evaluation out of training: text normalisation, near-duplicate search, dropping and refusing training rows
that repeat an evaluation query or come from its source items, and the queries held out for stage 06."""
from __future__ import annotations

import re
from collections import Counter

from lib.corpus import held_out_items


def loss_columns(num_negatives: int) -> list[str]:
    """The dataset columns the sentence-transformers losses read, in order."""
    return ["anchor", "positive"] + [f"negative_{n}" for n in range(1, num_negatives + 1)]


class LeakageError(ValueError):
    """Training data that contains evaluation queries, their source items or near-duplicates of them."""


def normal_text(text: str) -> str:
    """Lower-case text with runs of whitespace and punctuation collapsed (for exact-match checks)."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def near_duplicates(texts: list[str], others: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for every texts[i] whose word-TF-IDF cosine to others[j] is at or above `threshold`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not texts or not others:
        return []
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(list(texts) + list(others))
    sims = (tfidf.transform(texts) @ tfidf.transform(others).T).tocoo()
    return [(int(i), int(j), float(s)) for i, j, s in zip(sims.row, sims.col, sims.data) if s >= threshold]


def drop_leaking_rows(rows: list[dict], eval_queries: list[dict], threshold: float) -> tuple[list[dict], dict[str, int]]:
    """The rows (with texts) without those whose anchor repeats an evaluation query or whose text near-duplicates one
    (word TF-IDF cosine ≥ threshold), e.g. a document that happens to read like a test question; and how many were
    dropped of each kind."""
    eval_text = {normal_text(q["text"]) for q in eval_queries}
    texts = sorted({r[c] for r in rows for c in loss_columns(len(r.get("negative_ids", [])))})
    close = {texts[i] for i, _, _ in near_duplicates(texts, [q["text"] for q in eval_queries], threshold)}
    kept, dropped = [], Counter()
    for r in rows:
        if normal_text(r["anchor"]) in eval_text or any(r[c] in close for c in loss_columns(len(r.get("negative_ids", [])))):
            dropped[r["kind"]] += 1
        else:
            kept.append(r)
    return kept, dict(sorted(dropped.items()))


def check_leakage(rows: list[dict], eval_queries: list[dict], held_out: set[str], threshold: float, where: str) -> dict:
    """Raise LeakageError if a training row uses an item an evaluation query was built from, repeats an evaluation
    query's text, or holds a near-duplicate (word TF-IDF cosine ≥ threshold) of one; else return what was checked.
    After drop_leaking_rows only the first can fire, and only on a bug: the exclude set is the pipeline's own."""
    for n, r in enumerate(rows, start=1):
        used = [r["anchor_id"], r["positive_id"], *r.get("negative_ids", [])]
        bad = [i for i in used if i in held_out]
        if bad:
            raise LeakageError(f"{where} row {n} ({r['relation']}): item {bad[0]!r} is the source of an evaluation "
                               "query; it must stay out of training (check corpus.held_out_items and the exclude set)")
    eval_text = {normal_text(q["text"]): q["qid"] for q in eval_queries}
    for n, r in enumerate(rows, start=1):
        if normal_text(r["anchor"]) in eval_text:
            raise LeakageError(f"{where} row {n} ({r['relation']}): field 'anchor' repeats evaluation query "
                               f"{eval_text[normal_text(r['anchor'])]!r}; change the synthetic query templates")
    texts = sorted({r[c] for r in rows for c in loss_columns(len(r.get("negative_ids", [])))})
    hits = near_duplicates(texts, [q["text"] for q in eval_queries], threshold)
    if hits:
        i, j, score = max(hits, key=lambda h: h[2])
        raise LeakageError(f"{where}: a training text is a near-duplicate (cosine {score:.2f} ≥ {threshold}) of evaluation "
                           f"query {eval_queries[j]['qid']!r}: {texts[i][:80]!r}; exclude its item or raise "
                           "near_duplicate_threshold")
    return {"rows": len(rows), "texts": len(texts), "eval_queries": len(eval_queries), "near_duplicate_threshold": threshold}


def held_out_queries(queries: list[dict], train: list[dict], dev: list[dict], threshold: float) -> list[dict]:
    """The dev split's synthetic queries as evaluation queries (category 'synthetic:<kind>', relevant = every item the
    query fits), minus those whose text repeats or near-duplicates (≥ threshold) a training text."""
    dev_qids = {r["qid"] for r in dev if r.get("qid")}
    candidates = [q for q in queries if q["qid"] in dev_qids]
    train_texts = sorted({r[c] for r in train for c in loss_columns(len(r.get("negative_ids", [])))})
    close = {j for _, j, _ in near_duplicates(train_texts, [q["text"] for q in candidates], threshold)}
    seen = {normal_text(t) for t in train_texts}
    return [{"qid": q["qid"], "text": q["text"], "relevant": {i: 1 for i in q["matches"]}, "expected_topics": [],
             "category": f"synthetic:{q['kind']}", "split": "dev", "meta": {"source_item": q["source_id"]}}
            for j, q in enumerate(candidates) if j not in close and normal_text(q["text"]) not in seen]


def kept_out_of_training(items: list[dict], eval_queries: list[dict], threshold: float) -> tuple[set[str], set[str]]:
    """Items no training row may use: the sources of the evaluation queries, and the items whose text nearly copies
    an evaluation query (word TF-IDF cosine at least `threshold`)."""
    ids = [i["id"] for i in items]
    copies = {ids[i] for i, _, _ in near_duplicates([i["text"] for i in items], [q["text"] for q in eval_queries],
                                                    threshold)}
    return held_out_items(eval_queries), copies
