"""Stage-02 miners on small fixtures whose right answer is known; the leakage check fails on a leaking fixture."""
import ast
import dataclasses

import numpy as np
import pytest

from lib import finetune, leakage, neighbours, pairs, pipeline
from lib.teacher import normalize


def _toy():
    """Two monsters and two powers; m1≈p1 and m2≈p2 are near-duplicates, the two groups orthogonal."""
    ids = ["m1", "m2", "p1", "p2"]
    types = ["monster", "monster", "power", "power"]
    vectors = normalize(np.array([[1, 0, 0.1], [0, 1, 0.1], [1, 0.05, 0], [0.05, 1, 0]], dtype=np.float32))
    return ids, types, vectors


def _fixed(types, positive, negative):
    """Absolute thresholds for every relation of `types`."""
    return pairs.relation_thresholds(np.eye(len(types), dtype=np.float32), types, "absolute", positive, negative, 0, 0, 0)


def _arc(n: int, item_type: str = "power"):
    """n unit vectors on an arc: item k is at angle 9k degrees, so cosine falls with the index distance."""
    angles = np.radians(np.arange(n) * 9.0)
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    return [f"i{k}" for k in range(n)], [item_type] * n, vectors


def test_type_pairs_cover_every_combination():
    assert neighbours.type_pairs(["power", "monster", "power"]) == [
        ("monster", "monster"), ("monster", "power"), ("power", "power")]


