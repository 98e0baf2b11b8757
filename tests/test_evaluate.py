"""Retrieval metrics on hand-checked rankings and against sentence-transformers' evaluator; BM25, fusion, topic
coverage, bootstrap intervals, the paired randomisation test, teacher agreement, BEIR folders."""
import math

import numpy as np
import pandas as pd
import pytest

from lib import encoders, evaluate


def test_query_metrics_by_hand():
    m = evaluate.query_metrics(["x", "a", "y", "b"], {"a": 1, "b": 1})
    assert m["precision@1"] == 0 and m["precision@3"] == pytest.approx(1 / 3)
    assert m["recall@3"] == 0.5 and m["recall@10"] == 1.0
    assert m["mrr@10"] == 0.5 and m["hit@1"] == 0 and m["hit@3"] == 1
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
    assert m["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_perfect_ranking_scores_one():
    m = evaluate.query_metrics(["a", "b", "c"], {"a": 2, "b": 1})
    assert m["ndcg@10"] == pytest.approx(1.0) and m["mrr@10"] == 1.0 and m["map@100"] == 1.0


def test_graded_relevance_orders_matter():
    better = evaluate.query_metrics(["a", "b"], {"a": 2, "b": 1})["ndcg@5"]
    worse = evaluate.query_metrics(["b", "a"], {"a": 2, "b": 1})["ndcg@5"]
    assert better > worse


def test_target_types_mask_candidates():
    queries = [{"qid": "q", "text": "", "relevant": {"p": 1}, "category": "c", "meta": {"target_types": ["power"]}}]
    q = np.array([[1, 0.5, 0.2]], dtype=np.float32)  # closest to the monster m
    items = [{"id": i, "type": t, "name": i, "text": i} for i, t in zip(["m", "p", "p2"], ["monster", "power", "power"])]
    frame = evaluate.evaluate_scores("s", evaluate.dense_scores(q, np.eye(3, dtype=np.float32)), queries, items)
    assert frame.loc[0, "top1"] == "p" and frame.loc[0, "precision@1"] == 1.0
    assert frame.loc[0, "recall@10"] == 1.0 and frame.loc[0, "map@100"] == 1.0  # the monster is never ranked


def test_top_items_partitioned_or_sorted_give_the_same_ranking_ties_included():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(40, 3000)).astype(np.float32)  # a great many ties
    mask = rng.random((40, 3000)) > 0.3
    mask[0, 50:] = False  # a query with fewer candidates than asked for
    fast = evaluate.top_items(scores, mask, 100)  # 100 × 8 < 3000: the partition
    full = np.argsort(-np.where(mask, scores, -np.inf), axis=1, kind="stable")[:, :100]
    np.testing.assert_array_equal(fast, full)


def test_scores_by_blocks_or_as_a_function_give_the_same_metrics():
    rng = np.random.default_rng(1)
    items = [{"id": f"i{n}", "type": "monster" if n % 3 else "power", "name": f"i{n}", "text": f"i{n}"} for n in range(300)]
    queries = [{"qid": f"q{n}", "text": "", "category": "c", "relevant": {f"i{(7 * n) % 300}": 1, f"i{n}": 2},
                "meta": {"target_types": ["monster"]} if n % 2 else {}} for n in range(25)]
    scores = rng.normal(size=(25, 300)).astype(np.float32)
    whole = evaluate.evaluate_scores("s", scores, queries, items)
    asked = []
    blocks = evaluate.evaluate_scores("s", lambda a, b: asked.append((a, b)) or scores[a:b], queries, items,
                                      block_elements=300 * 4)
    pd.testing.assert_frame_equal(whole, blocks)
    assert asked[:2] == [(0, 4), (4, 8)] and asked[-1] == (24, 25)  # 4 queries a block: never the whole matrix


