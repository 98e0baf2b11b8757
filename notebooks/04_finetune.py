# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Contrastive fine-tuning
# **Purpose:** train the student on the stage-02 rows with `MultipleNegativesRankingLoss` (in-batch negatives
# plus each row's hard negatives) through `SentenceTransformerTrainer`, starting from the domain-adapted encoder of
# stage 03 (or the base student). Batches are entity-aware: no anchor meets another row's positive or negative that
# is its own entity, an alias, a related item or another right answer (the exact-text sampler misses those). bf16
# autocast where the CPU computes bf16 natively; checkpoints every `save_steps` (a rerun resumes); the same training
# runs under torchrun (`python -m lib.finetune --help`, README "Training on several GPUs or machines"). The dev queries
# (independent ground truth, never the test split) are scored before and after training (and during it with
# `ndcg_during_training`; the dev loss is logged every `eval_steps`). With `max_train_minutes`, the steps that fit the
# budget are planned after a short probe and the schedule ends there (any CPU gets the same wall time). With `distill`,
# batches of corpus items alternate with the contrastive batches and pull the student (through a learned projection)
# towards the teacher's cached item vectors (`EmbedDistillLoss`). Every dev score is at the same
# `eval_max_seq_length`. Last, the trained weights are averaged with the start model's (WiSE-FT) at the α that scores
# best on dev, α = 0 included: the shipped model is never worse on dev than the one training started from. With
# `blend_on: served` (the default) an α is scored by what the index would serve with it: the best dev NDCG@10 of
# dense, BM25 and every hybrid (stage 05's settings), so trained weights ship only when their served search beats the
# start model's own best, BM25 fusion included.
#
# **Reads:** `02_pairs/train/`, `dev/`, `train.jsonl`, `dev.jsonl`, `03_domain_adapt/model/`, `00_corpus/` dev queries,
# `01_teacher/items.npy` (with `distill`).
# **Writes:** `04_finetune/model/` (with its model card), `checkpoints/`, `log_history.json`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student when use_domain_adapted is False
use_domain_adapted: bool = True  # start from stage 03's adapted encoder
num_train_epochs: float = 3.0  # passes over the training rows
max_steps: int = -1  # > 0 stops after this many steps (overrides epochs)
per_device_train_batch_size: int = 16  # rows per step; MNRL uses the other rows of the batch as negatives
learning_rate: float = 2e-5  # AdamW peak learning rate
warmup_steps: float = 0.1  # a float < 1 is a ratio of the total steps
max_seq_length: int = 128  # tokens per passage (positive, negatives) while training
query_max_seq_length: int = 64  # tokens per anchor (each column is padded on its own)
eval_max_seq_length: int = 256  # tokens per text in every dev evaluation (before, during, after), as in stage 06
blend_alphas: list = [0.0, 0.25, 0.5, 0.75, 1.0]  # weight averaging with the start model, (1-α)·start + α·trained, α chosen on dev; [] ships α 1
blend_on: str = "served"  # served: α by the dev NDCG@10 of the best search setting (dense, BM25, hybrids); dense: by cosine alone
fusion_dense_weights: list = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # weighted hybrids compared (as in stage 05)
max_train_minutes: float = 0.0  # training budget in minutes (0: none): the steps that fit after an 8-step probe, the schedule ending there
eval_steps: int = 50  # dev loss and training loss logging interval
ndcg_during_training: bool = False  # also score the dev queries at every evaluation (a full dev encode, 20-80 s on a CPU)
save_steps: int = 50  # checkpoint interval; a rerun of the same configuration resumes from the last checkpoint
resume: bool = True  # False always starts afresh
dev_loss_rows: int = 128  # stage-02 dev rows scored for the eval loss at each evaluation (a seeded sample)
loss: str = "mnrl"  # mnrl | cached_mnrl (big batches in small memory) | gist (a guide model filters negatives) | mnrl+margin_mse (the teacher's scores, from stage 02's teacher_query_scores)
margin_mse_weight: float = 1.0  # mnrl+margin_mse: weight of the MarginMSE term
mini_batch_size: int = 8  # cached_mnrl: rows per forward pass
guide_model: str = ""  # gist: guide SentenceTransformer (name or folder); empty means the base student
matryoshka_dims: list = []  # e.g. [384, 256, 128, 64] trains truncatable embeddings (MatryoshkaLoss)
batch_sampler: str = "entity"  # entity | no_duplicates (exact text only) | random
bf16: bool = True  # bf16 autocast where the hardware computes bf16 natively; fp32 elsewhere
distill: bool = False  # also distil the teacher's cached item vectors (EmbedDistillLoss) on batches of items
seed: int = 42  # seeds data order and initialisation
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import FINETUNE
from lib.pipeline import lab_parameters

