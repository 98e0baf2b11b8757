"""Stage 02: training data — item pairs mined from teacher cosines across entity types, synthetic queries,
hard negatives with a false-negative guard, entity-group splits and a leakage check."""
from __future__ import annotations

import itertools
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.config import parameter_fields
from lib.corpus import remove_names, with_article
from lib.io import atomic_dir
from lib.leakage import loss_columns, near_duplicates, normal_text
from lib.neighbours import relation_name, sampled_similarities, type_pairs
from lib.progress import bar

TIERS = ("hard", "medium", "easy")
QUERY_KINDS = ("name", "keywords", "sentence", "tags")


def relation_thresholds(
    vectors: np.ndarray,
    types: list[str],
    mode: str,
    positive_threshold: float,
    negative_threshold: float,
    positive_percentile: float,
    negative_percentile: float,
    seed: int,
    n: int = 200_000,
) -> dict[str, dict[str, float]]:
    """Per relation, the cosine at or above which a neighbour is a positive and at or below which an item is an easy
    negative: fixed values ('absolute') or percentiles of the relation's own distribution ('calibrated')."""
    if mode not in ("absolute", "calibrated"):
        raise ValueError(f"threshold_mode must be 'absolute' or 'calibrated', got {mode!r}")
    out = {}
    for type_a, type_b in type_pairs(types):
        if mode == "absolute":
            positive, negative = positive_threshold, negative_threshold
        else:
            sims = sampled_similarities(vectors, types, type_a, type_b, n, seed)
            positive, negative = (float(v) for v in np.percentile(sims, [positive_percentile, negative_percentile]))
        out[relation_name(type_a, type_b)] = {"positive": round(positive, 4), "negative": round(negative, 4)}
    return out


# --- item pairs ------------------------------------------------------------------------------------------------

def mine_item_pairs(
    ids: list[str],
    types: list[str],
    neighbours: dict[str, tuple[np.ndarray, np.ndarray]],
    thresholds: dict[str, dict[str, float]],
    positives_per_anchor: int,
    exclude: set[str],
) -> list[dict]:
    """For each anchor and type pair: its nearest items of the other type with cosine ≥ the relation's positive
    threshold (at most `positives_per_anchor`; each unordered pair once). Items in `exclude` never appear."""
    seen: set[int] = set()  # each unordered pair once, as low·n + high (a million frozensets would take 300 MB)
    out = []
    types_arr = np.asarray(types)
    for type_a, type_b in type_pairs(types):
        relation = relation_name(type_a, type_b)
        scores, index = neighbours[type_b]
        for anchor in np.flatnonzero(types_arr == type_a):
            if ids[anchor] in exclude:
                continue
            taken = 0
            for score, other in zip(scores[anchor], index[anchor]):
                if score < thresholds[relation]["positive"] or taken >= positives_per_anchor:
                    break
                low, high = sorted((int(anchor), int(other)))
                key = low * len(ids) + high
                if ids[other] in exclude or key in seen:
                    continue
                seen.add(key)
                taken += 1
                out.append({"kind": "item", "relation": relation, "anchor": None, "anchor_id": ids[anchor],
                            "positive_id": ids[other], "score": round(float(score), 4)})
    return out


# --- synthetic queries -----------------------------------------------------------------------------------------

