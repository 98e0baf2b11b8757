"""Stage 04 on real SRD rows: MNRL and its options lower the loss; entity-aware batches keep guarded items apart;
a killed run resumes from its checkpoint to the same global step; two torchrun processes (gloo) train together."""
import ast
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from lib import batches, corpus, finetune, pairs, pipeline, training
from lib.io import save_npy, write_json, write_jsonl
from lib.paths import REPO_ROOT

pytestmark = pytest.mark.xdist_group("finetune-run")  # its module fixtures are built once, on one worker


def _rows(items: list[dict]) -> list[dict]:
    """name → own text rows for 32 spells (a task the base model only half knows) and a second, alias-like phrasing
    per spell; spells 2k and 2k+1 guard each other (as a monster and the spell it casts would), a relation the
    exact-text sampler cannot see."""
    spells = [i for i in items if i["type"] == "power"][:32]
    rows = []
    for n, s in enumerate(spells):
        negative, partner = spells[(n + 16) % 32], spells[n ^ 1]
        base = {"kind": "query:name", "anchor_id": s["id"], "positive_id": s["id"], "positive": s["text"],
                "negative_ids": [negative["id"]], "negative_1": negative["text"], "guard_ids": [s["id"], partner["id"]]}
        rows.append({**base, "anchor": s["name"]})
        rows.append({**base, "anchor": f"the spell called {s['name'].lower()}"})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory, srd_slice, student_path):
    """A run folder with a stage-00 corpus, stage-01 item vectors and stage-02 rows, as stage 04 reads them. The
    teacher here is the base student seen through a fixed random rotation: another space, known to be reachable."""
    items, queries, relations, background = srd_slice
    root = tmp_path_factory.mktemp("runs")
    dev_queries = [q | {"split": "dev"} for q in queries if q["category"] in ("power_attribute", "name_paraphrase")]
    corpus.write_corpus(root / "tiny" / "00_corpus", items, dev_queries, relations, background)
    rows = _rows(items)
    for name, part in (("train", rows), ("dev", rows[:16])):
        pairs.save_dataset(root / "tiny" / "02_pairs" / name, part, num_negatives=1)
        write_jsonl(root / "tiny" / "02_pairs" / f"{name}.jsonl", part)
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(384, 384)))
    vectors = SentenceTransformer(str(student_path), device="cpu").encode([i["text"] for i in items]) @ rotation
    (root / "tiny" / "01_teacher").mkdir()
    save_npy(root / "tiny" / "01_teacher" / "items.npy", vectors.astype(np.float32))
    write_json(root / "tiny" / "01_teacher" / "item_ids.json", [i["id"] for i in items])
    return root


def _config(**overrides) -> finetune.FinetuneConfig:
    settings = dict(num_train_epochs=1, per_device_train_batch_size=8, learning_rate=5e-4, warmup_steps=0.0,
                    max_seq_length=64, query_max_seq_length=16, eval_max_seq_length=64, seed=0, max_steps=12,
                    eval_steps=6, save_steps=6, blend_alphas=())
    return finetune.FinetuneConfig(**(settings | overrides))


def _train(run, student_path, out, **overrides):
    inputs = finetune.load_inputs(run / "tiny" / "00_corpus", run / "tiny" / "02_pairs", dev_loss_rows=16, seed=0,
                                  teacher_dir=run / "tiny" / "01_teacher")
    return finetune.finetune(student_path, inputs.train, inputs.dev, inputs.evaluator, out, _config(**overrides),
                             inputs.lookup, teacher_items=inputs.teacher_items)


