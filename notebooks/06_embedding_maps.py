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
# **Purpose:** see what fine-tuning did to the space. One UMAP of the items under the base student and one under
# the fine-tuned student, the second Procrustes-aligned onto the first (same axes: a point that moved, moved),
# coloured by type (monster / power) and by category (creature type / spell school), with labelled landmarks;
# cluster quality per labelling before/after (kNN label agreement: share of each item's 10 nearest neighbours
# with its label; cosine silhouette); how close related items (a monster and the spells it casts) sit; and the
# cosines of held-out positive vs negative pairs (stage 02's dev rows) before/after.
#
# **Reads:** `00_corpus/`, `02_pairs/dev.jsonl`, `04_finetune/model/`.
# **Writes:** `06_embedding_maps/umap_type.png`, `umap_category.png`, `pair_cosines.png`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student before any training
eval_max_seq_length: int = 256  # tokens per text when encoding
umap_n_neighbors: int = 15  # UMAP neighbourhood size
umap_min_dist: float = 0.1  # UMAP minimum distance between points
landmark_items: list = []  # item names labelled on the maps; empty labels one item per category (up to 8)
seed: int = 42  # seeds UMAP
# %%
import numpy as np
import pandas as pd

from lib import corpus, evaluate, plots
from lib.io import atomic_path, read_jsonl, write_metrics
from lib.paths import resolve_model_path, stage_dir

stage = lambda name, create=False: stage_dir(run_name, name, runs_root or None, create=create)
out_dir = stage("06_embedding_maps", create=True)
items = corpus.load_items(stage("00_corpus"))
relations = corpus.load_relations(stage("00_corpus"))
dev_rows = read_jsonl(stage("02_pairs") / "dev.jsonl")
labels = {
    "type": [i["type"] for i in items],
    "category": [plots.category_label(i) for i in items],
}
# every text once: the items, then the dev rows' query anchors
texts = list(dict.fromkeys([i["text"] for i in items] + [r["anchor"] for r in dev_rows]))
row_of = {t: n for n, t in enumerate(texts)}
vectors = {
    "base": evaluate.encode(resolve_model_path(base_model), texts, max_seq_length=eval_max_seq_length),
    "fine-tuned": evaluate.encode(stage("04_finetune") / "model", texts, max_seq_length=eval_max_seq_length),
}
item_vectors = {name: v[: len(items)] for name, v in vectors.items()}
wanted = [n.lower() for n in landmark_items]
if wanted:
    landmarks = {n: i["name"] for n, i in enumerate(items) if i["name"].lower() in wanted}
else:
    first = {}
    for n, label in enumerate(labels["category"]):
        first.setdefault(label, n)
    landmarks = {n: items[n]["name"] for n in list(first.values())[:8]}
print(f"{len(items)} items, {len(dev_rows)} held-out rows; landmarks: {', '.join(landmarks.values())}")

# %% [markdown]
# ## Maps (the fine-tuned map aligned onto the base map)

# %%
points_before = plots.umap_2d(item_vectors["base"], seed, umap_n_neighbors, umap_min_dist)
points_after = plots.align_2d(points_before, plots.umap_2d(item_vectors["fine-tuned"], seed, umap_n_neighbors, umap_min_dist))
quality = {}
for name, lab in labels.items():
    fig = plots.before_after_maps(points_before, points_after, lab, f"items by {name}", landmarks)
    with atomic_path(out_dir / f"umap_{name}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    quality[name] = {f"{measure} {model}": plots.rounded(fn(item_vectors[model], lab))
                     for measure, fn in (("kNN-10 agreement", plots.knn_label_agreement), ("silhouette", plots.silhouette))
                     for model in ("base", "fine-tuned")}  # None where a labelling has a single group
pd.DataFrame(quality).T

# %% [markdown]
# ## Did related items move together?
# Mean cosine of the corpus's related pairs (D&D: a monster and each spell it casts; markdown: a page and the pages
# it references), against all pairs of the same item types. Domains without relations show none.

# %%
index = {i["id"]: n for n, i in enumerate(items)}
heads, tails = [index[r["head"]] for r in relations], [index[r["tail"]] for r in relations]
head_types, tail_types = {items[n]["type"] for n in heads}, {items[n]["type"] for n in tails}
related = {}
for model, v in item_vectors.items():
    cross = v[[n for n, i in enumerate(items) if i["type"] in head_types]] @ v[[n for n, i in enumerate(items) if i["type"] in tail_types]].T
    related[model] = {"related pairs": round(float((v[heads] * v[tails]).sum(axis=1).mean()), 4) if relations else None,
                      "all pairs of those types": round(float(cross.mean()), 4) if relations else None}
pd.DataFrame(related).T

# %% [markdown]
# ## Held-out positive vs negative pairs (stage 02's dev rows, never trained on)

# %%
pair_cosines = {model: plots.pair_similarities(dev_rows, v, row_of) for model, v in vectors.items()}
fig = plots.histograms(pair_cosines, "cosine of anchor to positive vs to negatives", "cosine")
with atomic_path(out_dir / "pair_cosines.png") as tmp:
    fig.savefig(tmp, format="png", dpi=110)
separation = {model: {"positive mean": round(float(np.mean(c["positive"])), 4),
                      "negative mean": round(float(np.mean(c["negative"])), 4) if c["negative"] else None,
                      "triplet accuracy": round(plots.triplet_accuracy(dev_rows, vectors[model], row_of), 4)}
              for model, c in pair_cosines.items()}
pd.DataFrame(separation).T

# %%
metrics = {
    "items": len(items),
    "knn10_label_agreement": {name: {"before": q["kNN-10 agreement base"], "after": q["kNN-10 agreement fine-tuned"]}
                              for name, q in quality.items()},
    "silhouette": {name: {"before": q["silhouette base"], "after": q["silhouette fine-tuned"]} for name, q in quality.items()},
    "related_pair_cosine": {"before": related["base"], "after": related["fine-tuned"]},
    "held_out_pairs": {"rows": len(dev_rows), "before": separation["base"], "after": separation["fine-tuned"]},
    "landmarks": list(landmarks.values()),
}
write_metrics(out_dir, metrics)
metrics
