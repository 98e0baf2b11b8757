"""Stage 06: retrieval metrics of several systems on held-out queries with independent ground truth,
bootstrap confidence intervals, paired randomisation tests, teacher agreement, BM25 and hybrid baselines."""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.domains import beir
from lib.domains.records import skipped_line
from lib.encoders import OnnxEncoder, TorchEncoder, with_prompt
from lib.progress import note
from lib.search import Bm25, fuse, saved_settings, truncate
from lib.teacher import stage_vectors
from lib.paths import EXPORT

KS = (1, 3, 5, 10)
ScoreRows = Callable[[int, int], np.ndarray]  # (start, stop) → those queries' scores over every item


def candidate_mask(queries: list[dict], item_types: list[str], item_ids: list[str] | None = None) -> np.ndarray:
    """(queries × items) bool: the items each query may retrieve (meta.target_types, else all; only meta.candidates
    when given, e.g. the held-out entities), minus the items in meta.not_candidates (e.g. the page a markdown query
    was cut from)."""
    types = np.array(item_types)
    ids = np.array(item_ids if item_ids is not None else [], dtype=object)
    rows = []
    for q in queries:
        meta = q.get("meta", {})
        allowed = np.isin(types, meta["target_types"]) if meta.get("target_types") else np.ones(len(types), dtype=bool)
        if meta.get("candidates") and len(ids):
            allowed &= np.isin(ids, meta["candidates"])
        if meta.get("not_candidates") and len(ids):
            allowed &= ~np.isin(ids, meta["not_candidates"])
        rows.append(allowed)
    return np.stack(rows)


def headline_categories(queries: list[dict]) -> list[str]:
    """The categories the headline pools: every one but those whose queries are marked meta.beside_headline (reported
    beside it, e.g. D&D's held-out-entity attribute queries)."""
    return sorted({q["category"] for q in queries if not q.get("meta", {}).get("beside_headline")})


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (family-wise error over the given tests), same keys."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[key]))
        adjusted[key] = running
    return {k: adjusted[k] for k in p_values}


