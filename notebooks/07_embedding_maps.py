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
# # 07 · Embedding maps
# **Purpose:** see what fine-tuning did to the space. One UMAP of the items under the base student and one under
# the fine-tuned student, the second Procrustes-aligned onto the first (same axes: a point that moved, moved),
# coloured by type (monster / power) and by category (creature type / spell school), with labelled landmarks;
# cluster quality per labelling before/after (kNN label agreement: share of each item's 10 nearest neighbours
# with its label; cosine silhouette); how close related items (a monster and the spells it casts) sit; and the
# cosines of held-out positive vs negative pairs (stage 02's dev rows) before/after. A corpus of more than
# `map_max_items` items is mapped and measured on a sample stratified by category (the maps' titles say so).
#
# **Reads:** `00_corpus/`, `02_pairs/dev.jsonl`, `04_finetune/model/`.
# **Writes:** `07_embedding_maps/umap_type.png`, `umap_category.png`, `pair_cosines.png`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student before any training
eval_max_seq_length: int = 256  # tokens per text when encoding
umap_n_neighbors: int = 15  # UMAP neighbourhood size
umap_min_dist: float = 0.1  # UMAP minimum distance between points
landmark_items: list = []  # item names labelled on the maps; empty labels one item per category (up to 8)
map_max_items: int = 20000  # most items (and held-out rows) encoded and mapped; above it a sample stratified by category, which the maps name
seed: int = 42  # seeds UMAP
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import MAPS
from lib.pipeline import lab_parameters

globals().update(lab_parameters(MAPS))

# %%
import pandas as pd

from lib import corpus, maps
from lib.encoders import TorchEncoder
from lib.facts import MapsFacts
from lib.io import atomic_path, read_jsonl, write_metrics
from lib.paths import CORPUS, PAIRS, Run, resolve_model_path
from lib.plots import before_after_maps, histograms

run = Run(run_name, runs_root)
out_dir = run.stage(MAPS, create=True)
all_items = corpus.load_items(run.stage(CORPUS))
items = [all_items[n] for n in maps.stratified_sample([maps.category_label(i) for i in all_items], map_max_items, seed)]
relations = corpus.load_relations(run.stage(CORPUS))
all_dev_rows = read_jsonl(run.stage(PAIRS) / "dev.jsonl")
dev_rows = [all_dev_rows[n] for n in maps.stratified_sample(["row"] * len(all_dev_rows), map_max_items, seed)]
sample_note = f" (a sample of {len(items):,} of {len(all_items):,}, stratified by category)" if len(items) < len(all_items) else ""
labels = {"type": [i["type"] for i in items], "category": [maps.category_label(i) for i in items]}
row_texts = [r[c] for r in dev_rows for c in r if c in ("anchor", "positive") or (c.startswith("negative_") and c[9:].isdigit())]
texts = list(dict.fromkeys([i["text"] for i in items] + row_texts))  # every text once
row_of = {t: n for n, t in enumerate(texts)}
vectors = {name: TorchEncoder(path, eval_max_seq_length).encode(texts) for name, path in
           {"base": resolve_model_path(base_model), "fine-tuned": run.model}.items()}
item_vectors = {name: v[: len(items)] for name, v in vectors.items()}
landmarks = maps.landmarks(items, labels["category"], landmark_items)
print(f"{len(items)} items{sample_note}, {len(dev_rows)} held-out rows; landmarks: {', '.join(landmarks.values())}")

# %% [markdown]
# ## Maps (the fine-tuned map aligned onto the base map)

# %%
points_before = maps.umap_2d(item_vectors["base"], seed, umap_n_neighbors, umap_min_dist)
points_after = maps.align_2d(points_before, maps.umap_2d(item_vectors["fine-tuned"], seed, umap_n_neighbors, umap_min_dist))
for name, lab in labels.items():
    with atomic_path(out_dir / f"umap_{name}.png") as tmp:
        before_after_maps(points_before, points_after, lab, f"items by {name}{sample_note}", landmarks).savefig(tmp, format="png", dpi=110)
quality = {name: maps.cluster_quality(item_vectors, lab) for name, lab in labels.items()}
pd.DataFrame(quality).T

# %% [markdown]
# ## Did related items move together?
# Mean cosine of the corpus's related pairs (D&D: a monster and each spell it casts; markdown: a page and the pages
# it references), against all pairs of the same item types. Domains without relations show none.

# %%
related = {model: maps.related_pair_cosines(items, relations, v) for model, v in item_vectors.items()}
pd.DataFrame(related).T

# %% [markdown]
# ## Held-out positive vs negative pairs (stage 02's dev rows, never trained on)

# %%
pair_cosines = {model: maps.pair_similarities(dev_rows, v, row_of) for model, v in vectors.items()}
with atomic_path(out_dir / "pair_cosines.png") as tmp:
    histograms(pair_cosines, "cosine of anchor to positive vs to negatives", "cosine").savefig(tmp, format="png", dpi=110)
separation = {model: maps.pair_separation(pair_cosines[model], maps.triplet_accuracy(dev_rows, v, row_of))
              for model, v in vectors.items()}
pd.DataFrame(separation).T

# %%
metrics = MapsFacts(
    items=len(all_items),
    items_on_maps=len(items),  # a stratified sample when the corpus has more than map_max_items
    knn10_label_agreement={name: {"before": q["kNN-10 agreement base"], "after": q["kNN-10 agreement fine-tuned"]}
                           for name, q in quality.items()},
    silhouette={name: {"before": q["silhouette base"], "after": q["silhouette fine-tuned"]} for name, q in quality.items()},
    related_pair_cosine={"before": related["base"], "after": related["fine-tuned"]},
    held_out_pairs={"rows": len(dev_rows), "before": separation["base"], "after": separation["fine-tuned"]},
    landmarks=list(landmarks.values()),
).as_metrics()
write_metrics(out_dir, metrics)
metrics
