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
# # 06 · Evaluation
# **Purpose:** measure retrieval on held-out queries whose ground truth does not come from the teacher, each
# category reported on its own. For D&D: (a) monster→spell from the SRD Spellcasting lists (the monster's text with
# its spell names removed; only spells are candidates), (b) attribute queries whose relevant items come from
# structured fields (size, creature type, immunities, school, level, damage type, class), (c) aliases and
# catalogue-form names; beside the headline, (b′) `attribute_unseen`: field queries on entities held out of all
# training, in a wording no training query uses, scored among those entities only, and (b″) `question`: hand-written
# player questions ("a winged horse I could ride"), every item a candidate. Other domains bring their own categories (prompts: story, genre, themes, keywords; codex:
# the test questions' categories; beir: the qrels; markdown: references, user). Also (d) stage 02's held-out
# synthetic queries (labelled synthetic; not in the headline) and (e) any extra BEIR folder.
# Systems side by side: BM25, the base student, the domain-adapted encoder, the fine-tuned student, the hybrid
# (BM25 + fine-tuned, fused as stage 05's index does: the fusion it chose on the dev queries), base-hybrid (BM25 + the
# base student, the same fusion: what the served search has to beat), stage 05's int8 ONNX graph of the fine-tuned
# student, and the teacher.
# Every mean has a 95% bootstrap interval; every system is tested against the base student with a paired
# randomisation test on the same queries, and per kind of query the hybrid against base-hybrid.
#
# **Reads:** `00_corpus/`, `01_teacher/*.npy`, `02_pairs/train.jsonl`, `held_out_queries.jsonl`,
# `03_domain_adapt/model/`, `04_finetune/model/`, `05_export/model-int8.onnx`, `05_export/index/retriever.json`.
# **Writes:** `06_evaluate/metrics.json`, `per_query.csv`, `summary.csv`, `metric_bars.png`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student before any training
eval_split: str = "test"  # the held-out queries to score
eval_max_seq_length: int = 256  # tokens per text when encoding, the same for every student
headline_metrics: list = ["precision@1", "precision@3", "precision@5", "recall@10", "mrr@10", "ndcg@5", "ndcg@10", "map@100"]  # report order
recall_k_values: list = [10]  # k of the Recall@k columns in the headline (RECALL_K_VALUES of .env)
bootstrap_samples: int = 2000  # resamples of the queries for the 95% confidence intervals
permutation_samples: int = 10000  # random sign flips for the paired randomisation test vs base
rrf_k: int = 60  # reciprocal rank fusion constant of the hybrid system (when no stage 05 index says otherwise)
topic_coverage_k: int = 5  # top-k texts searched for a query's expected topics
min_topic_coverage: float = 4.0  # a query "covers its topics" at this 1–5 score or above
include_onnx: bool = True  # score stage 05's int8 ONNX graph of the fine-tuned student as well
beir_dir: str = ""  # a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) to score as well; empty skips
beir_split: str = "test"  # the qrels file of the BEIR folder
near_duplicate_threshold: float = 0.9  # leakage guard: word TF-IDF cosine from which a training text copies a query
seed: int = 42  # seeds the bootstrap and the permutations
matryoshka_dims: list = []  # the sizes stage 04 trained with MatryoshkaLoss: the fine-tuned student is scored at each
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import EVALUATE
from lib.pipeline import lab_parameters

globals().update(lab_parameters(EVALUATE))

# %%
import pandas as pd

from lib import corpus, evaluate, leakage
from lib.facts import EvaluationFacts
from lib.io import atomic_path, read_jsonl, write_metrics
from lib.paths import CORPUS, DOMAIN_ADAPT, EXPORT, PAIRS, TEACHER, Run, resolve_model_path
from lib.plots import metric_bars

run = Run(run_name, runs_root)
hybrid = evaluate.hybrid_setting(run.index, rrf_k)
scoring = evaluate.Scoring(ks=tuple(sorted(set(evaluate.KS) | set(recall_k_values))), rrf_k=hybrid["rrf_k"],
                           fusion=hybrid["fusion"], dense_weight=hybrid["dense_weight"], coverage_k=topic_coverage_k,
                           bootstrap_samples=bootstrap_samples, permutation_samples=permutation_samples, seed=seed)
