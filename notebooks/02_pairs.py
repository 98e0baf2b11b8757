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
# # 02 · Training pairs
# **Purpose:** mine (anchor, positive[, negative]) pairs from the teacher's cosine similarities for every
# combination of item types (monster↔monster, power↔power, monster↔power). Positives: an anchor's top
# neighbours with cosine ≥ `positive_threshold` (at most `positives_per_anchor` per type pair); negatives:
# a random item with cosine ≤ `negative_threshold`, when there is one. The source items of evaluation
# queries never enter a pair.
#
# **Reads:** `00_corpus/items.jsonl`, `queries.jsonl`, `01_teacher/items.npy`. **Writes:** `02_pairs/train.jsonl`,
# `dev.jsonl`, `stats.json`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
positive_threshold: float = 0.8  # teacher cosine at or above which a neighbour is a positive
negative_threshold: float = 0.4  # teacher cosine at or below which an item may be a negative
positives_per_anchor: int = 1  # most positives per anchor and type pair (the nearest first)
pairs_dev_fraction: float = 0.1  # anchors whose pairs go to dev (eval loss during training)
seed: int = 42  # seeds negative sampling and the split
# %%
import numpy as np
import pandas as pd

from lib import corpus, pairs
from lib.io import read_json, write_json, write_jsonl
from lib.paths import stage_dir

corpus_dir = stage_dir(run_name, "00_corpus", runs_root or None)
teacher_dir = stage_dir(run_name, "01_teacher", runs_root or None)
out_dir = stage_dir(run_name, "02_pairs", runs_root or None, create=True)
items = corpus.load_items(corpus_dir)
vectors = np.load(teacher_dir / "items.npy")
if read_json(teacher_dir / "item_ids.json") != [i["id"] for i in items]:
    raise ValueError("01_teacher/item_ids.json does not match 00_corpus/items.jsonl: rerun stage 01")
held_out = corpus.held_out_items(corpus.load_queries(corpus_dir))
print(f"{len(held_out)} items kept out of training (sources of evaluation queries)")

# %%
ids, types = [i["id"] for i in items], [i["type"] for i in items]
mined = pairs.mine_pairs(ids, types, vectors, positive_threshold, negative_threshold,
                         positives_per_anchor, exclude=held_out, seed=seed)
train, dev = pairs.split_by_anchor(mined, pairs_dev_fraction, seed)
texts = {i["id"]: i["text"] for i in items}
write_jsonl(out_dir / "train.jsonl", pairs.with_texts(train, texts))
write_jsonl(out_dir / "dev.jsonl", pairs.with_texts(dev, texts))
with_negative = sum(1 for p in mined if p["negative_id"])
print(f"{len(mined)} pairs ({with_negative} with a negative): {len(train)} train, {len(dev)} dev")
pd.DataFrame({"train": pairs.pair_counts(train), "dev": pairs.pair_counts(dev)}).fillna(0).astype(int)

# %% [markdown]
# Where the thresholds fall in the teacher's similarity distribution (percentiles per type pair):

# %%
summary = pairs.similarity_summary(types, vectors)
pd.DataFrame(summary).T

# %% [markdown]
# Examples of mined pairs, one relation at a time:

# %%
names = {i["id"]: i["name"] for i in items}
pd.DataFrame([{"relation": p["relation"], "anchor": names[p["anchor_id"]], "positive": names[p["positive_id"]],
               "negative": names.get(p["negative_id"], "—"), "cosine": p["score"]}
              for rel in sorted({p["relation"] for p in train}) for p in [q for q in train if q["relation"] == rel][:4]])

# %%
stats = {"pairs": len(mined), "train": len(train), "dev": len(dev), "with_negative": with_negative,
         "train_by_relation": pairs.pair_counts(train), "dev_by_relation": pairs.pair_counts(dev),
         "held_out_items": len(held_out), "similarity_percentiles": summary,
         "positive_threshold": positive_threshold, "negative_threshold": negative_threshold}
write_json(out_dir / "stats.json", stats)
metrics = {k: stats[k] for k in ("pairs", "train", "dev", "with_negative", "train_by_relation", "held_out_items")}
write_json(out_dir / "metrics.json", metrics)
metrics
