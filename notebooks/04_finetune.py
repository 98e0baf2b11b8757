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
# plus each row's hard negatives) through `SentenceTransformerTrainer`, starting from
# the domain-adapted encoder of stage 03 (or the base student). The dev queries (independent ground truth,
# never the test split) are evaluated before, during and after training.
#
# **Reads:** `02_pairs/train/`, `dev/`, `03_domain_adapt/model/`, `00_corpus/` dev queries.
# **Writes:** `04_finetune/model/` (with its model card), `checkpoints/`, `log_history.json`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student when use_domain_adapted is False
use_domain_adapted: bool = True  # start from stage 03's adapted encoder
num_train_epochs: int = 3  # passes over the training pairs
max_steps: int = -1  # > 0 stops after this many steps (overrides epochs)
per_device_train_batch_size: int = 16  # pairs per step; MNRL uses the other pairs of the batch as negatives
learning_rate: float = 2e-5  # AdamW peak learning rate
warmup_steps: float = 0.1  # a float < 1 is a ratio of the total steps
max_seq_length: int = 128  # tokens per text while training
eval_steps: int = 50  # dev evaluation, checkpoint and loss logging interval
dev_loss_rows: int = 128  # stage-02 dev rows scored for the eval loss at each evaluation (a seeded sample)
seed: int = 42  # seeds data order and initialisation
# %%
import pandas as pd
from transformers import set_seed

from lib import corpus, finetune
from lib.io import write_json
from lib.paths import resolve_model_path, stage_dir
from lib.plots import line_plot

set_seed(seed)
corpus_dir = stage_dir(run_name, "00_corpus", runs_root or None)
pairs_dir = stage_dir(run_name, "02_pairs", runs_root or None)
out_dir = stage_dir(run_name, "04_finetune", runs_root or None, create=True)
start_model = stage_dir(run_name, "03_domain_adapt", runs_root or None) / "model" if use_domain_adapted \
    else resolve_model_path(base_model)
train_ds = finetune.pairs_dataset(pairs_dir / "train")
dev_ds = finetune.pairs_dataset(pairs_dir / "dev")
dev_ds = dev_ds.shuffle(seed=seed).select(range(min(dev_loss_rows, len(dev_ds))))
dev_queries = corpus.load_queries(corpus_dir, split="dev")
evaluator = finetune.ir_evaluator(dev_queries, corpus.load_items(corpus_dir), name="dev")
print(f"start from {start_model}; {len(train_ds)} train rows {train_ds.column_names}, {len(dev_ds)} dev rows, "
      f"{len(dev_queries)} dev queries")

# %% [markdown]
# ## Dev metrics before training

# %%
from sentence_transformers import SentenceTransformer

before = evaluator(SentenceTransformer(str(start_model), device="cpu"))
{k: round(v, 4) for k, v in before.items() if "ndcg@10" in k or "mrr@10" in k}

# %% [markdown]
# ## Train

# %%
model, history = finetune.finetune(
    start_model, train_ds, dev_ds, evaluator, out_dir,
    num_train_epochs=num_train_epochs, per_device_train_batch_size=per_device_train_batch_size,
    learning_rate=learning_rate, warmup_steps=warmup_steps, max_seq_length=max_seq_length,
    seed=seed, max_steps=max_steps, eval_steps=eval_steps, model_name=f"codex-forge student ({run_name})",
)
after = evaluator(model)
write_json(out_dir / "log_history.json", history)

# %%
steps, losses = finetune.loss_curve(history)
line_plot(steps, losses, "MNRL training loss", "step", "loss");

# %%
score_key = next(k for k in after if k.endswith("ndcg@10"))
curve = [(h["step"], h[f"eval_{score_key}"]) for h in history if f"eval_{score_key}" in h]
if curve:
    line_plot([0] + [s for s, _ in curve], [before[score_key]] + [v for _, v in curve],
              f"dev {score_key} during training", "step", "NDCG@10");

# %%
keys = sorted(k for k in after if k.endswith(("ndcg@10", "mrr@10", "recall@10")))
pd.DataFrame({"before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}})

# %%
metrics = {
    "start_model": str(start_model),
    "train_pairs": len(train_ds),
    "steps": max((h.get("step", 0) for h in history), default=0),
    "train_loss_first": losses[0] if losses else None,
    "train_loss_last": losses[-1] if losses else None,
    "dev_before": {k: round(before[k], 4) for k in keys},
    "dev_after": {k: round(after[k], 4) for k in keys},
}
write_json(out_dir / "metrics.json", metrics)
metrics
