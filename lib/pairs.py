"""Stage 02: training pairs mined by teacher cosine similarity across every combination of item types."""
from __future__ import annotations

import itertools
import random

import numpy as np


def type_pairs(types: list[str]) -> list[tuple[str, str]]:
    """Every combination of the item types present, with repeats (monster↔monster, monster↔power, …)."""
    return list(itertools.combinations_with_replacement(sorted(set(types)), 2))


def mine_pairs(
    ids: list[str],
    types: list[str],
    vectors: np.ndarray,
    positive_threshold: float,
    negative_threshold: float,
    positives_per_anchor: int,
    exclude: set[str],
    seed: int,
) -> list[dict]:
    """For each anchor and type pair: its top neighbours with cosine ≥ positive_threshold as positives,
    and one random item with cosine ≤ negative_threshold as the negative (None if there is none).
    Items in `exclude` (evaluation sources) never appear."""
    rng = random.Random(seed)
    keep = [i for i, item_id in enumerate(ids) if item_id not in exclude]
    by_type = {t: [i for i in keep if types[i] == t] for t in set(types)}
    seen: set[frozenset] = set()
    pairs = []
    for type_a, type_b in type_pairs(types):
        rows, cols = by_type[type_a], by_type[type_b]
        if not rows or not cols:
            continue
        sims = vectors[rows] @ vectors[cols].T
        for r, anchor in enumerate(rows):
            order = np.argsort(-sims[r])
            taken = 0
            for c in order:
                if sims[r, c] < positive_threshold or taken >= positives_per_anchor:
                    break
                positive = cols[c]
                key = frozenset((anchor, positive))
                if positive == anchor or key in seen:
                    continue
                seen.add(key)
                taken += 1
                negatives = np.flatnonzero(sims[r] <= negative_threshold)
                negative = cols[rng.choice(list(negatives))] if len(negatives) else None
                pairs.append({
                    "anchor_id": ids[anchor], "positive_id": ids[positive],
                    "negative_id": ids[negative] if negative is not None else None,
                    "relation": f"{type_a}-{type_b}", "score": round(float(sims[r, c]), 4),
                })
    return pairs


def similarity_summary(types: list[str], vectors: np.ndarray, exclude_self: bool = True) -> dict[str, dict]:
    """Percentiles of the cosine distribution for each type pair (to see where thresholds fall)."""
    out = {}
    for type_a, type_b in type_pairs(types):
        a = np.flatnonzero(np.array(types) == type_a)
        b = np.flatnonzero(np.array(types) == type_b)
        sims = vectors[a] @ vectors[b].T
        if type_a == type_b and exclude_self:
            sims = sims[~np.eye(len(a), dtype=bool)]
        q = np.percentile(sims, [1, 5, 25, 50, 75, 95, 99])
        out[f"{type_a}-{type_b}"] = {f"p{p}": round(float(v), 4) for p, v in zip([1, 5, 25, 50, 75, 95, 99], q)}
    return out


def split_by_anchor(pairs: list[dict], dev_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/dev split by anchor entity (dev pairs give the eval loss during training)."""
    anchors = sorted({p["anchor_id"] for p in pairs})
    random.Random(seed).shuffle(anchors)
    dev_anchors = set(anchors[: round(len(anchors) * dev_fraction)])
    train = [p for p in pairs if p["anchor_id"] not in dev_anchors]
    dev = [p for p in pairs if p["anchor_id"] in dev_anchors]
    return train, dev


def with_texts(pairs: list[dict], texts: dict[str, str]) -> list[dict]:
    """Add anchor/positive(/negative) text columns, the names the sentence-transformers losses expect."""
    out = []
    for p in pairs:
        row = {"anchor": texts[p["anchor_id"]], "positive": texts[p["positive_id"]]}
        if p["negative_id"]:
            row["negative"] = texts[p["negative_id"]]
        out.append(row | p)
    return out


def pair_counts(pairs: list[dict]) -> dict[str, int]:
    """How many pairs each relation has."""
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p["relation"]] = counts.get(p["relation"], 0) + 1
    return dict(sorted(counts.items()))