def keywords(texts: list[str], names: list[str], top_n: int = 8) -> list[list[str]]:
    """The `top_n` most distinctive words (TF-IDF) of each text, leaving out the words of its own name."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z'-]{3,}\b",
                            sublinear_tf=True, max_df=max(0.2, 1 / len(texts)))  # a word in a fifth of the texts is not distinctive
    weights = tfidf.fit_transform(texts).tocsr()
    vocab = tfidf.get_feature_names_out()
    out = []
    for row, name in enumerate(names):
        name_words = set(re.findall(r"[a-z']+", name.lower()))
        start, end = weights.indptr[row], weights.indptr[row + 1]
        cols, vals = weights.indices[start:end], weights.data[start:end]
        ranked = [vocab[c] for c in cols[np.argsort(-vals, kind="stable")]]
        out.append([w for w in ranked if w not in name_words and not any(w.startswith(n) for n in name_words if len(n) > 3)][:top_n])
    return out


def sentences(text: str, min_words: int = 6, max_words: int = 30) -> list[str]:
    """Descriptive sentences of an item text: after its first (header) line when it has several (a one-line text,
    such as a prompt or a document, is all body), no 'Label: value' lines."""
    body = text.split("\n", 1)[1] if "\n" in text else text
    parts = re.split(r"(?<=[.!?])\s+|\n", body)
    return [p.strip() for p in parts if min_words <= len(p.split()) <= max_words and ":" not in p]


def items_by_name(items: list[dict]) -> dict[str, set[str]]:
    """Lower-cased name or alias → ids of the items known by it."""
    by_name: dict[str, set[str]] = defaultdict(set)
    for item in items:
        for name in [item["name"], *item["aliases"]]:
            by_name[name.lower()].add(item["id"])
    return by_name


def synthetic_queries(
    items: list[dict],
    vectors: np.ndarray,
    expansion_factor: int,
    positives_per_query: int,
    type_nouns: dict[str, str],
    exclude: set[str],
    seed: int,
) -> list[dict]:
    """Up to `expansion_factor` short queries per item, cycling through its name (and aliases, labelled as name
    queries), TF-IDF keywords, a descriptive sentence with the name removed, and a pair of its tags. Each query's
    positives: the source item, and for tag queries up to `positives_per_query` - 1 more items of the same type
    carrying the same tags (nearest to the source by teacher cosine); `matches` lists every item that fits."""
    rng = random.Random(seed)
    index = {item["id"]: n for n, item in enumerate(items)}
    words = keywords([i["text"] for i in items], [i["name"] for i in items])
    by_name = items_by_name(items)
    by_tag: dict[tuple[str, str], set[str]] = defaultdict(set)
    for item in items:
        for tag in item["tags"]:
            by_tag[(item["type"], tag)].add(item["id"])
    queries = []
    for n, item in enumerate(bar(items, desc="synthetic queries", leave=False)):
        if item["id"] in exclude:
            continue
        noun = with_article(type_nouns.get(item["type"], item["type"]))
        names = [item["name"], *item["aliases"]]
        candidates: dict[str, list[tuple[str, list[str]]]] = {
            "name": [(name, sorted(by_name[name.lower()])) for name in names],
            "keywords": [], "sentence": [], "tags": [],
        }
        for _ in range(expansion_factor):
            if len(words[n]) >= 3:
                picked = rng.sample(words[n], 3)
                candidates["keywords"].append((f"{noun} about {picked[0]}, {picked[1]} and {picked[2]}", [item["id"]]))
        described = sentences(item["text"])
        for sentence in rng.sample(described, min(expansion_factor, len(described))):
            text = remove_names(re.sub(rf"(?i)\bthe ({'|'.join(map(re.escape, names))})\b", "it", sentence), names).strip(" ,.")
            if len(text.split()) >= 5:
                candidates["sentence"].append((f"{noun}: {text[0].lower()}{text[1:]}", [item["id"]]))
        for _ in range(expansion_factor):
            if item["tags"]:
                tags = sorted(rng.sample(item["tags"], min(2, len(item["tags"]))))
                fits = set.intersection(*(by_tag[(item["type"], t)] for t in tags))
                candidates["tags"].append((f"{noun}: {', '.join(tags)}", sorted(fits)))
        made: set[str] = set()
        for kind in itertools.islice(itertools.cycle(QUERY_KINDS), expansion_factor * len(QUERY_KINDS)):
            if len(made) >= expansion_factor or not any(candidates.values()):
                break
            if not candidates[kind]:
                continue
            text, matches = candidates[kind].pop(0)
            if text.lower() in made:
                continue
            made.add(text.lower())
            others = sorted((m for m in matches if m != item["id"] and m not in exclude),
                            key=lambda m: -float(vectors[n] @ vectors[index[m]]))
            queries.append({"qid": f"syn:{item['id']}:{len(made)}", "text": text, "kind": kind,
                            "source_id": item["id"], "relevant": [item["id"]] + others[: positives_per_query - 1],
                            "matches": matches})
    return queries


def query_rows(queries: list[dict], ids: list[str], types: list[str], vectors: np.ndarray) -> list[dict]:
    """One training row per (synthetic query, positive), scored by the teacher cosine of source and positive."""
    index = {item_id: n for n, item_id in enumerate(ids)}
    rows = []
    for q in queries:
        source = index[q["source_id"]]
        for positive in q["relevant"]:
            rows.append({"kind": f"query:{q['kind']}", "relation": f"query-{types[source]}", "anchor": q["text"],
                         "anchor_id": q["source_id"], "positive_id": positive, "qid": q["qid"],
                         "score": round(float(vectors[source] @ vectors[index[positive]]), 4)})
    return rows


def drop_kinds(rows: list[dict], kinds: list[str]) -> list[dict]:
    """The rows whose kind (item, query:name, query:field, …) is not in `kinds`; an unknown kind is an error."""
    unknown = set(kinds) - {r["kind"] for r in rows} - {"item", "query:field", "query:feedback", "query:judged", "query:generated",
                                                         *(f"query:{k}" for k in QUERY_KINDS)}
    if unknown:
        raise ValueError(f"drop_row_kinds: unknown row kinds {sorted(unknown)}; this run's kinds are "
                         f"{sorted({r['kind'] for r in rows})}")
    return [r for r in rows if r["kind"] not in set(kinds)]


def supervised_queries(train_queries: list[dict], eval_queries: list[dict], positives_per_query: int,
                       threshold: float, exclude: set[str]) -> tuple[list[dict], int]:
    """The corpus's own training queries (split 'train': BEIR train qrels, codex templates) in the synthetic-query
    form: positives by grade (at most `positives_per_query`, none in `exclude`), every judged item guarded, given
    negatives kept. Those repeating or near-duplicating (word TF-IDF ≥ threshold) an evaluation query are dropped;
    returns the queries and how many were dropped."""
    close = {i for i, _, _ in near_duplicates([q["text"] for q in train_queries], [q["text"] for q in eval_queries], threshold)}
    seen = {normal_text(q["text"]) for q in eval_queries}
    out = []
    for n, q in enumerate(train_queries):
        ranked = [i for i, _ in sorted(q["relevant"].items(), key=lambda kv: -kv[1]) if i not in exclude]
        if n in close or normal_text(q["text"]) in seen or not ranked:
            continue
        out.append({"qid": q["qid"], "text": q["text"], "kind": q["category"], "source_id": ranked[0],
                    "relevant": ranked[:positives_per_query], "matches": sorted(q["relevant"]),
                    "negatives": q.get("meta", {}).get("negatives", [])})
    return out, len(train_queries) - len(out)


# --- hard negatives --------------------------------------------------------------------------------------------

def related_items(ids: list[str], items: list[dict], relations: list[dict]) -> dict[str, set[str]]:
    """Per item, the items that must never be its negative: those sharing a name or alias, or a known relation."""
    by_name = items_by_name(items)
    out: dict[str, set[str]] = {i: set() for i in ids}
    for item in items:
        for name in [item["name"], *item["aliases"]]:
            out[item["id"]] |= by_name[name.lower()]
    for r in relations:
        out.setdefault(r["head"], set()).add(r["tail"])
        out.setdefault(r["tail"], set()).add(r["head"])
    return out


def row_guards(rows: list[dict], related: dict[str, set[str]], queries: list[dict]) -> list[tuple[str, ...]]:
    """Per row, the items that must never be its negatives, sorted: those related to the anchor's source item, the
    source's other positives, and every item the row's synthetic query fits. Rows of one anchor share one tuple
    (a million rows: no copies, and a tuple is a quarter of a set)."""
    positives: dict[tuple, set[str]] = defaultdict(set)
    for r in rows:
        positives[(r["anchor_id"], r.get("qid"))].add(r["positive_id"])
    matches = {q["qid"]: set(q["matches"]) for q in queries}
    guards: dict[tuple, tuple[str, ...]] = {}
    for key, own in positives.items():
        guards[key] = tuple(sorted(own | related.get(key[0], set()) | matches.get(key[1], set())))
    del positives  # its sets, before the per-row list is built (a million of them at 1M items)
    return [guards[(r["anchor_id"], r.get("qid"))] for r in rows]


@dataclass(frozen=True)
class NegativeSettings:
    """How stage 02 picks hard negatives: its parameters of the same names (from_params), and the random items scored
    per row for the medium and easy tiers."""

    num_hard_negatives: int = 3
    hard_negative_min_rank: int = 3
    hard_negative_margin: float = 0.02
    seed: int = 42
    sample_size: int = 64

    @classmethod
    def from_params(cls, params: dict) -> NegativeSettings:
        """The settings stage 02's parameters (the notebook's globals()) give."""
        return cls(**parameter_fields(cls, params))


def add_negatives(
    rows: list[dict],
    guards: list[tuple[str, ...]],
    ids: list[str],
    types: list[str],
    vectors: np.ndarray,
    nearest: dict[str, tuple[np.ndarray, np.ndarray]],
    thresholds: dict[str, dict[str, float]],
    exclude: set[str],
    settings: NegativeSettings = NegativeSettings(),
    anchor_vectors: list[np.ndarray | None] | None = None,
) -> tuple[list[dict], int]:
    """Give each row `settings.num_hard_negatives` negatives of its positive's type, cycling hard → medium → easy:
    hard = the source's nearest items from rank `hard_negative_min_rank` on whose cosine is at least
    `hard_negative_margin` below the positive's; medium = a random item between the easy threshold and the nearest
    list; easy = a random item at or below the relation's negative threshold. A tier without a candidate lends its
    turn to the next. Never the anchor, the positive, an item in the row's guard (shared name/alias/relation, other
    positives, every item a query fits) or in `exclude`; the guard is kept as `guard_ids` (stage 04 keeps those
    items out of the row's batch). Rows that cannot get enough negatives are dropped; returns the kept rows and how
    many were dropped. With `anchor_vectors` (per row: the teacher's vector of the row's query, None for an item
    anchor), a query row is mined around its query instead of its source item: the hard tier is the query's own
    nearest items and every cosine is the teacher's query→item score (the margin keeps out a negative the teacher
    scores near the positive: a likely false negative). `nearest` is neighbours_by_type's answer."""
    num_hard_negatives, sample_size = settings.num_hard_negatives, settings.sample_size
    hard_negative_min_rank, hard_negative_margin = settings.hard_negative_min_rank, settings.hard_negative_margin
    rng = np.random.default_rng(settings.seed)
    index = {item_id: n for n, item_id in enumerate(ids)}
    types_arr = np.asarray(types)
    pool = {t: np.flatnonzero(types_arr == t) for t in set(types)}
    excluded = {index[i] for i in exclude if i in index}
    kept, dropped = [], 0
    for n, (row, guard) in enumerate(zip(bar(rows, desc="hard negatives", leave=False), guards)):
        source, positive = index[row["anchor_id"]], index[row["positive_id"]]
        target_type = types[positive]
        forbidden = {source, positive} | {index[i] for i in guard if i in index}
        query_vector = anchor_vectors[n] if anchor_vectors is not None else None
        anchor = vectors[source] if query_vector is None else query_vector
        if query_vector is None:
            scores, near = nearest[target_type][0][source], nearest[target_type][1][source]
        else:
            candidate_scores = vectors[pool[target_type]] @ query_vector
            order = np.argsort(-candidate_scores, kind="stable")[: nearest[target_type][1].shape[1]]
            scores, near = candidate_scores[order], pool[target_type][order]
        positive_score = float(anchor @ vectors[positive])
        easy_max = thresholds[relation_name(types[source], target_type)]["negative"]
        floor = float(scores[-1]) if len(scores) else 1.0
        is_hard = scores <= positive_score - hard_negative_margin
        is_hard[:hard_negative_min_rank] = False
        sample = rng.choice(pool[target_type], min(sample_size, len(pool[target_type])), replace=False)
        sample_scores = vectors[sample] @ anchor
        # only a tier's first num_hard_negatives allowed candidates can be chosen (choose_by_tiers)
        tiers = {"hard": near[is_hard], "medium": sample[(easy_max < sample_scores) & (sample_scores < floor)],
                 "easy": sample[sample_scores <= easy_max]}
        given = row.pop("given_negatives", [])  # a judged question's Wrong items come first (given_negatives)
        forbidden |= {c for c, _ in given}
        chosen = given + choose_by_tiers({tier: first_allowed(candidates, forbidden, excluded, num_hard_negatives)
                                          for tier, candidates in tiers.items()}, num_hard_negatives - len(given))
        if len(chosen) < num_hard_negatives:
            dropped += 1
            continue
        kept.append(with_negatives(row, guard, chosen, ids, vectors, anchor))
    return kept, dropped


