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
# # 05 · Evaluation
# **Purpose:** measure retrieval on the held-out **test** queries, whose ground truth does not come from the
# teacher: monster→spell retrieval from the SRD Spellcasting lists (the monster's text with its spell names
# removed is the query; only spells are candidates) and attribute queries whose relevant items come from
# structured fields (size, creature type, immunities, school, level, damage type, class).
# Systems side by side: the base student, the domain-adapted encoder, the fine-tuned student and the teacher.
#
# **Reads:** `00_corpus/`, `01_teacher/*.npy`, `03_domain_adapt/model/`, `04_finetune/model/`.
# **Writes:** `05_evaluate/metrics.json`, `per_query.csv`, `summary.csv`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student before any training
eval_split: str = "test"  # the held-out queries to score
eval_max_seq_length: int = 256  # tokens per text when encoding, the same for every student
headline_metrics: list = ["precision@1", "precision@3", "precision@5", "recall@10", "mrr@10", "ndcg@5", "ndcg@10"]  # report order
# %%
import numpy as np
import pandas as pd

from lib import corpus, evaluate
from lib.io import atomic_path, read_json, write_json
from lib.paths import resolve_model_path, stage_dir
from lib.plots import metric_bars

corpus_dir = stage_dir(run_name, "00_corpus", runs_root or None)
teacher_dir = stage_dir(run_name, "01_teacher", runs_root or None)
out_dir = stage_dir(run_name, "05_evaluate", runs_root or None, create=True)
items = corpus.load_items(corpus_dir)
queries = corpus.load_queries(corpus_dir, split=eval_split)
all_qids = read_json(teacher_dir / "query_ids.json")
item_ids, item_types = [i["id"] for i in items], [i["type"] for i in items]
print(f"{len(queries)} {eval_split} queries over {len(items)} items")

# %% [markdown]
# ## Encode with every system and score

# %%
students = {
    "base": resolve_model_path(base_model),
    "domain-adapted": stage_dir(run_name, "03_domain_adapt", runs_root or None) / "model",
    "fine-tuned": stage_dir(run_name, "04_finetune", runs_root or None) / "model",
}
query_texts, item_texts = [q["text"] for q in queries], [i["text"] for i in items]
frames = []
for system, path in students.items():
    vecs = evaluate.encode(path, query_texts + item_texts, max_seq_length=eval_max_seq_length)  # one model load
    q_vecs, i_vecs = vecs[:len(query_texts)], vecs[len(query_texts):]
    frames.append(evaluate.evaluate_system(system, q_vecs, i_vecs, queries, item_ids, item_types))
row_of = {qid: n for n, qid in enumerate(all_qids)}
teacher_q = np.load(teacher_dir / "queries.npy")[[row_of[q["qid"]] for q in queries]]
frames.append(evaluate.evaluate_system("teacher", teacher_q, np.load(teacher_dir / "items.npy"), queries, item_ids, item_types))
per_query = pd.concat(frames, ignore_index=True)
summary = evaluate.summarize(per_query)

# %% [markdown]
# ## Headline: all test queries

# %%
systems = list(students) + ["teacher"]
headline = evaluate.headline(summary, systems, headline_metrics)
metric_bars(headline, headline_metrics, f"{eval_split} queries (n={len(queries)})");
pd.DataFrame(headline).T

# %% [markdown]
# ## By category

# %%
by_category = {cat: evaluate.headline(summary, systems, headline_metrics, category=cat)
               for cat in sorted(per_query["category"].unique())}
pd.concat({cat: pd.DataFrame(t).T for cat, t in by_category.items()})

# %% [markdown]
# ## Per query: fine-tuned vs base, worst regressions first

# %%
wide = per_query.pivot_table(index=["qid", "category"], columns="system", values="ndcg@10").reset_index()
wide["delta"] = wide["fine-tuned"] - wide["base"]
wide.sort_values("delta").head(10)

# %%
with atomic_path(out_dir / "per_query.csv") as tmp:
    per_query.to_csv(tmp, index=False)
with atomic_path(out_dir / "summary.csv") as tmp:
    summary.to_csv(tmp)
metrics = {
    "split": eval_split,
    "queries": len(queries),
    "queries_by_category": per_query[per_query.system == "base"]["category"].value_counts().to_dict(),
    "systems": systems,
    "metrics": headline_metrics,
    "headline": headline,
    "by_category": by_category,
    "fine_tuned_wins": int((wide["delta"] > 0).sum()),
    "fine_tuned_losses": int((wide["delta"] < 0).sum()),
}
write_json(out_dir / "metrics.json", metrics)
{s: metrics["headline"][s]["ndcg@10"] for s in systems}