def test_summarize_has_an_all_row_per_system():
    queries = [{"qid": f"q{i}", "text": "", "relevant": {"a": 1}, "category": "c1" if i else "c2"} for i in range(3)]
    items = [{"id": i, "type": "t", "name": i, "text": i} for i in "ab"]
    frame = evaluate.evaluate_scores("s", np.tile([[1.0, 0.0]], (3, 1)), queries, items)
    summary = evaluate.summarize(frame, headline_categories=["c1"])
    assert summary.loc[("s", "all"), "precision@1"] == 1.0 and set(summary.loc["s"].index) == {"all", "c1", "c2"}
    assert evaluate.headline(summary, ["s"], ["mrr@10"]) == {"s": {"mrr@10": 1.0}}


def test_metrics_agree_with_sentence_transformers_evaluator(student_path, srd_slice):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    items, queries, _, _ = srd_slice
    queries = [q for q in queries if q["category"].endswith("attribute")]
    vectors = encoders.TorchEncoder(student_path).encode([q["text"] for q in queries] + [i["text"] for i in items])
    ours = evaluate.evaluate_scores("base", evaluate.dense_scores(vectors[:len(queries)], vectors[len(queries):]), queries, items)
    theirs = InformationRetrievalEvaluator(
        {q["qid"]: q["text"] for q in queries}, {i["id"]: i["text"] for i in items},
        {q["qid"]: set(q["relevant"]) for q in queries}, ndcg_at_k=[5, 10], write_csv=False, name="st",
    )(SentenceTransformer(str(student_path), device="cpu"))
    for ours_name, their_name in [("precision@1", "precision@1"), ("precision@5", "precision@5"), ("recall@3", "recall@3"),
                                  ("recall@10", "recall@10"), ("hit@3", "accuracy@3"), ("mrr@10", "mrr@10"),
                                  ("ndcg@5", "ndcg@5"), ("ndcg@10", "ndcg@10"), ("map@100", "map@100")]:
        assert ours[ours_name].mean() == pytest.approx(theirs[f"st_cosine_{their_name}"], abs=2e-3), ours_name


def test_topic_coverage_counts_aliases_and_maps_to_one_to_five():
    aliases = evaluate.topic_aliases([{"name": "Acid Arrow", "aliases": ["Melf's Acid Arrow"]}, {"name": "Sleep", "aliases": []}])
    texts = ["Melf's Acid Arrow. A shimmering green arrow.", "Shield. A barrier."]
    assert evaluate.topic_coverage(["Acid Arrow", "Sleep"], texts, aliases) == 3.0
    assert evaluate.topic_coverage(["Sleep"], ["Sleepy hollow"], aliases) == 1.0  # whole words only
    assert evaluate.topic_coverage(["Acid Arrow"], texts, aliases) == 5.0
    assert math.isnan(evaluate.topic_coverage([], texts, aliases))


def test_bm25_finds_an_item_by_its_own_words():
    texts = ["The medusa's gaze turns creatures to stone.", "Fireball: a bright streak blossoms into an explosion of flame.",
             "The goblin hides in the shadows with a scimitar."]
    scores = evaluate.bm25_scores(["petrifying gaze of stone", "explosions of flames", "zzzz unknown words"], texts)
    assert scores[0].argmax() == 0 and scores[1].argmax() == 1  # stemming: explosions → explos, flames → flame
    assert not scores[2].any()


