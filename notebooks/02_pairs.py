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
# # 02 · Training data
# **Purpose:** build the (anchor, positive, negative_1..k) rows the student learns from.
# 1. **Item pairs** for every combination of item types (monster↔monster, power↔power, monster↔power): an anchor's
#    nearest items by teacher cosine at or above the relation's positive threshold — fixed (`absolute`, the
#    method's 0.8) or a percentile of that relation's own similarity distribution (`calibrated`).
# 2. **Synthetic queries** per item: its name (labelled as a name query), TF-IDF keywords, a descriptive sentence
#    with the name removed, and a pair of its tags; tag queries get up to `positives_per_query` items that fit.
#    With `query_generator_model`, a chat model behind any OpenAI-compatible endpoint also writes
#    `generated_queries_per_item` queries per item (a question, keywords, a title-like phrase: the prompts in
#    lib/query_prompts/), cached beside the teacher cache; replies that are no query are counted and left out.
# 3. **Hard negatives** per row, mixing hard (a rank window below the positive, with a margin), medium and easy;
#    never an item sharing a name, alias or relation with the anchor, nor one its query fits. With
#    `teacher_query_scores`, the teacher embeds every training query (stage 01's backend, through its cache): a query
#    row's negatives come from the query's own nearest items by the teacher, and every row keeps the teacher's
#    scores of its positive and negatives (`label`, for `loss: mnrl+margin_mse` in stage 04).
# 4. **Judged questions** (`feedback_path`: the server's `feedback.sqlite` or its JSONL export; `judged_questions_path`:
#    the operator's own JSONL): a 👍 item is a positive of that question, a 👎 item its hard negative (given negatives fill a row when there are enough for
#    `num_hard_negatives`, else the row's negatives are mined). A judged query that repeats or near-duplicates an
#    evaluation query is refused, as are items kept out of training (in a judged-questions file it stops the run,
#    naming the line). Trusted judgements (a client holding the server's API key, the judged-questions file) are used
#    in full; anonymous ones are capped at `max_feedback_share` of the training queries.
# 5. **Split** by entity group (seeded) and a **leakage check**: a row whose text repeats or nearly repeats an
#    evaluation query (a document that happens to read like a test question) is dropped and counted
#    (`leakage_dropped`, per kind); then no item an evaluation query was built from, no evaluation query text and no
#    near-duplicate of one may remain in any training row — otherwise the stage fails (a bug, not your data).
#
# Nearest neighbours are computed a block at a time (memory-bounded); distributions are estimated from samples.
#
# **Reads:** `00_corpus/items.jsonl`, `queries.jsonl`, `relations.jsonl`, `01_teacher/items.npy`, `feedback_path`.
# **Writes:** `02_pairs/train/`, `dev/` (Hugging Face datasets with the loss columns), `train.jsonl`, `dev.jsonl`
# (the same rows with ids, tiers and scores), `held_out_queries.jsonl` (the dev split's synthetic queries, for
# stage 06), `stats.json`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
threshold_mode: str = "calibrated"  # absolute (fixed cosines) or calibrated (percentiles per relation)
positive_threshold: float = 0.8  # absolute mode: cosine at or above which a neighbour is a positive
negative_threshold: float = 0.4  # absolute mode: cosine at or below which an item is an easy negative
positive_percentile: float = 99.0  # calibrated mode: percentile of a relation's cosines that makes a positive
negative_percentile: float = 50.0  # calibrated mode: percentile at or below which an item is an easy negative
positives_per_anchor: int = 1  # most item positives per anchor and type pair (the nearest first)
synthetic_expansion_factor: int = 5  # synthetic queries per item (0 turns them off)
positives_per_query: int = 3  # most positives per synthetic query (tag queries fit several items)
query_generator_model: str = ""  # a chat model that writes training queries per item (a question, keywords, a title-like phrase); empty: off
query_generator_base_url: str = ""  # its OpenAI-compatible endpoint (empty: api.openai.com; Ollama: http://localhost:11434/v1)
query_generator_api_key_env: str = ""  # the variable holding its key; empty: none (OPENAI_API_KEY for api.openai.com)
generated_queries_per_item: int = 2  # queries written per item, cycling question, keywords, title-like phrase
query_generator_max_items: int = 0  # the items it writes for (a seeded sample); 0: every item not kept out of training
query_generator_max_concurrency: int = 4  # its requests in flight at once
type_nouns: dict = {}  # how queries name an item type, e.g. power as spell
num_hard_negatives: int = 3  # negatives per row, cycling hard, medium, easy
hard_negative_min_rank: int = 3  # hard negatives start at this rank of the anchor's nearest list
hard_negative_margin: float = 0.02  # a hard negative's cosine is at least this far below the positive's
neighbours_k: int = 50  # length of each item's nearest list per type (positives and hard negatives)
ann_threshold: int = 50000  # items of one type from which its nearest lists are approximate (faiss IVF, exact re-rank); 0: always exact
ann_nprobe: int = 16  # approximate search: inverted lists visited per item (more: higher recall, slower)
near_duplicate_threshold: float = 0.9  # word TF-IDF cosine at which a text counts as a copy of an evaluation query
pairs_dev_fraction: float = 0.1  # entity groups whose rows go to dev (eval loss during training)
teacher_query_scores: bool = False  # embed every training query with stage 01's teacher (same cache): negatives mined around the query, teacher scores saved for distillation
cache_root: str = ""  # where the teacher cache lives; empty means <repo>/data/cache
teacher_base_url: str = ""  # as stage 01 was given it (the key and the budget below apply to the query calls too)
teacher_api_key_env: str = ""  # the variable holding teacher_base_url's key; empty: none (OPENAI_API_KEY for OpenAI)
teacher_max_tokens: int = 0  # the run's teacher budget in tokens, shared with stage 01 (0: no cap)
teacher_max_cost_usd: float = 0.0  # the same in dollars (0: no cap)
teacher_max_concurrency: int = 4  # requests in flight at once to the endpoint, as in stage 01
teacher_requests_per_minute: int = 0  # the endpoint's rate limit in requests (0: none)
teacher_tokens_per_minute: int = 0  # the endpoint's rate limit in tokens (0: none)
feedback_path: str = ""  # search judgements to train on: a feedback.sqlite from make serve or a JSONL export; empty: none
judged_questions_path: str = ""  # the operator's judged questions (JSONL: question, relevant {id: grade}, wrong [ids]): trusted, used in full
max_feedback_share: float = 0.1  # at most this share of the training queries comes from anonymous feedback (a seeded sample beyond it); 1: no cap
drop_row_kinds: list = []  # row kinds left out of training: item, query:name, query:keywords, query:sentence, query:tags, query:field, …
seed: int = 42  # seeds sampling, templates and the split
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import PAIRS
from lib.pipeline import lab_parameters

