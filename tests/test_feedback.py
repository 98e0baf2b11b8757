"""Judged questions as training data: the operator's JSONL file, trusted feedback in full, anonymous feedback capped,
Wrong items first among a row's negatives, and a question that is also an evaluation query refused by file and line."""
import json
import sqlite3

import numpy as np
import pytest

from lib import feedback, neighbours, pairs
from lib.io import write_jsonl

ITEMS = {"monster:medusa", "monster:basilisk", "monster:xorn", "power:raise-dead", "power:cure-wounds"}
TESTS = [{"qid": "t1", "text": "A spell that raises the dead."}]


def test_judged_questions_file_reads_as_trusted_judgements(tmp_path):
    path = tmp_path / "judged.jsonl"
    write_jsonl(path, [
        {"question": "which monster turns you to stone with a look", "relevant": {"monster:medusa": 2, "monster:basilisk": 1},
         "wrong": ["monster:xorn"]},
        {"question": "heal a friend", "relevant": ["power:cure-wounds"]},
    ])
    rows = feedback.read_judged_questions(path)
    assert [(r["item_id"], r["judgement"], r["line"]) for r in rows] == [
        ("monster:medusa", 1, 1), ("monster:basilisk", 1, 1), ("monster:xorn", -1, 1), ("power:cure-wounds", 1, 2)]
    assert all(r["trusted"] for r in rows)
    queries, counts = feedback.learned_queries(rows, ITEMS, set(), TESTS, 0, feedback.FeedbackSettings(max_feedback_share=0.1))
    assert [(q["kind"], sorted(q["relevant"])) for q in queries] == [
        ("judged", ["monster:basilisk", "monster:medusa"]), ("judged", ["power:cure-wounds"])]
    assert queries[0]["negatives"] == [["monster:xorn", "hard"]]
    assert counts["trusted"]["training_queries"] == 2 and counts["training_queries"] == 0


@pytest.mark.parametrize("line, message", [
    ({"relevant": {"monster:medusa": 1}}, ":2: field 'question'"),
    ({"question": "x", "relevant": {}}, ":2: field 'relevant'"),
    ({"question": "x", "relevant": {"monster:medusa": 0}}, ":2: field 'relevant'"),
    ({"question": "x", "relevant": ["monster:medusa"], "wrong": "monster:xorn"}, ":2: field 'wrong'"),
])
def test_a_bad_judged_question_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "judged.jsonl"
    path.write_text(json.dumps({"question": "fine", "relevant": ["monster:medusa"]}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message) as error:
        feedback.read_judged_questions(path)
    assert str(path) in str(error.value)


def test_a_judged_question_that_is_also_an_evaluation_query_stops_with_its_line(tmp_path):
    path = tmp_path / "judged.jsonl"
    write_jsonl(path, [{"question": "heal a friend", "relevant": ["power:cure-wounds"]},
                       {"question": "a spell that raises the dead", "relevant": ["power:raise-dead"]}])
    rows = feedback.read_judged_questions(path)
    with pytest.raises(ValueError, match=r"judged\.jsonl:2: question 'a spell that raises the dead' is also the evaluation query 't1'"):
        feedback.refuse_evaluation_copies(path, rows, TESTS, 0.9)
    feedback.refuse_evaluation_copies(path, rows[:1], TESTS, 0.9)  # the first line alone is fine


def test_keyed_feedback_trains_in_full_and_an_anonymous_flood_stays_within_the_cap():
    """500 anonymous judged queries among 900 others are cut to 10 % of the training queries; 300 trusted ones (sent
    with the server's API key) all train, and do not make room for more anonymous ones than the cap allows."""
    flood = [{"query": f"flood {n}", "item_id": "monster:medusa", "judgement": 1} for n in range(500)]
    keyed = [{"query": f"keyed {n}", "item_id": "monster:xorn", "judgement": 1, "trusted": 1} for n in range(300)]
    settings = feedback.FeedbackSettings(max_feedback_share=0.1)
    queries, counts = feedback.learned_queries(flood + keyed, ITEMS, set(), TESTS, 900, settings)
    anonymous = [q for q in queries if q["kind"] == "feedback"]
    assert sum(q["kind"] == "judged" for q in queries) == counts["trusted"]["training_queries"] == 300
    assert len(anonymous) == counts["training_queries"] and len(anonymous) / len(queries + [None] * 900) <= 0.1
    assert counts["over_share_cap"] == 500 - len(anonymous) > 0
    alone, _ = feedback.learned_queries(flood, ITEMS, set(), TESTS, 900, settings)
    assert len(alone) == 100  # without the trusted ones: exactly today's cap


def test_a_store_from_before_the_trusted_column_opens_and_reads_untrusted(tmp_path):
    path = tmp_path / "feedback.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE feedback (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, run TEXT NOT NULL, model_version "
               "TEXT NOT NULL, query TEXT NOT NULL, item_id TEXT NOT NULL, item_type TEXT, judgement INTEGER NOT NULL, "
               "rank INTEGER, mode TEXT, comment TEXT)")
    db.execute("INSERT INTO feedback VALUES (1, 't', 'r', 'v', 'stone gaze', 'monster:medusa', 'monster', 1, 1, 'dense', '')")
    db.commit()
    db.close()
    store = feedback.FeedbackStore(path)
    store.add({"created_at": "t", "run": "r", "model_version": "v", "query": "q", "item_id": "monster:xorn",
               "judgement": -1, "trusted": True})
    store.close()
    assert [(r["query"], r["trusted"]) for r in feedback.read_judgements(path)] == [("stone gaze", 0), ("q", 1)]


def test_wrong_items_come_first_and_mined_negatives_fill_the_rest():
    ids = [f"monster:{n}" for n in range(40)]
    vectors = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    types = ["monster"] * 40
    query = {"qid": "judged:0", "text": "q", "kind": "judged", "source_id": ids[0], "relevant": [ids[0]],
             "matches": [ids[0]], "negatives": [[ids[7], "hard"]]}
    rows = pairs.query_rows([query], ids, types, vectors)
    guards = pairs.row_guards(rows, {}, [query])
    given, rest, guards = pairs.given_negatives(rows, guards, [query], ids, vectors, 3, set())
    assert given == [] and rest[0]["given_negatives"] == [(7, "hard")]
    nearest = neighbours.neighbours_by_type(vectors, types, 20)
    thresholds = pairs.relation_thresholds(vectors, types, "absolute", 0.8, 0.4, 99, 50, 0)
    (row,), dropped = pairs.add_negatives(rest, guards, ids, types, vectors, nearest, thresholds, set(),
                                          pairs.NegativeSettings(num_hard_negatives=3))
    assert dropped == 0 and row["negative_ids"][0] == ids[7] and len(set(row["negative_ids"])) == 3
    assert ids[0] not in row["negative_ids"]
