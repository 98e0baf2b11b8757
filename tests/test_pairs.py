"""Pair mining by teacher cosine: thresholds, per-anchor cap, exclusions, every type pair."""
import numpy as np

from lib import pairs
from lib.teacher import normalize


def _toy():
    """Two monsters and two powers; m1≈p1 and m2≈p2 are near-duplicates, the two groups orthogonal."""
    ids = ["m1", "m2", "p1", "p2"]
    types = ["monster", "monster", "power", "power"]
    vectors = normalize(np.array([[1, 0, 0.1], [0, 1, 0.1], [1, 0.05, 0], [0.05, 1, 0]], dtype=np.float32))
    return ids, types, vectors


def test_type_pairs_cover_every_combination():
    assert pairs.type_pairs(["power", "monster", "power"]) == [
        ("monster", "monster"), ("monster", "power"), ("power", "power")]


def test_thresholds_decide_positives_and_negatives():
    ids, types, vectors = _toy()
    mined = pairs.mine_pairs(ids, types, vectors, 0.8, 0.4, positives_per_anchor=2, exclude=set(), seed=0)
    got = {(p["anchor_id"], p["positive_id"]) for p in mined}
    assert got == {("m1", "p1"), ("m2", "p2")}
    assert all(p["relation"] == "monster-power" and p["score"] >= 0.8 for p in mined)
    negatives = {p["anchor_id"]: p["negative_id"] for p in mined}
    assert negatives == {"m1": "p2", "m2": "p1"}


def test_no_negative_when_nothing_is_below_the_threshold():
    ids, types, vectors = _toy()
    mined = pairs.mine_pairs(ids, types, vectors, 0.8, -0.5, 2, set(), 0)
    assert mined and all(p["negative_id"] is None for p in mined)


def test_excluded_items_never_appear_and_cap_holds():
    rng = np.random.default_rng(0)
    vectors = normalize(rng.normal(size=(40, 8)).astype(np.float32) + 3)  # all similar
    ids = [f"i{n}" for n in range(40)]
    types = ["monster"] * 20 + ["power"] * 20
    mined = pairs.mine_pairs(ids, types, vectors, 0.0, -1, positives_per_anchor=2, exclude={"i0", "i25"}, seed=0)
    assert not {"i0", "i25"} & ({p["anchor_id"] for p in mined} | {p["positive_id"] for p in mined})
    per_anchor = {}
    for p in mined:
        per_anchor[(p["anchor_id"], p["relation"])] = per_anchor.get((p["anchor_id"], p["relation"]), 0) + 1
    assert max(per_anchor.values()) <= 2
    assert {p["relation"] for p in mined} == {"monster-monster", "monster-power", "power-power"}
    assert len({frozenset((p["anchor_id"], p["positive_id"])) for p in mined}) == len(mined)


def test_split_by_anchor_is_disjoint_and_seeded():
    rows = [{"anchor_id": f"a{i % 10}", "positive_id": f"b{i}", "relation": "x"} for i in range(50)]
    train, dev = pairs.split_by_anchor(rows, 0.2, seed=3)
    assert len(train) + len(dev) == 50
    assert not {r["anchor_id"] for r in train} & {r["anchor_id"] for r in dev}
    assert pairs.split_by_anchor(rows, 0.2, seed=3) == (train, dev)


def test_with_texts_adds_the_loss_columns():
    row = {"anchor_id": "a", "positive_id": "b", "negative_id": None, "relation": "x", "score": 0.9}
    out = pairs.with_texts([row], {"a": "A", "b": "B"})[0]
    assert out["anchor"] == "A" and out["positive"] == "B" and "negative" not in out