headline_metrics += [f"recall@{k}" for k in recall_k_values if f"recall@{k}" not in headline_metrics]
out_dir = run.stage(EVALUATE, create=True)
items = corpus.load_items(run.stage(CORPUS))
queries = corpus.load_queries(run.stage(CORPUS), split=eval_split)
synthetic = read_jsonl(run.stage(PAIRS) / "held_out_queries.jsonl", corpus.QUERY_FIELDS)
independent = evaluate.headline_categories(queries)  # the headline pools these; synthetic and beside_headline apart
students = {"base": resolve_model_path(base_model), "domain-adapted": run.stage(DOMAIN_ADAPT) / "model",
            "fine-tuned": run.model}
print(f"{len(queries)} {eval_split} queries ({', '.join(independent)}) and {len(synthetic)} held-out synthetic "
      f"queries over {len(items)} items; {evaluate.hybrid_label(hybrid)} from {hybrid['from']}")

# %% [markdown]
# ## Leakage guard
# Fails if a training row uses an item an evaluation query was built from, or repeats (or nearly repeats) an
# evaluation query's text — for the independent queries and for the held-out synthetic ones.

# %%
train_rows = read_jsonl(run.stage(PAIRS) / "train.jsonl")
held_out = corpus.held_out_items(corpus.load_queries(run.stage(CORPUS)))
leakage_check = {
    "independent": leakage.check_leakage(train_rows, queries, held_out, near_duplicate_threshold, f"{PAIRS}/train.jsonl"),
    "synthetic": leakage.check_leakage(train_rows, synthetic, set(), near_duplicate_threshold, f"{PAIRS}/train.jsonl"),
}
leakage_check

# %% [markdown]
# ## Score every system

# %%
encoders = evaluate.dense_encoders(students, run.stage(EXPORT) / "model-int8.onnx" if include_onnx else None,
                                   eval_max_seq_length)
scores = evaluate.score_systems(encoders, [q["text"] for q in queries + synthetic], [i["text"] for i in items],
                                scoring.rrf_k, scoring.fusion, scoring.dense_weight)
teacher_scores = evaluate.teacher_scores(run.stage(TEACHER), queries, items)  # corpus queries only
systems = ["bm25", *students, "hybrid", "base-hybrid", *(["onnx-int8"] if include_onnx else []), "teacher"]
per_query = evaluate.per_query_frame(scores, teacher_scores, queries, synthetic, items, systems, scoring)
summary = evaluate.summarize(per_query, independent)

# %% [markdown]
# ## Headline: every independent test query, 95% bootstrap intervals

# %%
n_headline = sum(q["category"] in independent for q in queries)
coverage_metric = f"topic_coverage@{topic_coverage_k}"
ci = evaluate.intervals(per_query, headline_metrics + [coverage_metric], bootstrap_samples, seed, independent)
headline = evaluate.headline(summary, systems, headline_metrics)
p_values = evaluate.paired_tests(per_query[per_query.category.isin(independent)], "base", ["ndcg@10", "mrr@10", "precision@1"],
                                 permutation_samples, seed)
fig = metric_bars(headline, headline_metrics, f"{eval_split} queries (n={n_headline}), 95% bootstrap intervals", ci["all"])
with atomic_path(out_dir / "metric_bars.png") as tmp:
    fig.savefig(tmp, format="png", dpi=100)
evaluate.interval_table({s: ci["all"][s] for s in systems})

# %% [markdown]
# Paired randomisation test of each system against the base student (two-sided p-values, same queries):

# %%
pd.DataFrame(p_values).T

# %% [markdown]
# ## Each ground truth on its own
# `synthetic:*` are stage 02's held-out synthetic queries (built from item fields, not by the teacher; their
# query texts were never trained on, but their items were); the teacher has no vectors for them.

# %%
categories = sorted(per_query["category"].unique())
by_category = {cat: evaluate.headline(summary, systems, headline_metrics, category=cat) for cat in categories}
evaluate.interval_table({cat: ci[cat] for cat in categories}, "ndcg@10").assign(
    n=per_query[per_query.system == "base"].category.value_counts())

# %% [markdown]
# NDCG@10 and topic coverage per difficulty, where the queries carry one (codex's test questions; empty elsewhere):

# %%
by_difficulty = evaluate.by_meta(per_query, queries, "difficulty")
topic_coverage_by_difficulty = evaluate.by_meta(per_query, queries, "difficulty", coverage_metric)
display(pd.DataFrame(by_difficulty).T)
pd.DataFrame(topic_coverage_by_difficulty).T