def top_items(scores: np.ndarray, mask: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the top_k items per query by score, masked items excluded (ties broken by item order): a stable
    sort of every row when top_k is a good part of it, else a partition and a sort of what reaches the k-th score."""
    scores = np.where(mask, scores, -np.inf)
    top_k = min(top_k, scores.shape[1])
    if top_k * 8 >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    kth = -np.partition(-scores, top_k - 1, axis=1)[:, top_k - 1]
    top = np.empty((len(scores), top_k), dtype=np.int64)
    for row, (values, floor) in enumerate(zip(scores, kth)):
        reached = np.flatnonzero(values >= floor)  # with every item tied at the k-th score, in item order
        top[row] = reached[np.argsort(-values[reached], kind="stable")[:top_k]]
    return top


def dcg(gains: list[float]) -> float:
    """Discounted cumulative gain (exponential gain for graded relevance)."""
    return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gains))


def query_metrics(ranked: list[str], relevant: dict[str, float], ks: tuple[int, ...] | list[int] = KS) -> dict[str, float]:
    """P@k, Recall@k, hit@k (k in `ks`), MRR@10, NDCG@5/10 (graded) and AP@100 of one ranked list."""
    out: dict[str, float] = {}
    hits = [1.0 if relevant.get(i, 0) > 0 else 0.0 for i in ranked]
    n_relevant = sum(1 for g in relevant.values() if g > 0)
    for k in ks:
        out[f"precision@{k}"] = sum(hits[:k]) / k
        out[f"recall@{k}"] = sum(hits[:k]) / n_relevant
        out[f"hit@{k}"] = float(any(hits[:k]))
    first = next((i for i, h in enumerate(hits[:10]) if h), None)
    out["mrr@10"] = 0.0 if first is None else 1.0 / (first + 1)
    for k in (5, 10):
        ideal = dcg(sorted(relevant.values(), reverse=True)[:k])
        out[f"ndcg@{k}"] = dcg([relevant.get(i, 0) for i in ranked[:k]]) / ideal if ideal else 0.0
    precisions = [sum(hits[: i + 1]) / (i + 1) for i, h in enumerate(hits[:100]) if h]
    out["map@100"] = sum(precisions) / min(n_relevant, 100)
    return out


def topic_aliases(items: list[dict]) -> dict[str, list[str]]:
    """Lower-cased name → the name and its aliases, for matching expected topics in retrieved texts."""
    out: dict[str, list[str]] = {}
    for item in items:
        names = [item["name"], *item.get("aliases", [])]
        for name in names:
            out.setdefault(name.lower(), [])
            out[name.lower()] += [n for n in names if n not in out[name.lower()]]
    return out


def topic_coverage(topics: list[str], texts: list[str], aliases: dict[str, list[str]]) -> float:
    """1–5: 1 + 4 × the share of `topics` named (or an alias of them) as whole words in `texts`; NaN without topics."""
    if not topics:
        return float("nan")
    joined = "\n".join(texts)
    found = sum(any(re.search(rf"(?i)\b{re.escape(form)}\b", joined) for form in aliases.get(t.lower(), [t]) or [t])
                for t in topics)
    return 1 + 4 * found / len(topics)


def evaluate_scores(system: str, scores: np.ndarray | ScoreRows, queries: list[dict], items: list[dict], coverage_k: int = 5,
                    aliases: dict[str, list[str]] | None = None, ks: tuple[int, ...] | list[int] = KS,
                    block_elements: int = 1 << 24) -> pd.DataFrame:
    """Per-query metrics (one row per query) of one system's scores: a (queries × items) matrix, or a function
    (start, stop) → those queries' rows, asked a block of queries at a time (at most `block_elements` scores) so that
    no full matrix, nor its candidate mask, need ever exist."""
    rows_of = scores if callable(scores) else (lambda start, stop: scores[start:stop])
    types, ids = [i["type"] for i in items], [i["id"] for i in items]
    aliases = aliases if aliases is not None else topic_aliases(items)
    step = max(1, block_elements // max(1, len(items)))
    rows = []
    for start in range(0, len(queries), step):
        block = queries[start:start + step]
        mask = candidate_mask(block, types, ids)
        ranked = top_items(rows_of(start, start + len(block)), mask, top_k=100)
        for q, idx, allowed in zip(block, ranked, mask):
            ranked_ids = [items[i]["id"] for i in idx[: int(allowed.sum())]]
            coverage = topic_coverage(q.get("expected_topics", []), [items[i]["text"] for i in idx[:coverage_k]], aliases)
            rows.append({"system": system, "qid": q["qid"], "category": q["category"], "top1": ranked_ids[0],
                         **query_metrics(ranked_ids, q["relevant"], ks), f"topic_coverage@{coverage_k}": coverage})
    return pd.DataFrame(rows)


def dense_scores(query_vecs: np.ndarray, item_vecs: np.ndarray) -> np.ndarray:
    """Cosine scores of normalised query and item vectors."""
    return query_vecs @ item_vecs.T


def bm25_scores(query_texts: list[str], item_texts: list[str]) -> np.ndarray:
    """(queries × items) BM25 scores (lib.search.Bm25: bm25s, English stop words, Snowball stemming)."""
    return Bm25(item_texts).scores(query_texts)


def ensemble_scores(score_matrices: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """The mean of several systems' (queries × items) scores, each z-normalised per query over the query's candidate
    items (`mask`), so that teachers with different cosine scales weigh alike."""
    total = np.zeros(score_matrices[0].shape, dtype=np.float64)
    for scores in score_matrices:
        masked = np.where(mask, scores, np.nan)
        mean, std = np.nanmean(masked, axis=1, keepdims=True), np.nanstd(masked, axis=1, keepdims=True)
        total += (scores - mean) / np.where(std > 0, std, 1.0)
    return total / len(score_matrices)


def teacher_ceiling(vectors: dict[str, tuple[np.ndarray, np.ndarray]], queries: list[dict], items: list[dict],
                    metrics: tuple[str, ...] = ("ndcg@10", "mrr@10", "recall@10")) -> pd.DataFrame:
    """Each teacher's mean metrics on `queries` from its (query vectors, item vectors), and, with two or more, their
    ensemble (per-query z-normalised scores, averaged): the quality a student distilled from them can hope for."""
    mask = candidate_mask(queries, [i["type"] for i in items], [i["id"] for i in items])
    scores = {name: dense_scores(q, i) for name, (q, i) in vectors.items()}
    if len(scores) > 1:
        scores["ensemble (" + " + ".join(scores) + ")"] = ensemble_scores(list(scores.values()), mask)
    frames = [evaluate_scores(name, s, queries, items) for name, s in scores.items()]
    return pd.concat(frames).groupby("system", sort=False)[list(metrics)].mean().round(4)


def teacher_against_student(teacher: pd.Series, student: pd.Series, metric: str = "ndcg@10") -> dict:
    """The teacher's and the base student's dev `metric`, the gap, and a sentence on what it means for the run."""
    t, s = float(teacher[metric]), float(student[metric])
    gap = round(t - s, 4)
    if gap >= 0:
        message = (f"the teacher ranks the dev queries above the base student ({metric} {t:.3f} vs {s:.3f}, {gap:+.3f}): "
                   "the pairs and negatives it mines can teach the student")
    else:
        message = (f"the teacher ranks the dev queries below the base student ({metric} {t:.3f} vs {s:.3f}, {gap:+.3f}): "
                   "the pairs it mines and the negatives it picks carry little the student does not already know, so "
                   "expect little from them; a stronger teacher (an OpenAI-compatible endpoint, PROFILE=teacher-mpnet) "
                   "or training queries of your own (BEIR train qrels, codex questions) are where gains come from")
    return {"metric": metric, "teacher": round(t, 4), "base_student": round(s, 4), "gap": gap, "teacher_weaker": gap < 0,
            "message": message}


def score_systems(encoders: dict, query_texts: list[str], item_texts: list[str], rrf_k: int = 60, fusion: str = "rrf",
                  dense_weight: float = 0.5) -> dict[str, np.ndarray]:
    """(queries × items) scores of BM25, of each dense encoder (name → (query texts, item texts) → normalised vectors
    of both, stacked: see dense_encoders), the hybrid: BM25
    and the 'fine-tuned' encoder fused as lib.search.fuse does (RRF, or weighted with `dense_weight`), and the same
    fusion of BM25 and the 'base' encoder ('base-hybrid': what the served search is to beat)."""
    scores = {"bm25": bm25_scores(query_texts, item_texts)}
    for name, encode_texts in encoders.items():
        vectors = encode_texts(query_texts, item_texts)
        scores[name] = dense_scores(vectors[: len(query_texts)], vectors[len(query_texts):])
    for hybrid, dense in (("hybrid", "fine-tuned"), ("base-hybrid", "base")):
        if dense in scores:
            scores[hybrid] = fuse(scores[dense], scores["bm25"], fusion, dense_weight, rrf_k)
    return scores


def metric_columns(per_query: pd.DataFrame) -> list[str]:
    """The metric columns of a per-query frame (every name with '@')."""
    return [c for c in per_query.columns if "@" in c]


def summarize(per_query: pd.DataFrame, headline_categories: list[str] | None = None) -> pd.DataFrame:
    """Mean of every metric per system and category, plus 'all' over `headline_categories` (default: every one)."""
    metrics = metric_columns(per_query)
    by_cat = per_query.groupby(["system", "category"])[metrics].mean()
    pool = per_query if headline_categories is None else per_query[per_query.category.isin(headline_categories)]
    overall = pool.groupby("system")[metrics].mean().assign(category="all").set_index("category", append=True)
    return pd.concat([by_cat, overall]).sort_index()


def bootstrap_ci(values: np.ndarray, n_samples: int, seed: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the column means of (queries × metrics) `values` (NaNs ignored)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_samples, len(values)))
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():  # an all-NaN column (no query has topics) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values[idx], axis=1)
        return np.nanpercentile(means, tail, axis=0), np.nanpercentile(means, 100 - tail, axis=0)


def paired_randomisation(a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int) -> float:
    """Two-sided p-value of mean(a - b) ≠ 0 by random sign flips of the per-query differences."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not diff.any():
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_permutations, len(diff)))
    null = np.abs((signs * diff).mean(axis=1))
    return float((1 + (null >= abs(diff.mean()) - 1e-12).sum()) / (n_permutations + 1))