@pytest.mark.slow
def test_mnrl_steps_lower_the_loss_with_entity_batches_and_bf16(tmp_path, run, student_path):
    model, history, facts = _train(run, student_path, tmp_path, ndcg_during_training=True)
    steps, losses = training.loss_curve(history)
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert (tmp_path / "model" / "README.md").exists()
    assert any(k.startswith("eval_dev-") and k.endswith("ndcg@10") for h in history for k in h)
    assert facts["global_step"] == 12 and facts["bf16"] == training.use_bf16(True) and facts["resumed_from_step"] == 0
    used = facts["resources"]  # what training used, sampled by ResourceMonitor
    assert len(used["epoch_seconds"]) >= 1 and all(t > 0 for t in used["epoch_seconds"])
    assert used["samples"][-1]["step"] == 12 and 0 < used["cpu_percent_mean"] <= 100
    assert used["peak_rss_mib"] >= max(s["rss_mib"] for s in used["samples"]) > 90


@pytest.mark.slow
@pytest.mark.parametrize("option", [{"loss": "cached_mnrl", "mini_batch_size": 4}, {"loss": "gist"},
                                    {"matryoshka_dims": (384, 128, 32)}])
def test_each_loss_option_lowers_the_loss(tmp_path, run, student_path, option):
    if option.get("loss") == "gist":
        option = option | {"guide_model": str(student_path)}
    _, history, _ = _train(run, student_path, tmp_path, max_steps=8, eval_steps=10, save_steps=100, **option)
    _, losses = training.loss_curve(history)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_distillation_of_the_cached_teacher_vectors_is_trained_alongside(tmp_path, run, student_path):
    _, history, facts = _train(run, student_path, tmp_path, distill=True, max_steps=16, eval_steps=8, save_steps=100,
                               learning_rate=2e-3)
    distill = [h["distill"] for h in history if "distill" in h]
    assert len(distill) >= 3 and distill[-1] < distill[0]
    assert (tmp_path / "model" / "README.md").exists() and facts["global_step"] == 16


@pytest.mark.slow
def test_margin_mse_to_the_teacher_scores_is_trained_beside_mnrl(tmp_path, run, student_path):
    inputs = finetune.load_inputs(run / "tiny" / "00_corpus", run / "tiny" / "02_pairs", dev_loss_rows=16, seed=0)
    with pytest.raises(ValueError, match="teacher_query_scores"):
        finetune.finetune(student_path, inputs.train, inputs.dev, None, tmp_path / "a", _config(loss="mnrl+margin_mse"))
    items = corpus.load_items(run / "tiny" / "00_corpus")
    ids = [i["id"] for i in items]
    teacher = np.load(run / "tiny" / "01_teacher" / "items.npy")
    scored = pairs.with_teacher_scores(_rows(items), {}, ids, teacher)  # item anchors: the teacher's item vectors
    pairs.save_dataset(tmp_path / "train", scored, num_negatives=1)
    train = finetune.pairs_dataset(tmp_path / "train")
    assert train.column_names[-1] == "label" and len(train[0]["label"]) == 2
    _, history, facts = finetune.finetune(student_path, train, train.select(range(16)), None, tmp_path / "b",
                                          _config(loss="mnrl+margin_mse", max_steps=10, eval_steps=5, save_steps=100),
                                          inputs.lookup)
    margin = [h["margin_mse"] for h in history if "margin_mse" in h]
    assert facts["teacher_scale"] > 0 and len(margin) >= 2 and margin[-1] < margin[0]


@pytest.mark.slow
def test_weight_averaging_ships_the_best_dev_blend_and_never_a_worse_one_than_the_start(tmp_path, run, student_path):
    model, _, facts = _train(run, student_path, tmp_path, blend_alphas=(0.5, 1.0), max_steps=8, eval_steps=8,
                             save_steps=100)
    blend = facts["blend"]
    scores = blend["dev_by_alpha"]
    assert set(scores) == {0.0, 0.5, 1.0}  # α = 0, the start model, is always a candidate
    assert scores[blend["alpha"]] == max(scores.values()) and scores[blend["alpha"]] >= scores[0.0]
    inputs = finetune.load_inputs(run / "tiny" / "00_corpus", run / "tiny" / "02_pairs", dev_loss_rows=16, seed=0)
    saved = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    saved.max_seq_length = _config().eval_max_seq_length
    assert inputs.evaluator(saved)["sequential_score"] == pytest.approx(scores[blend["alpha"]], abs=2e-3)
    start = SentenceTransformer(str(student_path), device="cpu").state_dict()
    moved = {k: v + 1.0 if v.is_floating_point() else v for k, v in start.items()}
    finetune.blend_weights(model, start, moved, 0.25)
    key = next(k for k, v in start.items() if v.is_floating_point())
    assert torch.allclose(model.state_dict()[key], start[key] + 0.25, atol=1e-6)
    with pytest.raises(ValueError, match=r"blend_alphas=\[1.5\]"):
        finetune.FinetuneConfig(blend_alphas=(1.5,))