globals().update(lab_parameters(PAIRS))

# %%
import random

import pandas as pd

from lib import corpus, feedback, leakage, neighbours, pairs, querygen, teacher
from lib.facts import PairsFacts
from lib.io import write_json, write_jsonl, write_metrics
from lib.paths import CORPUS, TEACHER, Run, generation_cache_path
from lib.plots import histograms

run = Run(run_name, runs_root)
corpus_dir = run.stage(CORPUS)
teacher_dir = run.stage(TEACHER)
out_dir = run.stage(PAIRS, create=True)
items = corpus.load_items(corpus_dir)
corpus_queries = corpus.load_queries(corpus_dir)
train_queries = [q for q in corpus_queries if q["split"] == "train"]  # the corpus's own training queries, if any
eval_queries = [q for q in corpus_queries if q["split"] != "train"]
relations = corpus.load_relations(corpus_dir)
vectors = teacher.stage_vectors(teacher_dir, "items", [i["id"] for i in items])
ids, types, texts = [i["id"] for i in items], [i["type"] for i in items], {i["id"]: i["text"] for i in items}
names = {i["id"]: i["name"] for i in items}
held_out, copies = leakage.kept_out_of_training(items, eval_queries, near_duplicate_threshold)
exclude = held_out | copies
print(f"{len(exclude)} items kept out of training: {len(held_out)} sources of evaluation queries, "
      f"{len(copies - held_out)} more near-duplicates of one")

# %% [markdown]
# ## Where thresholds fall
# Percentiles of each relation's teacher-cosine distribution (estimated from random pairs), and the thresholds
# of both modes. A fixed 0.8 / 0.4 only makes sense for a teacher whose cosines spread over that range.

# %%
summary = neighbours.similarity_summary(vectors, types, seed)
thresholds = {mode: pairs.relation_thresholds(vectors, types, mode, positive_threshold, negative_threshold,
                                              positive_percentile, negative_percentile, seed)
              for mode in ("absolute", "calibrated")}