def first_allowed(candidates: np.ndarray, forbidden: set[int], excluded: set[int], most: int) -> list[int]:
    """The first `most` candidates in neither `forbidden` nor `excluded`, in order."""
    out = []
    for c in candidates.tolist():
        if c not in forbidden and c not in excluded:
            out.append(c)
            if len(out) == most:
                break
    return out


def choose_by_tiers(candidates: dict[str, list[int]], num_negatives: int) -> list[tuple[int, str]]:
    """Up to `num_negatives` (item, tier) picks cycling hard → medium → easy, the first unused candidate of each
    tier; a tier without one lends its turn to the next."""
    chosen: list[tuple[int, str]] = []
    used: set[int] = set()
    for n in range(num_negatives):
        tier = TIERS[n % len(TIERS)]
        for option in TIERS[TIERS.index(tier):] + TIERS[:TIERS.index(tier)]:
            pick = next((c for c in candidates.get(option, []) if c not in used), None)
            if pick is not None:
                chosen.append((pick, option))
                used.add(pick)
                break
    return chosen


def with_negatives(row: dict, guard: tuple[str, ...], chosen: list[tuple[int, str]], ids: list[str], vectors: np.ndarray,
                   anchor: np.ndarray) -> dict:
    """The row, given its guard and chosen negatives in place (a million rows are not copied): ids, tiers and teacher
    cosines to the anchor's vector (the source item's, or the query's own when the teacher embedded it)."""
    row.update({"guard_ids": list(guard), "negative_ids": [ids[c] for c, _ in chosen],
                "negative_tiers": [t for _, t in chosen],
                "negative_scores": [round(float(anchor @ vectors[c]), 4) for c, _ in chosen]})
    return row


