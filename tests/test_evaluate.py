"""Retrieval metrics on hand-checked rankings, masking, aggregation."""
import math

import numpy as np
import pytest

from lib import evaluate


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
    items = np.eye(3, dtype=np.float32)
    q = np.array([[1, 0.5, 0.2]], dtype=np.float32)  # closest to the monster m
    frame = evaluate.evaluate_system("s", q, items, queries, ["m", "p", "p2"], ["monster", "power", "power"])
    assert frame.loc[0, "top1"] == "p" and frame.loc[0, "precision@1"] == 1.0


def test_summarize_has_an_all_row_per_system():
    queries = [{"qid": f"q{i}", "text": "", "relevant": {"a": 1}, "category": "c1" if i else "c2"} for i in range(3)]
    items = np.eye(2, dtype=np.float32)
    frame = evaluate.evaluate_system("s", np.tile([[1, 0]], (3, 1)).astype(np.float32), items, queries, ["a", "b"],
                                     ["t", "t"])
    summary = evaluate.summarize(frame)
    assert summary.loc[("s", "all"), "precision@1"] == 1.0
    assert evaluate.headline(summary, ["s"], ["mrr@10"]) == {"s": {"mrr@10": 1.0}}