if threshold_mode not in thresholds:
    raise ValueError(f"threshold_mode must be 'absolute' or 'calibrated', got {threshold_mode!r}")
pd.DataFrame(summary).T.join(pd.DataFrame({f"{mode} {side}": {rel: t[side] for rel, t in th.items()}
                                           for mode, th in thresholds.items() for side in ("positive", "negative")}))

# %% [markdown]
# ## Item pairs per relation, both modes

# %%
nearest = neighbours.neighbours_by_type(vectors, types, neighbours_k, ann_threshold=ann_threshold, ann_nprobe=ann_nprobe,
                                      seed=seed)
ann = neighbours.approximate_neighbours_check(vectors, types, nearest, ann_threshold, seed)
item_pairs = {mode: pairs.mine_item_pairs(ids, types, nearest, th, positives_per_anchor, exclude)
              for mode, th in thresholds.items()}
mode_counts = {mode: pairs.pair_counts(rows) for mode, rows in item_pairs.items()}
print(f"training uses threshold_mode={threshold_mode!r}")
pd.DataFrame(mode_counts).fillna(0).astype(int)

# %% [markdown]
# ## Synthetic queries

# %%
queries = pairs.synthetic_queries(items, vectors, synthetic_expansion_factor, positives_per_query, type_nouns,
                                  exclude, seed) if synthetic_expansion_factor > 0 else []
generation = {}
if query_generator_model:  # the key comes from the environment or .env, never from a parameter
    generated, generation = querygen.generated_queries(
        items, type_nouns, exclude, querygen.GeneratorSettings(
            query_generator_model, query_generator_base_url, query_generator_api_key_env, generated_queries_per_item,
            query_generator_max_items, query_generator_max_concurrency), generation_cache_path(cache_root or None), seed)
    print(f"{generation['kept']} queries written by {query_generator_model} for {generation['items']} items "
          f"({generation['from_cache']} of {generation['asked']} replies from the cache, {generation['unusable']} no "
          f"query, {generation['tokens']} tokens spent)")
    queries += generated
supervised, dropped_supervised = pairs.supervised_queries(train_queries, eval_queries, positives_per_query,
                                                          near_duplicate_threshold, exclude)
print(f"{len(supervised)} training queries from the corpus (beir train qrels, codex templates); {dropped_supervised} "
      "dropped as copies of an evaluation query or without a positive left")
queries += supervised
feedback_counts = {}
if feedback_path or judged_questions_path:
    judgements = feedback.read_judgements(feedback_path) if feedback_path else []
    if judged_questions_path:  # the operator's own: a question that is also an evaluation query stops the run
        questions = feedback.read_judged_questions(judged_questions_path)
        feedback.refuse_evaluation_copies(judged_questions_path, questions, eval_queries, near_duplicate_threshold)
        judgements += questions
    learned, feedback_counts = feedback.learned_queries(judgements, set(ids), exclude, eval_queries, len(queries),
                                                        feedback.FeedbackSettings.from_params(globals()))
    feedback_counts["from"] = [p.rsplit("/", 1)[-1] for p in (feedback_path, judged_questions_path) if p]
    queries += learned
    print(f"judged questions: {feedback_counts['trusted']['training_queries']} trusted (API key or judged-questions "
          f"file, used in full), {feedback_counts['training_queries']} anonymous (at most {max_feedback_share:.0%} of "
          f"the training queries); {feedback_counts}")
rows = pairs.drop_kinds(item_pairs[threshold_mode] + pairs.query_rows(queries, ids, types, vectors), drop_row_kinds)
pd.DataFrame([{"kind": q["kind"], "query": q["text"], "positives": ", ".join(names[i] for i in q["relevant"]),
               "items it fits": len(q["matches"])} for q in random.Random(seed).sample(queries, min(12, len(queries)))])

# %% [markdown]
# ## Hard negatives, split and leakage check

# %%
query_vectors, teacher_usage = {}, {}
if teacher_query_scores:  # the teacher's own view of each training query: its vector, through stage 01's cache
    query_vectors, teacher_usage = teacher.run_teacher_query_vectors(
        teacher_dir, sorted({r["anchor"] for r in rows if r["anchor"]}), teacher.TeacherSettings.from_params(globals()),
        teacher.Budget(max_tokens=teacher_max_tokens, max_cost_usd=teacher_max_cost_usd, run=run_name))