def intervals(per_query: pd.DataFrame, metrics: list[str], n_samples: int, seed: int,
              headline_categories: list[str] | None = None) -> dict:
    """{category: {system: {metric: [mean, low, high]}}}, 95% bootstrap intervals (the same resamples for every
    system); 'all' pools `headline_categories` (default: every category)."""
    pool = per_query if headline_categories is None else per_query[per_query.category.isin(headline_categories)]
    out: dict = {}
    for category, frame in [("all", pool), *per_query.groupby("category")]:
        out[category] = {}
        for system, rows in frame.groupby("system", sort=False):
            values = rows.sort_values("qid")[metrics].to_numpy(dtype=np.float64)
            low, high = bootstrap_ci(values, n_samples, seed)
            out[category][system] = {m: [round(float(np.nanmean(values[:, j])), 4), round(float(low[j]), 4),
                                         round(float(high[j]), 4)]
                                     for j, m in enumerate(metrics) if np.isfinite(values[:, j]).any()}
    return out


def paired_tests(per_query: pd.DataFrame, baseline: str, metrics: list[str], n_permutations: int, seed: int) -> dict:
    """{system: {metric: p-value}} of each system against `baseline` on the same queries."""
    wide = {m: per_query.pivot_table(index="qid", columns="system", values=m) for m in metrics}
    return {s: {m: round(paired_randomisation(wide[m][s], wide[m][baseline], n_permutations, seed), 4) for m in metrics}
            for s in per_query.system.unique() if s != baseline}