def test_stage_06s_hybrid_is_the_saved_indexs_fusion_or_rrf_without_one(tmp_path):
    (tmp_path / "index").mkdir()
    assert evaluate.hybrid_setting(tmp_path / "index", 30) == {"fusion": "rrf", "dense_weight": 0.5, "rrf_k": 30,
                                                                "from": "rrf_k parameter (no saved index)"}
    (tmp_path / "index" / "retriever.json").write_text('{"mode": "hybrid", "fusion": "weighted", "dense_weight": 0.6, "rrf_k": 60}')
    setting = evaluate.hybrid_setting(tmp_path / "index", 30)
    assert (setting["fusion"], setting["dense_weight"], setting["rrf_k"]) == ("weighted", 0.6, 60)
    assert evaluate.hybrid_label(setting) == "hybrid (BM25 + fine-tuned, weighted 0.6 dense)"
    vectors = lambda queries, items: np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # the query's vector is the fire item's
    systems = lambda weight: evaluate.score_systems({"fine-tuned": vectors}, ["stone"], ["fire burns", "a gaze of stone"],
                                                    60, "weighted", weight)
    assert systems(0.6)["bm25"][0].argmax() == 1 and systems(0.6)["fine-tuned"][0].argmax() == 0
    assert systems(0.6)["hybrid"][0] == pytest.approx([0.6, 0.4]) and systems(0.3)["hybrid"][0] == pytest.approx([0.3, 0.7])
    flipped = lambda queries, items: np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # the base finds the stone item
    both = evaluate.score_systems({"base": flipped, "fine-tuned": vectors}, ["stone"], ["fire burns", "a gaze of stone"],
                                  60, "weighted", 0.6)
    assert both["base-hybrid"][0] == pytest.approx([0.0, 1.0]) and both["hybrid"][0] == pytest.approx([0.6, 0.4])


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    small, large = rng.random((20, 1)), rng.random((2000, 1))
    low, high = evaluate.bootstrap_ci(small, 1000, seed=1)
    assert low[0] < small.mean() < high[0]
    low_l, high_l = evaluate.bootstrap_ci(large, 1000, seed=1)
    assert high_l[0] - low_l[0] < (high[0] - low[0]) / 5
    assert evaluate.bootstrap_ci(small, 1000, seed=1)[0][0] == low[0]  # seeded


def test_paired_randomisation_test():
    rng = np.random.default_rng(0)
    base = rng.random(40)
    assert evaluate.paired_randomisation(base, base, 2000, seed=0) == 1.0
    assert evaluate.paired_randomisation(base + 0.2, base, 2000, seed=0) < 0.001
    noise = rng.normal(0, 0.1, 40)
    assert evaluate.paired_randomisation(base + noise - noise.mean(), base, 2000, seed=0) > 0.5


def test_intervals_and_paired_tests_per_system():
    frame = pd.DataFrame({"system": ["a"] * 30 + ["b"] * 30, "qid": [f"q{i}" for i in range(30)] * 2,
                          "category": ["c"] * 60, "ndcg@10": [0.2] * 30 + [0.9] * 30})
    ci = evaluate.intervals(frame, ["ndcg@10"], 200, seed=0)
    assert ci["all"]["b"]["ndcg@10"] == [0.9, 0.9, 0.9] and set(ci) == {"all", "c"}
    assert evaluate.paired_tests(frame, "a", ["ndcg@10"], 500, seed=0)["b"]["ndcg@10"] < 0.01


def test_teacher_agreement():
    rng = np.random.default_rng(0)
    teacher = rng.random((5, 30))
    mask = np.ones_like(teacher, dtype=bool)
    assert evaluate.teacher_agreement(teacher, teacher, mask) == {"top10_overlap": 1.0, "spearman": 1.0}
    reversed_ = evaluate.teacher_agreement(-teacher, teacher, mask)
    assert reversed_["spearman"] == -1.0 and reversed_["top10_overlap"] == 0.0


def test_wins_and_losses_list_the_worst_regression_first():
    frame = pd.DataFrame({"system": ["base"] * 3 + ["ft"] * 3, "qid": ["a", "b", "c"] * 2, "category": ["x"] * 6,
                          "ndcg@10": [0.5, 0.5, 0.5, 0.9, 0.1, 0.5]})
    changes = evaluate.wins_and_losses(frame, "ft", "base", "ndcg@10")
    assert list(changes["qid"]) == ["b", "c", "a"] and changes.loc[0, "delta"] == pytest.approx(-0.4)