# %%
p_by_category, p_by_category_holm = evaluate.category_tests(per_query, scoring)
p_served_by_category, _ = evaluate.category_tests(per_query, scoring, system="hybrid", baseline="base-hybrid")
pd.DataFrame({"p (fine-tuned vs base, NDCG@10)": p_by_category, "Holm-adjusted (independent categories)": p_by_category_holm,
              "p (hybrid vs base-hybrid)": p_served_by_category})

# %% [markdown]
# ## Topic coverage and agreement with the teacher
# Topic coverage (1–5): 1 + 4 × the share of a query's expected topics (D&D: spell names for monster→spell, the
# item's name for name queries; codex: the questions' expected topics; aliases count) named in the top-5 retrieved
# texts; queries without expected topics are left out. Teacher agreement: overlap of the
# top-10 items and Spearman correlation of all candidate scores, per test query.

# %%
topic_coverage = evaluate.topic_coverage_summary(per_query, independent, topic_coverage_k, min_topic_coverage)
teacher_agreement = evaluate.teacher_agreement_by_system(scores, teacher_scores, queries, items, systems)
pd.concat({"topic coverage": pd.DataFrame(topic_coverage).T, "teacher agreement": pd.DataFrame(teacher_agreement).T}, axis=1)

# %% [markdown]
# ## Per query: fine-tuned vs base, worst regressions first

# %%
text_of = {q["qid"]: q["text"][:90] for q in queries + synthetic}
per_query.insert(2, "query", per_query["qid"].map(text_of))
changes = evaluate.wins_and_losses(per_query[per_query.category.isin(independent)], "fine-tuned", "base", "ndcg@10")
changes.insert(1, "query", changes["qid"].map(text_of))
pd.concat([changes.head(10), changes.tail(5)])

# %% [markdown]
# ## Matryoshka: the fine-tuned student's vectors cut to each trained size (when `matryoshka_dims` is set)
# NDCG@10 on the headline queries; a smaller index (and `dimensions` in the server's answers) costs this much.

# %%
ndcg_at_dimensions = {}
if matryoshka_dims:
    ndcg_at_dimensions = evaluate.ndcg_at_dimensions(encoders["fine-tuned"], [q for q in queries if q["category"] in independent],
                                                     items, matryoshka_dims)
    display(pd.Series(ndcg_at_dimensions, name="ndcg@10").rename_axis("dimensions").to_frame())
else:
    print("matryoshka_dims is empty: the student was trained at its full width only")

# %% [markdown]
# ## BEIR folder (when `beir_dir` is set)

# %%
beir = {}
if beir_dir:
    beir_frame, beir = evaluate.score_beir_folder(beir_dir, beir_split, encoders, headline_metrics, scoring)
    per_query = pd.concat([per_query, beir_frame], ignore_index=True)
    display(evaluate.interval_table(beir["headline_ci"]))
else:
    print("beir_dir is empty: no BEIR folder scored")

# %%
with atomic_path(out_dir / "per_query.csv") as tmp:
    per_query.to_csv(tmp, index=False)
with atomic_path(out_dir / "summary.csv") as tmp:
    summary.to_csv(tmp)
metrics = EvaluationFacts(
    split=eval_split,
    queries=len(queries),
    queries_by_category=per_query[per_query.system == "base"]["category"].value_counts().sort_index().to_dict(),
    headline_categories=independent,
    systems=systems,
    hybrid=hybrid,
    metrics=headline_metrics,
    headline=headline,
    headline_ci={s: ci["all"][s] for s in systems},
    p_values_vs_base=p_values,
    by_category=by_category,
    by_difficulty=by_difficulty,
    topic_coverage_by_difficulty=topic_coverage_by_difficulty,
    by_category_ci={cat: ci[cat] for cat in categories},
    p_values_by_category=p_by_category,
    p_values_by_category_holm=p_by_category_holm,
    p_values_hybrid_vs_base_hybrid_by_category=p_served_by_category,  # the served search against base + BM25
    beside_headline=sorted({q["category"] for q in queries} - set(independent)),
    topic_coverage=topic_coverage,
    teacher_agreement=teacher_agreement,
    fine_tuned_wins=int((changes["delta"] > 0).sum()),
    fine_tuned_losses=int((changes["delta"] < 0).sum()),
    leakage_check=leakage_check,
    bootstrap_samples=bootstrap_samples,
    permutation_samples=permutation_samples,
    beir=beir,
    ndcg_at_dimensions=ndcg_at_dimensions,
).as_metrics()
write_metrics(out_dir, metrics)
{s: metrics["headline_ci"][s]["ndcg@10"] for s in systems}