def teacher_agreement(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean top-k overlap and mean Spearman correlation of a student's and the teacher's item scores per query."""
    from scipy.stats import spearmanr

    overlaps, rhos = [], []
    for s, t, allowed in zip(student, teacher, mask):
        s, t = s[allowed], t[allowed]
        top_s, top_t = set(np.argsort(-s)[:k]), set(np.argsort(-t)[:k])
        overlaps.append(len(top_s & top_t) / min(k, len(s)))
        rhos.append(spearmanr(s, t).statistic)
    return {f"top{k}_overlap": round(float(np.mean(overlaps)), 4), "spearman": round(float(np.nanmean(rhos)), 4)}


def wins_and_losses(per_query: pd.DataFrame, system: str, baseline: str, metric: str) -> pd.DataFrame:
    """Per query: `metric` of `system` and `baseline` and the change, worst regressions first."""
    wide = per_query.pivot_table(index=["qid", "category"], columns="system", values=metric).reset_index()
    wide = wide[["qid", "category", baseline, system]].assign(delta=wide[system] - wide[baseline])
    return wide.sort_values(["delta", "qid"]).reset_index(drop=True)


def load_beir(folder: str | Path, split: str = "test") -> tuple[list[dict], list[dict]]:
    """Items and the `split` queries of a BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv),
    read and validated by the beir domain adapter."""
    skipped = Counter()
    docs, texts, qrels = beir.read_beir(folder, split, skipped)
    if skipped:
        print(f"{folder}: {skipped_line(skipped)}")
    queries = [{"qid": qid, "text": texts[qid], "relevant": rel, "expected_topics": [], "category": f"beir:{Path(folder).name}",
                "split": split, "meta": {}} for qid, rel in sorted(qrels[split].items())]
    return [beir.document_item(d) for d in docs], queries


def by_meta(per_query: pd.DataFrame, queries: list[dict], field: str, metric: str = "ndcg@10") -> dict[str, dict]:
    """{value: {"n": queries, system: mean `metric`}} per value of the queries' meta[field] (e.g. codex's difficulty),
    over the queries that have the metric (topic coverage needs expected topics); {} when no query has both."""
    value = {q["qid"]: str(q["meta"][field]) for q in queries if q.get("meta", {}).get(field) not in (None, "")}
    rows = per_query[per_query.qid.isin(value)].dropna(subset=[metric])
    out = {}
    for group, part in rows.assign(group=rows.qid.map(value)).groupby("group"):
        means = part.groupby("system")[metric].mean()
        out[str(group)] = {"n": int(part.qid.nunique())} | {system: round(float(v), 4) for system, v in means.items()}
    return out


def headline(summary: pd.DataFrame, systems: list[str], metrics: list[str], category: str = "all") -> dict[str, dict[str, float]]:
    """{system: {metric: value}} for one category ('all' = the numbers the report leads with)."""
    return {s: {m: round(float(summary.loc[(s, category), m]), 4) for m in metrics} for s in systems
            if (s, category) in summary.index}


@dataclass(frozen=True)
class Scoring:
    """How stage 06 scores and summarises: the k of the metrics, the hybrid's fusion, the statistics' samples."""

    ks: tuple[int, ...] = KS
    rrf_k: int = 60
    fusion: str = "rrf"
    dense_weight: float = 0.5
    coverage_k: int = 5
    bootstrap_samples: int = 2000
    permutation_samples: int = 10000
    seed: int = 42


def hybrid_setting(index_dir: str | Path, rrf_k: int = 60) -> dict:
    """The hybrid stage 06 scores: the saved index's fusion (chosen on dev by stage 05), else RRF with `rrf_k` (runs
    without stage 05, e.g. ablation arms)."""
    if not (Path(index_dir) / "retriever.json").exists():
        return {"fusion": "rrf", "dense_weight": 0.5, "rrf_k": rrf_k, "from": "rrf_k parameter (no saved index)"}
    saved = saved_settings(index_dir)
    return {"fusion": saved["fusion"], "dense_weight": saved["dense_weight"], "rrf_k": saved["rrf_k"],
            "from": f"{EXPORT}/index (chosen on dev)"}


def hybrid_label(setting: dict) -> str:
    """How tables name the hybrid: 'BM25 + fine-tuned, RRF' or '…, weighted 0.6 dense'."""
    fusion = "RRF" if setting["fusion"] == "rrf" else f"weighted {setting['dense_weight']:g} dense"
    return f"hybrid (BM25 + fine-tuned, {fusion})"


def format_interval(interval: list[float]) -> str:
    """[mean, low, high] as "mean [low, high]", three decimals."""
    return f"{interval[0]:.3f} [{interval[1]:.3f}, {interval[2]:.3f}]"


def interval_table(rows: dict[str, dict], metric: str | None = None) -> pd.DataFrame:
    """{row: {column: interval}} (or {row: {column: {metric: interval}}} with `metric`) as a table of
    "mean [low, high]" strings."""
    return pd.DataFrame({row: {col: format_interval(v[metric] if metric else v) for col, v in cols.items()}
                         for row, cols in rows.items()}).T


def dense_encoders(students: dict[str, Path], onnx_path: Path | None, max_seq_length: int) -> dict:
    """{system: (query texts, item texts) → their normalised vectors}: each student folder with torch, and the int8
    graph when given."""
    encoders = {name: TorchEncoder(path, max_seq_length) for name, path in students.items()}
    if onnx_path:
        encoders["onnx-int8"] = OnnxEncoder(onnx_path, max_seq_length=max_seq_length)
    return {name: queries_and_items(encoder) for name, encoder in encoders.items()}


def ndcg_at_dimensions(encode_pair: Callable[[list[str], list[str]], np.ndarray], queries: list[dict],
                       items: list[dict], dimensions: list[int]) -> dict[int, float]:
    """Mean NDCG@10 on `queries` of one encoder's vectors (see dense_encoders) cut to each size, largest first."""
    vectors = encode_pair([q["text"] for q in queries], [i["text"] for i in items])
    out = {}
    for size in sorted({int(d) for d in dimensions}, reverse=True):
        cut = truncate(vectors, size)
        scores = dense_scores(cut[: len(queries)], cut[len(queries):])
        out[size] = round(float(evaluate_scores(str(size), scores, queries, items)["ndcg@10"].mean()), 4)
    return out