globals().update(lab_parameters(FINETUNE))

# %%
import pandas as pd
from sentence_transformers import SentenceTransformer
from transformers import set_seed

from lib import batches, corpus, finetune, served, training
from lib.facts import TrainingFacts
from lib.io import write_json, write_metrics
from lib.paths import CORPUS, DOMAIN_ADAPT, PAIRS, TEACHER, Run, resolve_model_path, shown_path
from lib.plots import line_plot

set_seed(seed)
run = Run(run_name, runs_root)
corpus_dir = run.stage(CORPUS)
pairs_dir = run.stage(PAIRS)
out_dir = run.stage(FINETUNE, create=True)
start_model = run.stage(DOMAIN_ADAPT) / "model" if use_domain_adapted \
    else resolve_model_path(base_model)
config = finetune.FinetuneConfig.from_params(
    globals(), guide_model=str(resolve_model_path(guide_model or base_model)) if loss == "gist" else "",
    model_name=f"codex-forge student ({run_name})")
inputs = finetune.load_inputs(corpus_dir, pairs_dir, dev_loss_rows, seed,
                              run.stage(TEACHER) if distill else None)
if blend_on not in ("served", "dense"):
    raise ValueError(f"blend_on={blend_on!r}: expected 'served' or 'dense'")
evaluator = inputs.evaluator if blend_on == "dense" else served.ServedEvaluator(
    corpus.load_queries(corpus_dir, split="dev"), corpus.load_items(corpus_dir), fusion_dense_weights, inputs.evaluator)
print(f"start from {shown_path(start_model, run.path)}; {len(inputs.train)} train rows {inputs.train.column_names}, {len(inputs.dev)} dev rows, "
      f"{inputs.dev_queries} dev queries; loss {loss}, batch sampler {batch_sampler}, "
      f"bf16 {training.use_bf16(bf16)}")

# %% [markdown]
# ## In-batch false negatives per batch sampler
# One epoch of batches over the training rows: how often an anchor is contrasted with an item it is guarded
# against (its own entity under another text, an alias, a related item, another item its query fits).

# %%
sampler_counts = batches.false_negatives_by_sampler(inputs.train, inputs.lookup, per_device_train_batch_size, seed)
pd.DataFrame(sampler_counts).T

# %% [markdown]
# ## Dev metrics before training

# %%
start = SentenceTransformer(str(start_model), device="cpu")
start.max_seq_length = eval_max_seq_length  # the same length as every later dev evaluation
before = evaluator(start)
if blend_on == "served":
    print(f"served on dev by the start model: {served.setting_label(evaluator.chosen_setting(before))}, "
          f"NDCG@10 {before[served.PRIMARY]:.4f} (dense {before['served_dense_ndcg@10']:.4f}, BM25 {before['served_bm25_ndcg@10']:.4f})")
{k: round(v, 4) for k, v in before.items() if "ndcg@10" in k or "mrr@10" in k or k == "sequential_score"}

# %% [markdown]
# ## Train

# %%
model, history, facts = finetune.finetune(start_model, inputs.train, inputs.dev, evaluator, out_dir, config,
                                          inputs.lookup, teacher_items=inputs.teacher_items, start_metrics=before)
after = facts["blend"]["dev_metrics"] if "blend" in facts else evaluator(model)
write_json(out_dir / "log_history.json", history)
{k: v for k, v in facts.items() if k != "blend"}

# %% [markdown]
# ## Weight averaging with the start model
# θ = (1 − α)·θ_start + α·θ_trained, scored on the dev queries (NDCG@10 per query, all dev queries; with
# `blend_on: served`, of the best search setting for those weights) from the largest α
# down, stopping at the first α below the best so far; the shipped `model/` is the best α (the smaller on a tie).
# α = 0 is the start model itself (its score is the "before" above): a training run that does not help on dev ships
# the model it started from, and says so here.