def _beir(folder, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td2\t2\n"):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "title": "Owlbear", "text": "half owl, half bear"}\n'
                                         '{"_id": "d2", "title": "", "text": "a spell of sleep"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "owl bear"}\n{"_id": "q2", "text": "sleep"}\n')
    (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


def test_load_beir_reads_a_folder(tmp_path):
    items, queries = evaluate.load_beir(_beir(tmp_path / "tiny"))
    assert [i["text"] for i in items] == ["Owlbear. half owl, half bear", "a spell of sleep"]
    assert [(q["qid"], q["relevant"]) for q in queries] == [("q1", {"d1": 1}), ("q2", {"d2": 2})]
    frame = evaluate.evaluate_scores("bm25", evaluate.bm25_scores([q["text"] for q in queries], [i["text"] for i in items]),
                                     queries, items)
    assert list(frame["precision@1"]) == [1.0, 1.0]


def test_load_beir_names_the_file_line_and_field(tmp_path, capsys):
    _, queries = evaluate.load_beir(_beir(tmp_path / "a", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n"))
    assert queries[0]["relevant"] == {"d1": 1} and "skipped from DATA: qrels unknown document 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"test.tsv:2: expected 'query-id"):
        evaluate.load_beir(_beir(tmp_path / "b", "query-id\tcorpus-id\tscore\nq1 d1 1\n"))
    with pytest.raises(ValueError, match="qrels/dev.tsv: not found"):
        evaluate.load_beir(_beir(tmp_path / "c"), split="dev")
    bad = _beir(tmp_path / "d")
    (bad / "queries.jsonl").write_text('{"_id": "q1"}\n')
    with pytest.raises(ValueError, match=r"queries.jsonl:1: missing field 'text'"):
        evaluate.load_beir(bad)


def test_recall_at_the_configured_k_values():
    metrics = evaluate.query_metrics(["a", "x", "b", "y"], {"a": 1, "b": 1, "c": 1}, ks=[2, 4])
    assert metrics["recall@2"] == pytest.approx(1 / 3) and metrics["recall@4"] == pytest.approx(2 / 3)
    assert "recall@10" not in metrics and metrics["precision@4"] == 0.5


def test_candidates_by_target_type_and_not_the_source():
    queries = [{"meta": {"target_types": ["herbs"], "not_candidates": ["h1"]}}, {"meta": {}}]
    mask = evaluate.candidate_mask(queries, ["herbs", "herbs", "remedies"], ["h1", "h2", "r1"])
    assert mask.tolist() == [[False, True, False], [True, True, True]]


def test_candidates_restrict_the_mask_to_a_subset():
    queries = [{"qid": "q", "meta": {"target_types": ["power"], "candidates": ["b", "c", "x"]}}, {"qid": "r"}]
    mask = evaluate.candidate_mask(queries, ["power", "power", "monster", "power"], ["a", "b", "c", "d"])
    assert mask.tolist() == [[False, True, False, False], [True, True, True, True]]


def test_holm_adjustment_by_hand():
    adjusted = evaluate.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert evaluate.holm({"a": 0.6, "b": 0.9}) == {"a": 1.0, "b": 1.0}


def test_headline_leaves_out_categories_reported_beside_it():
    queries = [{"category": "x", "meta": {}}, {"category": "y", "meta": {"beside_headline": True}}, {"category": "z"}]
    assert evaluate.headline_categories(queries) == ["x", "z"]


def test_the_teacher_ceiling_ensemble_weighs_teachers_on_different_scales_alike():
    items = [{"id": f"i{n}", "type": "power", "text": f"item {n}", "name": f"item {n}"} for n in range(4)]
    queries = [{"qid": "q0", "category": "c", "relevant": {"i0": 1}, "meta": {}},
               {"qid": "q1", "category": "c", "relevant": {"i1": 1}, "meta": {}}]
    eye = np.eye(4, dtype=np.float32)
    a_scores = np.array([[0.9, 0.1, 0.0, 0.0], [0.0, 0.5, 0.9, 0.0]])  # q0 right, q1 wrong (i2 first)
    b_scores = np.array([[0.2, 0.9, 0.1, 0.0], [0.0, 0.9, 0.1, 0.0]])  # q0 wrong, q1 right
    mask = np.ones((2, 4), dtype=bool)
    fused = evaluate.ensemble_scores([a_scores, b_scores], mask)
    narrow_b = 0.8 + 0.1 * b_scores  # the same ranking on a ten-times narrower cosine scale (as e5 against mpnet)
    assert np.allclose(evaluate.ensemble_scores([a_scores, narrow_b], mask), fused)
    table = evaluate.teacher_ceiling({"a": (a_scores, eye), "b": (b_scores, eye)}, queries, items)
    assert list(table.index) == ["a", "b", "ensemble (a + b)"]
    assert table.loc["a", "mrr@10"] == 0.75 and table.loc["b", "mrr@10"] == 0.75


def test_a_teacher_below_the_base_student_on_dev_is_called_weaker_and_told_why():
    weak = evaluate.teacher_against_student(pd.Series({"ndcg@10": 0.373}), pd.Series({"ndcg@10": 0.412}))
    assert weak["teacher_weaker"] and weak["gap"] == -0.039 and "below the base student" in weak["message"]
    assert "stronger teacher" in weak["message"]
    strong = evaluate.teacher_against_student(pd.Series({"ndcg@10": 0.6}), pd.Series({"ndcg@10": 0.5}))
    assert not strong["teacher_weaker"] and strong["gap"] == 0.1 and "above the base student" in strong["message"]


def test_by_meta_averages_each_system_per_difficulty():
    frame = pd.DataFrame({"system": ["base"] * 3 + ["ft"] * 3, "qid": ["a", "b", "c"] * 2,
                          "ndcg@10": [0.2, 0.4, 1.0, 0.6, 0.8, 1.0]})
    queries = [{"qid": "a", "meta": {"difficulty": "hard"}}, {"qid": "b", "meta": {"difficulty": "hard"}},
               {"qid": "c", "meta": {"difficulty": "easy"}}]
    assert evaluate.by_meta(frame, queries, "difficulty") == {"easy": {"n": 1, "base": 1.0, "ft": 1.0},
                                                              "hard": {"n": 2, "base": 0.3, "ft": 0.7}}
    assert evaluate.by_meta(frame, [{"qid": "a", "meta": {}}], "difficulty") == {}
    coverage = frame.assign(**{"topic_coverage@5": [5.0, None, None, 3.0, None, None]})  # only query a has topics
    assert evaluate.by_meta(coverage, queries, "difficulty", "topic_coverage@5") == {"hard": {"n": 1, "base": 5.0, "ft": 3.0}}


def test_matryoshka_sizes_are_scored_on_cut_vectors_and_only_trained_sizes_are_served():
    from lib.export import served_dimensions

    items = [{"id": "fire", "type": "power", "name": "Fire", "text": "fire"},
             {"id": "stone", "type": "power", "name": "Stone", "text": "stone"}]
    queries = [{"qid": "q", "text": "stone", "category": "c", "relevant": {"stone": 1}, "split": "test"}]
    # rows: the query, the fire item, the stone item; cut to one value all three tie and the fire item comes first
    vectors = np.array([[0.6, 0.8, 0.0, 0.0], [0.1, 0.0, 0.99, 0.0], [0.6, 0.8, 0.0, 0.0]])
    by_size = evaluate.ndcg_at_dimensions(lambda q, i: vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                                          queries, items, [4, 1])
    assert list(by_size) == [4, 1] and by_size[4] == 1.0 and by_size[1] < 1.0
    assert served_dimensions([384, 256, 128, 64, 1024], 384) == [64, 128, 256, 384]
    assert served_dimensions([], 384) == [384]