def queries_and_items(encoder) -> Callable[[list[str], list[str]], np.ndarray]:
    """(query texts, item texts) → their vectors stacked, queries first, in one encoder call (one length-sorted
    batching), each text with the prompt of its role."""
    return lambda queries, items: encoder.encode(with_prompt(queries, encoder.prompts, "query")
                                                 + with_prompt(items, encoder.prompts, "document"), role="text")


def teacher_scores(teacher_dir: Path, queries: list[dict], items: list[dict]) -> np.ndarray:
    """(queries × items) cosine scores of stage 01's teacher vectors, rows and columns matched by id."""
    return dense_scores(stage_vectors(teacher_dir, "queries", [q["qid"] for q in queries]),
                        stage_vectors(teacher_dir, "items", [i["id"] for i in items]))


def per_query_frame(scores: dict[str, np.ndarray], teacher: np.ndarray, queries: list[dict], synthetic: list[dict],
                    items: list[dict], systems: list[str], scoring: Scoring) -> pd.DataFrame:
    """Per-query metrics of every system on the test and the synthetic queries; the teacher, which has no vectors for
    the synthetic ones, on the test queries."""
    aliases = topic_aliases(items)
    frames = []
    for system in systems:
        note(f"metrics of {system}")
        matrix, asked = (teacher, queries) if system == "teacher" else (scores[system], queries + synthetic)
        frames.append(evaluate_scores(system, matrix, asked, items, scoring.coverage_k, aliases, scoring.ks))
    return pd.concat(frames, ignore_index=True)