@pytest.mark.slow
def test_a_wall_clock_budget_plans_the_steps_that_fit_and_stops_there_with_a_checkpoint(tmp_path, run, student_path):
    _, history, facts = _train(run, student_path, tmp_path, max_steps=2000, eval_steps=1000, save_steps=1000,
                               max_train_minutes=0.5)
    stopped, planned = facts["stopped_by_time_limit_at_step"], facts["planned_steps_in_budget"]
    assert planned is not None and planned < 2000  # planned after the 8-step probe (or half the budget, if slower)
    assert stopped is not None and facts["global_step"] == stopped <= planned
    assert (tmp_path / "checkpoints" / f"checkpoint-{stopped}").is_dir() and (tmp_path / "model" / "README.md").exists()


def test_a_shortened_schedule_warms_up_and_decays_to_zero_at_the_planned_step():
    from transformers import get_constant_schedule, get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100)
    assert training.shorten_linear_schedule(schedule, 40)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[4] == pytest.approx(1.0) and lrs[2] == pytest.approx(0.5)  # warm-up: 10 of 100 → 4 of 40
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0) and lrs[22] == pytest.approx(0.5)
    assert not training.shorten_linear_schedule(get_constant_schedule(optimizer), 40)


@pytest.mark.slow
def test_dev_evaluator_scores_candidate_subsets_and_weights_groups_by_queries(student_path):
    from lib.domains import dnd

    items, queries, _, _ = dnd.build_corpus(seed=42)
    dev = [q for q in queries if q["category"] == "attribute_unseen"][:6] + \
        [q for q in queries if q["category"] == "monster_spells"][:6]
    evaluator = finetune.ir_evaluator(dev, items, "dev")
    model = SentenceTransformer(str(student_path), device="cpu")
    model.max_seq_length = 64  # the groups and their weights are under test, not the scores
    results = evaluator(model)
    groups = [e for e in evaluator.evaluators]
    sizes = [len(e.queries) for e in groups]
    weighted = sum(results[e.primary_metric] * n for e, n in zip(groups, sizes)) / sum(sizes)
    assert len(groups) >= 2 and results["sequential_score"] == pytest.approx(weighted)
    unseen = next(q for q in dev if q["category"] == "attribute_unseen")
    subset = next(e for e in groups if unseen["qid"] in e.queries_ids)
    assert set(subset.corpus_ids) == set(unseen["meta"]["candidates"])


def test_teacher_vectors_missing_an_item_name_it(tmp_path, run):
    items = corpus.load_items(run / "tiny" / "00_corpus")
    shutil.copytree(run / "tiny" / "01_teacher", tmp_path / "t")
    write_json(tmp_path / "t" / "item_ids.json", [i["id"] for i in items][:-1] + ["other"])
    with pytest.raises(ValueError, match=f"t: no teacher vector for item '{items[-1]['id']}'"):
        finetune.teacher_items_dataset(items, tmp_path / "t")


def test_unknown_loss_or_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="loss='triplet'.*mnrl"):
        finetune.FinetuneConfig(loss="triplet")
    with pytest.raises(ValueError, match="batch_sampler='x'"):
        finetune.FinetuneConfig(batch_sampler="x")
    with pytest.raises(ValueError, match="guide_model"):
        finetune.FinetuneConfig(loss="gist")
    with pytest.raises(ValueError, match="distill=True needs"):
        finetune.finetune("unused", None, None, None, "unused", finetune.FinetuneConfig(distill=True))