def test_topk_by_block_matches_the_dense_answer_with_tiny_blocks():
    rng = np.random.default_rng(0)
    rows, cols = normalize(rng.normal(size=(37, 16)).astype(np.float32)), normalize(rng.normal(size=(53, 16)).astype(np.float32))
    scores, index = neighbours.topk_by_block(rows, cols, 5, block_elements=100)  # one row per block
    dense = rows @ cols.T
    np.testing.assert_array_equal(index, np.argsort(-dense, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(dense, axis=1)[:, ::-1][:, :5], rtol=1e-6)


def test_neighbours_by_type_never_lists_an_item_as_its_own_neighbour():
    ids, types, vectors = _arc(12)
    types = ["monster", "power"] * 6
    near = neighbours.neighbours_by_type(vectors, types, k=3)
    for t in ("monster", "power"):
        scores, index = near[t]
        assert index.shape == (12, 3)
        assert not (index == np.arange(12)[:, None]).any()
        assert all(types[j] == t for j in index.ravel())
        assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert list(near["power"][1][0]) == [1, 3, 5]  # item 0's nearest powers, by angle


def test_without_self_rewrites_in_place_what_a_mask_would_copy():
    vectors = _clustered(700)
    cols = np.arange(0, 700, 3, dtype=np.int32)
    scores, pos = neighbours.topk_by_block(vectors, vectors[cols], 9)
    index = cols[pos]
    is_self = index == np.arange(700)[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # rows not in cols drop their 9th
    expected_scores, expected_index = scores[~is_self].reshape(700, 8), index[~is_self].reshape(700, 8)
    kept_scores, kept_index = neighbours.without_self(scores, pos, cols, chunk=64)
    np.testing.assert_array_equal(kept_scores, expected_scores)
    np.testing.assert_array_equal(kept_index, expected_index)
    assert np.shares_memory(kept_scores, scores)  # no second copy of a million rows


def test_row_guards_are_sorted_and_shared_by_the_rows_of_one_anchor():
    rows = [{"anchor_id": "a", "positive_id": "c"}, {"anchor_id": "a", "positive_id": "b"},
            {"anchor_id": "d", "positive_id": "a"}, {"anchor_id": "e", "positive_id": "f", "qid": "q"}]
    guards = pairs.row_guards(rows, {"a": {"z"}}, [{"qid": "q", "matches": ["g"]}])
    assert guards[0] == ("b", "c", "z") and guards[0] is guards[1]
    assert guards[2] == ("a",) and guards[3] == ("f", "g")


def _clustered(n: int, dims: int = 32, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` centres: neighbourhoods with structure, as real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dims))
    return normalize((centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dims))).astype(np.float32))


def test_approximate_neighbours_find_the_exact_ones_and_score_them_exactly():
    vectors = _clustered(6000)
    cols = np.arange(0, 6000, 2)
    scores, pos = neighbours.ann_top_k(vectors[:500], vectors, cols, k=10, nprobe=16)
    exact_scores, exact_pos = neighbours.topk_by_block(vectors[:500], vectors[cols], 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(pos, exact_pos)])
    assert recall >= 0.95
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", vectors[cols[pos]], vectors[:500]), rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert (scores[:, 0] >= exact_scores[:, 0] - 1e-6).all() and (scores <= exact_scores + 1e-6).all()


def test_neighbours_by_type_turns_approximate_at_the_threshold_only():
    vectors = _clustered(3000)
    types = ["monster"] * 2000 + ["power"] * 1000
    assert neighbours.approximate_types(types, 1500) == ["monster"]
    assert neighbours.approximate_types(types, 0) == []
    near = neighbours.neighbours_by_type(vectors, types, k=10, ann_threshold=1500)
    exact = neighbours.neighbours_by_type(vectors, types, k=10)
    np.testing.assert_array_equal(near["power"][1], exact["power"][1])  # below the threshold: the exact lists
    scores, index = near["monster"]
    assert index.shape == (3000, 10) and not (index == np.arange(3000)[:, None]).any()
    assert all(types[j] == "monster" for j in index.ravel())
    assert neighbours.ann_recall(vectors, types, {"monster": near["monster"]}, sample=300) >= 0.95
    assert neighbours.ann_recall(vectors, types, {"monster": exact["monster"]}, sample=300) == 1.0
    checked = neighbours.approximate_neighbours_check(vectors, types, near, 1500, seed=0, sample=300)
    assert checked["types"] == ["monster"] and checked["sample"] == 300 and checked["recall@10"] >= 0.95
    assert neighbours.approximate_neighbours_check(vectors, types, exact, 0, seed=0) == {}


def test_calibrated_thresholds_are_percentiles_of_each_relation():
    vectors = normalize(np.random.default_rng(2).normal(size=(60, 8)).astype(np.float32))
    types = ["power"] * 60
    th = pairs.relation_thresholds(vectors, types, "calibrated", 0.8, 0.4, 90.0, 10.0, seed=0, n=200_000)
    sims = (vectors @ vectors.T)[~np.eye(60, dtype=bool)]
    assert th["power-power"]["positive"] == pytest.approx(np.percentile(sims, 90), abs=0.02)
    assert th["power-power"]["negative"] == pytest.approx(np.percentile(sims, 10), abs=0.02)
    assert _fixed(types, 0.8, 0.4) == {"power-power": {"positive": 0.8, "negative": 0.4}}
    with pytest.raises(ValueError, match="threshold_mode"):
        pairs.relation_thresholds(vectors, types, "percent", 0.8, 0.4, 90, 10, 0)


def test_thresholds_decide_item_pairs():
    ids, types, vectors = _toy()
    near = neighbours.neighbours_by_type(vectors, types, k=3)
    mined = pairs.mine_item_pairs(ids, types, near, _fixed(types, 0.8, 0.4), positives_per_anchor=2, exclude=set())
    assert {(p["anchor_id"], p["positive_id"]) for p in mined} == {("m1", "p1"), ("m2", "p2")}
    assert all(p["relation"] == "monster-power" and p["score"] >= 0.8 and p["kind"] == "item" for p in mined)


def test_excluded_items_never_appear_cap_holds_and_each_pair_once():
    rng = np.random.default_rng(0)
    vectors = normalize(rng.normal(size=(40, 8)).astype(np.float32) + 3)  # all similar
    ids = [f"i{n}" for n in range(40)]
    types = ["monster"] * 20 + ["power"] * 20
    near = neighbours.neighbours_by_type(vectors, types, k=10)
    mined = pairs.mine_item_pairs(ids, types, near, _fixed(types, 0.0, -1), 2, exclude={"i0", "i25"})
    assert not {"i0", "i25"} & ({p["anchor_id"] for p in mined} | {p["positive_id"] for p in mined})
    per_anchor: dict = {}
    for p in mined:
        per_anchor[(p["anchor_id"], p["relation"])] = per_anchor.get((p["anchor_id"], p["relation"]), 0) + 1
    assert max(per_anchor.values()) <= 2
    assert {p["relation"] for p in mined} == {"monster-monster", "monster-power", "power-power"}
    assert len({frozenset((p["anchor_id"], p["positive_id"])) for p in mined}) == len(mined)


def _items():
    """Four spells with tags and texts; Fire Bolt and Fireball share a tag."""
    specs = [("Fire Bolt", ["evocation"], "Fire Bolt. Cantrip.\nYou hurl a mote of fire at a creature or object within range. A flammable object hit by this spell ignites."),
             ("Fireball", ["evocation", "sphere area"], "Fireball. Level 3.\nA bright streak flashes from your pointing finger and blossoms into an explosion of flame. Each creature in a sphere must make a saving throw."),
             ("Shield", ["casting time 1 reaction"], "Shield. Level 1.\nAn invisible barrier of magical force appears and protects you until the start of your next turn."),
             ("Sleep", ["ritual"], "Sleep. Level 1.\nThis spell sends creatures into a magical slumber. Roll dice to see how many hit points of creatures it affects.")]
    return [{"id": f"power:{n}", "type": "power", "name": name, "text": text, "aliases": ["Sphere of Fire"] if name == "Fireball" else [],
             "tags": tags, "meta": {}} for n, (name, tags, text) in enumerate(specs)]


def test_synthetic_queries_label_names_and_keep_names_out_of_the_rest():
    items = _items()
    vectors = normalize(np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32))
    queries = pairs.synthetic_queries(items, vectors, 5, 3, {"power": "spell"}, exclude={"power:3"}, seed=0)
    assert "power:3" not in {q["source_id"] for q in queries}
    assert {q["kind"] for q in queries} == set(pairs.QUERY_KINDS)
    for q in queries:
        item = items[int(q["source_id"].split(":")[1])]
        assert q["relevant"][0] == item["id"] and len(q["relevant"]) <= 3
        if q["kind"] == "name":
            assert q["text"] in [item["name"], *item["aliases"]]
        else:
            assert item["name"].lower() not in q["text"].lower(), q
            assert q["text"].startswith("a spell")
        if q["kind"] == "tags":
            tags = q["text"].split(": ", 1)[1].split(", ")
            assert all(set(tags) <= set(items[int(i.split(":")[1])]["tags"]) for i in q["matches"])
    fire_bolt_tags = [q for q in queries if q["source_id"] == "power:0" and q["kind"] == "tags"]
    assert [q["relevant"] for q in fire_bolt_tags] == [["power:0", "power:1"]]  # Fireball is evocation too
    by_source = {}
    for q in queries:
        by_source[q["source_id"]] = by_source.get(q["source_id"], 0) + 1
    assert max(by_source.values()) <= 5


def test_keywords_leave_out_the_items_own_name():
    words = pairs.keywords(["Medusa gazes: the medusa turns victims to stone with petrifying eyes",
                            "Goblin sneaks and stabs with a scimitar in the dark"], ["Medusa", "Goblin"])
    assert "medusa" not in words[0] and "goblin" not in words[1]
    assert "petrifying" in words[0] and "scimitar" in words[1]


def test_hard_negatives_follow_the_tiers_and_the_false_negative_guard():
    ids, types, vectors = _arc(20)
    near = neighbours.neighbours_by_type(vectors, types, k=8)
    th = _fixed(types, 0.9, -0.05)
    rows = [{"kind": "item", "relation": "power-power", "anchor": None, "anchor_id": "i0", "positive_id": "i1", "score": 0.99}]
    related = {"i0": {"i4"}}  # a known relation: i4 must never be a negative of i0, though it is the hardest eligible
    guards = pairs.row_guards(rows, related, [])
    kept, dropped = pairs.add_negatives(rows, guards, ids, types, vectors, near, th, {"i5"}, pairs.NegativeSettings(
        num_hard_negatives=3, hard_negative_min_rank=2, hard_negative_margin=0.05, seed=0))
    assert dropped == 0
    row = kept[0]
    assert row["negative_tiers"] == ["hard", "medium", "easy"]
    assert row["negative_ids"][0] == "i3"  # ranks 0-1 (i1, i2) skipped; i3 is 0.10 below the positive's cosine
    assert not {"i0", "i1", "i4", "i5"} & set(row["negative_ids"])
    cos = dict(zip(row["negative_tiers"], row["negative_scores"]))
    assert cos["easy"] <= -0.05 < cos["medium"] < near["power"][0][0, -1] < cos["hard"] <= 0.99 - 0.05


def test_a_query_with_its_teacher_vector_gets_negatives_near_the_query_and_the_teacher_scores():
    ids, types, vectors = _arc(20)
    near = neighbours.neighbours_by_type(vectors, types, k=8)
    # the query's source is i0 but the teacher places the query by i10 (its positive): negatives come from there
    rows = [{"kind": "query:keywords", "relation": "query-power", "anchor": "q", "anchor_id": "i0", "positive_id": "i10",
             "qid": "q1", "score": 0.5}]
    kept, _ = pairs.add_negatives(rows, [set()], ids, types, vectors, near, _fixed(types, 0.9, -0.05), set(),
                                  pairs.NegativeSettings(1, hard_negative_min_rank=1, hard_negative_margin=0.02, seed=0),
                                  anchor_vectors=[vectors[10]])
    # the query's own nearest after its positive, but i9/i11 (cosine 0.988) sit within the 0.02 margin of the positive
    assert kept[0]["negative_ids"][0] in {"i8", "i12"}
    scored = pairs.with_teacher_scores(kept + [{**kept[0], "anchor": None, "anchor_id": "i0"}], {"q": vectors[10]},
                                       ids, vectors)
    neg = ids.index(kept[0]["negative_ids"][0])
    assert scored[0]["teacher_scores"] == [pytest.approx(1.0, abs=1e-4), pytest.approx(float(vectors[10] @ vectors[neg]), abs=1e-4)]
    assert scored[1]["teacher_scores"][0] == pytest.approx(float(vectors[0] @ vectors[10]), abs=1e-4)  # an item anchor


def test_rows_without_enough_negatives_are_dropped():
    ids, types, vectors = _arc(4)
    near = neighbours.neighbours_by_type(vectors, types, k=3)
    rows = [{"kind": "item", "relation": "power-power", "anchor": None, "anchor_id": "i0", "positive_id": "i1", "score": 1}]
    kept, dropped = pairs.add_negatives(rows, [set()], ids, types, vectors, near, _fixed(types, 0.9, 0.0), set(),
                                        pairs.NegativeSettings(3, 0, 0.0, 0))
    assert (kept, dropped) == ([], 1)


def test_split_by_group_is_disjoint_and_seeded():
    rows = [{"anchor_id": f"a{i % 10}", "positive_id": f"b{i}", "relation": "x"} for i in range(50)]
    train, dev = pairs.split_by_group(rows, 0.2, seed=3)
    assert len(train) + len(dev) == 50 and len(dev) == 10
    assert not {r["anchor_id"] for r in train} & {r["anchor_id"] for r in dev}
    assert pairs.split_by_group(rows, 0.2, seed=3) == (train, dev)


def _training_rows():
    """Two clean rows with texts: an item pair and a query row."""
    texts = {"a": "Owlbear. Large monstrosity. Its screech echoes through dark valleys and benighted forests, piercing the "
                  "quiet night to announce the death of its prey. Multiattack: one beak, one claw. Spellcasting: none.", "b": "A griffon is half eagle, half lion.",
             "c": "Shield raises a barrier of force.", "d": "Sleep sends creatures into slumber."}
    rows = [{"kind": "item", "relation": "monster-monster", "anchor": None, "anchor_id": "a", "positive_id": "b",
             "negative_ids": ["c"], "score": 0.9},
            {"kind": "query:keywords", "relation": "query-power", "anchor": "a spell about barrier and force",
             "anchor_id": "c", "positive_id": "c", "negative_ids": ["d"], "score": 1.0}]
    return pairs.with_texts(rows, texts)


def test_leakage_check_passes_clean_data_and_fails_each_leak():
    rows = _training_rows()
    assert rows[0]["anchor"].startswith("Owlbear.") and rows[1]["negative_1"].startswith("Sleep")
    eval_queries = [{"qid": "q1", "text": "a creature immune to fire"}, {"qid": "q2", "text": "a wizard's tower golem"}]
    assert leakage.check_leakage(rows, eval_queries, {"z"}, 0.9, "train")["rows"] == 2
    with pytest.raises(leakage.LeakageError, match="row 1 .*item 'c' is the source"):
        leakage.check_leakage(rows, eval_queries, {"c"}, 0.9, "train")
    leaking = eval_queries + [{"qid": "q3", "text": "A spell about barrier, and force!"}]
    with pytest.raises(leakage.LeakageError, match="row 2 .*repeats evaluation query 'q3'"):
        leakage.check_leakage(rows, leaking, set(), 0.9, "train")
    near_copy = eval_queries + [{"qid": "q4", "text": rows[0]["anchor"].replace("Spellcasting: none.", "")}]
    with pytest.raises(leakage.LeakageError, match="near-duplicate .*'q4'"):
        leakage.check_leakage(rows, near_copy, set(), 0.9, "train")


def test_rows_that_nearly_repeat_an_evaluation_query_are_dropped_and_counted():
    rows = _training_rows()
    eval_queries = [{"qid": "q1", "text": "a creature immune to fire"}]
    assert leakage.drop_leaking_rows(rows, eval_queries, 0.9) == (rows, {})
    near_copy = eval_queries + [{"qid": "q4", "text": rows[0]["anchor"].replace("Spellcasting: none.", "")},
                                {"qid": "q3", "text": "A spell about barrier, and force!"}]
    kept, dropped = leakage.drop_leaking_rows(rows, near_copy, 0.9)
    assert kept == [] and dropped == {"item": 1, "query:keywords": 1}
    kept, dropped = leakage.drop_leaking_rows(rows, near_copy[:2], 0.9)
    assert kept == rows[1:] and dropped == {"item": 1}
    assert leakage.check_leakage(kept, near_copy[:2], set(), 0.9, "train")["rows"] == 1  # the guard is silent after


def test_saved_dataset_has_exactly_the_loss_columns(tmp_path):
    rows = _training_rows()
    pairs.save_dataset(tmp_path / "train", rows, num_negatives=1)
    ds = finetune.pairs_dataset(tmp_path / "train")
    assert ds.column_names == ["anchor", "positive", "negative_1"] and len(ds) == 2
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(FileNotFoundError, match="run stage 02"):
        finetune.pairs_dataset(tmp_path / "missing")


def test_related_items_share_a_name_alias_or_relation_both_ways():
    items = _items() + [{"id": "monster:x", "type": "monster", "name": "Sphere of Fire", "text": "x", "aliases": [], "tags": [], "meta": {}}]
    related = pairs.related_items([i["id"] for i in items], items, [{"head": "monster:x", "tail": "power:3", "relation": "casts", "source": "t"}])
    assert "monster:x" in related["power:1"] and "power:1" in related["monster:x"]  # Fireball's alias is its name
    assert "power:3" in related["monster:x"] and "monster:x" in related["power:3"]
    assert related["power:2"] == {"power:2"}


def test_cosines_by_relation_groups_positives_and_tiers():
    rows = [{"relation": "power-power", "score": 0.9, "negative_scores": [0.8, 0.5], "negative_tiers": ["hard", "easy"]},
            {"relation": "query-power", "score": 1.0}]
    out = pairs.cosines_by_relation(rows)
    assert out["power-power"] == {"positive": [0.9], "hard": [0.8], "medium": [], "easy": [0.5]}
    assert out["query-power"]["positive"] == [1.0]


def test_held_out_queries_keep_dev_queries_whose_text_training_never_saw():
    rows = _training_rows()
    queries = [
        {"qid": "syn:c:1", "text": "a spell about barrier and force", "kind": "keywords", "source_id": "c", "matches": ["c"]},
        {"qid": "syn:d:1", "text": "a spell: ritual, concentration", "kind": "tags", "source_id": "d", "matches": ["d", "e"]},
        {"qid": "syn:d:2", "text": rows[0]["anchor"].replace("Spellcasting: none.", ""), "kind": "sentence",
         "source_id": "d", "matches": ["d"]},
    ]
    dev = [{"qid": "syn:d:1"}, {"qid": "syn:d:2"}, {"qid": "syn:c:1"}]
    held_out = leakage.held_out_queries(queries, rows, dev, 0.9)
    assert [q["qid"] for q in held_out] == ["syn:d:1"]  # c:1 repeats a training anchor, d:2 nearly
    assert held_out[0]["relevant"] == {"d": 1, "e": 1} and held_out[0]["category"] == "synthetic:tags"


def test_a_one_line_text_is_all_body_for_sentence_queries():
    prompt = "A dragon arrives. It demands to pay twenty years of back taxes on its hoard."
    assert pairs.sentences(prompt) == ["It demands to pay twenty years of back taxes on its hoard."]  # 6+ words only
    assert pairs.sentences("Header line\nLevel: 3\nA long enough descriptive sentence about the thing.") == [
        "A long enough descriptive sentence about the thing."]


def test_stage_02s_notebook_and_the_negative_settings_agree_on_every_default():
    declared = {name: ast.literal_eval(info["default"]) for name, info in pipeline.declared_parameters("02_pairs").items()}
    fields = {field.name for field in dataclasses.fields(pairs.NegativeSettings)}
    assert fields - set(declared) == {"sample_size"}  # every other setting is a parameter
    assert pairs.NegativeSettings.from_params(declared) == pairs.NegativeSettings()
    assert pairs.NegativeSettings.from_params(declared | {"seed": 7}).seed == 7