def category_tests(per_query: pd.DataFrame, scoring: Scoring, system: str = "fine-tuned",
                   metric: str = "ndcg@10", baseline: str = "base") -> tuple[dict[str, float], dict[str, float]]:
    """p of `system` against `baseline` (the base student) per category, and the Holm-adjusted p over the independent
    (non-synthetic) categories."""
    p = {cat: paired_tests(frame[frame.system.isin([baseline, system])], baseline, [metric], scoring.permutation_samples,
                           scoring.seed)[system][metric]
         for cat, frame in per_query.groupby("category")}
    return p, holm({c: v for c, v in p.items() if not c.startswith("synthetic:")})


def topic_coverage_summary(per_query: pd.DataFrame, categories: list[str], coverage_k: int,
                           threshold: float) -> dict[str, dict]:
    """Per system: mean topic coverage@k over the queries of `categories` that expect topics, the share at or above
    `threshold`, and how many queries that is."""
    column = f"topic_coverage@{coverage_k}"
    rows = per_query[per_query[column].notna() & per_query.category.isin(categories)]
    return {s: {"mean": round(float(g[column].mean()), 4),
                f"share_at_least_{threshold:g}": round(float((g[column] >= threshold).mean()), 4), "queries": len(g)}
            for s, g in rows.groupby("system", sort=False)}


def teacher_agreement_by_system(scores: dict[str, np.ndarray], teacher: np.ndarray, queries: list[dict],
                                items: list[dict], systems: list[str]) -> dict[str, dict[str, float]]:
    """teacher_agreement of each system but the fusion on the test queries (the first rows), over their candidates."""
    mask = candidate_mask(queries, [i["type"] for i in items], [i["id"] for i in items])
    return {s: teacher_agreement(scores[s][: len(queries)], teacher, mask) for s in systems
            if s not in ("teacher", "hybrid")}


def score_beir_folder(folder: str | Path, split: str, encoders: dict, metrics: list[str],
                      scoring: Scoring) -> tuple[pd.DataFrame, dict]:
    """A BEIR folder scored by BM25, the encoders and the hybrid: its per-query frame and its summary (95% intervals)."""
    items, queries = load_beir(folder, split)
    scores = score_systems(encoders, [q["text"] for q in queries], [i["text"] for i in items], scoring.rrf_k,
                           scoring.fusion, scoring.dense_weight)
    frame = pd.concat([evaluate_scores(s, scores[s], queries, items, scoring.coverage_k, ks=scoring.ks) for s in scores],
                      ignore_index=True)
    frame.insert(2, "query", frame["qid"].map({q["qid"]: q["text"][:90] for q in queries}))
    ci = intervals(frame, metrics, scoring.bootstrap_samples, scoring.seed)["all"]
    return frame, {"folder": str(folder), "split": split, "queries": len(queries), "documents": len(items),
                   "headline_ci": ci, "note": "no teacher row: stage 01 embeds the run's own corpus only"}