def with_teacher_scores(rows: list[dict], query_vectors: dict[str, np.ndarray], ids: list[str],
                        vectors: np.ndarray) -> list[dict]:
    """Each row with `teacher_scores`: the teacher's cosine of its anchor (the query's own vector by text, else the
    anchor item's) to the positive and to each negative, the targets of distillation losses."""
    index = {item_id: n for n, item_id in enumerate(ids)}
    out = []
    for r in rows:
        anchor = query_vectors[r["anchor"]] if r.get("anchor") in query_vectors else vectors[index[r["anchor_id"]]]
        targets = [r["positive_id"], *r.get("negative_ids", [])]
        out.append(r | {"teacher_scores": [round(float(anchor @ vectors[index[i]]), 4) for i in targets]})
    return out


def given_negatives(rows: list[dict], guards: list[tuple[str, ...]], queries: list[dict], ids: list[str],
                    vectors: np.ndarray, num_hard_negatives: int,
                    exclude: set[str]) -> tuple[list[dict], list[dict], list[tuple[str, ...]]]:
    """Rows whose query brought its own negatives ([id, tier] pairs, e.g. the codex miner's, a judged question's
    Wrong items) take them, cycling hard → medium → easy and skipping guarded or excluded items. Returns those rows
    (complete, as add_negatives makes them) and the other rows with their guards, for add_negatives; a row with some
    given negatives but too few carries them (`given_negatives`) and add_negatives mines only the rest."""
    given = {q["qid"]: q.get("negatives", []) for q in queries if q.get("negatives")}
    index = {item_id: n for n, item_id in enumerate(ids)}
    done, rest, rest_guards = [], [], []
    for row, guard in zip(rows, guards):
        skip = exclude.union(guard, (row["anchor_id"], row["positive_id"]))
        candidates: dict[str, list[int]] = {}
        for item_id, tier in given.get(row.get("qid"), []):
            if item_id in index and item_id not in skip:
                candidates.setdefault(tier, []).append(index[item_id])
        chosen = choose_by_tiers(candidates, num_hard_negatives)
        if not given.get(row.get("qid")) or len(chosen) < num_hard_negatives:
            if chosen:  # too few to fill the row: add_negatives keeps them first and mines the rest
                row["given_negatives"] = chosen
            rest.append(row)
            rest_guards.append(guard)
            continue
        done.append(with_negatives(row, guard, chosen, ids, vectors, vectors[index[row["anchor_id"]]]))
    return done, rest, rest_guards