guards = pairs.row_guards(rows, pairs.related_items(ids, items, relations), queries)
given, rows, guards = pairs.given_negatives(rows, guards, queries, ids, vectors, num_hard_negatives, exclude)
rows, dropped = pairs.add_negatives(rows, guards, ids, types, vectors, nearest, thresholds[threshold_mode], exclude,
                                    pairs.NegativeSettings.from_params(globals()),
                                    anchor_vectors=[query_vectors.get(r["anchor"]) for r in rows] if query_vectors else None)
rows = given + rows
if teacher_query_scores:
    rows = pairs.with_teacher_scores(rows, query_vectors, ids, vectors)
# a row whose text nearly repeats an evaluation query (a document that reads like a test question) is dropped, counted
rows, leaking = leakage.drop_leaking_rows(pairs.with_texts(rows, texts), eval_queries, near_duplicate_threshold)
if leaking:
    print(f"dropped {sum(leaking.values())} training rows whose text nearly repeats an evaluation query "
          f"(cosine ≥ {near_duplicate_threshold}), by kind: {leaking}")
train, dev = pairs.split_by_group(rows, pairs_dev_fraction, seed)
checked = {name: leakage.check_leakage(part, eval_queries, exclude, near_duplicate_threshold, f"{PAIRS}/{name}")
           for name, part in (("train", train), ("dev", dev))}
for name, part in (("train", train), ("dev", dev)):
    pairs.save_dataset(out_dir / name, part, num_hard_negatives)
    write_jsonl(out_dir / f"{name}.jsonl", part)
held_out_queries = leakage.held_out_queries(queries, train, dev, near_duplicate_threshold)
write_jsonl(out_dir / "held_out_queries.jsonl", held_out_queries)  # stage 06 scores them, labelled synthetic
tiers = pd.Series([t for r in rows for t in r["negative_tiers"]]).value_counts().to_dict()
print(f"{len(rows)} rows ({dropped} dropped for lack of negatives): {len(train)} train, {len(dev)} dev; "
      f"negatives by tier {tiers}; leakage check passed over {sum(c['texts'] for c in checked.values())} texts")
pd.DataFrame({"train": pairs.pair_counts(train, "kind"), "dev": pairs.pair_counts(dev, "kind")}).fillna(0).astype(int)

# %% [markdown]
# ## Teacher cosines of the chosen pairs
# Anchor (or the item a query came from) to its positive and to each negative tier.

# %%
histograms(pairs.cosines_by_relation(rows), "teacher cosine to the anchor", "cosine");

# %% [markdown]
# ## Ten random examples per relation

# %%
pd.DataFrame(pairs.example_rows(rows, {r["relation"] for r in train}, names, seed))

# %%
stats = {"rows": len(rows), "train": len(train), "dev": len(dev), "dropped_without_negatives": dropped,
         "threshold_mode": threshold_mode, "thresholds": thresholds, "item_pairs_by_mode": mode_counts,
         "train_by_relation": pairs.pair_counts(train), "dev_by_relation": pairs.pair_counts(dev),
         "train_by_kind": pairs.pair_counts(train, "kind"), "synthetic_queries": len(queries),
         "negatives_by_tier": tiers, "num_hard_negatives": num_hard_negatives, "excluded_items": len(exclude),
         "held_out_items": len(held_out), "held_out_synthetic_queries": len(held_out_queries),
         "corpus_training_queries": len(supervised), "dropped_corpus_training_queries": dropped_supervised,
         "similarity_percentiles": summary, "leakage_check": checked, "leakage_dropped": leaking, "approximate_neighbours": ann,
         "teacher_query_scores": teacher_query_scores, "teacher_query_usage": teacher_usage,
         "generated_queries": generation | ({"model": query_generator_model} if generation else {}),
         "feedback": feedback_counts | ({"rows": sum(r["kind"] == "query:feedback" for r in rows),
                                         "judged_rows": sum(r["kind"] == "query:judged" for r in rows),
                                         "judged_train_rows": sum(r["kind"] == "query:judged" for r in train),
                                         "train_rows": sum(r["kind"] == "query:feedback" for r in train),
                                         "share_of_train_rows": round(sum(r["kind"] == "query:feedback" for r in train)
                                                                      / max(len(train), 1), 4),
                                         "max_share": max_feedback_share} if feedback_counts else {})}
write_json(out_dir / "stats.json", stats)
metrics = PairsFacts.from_metrics(stats).as_metrics()
write_metrics(out_dir, metrics)
metrics