def test_entity_batches_keep_aliases_relations_and_other_answers_apart():
    # rows 0/1: two phrasings of one entity A; row 2's candidate B is related to A; row 3 is unrelated
    rows = [
        {"kind": "query:name", "anchor": "a", "anchor_id": "A", "positive": "A text", "positive_id": "A",
         "negative_1": "D text", "negative_ids": ["D"], "guard_ids": ["A", "B"]},
        {"kind": "query:name", "anchor": "alias of a", "anchor_id": "A", "positive": "A text", "positive_id": "A",
         "negative_1": "E text", "negative_ids": ["E"], "guard_ids": ["A", "B"]},
        {"kind": "item", "anchor": "C text", "anchor_id": "C", "positive": "B text", "positive_id": "B",
         "negative_1": "F text", "negative_ids": ["F"], "guard_ids": ["C"]},
        {"kind": "item", "anchor": "G text", "anchor_id": "G", "positive": "H text", "positive_id": "H",
         "negative_1": "I text", "negative_ids": ["I"], "guard_ids": ["G"]},
    ]
    lookup = batches.entity_lookup(rows)
    candidates, guards = batches.row_keys([[r["anchor"], r["positive"], r["negative_1"]] for r in rows], lookup)
    everything_together = [[0, 1, 2, 3]]
    # 0↔1 share A (both ways), 2's B is guarded by 0 and 1
    assert batches.in_batch_false_negatives(everything_together, candidates, guards) == 4
    grouped = batches.entity_batches([0, 1, 2, 3], candidates, guards, batch_size=4, drop_last=False)
    assert batches.in_batch_false_negatives(grouped, candidates, guards) == 0
    assert sorted(i for b in grouped for i in b) == [0, 1, 2, 3] and grouped[0] == [0, 3]
    assert batches.entity_batches([0, 1, 2, 3], candidates, guards, 2, drop_last=True) == [[0, 3]]


def test_entity_sampler_removes_false_negatives_that_no_duplicates_keeps(run):
    inputs = finetune.load_inputs(run / "tiny" / "00_corpus", run / "tiny" / "02_pairs", dev_loss_rows=16, seed=0)
    counts = batches.false_negatives_by_sampler(inputs.train, inputs.lookup, batch_size=8, seed=0)
    # the exact-text sampler separates the two phrasings of a spell (same positive text) but not related spells
    assert counts["random"]["false_negatives"] > counts["entity"]["false_negatives"] == 0
    assert counts["no_duplicates"]["false_negatives"] > 0
    sampler = batches.EntityAwareBatchSampler(inputs.train, 8, False, seed=0, lookup=inputs.lookup)
    assert len(sampler) == len(list(sampler)) and sorted(i for b in sampler for i in b) == list(range(len(inputs.train)))


def _cli(run, student_path, out, *extra):
    """Stage 04's command line on the tiny run, as _config trains in-process (evaluating at 64 tokens, no blend)."""
    return [sys.executable, "-m", "lib.finetune", "--run-name", "tiny", "--runs-root", str(run), "--start-model",
            str(student_path), "--output-dir", str(out), "--per-device-train-batch-size", "8", "--max-seq-length", "64",
            "--eval-max-seq-length", "64", "--learning-rate", "5e-4", "--dev-loss-rows", "16", "--blend-alphas", *extra]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, run, student_path):
    out = tmp_path / "ft"
    args = _cli(run, student_path, out, "--max-steps", "12", "--save-steps", "4", "--eval-steps", "100")
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists() and time.monotonic() < deadline:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(1.0)  # let it get into the next steps, then kill the whole process group hard
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "model").exists()
    # the last complete checkpoint (a kill during a save leaves a partial folder, which a resume skips)
    last = max(int(c.name.split("-")[1]) for c in (out / "checkpoints").glob("checkpoint-*")
               if (c / "trainer_state.json").exists())
    assert 4 <= last < 12
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads((out / "train_facts.json").read_text())
    assert facts["resumed_from_step"] == last and facts["global_step"] == 12
    assert (out / "model" / "model.safetensors").exists()
    # a rerun of a finished run (say the stage died after training) takes the final checkpoint: no extra step
    trained = load_file(out / "model" / "model.safetensors")
    rerun = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    facts = json.loads((out / "train_facts.json").read_text())
    assert facts["resumed_from_step"] == 12 and facts["global_step"] == 12
    reloaded = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)
    # a different configuration never resumes from these checkpoints
    again = subprocess.run(args[:-6] + ["--max-steps", "4", "--save-steps", "4", "--eval-steps", "100"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "train_facts.json").read_text())["resumed_from_step"] == 0