# --- splits, texts, leakage, output ----------------------------------------------------------------------------

def split_by_group(rows: list[dict], dev_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/dev split by entity group (the item an anchor comes from): a group never straddles the split."""
    groups = sorted({r["anchor_id"] for r in rows})
    random.Random(seed).shuffle(groups)
    dev_groups = set(groups[: round(len(groups) * dev_fraction)])
    return [r for r in rows if r["anchor_id"] not in dev_groups], [r for r in rows if r["anchor_id"] in dev_groups]


def with_texts(rows: list[dict], texts: dict[str, str]) -> list[dict]:
    """Fill the loss columns: anchor (the item text for item pairs), positive, negative_1..k."""
    out = []
    for r in rows:
        row = {"anchor": r["anchor"] or texts[r["anchor_id"]], "positive": texts[r["positive_id"]]}
        row |= {f"negative_{n}": texts[i] for n, i in enumerate(r.get("negative_ids", []), start=1)}
        out.append(row | {k: v for k, v in r.items() if k not in row})
    return out


def save_dataset(path: str | Path, rows: list[dict], num_negatives: int) -> None:
    """Save the loss columns as a Hugging Face dataset folder, atomically (written beside, then renamed)."""
    from datasets import Dataset

    columns = loss_columns(num_negatives)
    data = {c: [r[c] for r in rows] for c in columns}
    if rows and all("teacher_scores" in r for r in rows):  # distillation targets: [positive, negatives…] per row
        data["label"] = [r["teacher_scores"] for r in rows]
    with atomic_dir(path) as tmp:
        Dataset.from_dict(data).save_to_disk(str(tmp))


def cosines_by_relation(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per relation, the teacher cosines of the positives and of each negative tier (for the histograms)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        series = out.setdefault(r["relation"], {"positive": [], **{tier: [] for tier in TIERS}})
        series["positive"].append(r["score"])
        for score, tier in zip(r.get("negative_scores", []), r.get("negative_tiers", [])):
            series[tier].append(score)
    return dict(sorted(out.items()))


def pair_counts(rows: list[dict], key: str = "relation") -> dict[str, int]:
    """How many rows each relation (or kind) has."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r[key]] += 1
    return dict(sorted(counts.items()))


def example_rows(rows: list[dict], relations: set[str], names: dict[str, str], seed: int, per_relation: int = 10) -> list[dict]:
    """A seeded sample of training rows per relation, as a table shows them: anchor, positive, cosine, negatives."""
    label = lambda text, item_id: names[item_id] if text is None else f"“{text}”"
    examples = []
    for relation in sorted(relations):
        group = [r for r in rows if r["relation"] == relation]
        for r in random.Random(seed).sample(group, min(per_relation, len(group))):
            examples.append({"relation": relation, "anchor": label(r["anchor"], r["anchor_id"]),
                             "positive": names[r["positive_id"]], "cosine": r["score"],
                             "negatives": "; ".join(f"{names[i]} ({t})" for i, t in zip(r["negative_ids"], r["negative_tiers"]))})
    return examples