# %%
blend = facts.get("blend")
if blend:
    verdict = ("α = 0: training did not beat the start model on dev; the start model is shipped" if blend["alpha"] == 0
               else f"α = {blend['alpha']:g} shipped")
    print(verdict)
    display(pd.Series(blend["dev_by_alpha"], name=f"dev {blend['metric']}").rename_axis("α").to_frame())

# %%
steps, losses = training.loss_curve(history)
_, dev_losses = training.loss_curve(history, "eval_loss")
line_plot(steps, losses, f"{loss} training loss" + (" (with the distillation batches)" if distill else ""), "step", "loss");
margin_steps, margin_losses = training.loss_curve(history, "margin_mse")
if margin_steps:
    line_plot(margin_steps, margin_losses, f"MarginMSE to the teacher's margins (teacher × {facts['teacher_scale']:.2f})", "step", "loss");
distill_steps, distill_losses = training.loss_curve(history, "distill")
if distill_steps:
    line_plot(distill_steps, distill_losses, "distillation loss (1 − cosine to the teacher)", "step", "loss");

# %% [markdown]
# ## What training used
# Wall time per epoch, the process's CPU use (share of all cores) and resident memory over the steps; GPU memory on
# CUDA.

# %%
resources = facts.get("resources") or {}
if resources:
    samples = resources["samples"]
    print(f"epochs: {resources['epoch_seconds']} s; CPU {resources['cpu_percent_mean']} % of {resources['cores']} "
          f"cores on average; peak RSS {resources['peak_rss_mib']} MiB"
          + (f"; peak GPU memory {resources['gpu_peak_mib']} MiB" if "gpu_peak_mib" in resources else ""))
    line_plot([r["step"] for r in samples], [r["cpu_percent"] for r in samples], "CPU use during training",
              "step", "% of all cores");
    line_plot([r["step"] for r in samples], [r["rss_mib"] for r in samples], "resident memory during training",
              "step", "RSS (MiB)");

# %%
score_key = "sequential_score"  # NDCG@10 over all dev queries (per-query mean)
dev_steps, dev_scores = training.loss_curve(history, f"eval_{score_key}")
if dev_steps:
    line_plot([0] + dev_steps, [before[score_key]] + dev_scores, f"dev {score_key} during training", "step", "NDCG@10");

# %%
keys = sorted(k for k in after if k.endswith(("ndcg@10", "mrr@10", "recall@10")) or k == "sequential_score")
if blend_on == "served":
    print(f"served on dev after: {served.setting_label(evaluator.chosen_setting(after))}, NDCG@10 {after[served.PRIMARY]:.4f} "
          f"(the start model served {before[served.PRIMARY]:.4f})")
pd.DataFrame({"before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}})

# %%
trained = TrainingFacts(  # what releases, the report, its recommendations and the ablations read
    start_model=shown_path(start_model, run.path),  # no home folder in a shared report
    train_pairs=len(inputs.train),
    steps=facts["global_step"],
    loss=loss,
    batch_sampler=batch_sampler,
    distill=distill,
    bf16=facts["bf16"],
    resumed_from_step=facts["resumed_from_step"],
    train_runtime_s=facts["train_runtime_s"],
    max_train_minutes=max_train_minutes,
    planned_steps_in_budget=facts["planned_steps_in_budget"],
    eval_max_seq_length=eval_max_seq_length,
    in_batch_false_negatives={name: c["false_negatives"] for name, c in sampler_counts.items()},
    dev_before={k: round(before[k], 4) for k in keys},
    dev_after={k: round(after[k], 4) for k in keys},
    blend_alpha=blend["alpha"] if blend else 1.0,
    dev_by_alpha=blend["dev_by_alpha"] if blend else {},
)
metrics = {
    **trained.as_metrics(),
    "teacher_scale": facts["teacher_scale"],
    "epoch_seconds": resources.get("epoch_seconds"),
    "cpu_percent_mean": resources.get("cpu_percent_mean"),
    "peak_rss_mib": resources.get("peak_rss_mib"),
    "gpu_peak_mib": resources.get("gpu_peak_mib"),
    "stopped_by_time_limit_at_step": facts["stopped_by_time_limit_at_step"],
    "train_loss_first": losses[0] if losses else None,
    "train_loss_last": losses[-1] if losses else None,
    "dev_loss_first": dev_losses[0] if dev_losses else None,  # the MNRL loss on the fixed sample of stage-02 dev rows
    "dev_loss_last": dev_losses[-1] if dev_losses else None,
}
write_metrics(out_dir, metrics)
metrics