@pytest.mark.slow
def test_two_torchrun_processes_train_together_over_gloo(tmp_path, run, student_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "ddp"
    args = [torchrun, "--standalone", "--nproc_per_node=2", *_cli(run, student_path, out, "--max-steps", "6",
                                                                  "--save-steps", "100", "--eval-steps", "5")[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    facts = json.loads((out / "train_facts.json").read_text())
    assert facts["world_size"] == 2 and facts["global_step"] == 6
    _, losses = training.loss_curve(json.loads((out / "log_history.json").read_text()))
    assert losses[-1] < losses[0]
    assert (out / "model" / "model.safetensors").exists()


def test_the_progress_line_counts_to_the_planned_step_and_never_past_the_budget(capsys):
    from types import SimpleNamespace

    budget = training.TimeBudget(minutes=1.0)
    budget.start, budget.planned_steps = time.monotonic() - 50, 40  # 50 s of a 60 s budget gone, 40 steps planned
    progress = training.TrainingProgress("fine-tuning", budget)
    state = SimpleNamespace(global_step=0, max_steps=302)
    progress.on_train_begin(None, state, None)
    progress.start -= 20  # 10 steps in 20 s: 2 s a step
    state.global_step = 10
    progress.on_log(None, state, None, logs={"loss": 0.75})
    progress.on_step_end(None, state, None)
    line = capsys.readouterr().err.strip()
    assert line.startswith("fine-tuning: step 10/40 · loss 0.7500 · 2.00 s/step · 20s elapsed, ≤")
    assert line.endswith(" left") and line.split("≤")[1] in ("10s left", "9s left")  # 30 steps would take 60 s


def test_each_training_column_gets_the_models_prompt_for_its_role():
    routes = finetune.column_routes(["anchor", "positive", "negative_1", "label"])
    assert finetune.column_prompts(routes, {"query": "", "document": ""}) == {}  # the default student: no prompts
    e5 = {"query": "query: ", "document": "passage: "}
    assert finetune.column_prompts(routes, e5) == {"anchor": "query: ", "positive": "passage: ", "negative_1": "passage: "}
    nested = {"pairs": routes, "distill": {"text": "document"}}  # with distillation: per dataset
    assert finetune.column_prompts(nested, e5)["distill"] == {"text": "passage: "}
    bge = {"query": "Represent this sentence for searching relevant passages: ", "document": ""}
    assert finetune.column_prompts(routes, bge) == {"anchor": bge["query"]}


def test_stage_04s_notebook_and_its_settings_agree_on_every_default():
    declared = {name: ast.literal_eval(info["default"]) for name, info in pipeline.declared_parameters("04_finetune").items()
                if name in {field.name for field in dataclasses.fields(finetune.FinetuneConfig)}}
    derived = {"model_name"}  # the notebook writes it from the run's name
    assert set(declared) | derived == {field.name for field in dataclasses.fields(finetune.FinetuneConfig)}
    from_notebook = finetune.FinetuneConfig.from_params(declared | {"run_name": "r", "base_model": "m"})
    assert from_notebook == finetune.FinetuneConfig()  # lists read as the dataclass's tuples
    assert finetune.FinetuneConfig.from_params(declared, seed=7, model_name="x").seed == 7
