"""Choosing for the served search (lib/served.py) and the learning curve of judged questions (lib/learning_curve.py):
pure pieces on small hand-made data, then the real student on a slice of the SRD."""
import json

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from lib import corpus, learning_curve, served
from lib.paths import CORPUS, Run

QUESTIONS = [{"qid": f"q{n}", "text": f"question {n}", "relevant": {f"i{n}": 1}, "category": "question",
              "split": "dev" if n < 9 else "test"} for n in range(15)]


def test_the_curve_splits_dev_into_a_judged_pool_and_a_choice_share_and_keeps_test_apart():
    pool, choice, test = learning_curve.curve_questions(QUESTIONS + [{**QUESTIONS[0], "qid": "f", "category": "field"}],
                                                        "question", 0.34, seed=42)
    assert (len(pool), len(choice), len(test)) == (6, 3, 6)
    assert not {q["qid"] for q in pool} & {q["qid"] for q in choice} and all(q["split"] == "test" for q in test)
    assert [q["qid"] for q in pool] == [q["qid"] for q in learning_curve.curve_questions(QUESTIONS, "question", 0.34, 42)[0]]
    with pytest.raises(ValueError, match="needs dev and test questions of category 'alias'"):
        learning_curve.curve_questions(QUESTIONS, "alias", 0.34, 42)


def test_a_simulated_user_judges_the_shown_results_and_wrong_ones_become_first_negatives():
    question = {"qid": "q", "text": "stone gaze", "relevant": {"medusa": 2, "basilisk": 1}}
    judged = learning_curve.simulate_judgements([question], [["xorn", "medusa", "owlbear", "basilisk", "lich"]], depth=4)
    assert [(r["item_id"], r["judgement"]) for r in judged] == [("xorn", -1), ("medusa", 1), ("owlbear", -1), ("basilisk", 1)]
    texts = {i: f"text of {i}" for i in ("xorn", "medusa", "owlbear", "basilisk", "lich")}
    queries, _ = learning_curve.feedback.training_queries(judged, set(texts), set(), [], 0.9, 10)
    rows = learning_curve.judged_rows(queries, texts, {"stone gaze": ["lich"]})
    assert [(r["positive"], r["negative_1"]) for r in rows] == [("text of medusa", "text of xorn"),
                                                                ("text of basilisk", "text of owlbear")]
    only_good = learning_curve.simulate_judgements([question], [["medusa", "basilisk", "lich"]], depth=2)
    queries, _ = learning_curve.feedback.training_queries(only_good, set(texts), set(), [], 0.9, 10)
    assert {r["negative_1"] for r in learning_curve.judged_rows(queries, texts, {"stone gaze": ["lich"]})} == {"text of lich"}


@pytest.fixture(scope="module")
def slice_run(srd_slice, tmp_path_factory):
    """A run whose stage 00 is a 30-monster / 40-spell slice of the SRD, its questions split half dev, half test."""
    items, queries, relations, _ = srd_slice
    run = Run("dnd-curve", tmp_path_factory.mktemp("runs"))
    corpus.write_corpus(run.stage(CORPUS, create=True), items, corpus.assign_splits(queries, 0.5, 42), relations, {})
    return run


def test_the_served_evaluator_scores_the_best_search_setting_of_the_real_student(slice_run, student_path):
    items, queries = corpus.load_items(slice_run.stage(CORPUS)), corpus.load_queries(slice_run.stage(CORPUS), "dev")
    evaluator = served.ServedEvaluator(queries, items, [0.3, 0.7])
    model = SentenceTransformer(str(student_path), device="cpu")
    metrics = evaluator(model)
    assert metrics["served_ndcg@10"] >= max(metrics["served_dense_ndcg@10"], metrics["served_bm25_ndcg@10"]) > 0
    setting = evaluator.chosen_setting(metrics)
    assert setting in served.search_settings([0.3, 0.7]) and served.setting_label(setting) in (
        "dense", "bm25", "hybrid rrf", "hybrid weighted 0.3", "hybrid weighted 0.7")
    assert evaluator.primary_metric == "served_ndcg@10"


@pytest.mark.slow
def test_a_learning_curve_point_trains_on_judged_questions_and_reports_test_with_intervals(slice_run, student_path,
                                                                                           tmp_path):
    settings = learning_curve.CurveSettings(points=(4, 0), max_steps=2, n_samples=200, n_permutations=200,
                                            dense_weights=(0.5,), eval_max_seq_length=128)
    result = learning_curve.learning_curve(slice_run, settings, student_path)
    assert result["questions"]["test"] > 0 and result["questions"]["pool"] > 4
    trained = [p for p in result["points"] if "skipped" not in p]
    assert [p["questions"] for p in result["points"]] == [4, result["questions"]["pool"]] and trained
    for point in trained:
        assert point["rows"] > 0 and point["alpha"] in (0.0, 0.5, 1.0)
        mean, low, high = point["test_served"]
        assert low <= mean <= high and 0 <= point["p_served_vs_base_served"] <= 1
        assert point["better"] + point["worse"] <= result["questions"]["test"]
    assert point["choice_served"] >= result["base"]["choice_served"]  # α = 0 is a candidate: never below the base
    doc = tmp_path / "results.md"
    doc.write_text("x\n<!-- make docs: learning_curve -->\n<!-- /make docs -->\n")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "slice.json").write_text(json.dumps(result))
    assert learning_curve.write_docs(tmp_path / "res", doc)
    assert "| judged questions |" in doc.read_text() and "**slice**" in doc.read_text()
    assert np.isfinite(result["base"]["test_served"][0])
