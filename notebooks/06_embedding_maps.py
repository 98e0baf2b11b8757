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
# # 06 · Embedding maps
# **Purpose:** see what fine-tuning did to the space: UMAP of every item under the base student and under
# the fine-tuned student, coloured by type (monster / power) and by category (creature type / spell school),
# with the kNN label agreement (share of each item's 10 nearest neighbours that share its label) before/after.
#
# **Reads:** `00_corpus/items.jsonl`, `04_finetune/model/`. **Writes:** `06_embedding_maps/*.png`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student before any training
eval_max_seq_length: int = 256  # tokens per text when encoding
umap_n_neighbors: int = 15  # UMAP neighbourhood size
umap_min_dist: float = 0.1  # UMAP minimum distance between points
seed: int = 42  # seeds UMAP
# %%
import pandas as pd

from lib import corpus, evaluate, plots
from lib.io import atomic_path, write_json
from lib.paths import resolve_model_path, stage_dir

out_dir = stage_dir(run_name, "06_embedding_maps", runs_root or None, create=True)
items = corpus.load_items(stage_dir(run_name, "00_corpus", runs_root or None))
texts = [i["text"] for i in items]
before = evaluate.encode(resolve_model_path(base_model), texts, max_seq_length=eval_max_seq_length)
after = evaluate.encode(stage_dir(run_name, "04_finetune", runs_root or None) / "model", texts,
                        max_seq_length=eval_max_seq_length)
labels = {
    "type": [i["type"] for i in items],
    "category": [i["meta"].get("creature_type") or i["meta"].get("school") or i["type"] for i in items],
}

# %%
points_before = plots.umap_2d(before, seed, umap_n_neighbors, umap_min_dist)
points_after = plots.umap_2d(after, seed, umap_n_neighbors, umap_min_dist)
for name, lab in labels.items():
    fig = plots.before_after_maps(points_before, points_after, lab, f"items by {name}")
    with atomic_path(out_dir / f"umap_{name}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)

# %%
agreement = {name: {"before": round(plots.knn_label_agreement(before, lab), 4),
                    "after": round(plots.knn_label_agreement(after, lab), 4)} for name, lab in labels.items()}
pd.DataFrame(agreement).T

# %%
metrics = {"items": len(items), "knn10_label_agreement": agreement}
write_json(out_dir / "metrics.json", metrics)
metrics
