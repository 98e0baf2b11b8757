"""The learning curve of judged questions (`make learning-curve`): what n questions judged on the search page are
worth to the served search. The dev questions of a run's corpus are the pool: a seeded third of them is kept to
choose (α and the search setting, never trained on), the rest are judged as a user of the search page would judge
them (the base student's served top 10: relevant items Good, the others Wrong). Each point trains the base student on
the first n judged questions through stage 02's feedback path and stage 04's `finetune` (the same loss, the weight
averaging and the served guard), then scores the test questions, dense and served, with intervals and paired tests
against the base student as served. Results go to bench/results/learning_curve/<name>.json; `--write-docs` renders
every results file into docs/results.md."""
from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lib import corpus, feedback
from lib.evaluate import bm25_scores, bootstrap_ci, candidate_mask, paired_randomisation, top_items
from lib.finetune import FinetuneConfig, finetune
from lib.io import read_json, write_json, write_text
from lib.paths import CORPUS, REPO_ROOT, Run, base_student_path, shown_path
from lib.provenance import fill_generated, git_commit, machine, machine_label
from lib.served import ServedEvaluator, encode_texts, setting_label, setting_scores, settings_ndcg

RESULTS = REPO_ROOT / "bench" / "results" / "learning_curve"
FUSION_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class CurveSettings:
    """One learning curve's settings (the command's flags)."""
    points: tuple = (10, 25, 50, 100, 200, 0)  # judged questions per point; 0: every question of the pool
    category: str = ""  # the kind of evaluation query learned from and scored; empty: every kind
    choice_fraction: float = 0.34  # share of the dev questions kept to choose α and the search setting
    judged_depth: int = 10  # results a simulated user judges per question (the page shows 10)
    max_steps: int = 60  # training steps per point (each point the same budget)
    per_device_train_batch_size: int = 16
    learning_rate: float = 2e-5
    blend_alphas: tuple = (0.0, 0.5, 1.0)
    eval_max_seq_length: int = 256
    n_samples: int = 2000  # bootstrap resamples per interval
    n_permutations: int = 10000  # sign flips per paired test
    seed: int = 42
    dense_weights: tuple = field(default=FUSION_WEIGHTS)


def curve_questions(queries: list[dict], category: str, choice_fraction: float, seed: int
                    ) -> tuple[list[dict], list[dict], list[dict]]:
    """(pool, choice, test): the dev questions of `category` split by a seeded shuffle into the judged pool and the
    choice share; the test questions as they are."""
    fits = [q for q in queries if q["split"] != "train" and (not category or q["category"] == category)]
    dev = sorted((q for q in fits if q["split"] == "dev"), key=lambda q: q["qid"])
    random.Random(seed).shuffle(dev)
    n_choice = max(1, round(len(dev) * choice_fraction))
    test = [q for q in fits if q["split"] == "test"]
    if len(dev) < 2 or not test:
        raise ValueError(f"the learning curve needs dev and test questions of category {category or 'any'!r}: "
                         f"found {len(dev)} dev and {len(test)} test")
    return dev[n_choice:], dev[:n_choice], test


def served_ranking(scores: np.ndarray, queries: list[dict], items: list[dict], depth: int) -> list[list[str]]:
    """Each query's top `depth` item ids among its candidates."""
    mask = candidate_mask(queries, [i["type"] for i in items], [i["id"] for i in items])
    return [[items[i]["id"] for i in row[: int(allowed.sum())]] for row, allowed in zip(top_items(scores, mask, depth), mask)]


def simulate_judgements(questions: list[dict], ranked: list[list[str]], depth: int) -> list[dict]:
    """Feedback rows as a user of the search page makes them: each of a question's top `depth` results judged Good
    (1) when the question's ground truth holds it, else Wrong (-1)."""
    return [{"query": q["text"], "item_id": item_id, "judgement": 1 if q["relevant"].get(item_id, 0) > 0 else -1}
            for q, top in zip(questions, ranked) for item_id in top[:depth]]


def judged_rows(judged: list[dict], texts: dict[str, str], fallback: dict[str, list[str]]) -> list[dict]:
    """(anchor, positive, negative_1) rows of stage 02's feedback queries: each Good item a positive, the question's
    Wrong items its negatives in turn, else the first unjudged result below the judged ones (`fallback`)."""
    rows = []
    for q in judged:
        wrong = [i for i, _ in q["negatives"]] or [i for i in fallback.get(q["text"], []) if i not in q["matches"]][:1]
        if not wrong:
            continue
        rows += [{"anchor": q["text"], "positive": texts[good], "negative_1": texts[wrong[n % len(wrong)]]}
                 for n, good in enumerate(q["relevant"])]
    return rows


def test_ndcg(model, item_vectors: np.ndarray, test: list[dict], items: list[dict], keyword: np.ndarray,
              setting: dict) -> dict[str, np.ndarray]:
    """Per-question NDCG@10 of the test questions: cosine alone and as served with `setting` (the model's vectors of
    `items` given)."""
    dense = encode_texts(model, [q["text"] for q in test], "query") @ item_vectors.T
    dense_ndcg, served_ndcg = settings_ndcg(dense, keyword, test, items, [{"mode": "dense", "fusion": "rrf", "dense_weight": 0.5},
                                                                          setting])
    return {"dense": dense_ndcg, "served": served_ndcg}


def interval(values: np.ndarray, settings: CurveSettings) -> list[float]:
    """[mean, low, high] of per-question values, a 95 % bootstrap interval."""
    low, high = bootstrap_ci(values[:, None], settings.n_samples, settings.seed)
    return [round(float(values.mean()), 4), round(float(low[0]), 4), round(float(high[0]), 4)]


def point_result(n: int, scored: dict[str, np.ndarray], base: dict[str, np.ndarray], settings: CurveSettings) -> dict:
    """One point's test figures: dense and served NDCG@10 with intervals, p against the base dense and as served."""
    p = lambda a, b: round(paired_randomisation(a, b, settings.n_permutations, settings.seed), 4)
    return {"questions": n, "test_dense": interval(scored["dense"], settings), "test_served": interval(scored["served"], settings),
            "p_dense_vs_base": p(scored["dense"], base["dense"]), "p_served_vs_base_served": p(scored["served"], base["served"]),
            "served_gain": round(float((scored["served"] - base["served"]).mean()), 4),
            "better": int((scored["served"] > base["served"]).sum()), "worse": int((scored["served"] < base["served"]).sum())}


def train_point(base_model: Path, rows: list[dict], evaluator: ServedEvaluator, settings: CurveSettings, out_dir: Path):
    """The base student trained on `rows` by stage 04's finetune (weight averaging chosen as served on the choice
    questions); returns the model and the blend facts."""
    from datasets import Dataset

    config = FinetuneConfig(max_steps=settings.max_steps, per_device_train_batch_size=settings.per_device_train_batch_size,
                            learning_rate=settings.learning_rate, blend_alphas=settings.blend_alphas,
                            eval_max_seq_length=settings.eval_max_seq_length, eval_steps=settings.max_steps + 1,
                            save_steps=settings.max_steps + 1, batch_sampler="no_duplicates", resume=False,
                            seed=settings.seed, model_name="learning-curve point")
    train = Dataset.from_list(rows)
    model, _, facts = finetune(base_model, train, train.select(range(min(16, len(train)))), evaluator, out_dir, config)
    return model, facts["blend"]


def learning_curve(run: Run, settings: CurveSettings, base_model: Path) -> dict:
    """Every point of the curve for a run's corpus (its stage 00), with the base student's figures."""
    from sentence_transformers import SentenceTransformer

    items, queries = corpus.load_items(run.stage(CORPUS)), corpus.load_queries(run.stage(CORPUS))
    pool, choice, test = curve_questions(queries, settings.category, settings.choice_fraction, settings.seed)
    texts = {i["id"]: i["text"] for i in items}
    evaluator = ServedEvaluator(choice, items, list(settings.dense_weights))
    base = SentenceTransformer(str(base_model), device="cpu")
    base.max_seq_length = settings.eval_max_seq_length
    base_choice = evaluator(base)
    base_setting = evaluator.chosen_setting(base_choice)
    item_texts = [i["text"] for i in items]
    test_keyword = bm25_scores([q["text"] for q in test], item_texts)
    base_items = encode_texts(base, item_texts, "document")  # once, for the test questions and the judged pool
    base_test = test_ndcg(base, base_items, test, items, test_keyword, base_setting)
    pool_dense = encode_texts(base, [q["text"] for q in pool], "query") @ base_items.T
    pool_scores = setting_scores(pool_dense, bm25_scores([q["text"] for q in pool], item_texts), base_setting)
    ranked = served_ranking(pool_scores, pool, items, 2 * settings.judged_depth)
    print(f"{len(pool)} judged-pool, {len(choice)} choice and {len(test)} test questions; the base student serves "
          f"{setting_label(base_setting)} (choice NDCG@10 {base_choice['served_ndcg@10']:.4f})", flush=True)
    points = []
    for n in sorted({min(p or len(pool), len(pool)) for p in settings.points}):
        judgements = simulate_judgements(pool[:n], ranked[:n], settings.judged_depth)
        judged, counts = feedback.training_queries(judgements, set(texts), set(), choice + test, 0.9, 1000)
        rows = judged_rows(judged, texts, {q["text"]: r[settings.judged_depth:] for q, r in zip(pool, ranked)})
        print(f"point {n}: {len(judgements)} judgements, {counts['training_queries']} questions with a Good result, "
              f"{len(rows)} rows", flush=True)
        if not rows:
            points.append({"questions": n, "rows": 0, "skipped": "no question has a Good result in its top results"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            model, blend = train_point(base_model, rows, evaluator, settings, Path(tmp))
        setting = evaluator.chosen_setting(blend["dev_metrics"])
        scored = test_ndcg(model, encode_texts(model, item_texts, "document"), test, items, test_keyword, setting)
        point = point_result(n, scored, base_test, settings)
        points.append(point | {"judged_questions": counts["training_queries"], "judgements": len(judgements), "rows": len(rows),
                               "alpha": blend["alpha"], "setting": setting_label(setting),
                               "choice_served": round(blend["dev_metrics"]["served_ndcg@10"], 4)})
        print(f"point {n}: α {blend['alpha']:g}, {setting_label(setting)}; test served {point['test_served']} "
              f"(base served {interval(base_test['served'], settings)}, p {point['p_served_vs_base_served']})", flush=True)
    return {"run": run.name, "category": settings.category or "all", "settings": asdict(settings),
            "questions": {"pool": len(pool), "choice": len(choice), "test": len(test)},
            "base": {"setting": setting_label(base_setting), "choice_served": round(base_choice["served_ndcg@10"], 4),
                     "test_dense": interval(base_test["dense"], settings), "test_served": interval(base_test["served"], settings)},
            "points": points, "commit": git_commit(), "machine": machine_label(machine()),
            "base_model": shown_path(base_model)}


def curve_table(result: dict) -> str:
    """One results file as a markdown table under a line saying what was measured."""
    base, q = result["base"], result["questions"]
    kind = "every kind of query" if result["category"] == "all" else f"`{result['category']}` queries"
    head = (f"**{result['name']}** (run `{result['run']}`, {kind}: {q['pool']} judged pool, "
            f"{q['choice']} to choose, {q['test']} test) at commit {result['commit']}, {result['machine']}; "
            f"{result['settings']['max_steps']} steps of {result['settings']['per_device_train_batch_size']} per point. "
            f"Base student: dense {fmt(base['test_dense'])}, served ({base['setting']}) {fmt(base['test_served'])}.\n\n"
            "| judged questions | with a Good result | rows | α | served as | test dense | test served | gain vs base served | p | better / worse |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {p['questions']} | — | 0 | — | — | — | — | — | — | — |" if "skipped" in p else
             f"| {p['questions']} | {p['judged_questions']} | {p['rows']} | {p['alpha']:g} | {p['setting']} | {fmt(p['test_dense'])} | "
             f"{fmt(p['test_served'])} | {p['served_gain']:+.4f} | {p['p_served_vs_base_served']} | {p['better']} / {p['worse']} |"
             for p in result["points"]]
    return head + "\n".join(lines)


def fmt(value: list[float]) -> str:
    """0.412 [0.371, 0.455]."""
    return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def write_docs(results_dir: Path = RESULTS, doc: Path = REPO_ROOT / "docs" / "results.md") -> bool:
    """Render every learning-curve results file into docs/results.md's `learning_curve` block."""
    files = sorted(results_dir.glob("*.json"))
    block = "\n\n".join(curve_table(read_json(f) | {"name": f.stem}) for f in files) or "No learning curve measured yet."
    text = doc.read_text(encoding="utf-8")
    filled = fill_generated(text, {"learning_curve": block})
    if filled != text:
        write_text(doc, filled)
    return filled != text


def main(argv: list[str] | None = None) -> None:
    """python -m lib.learning_curve --run beir-default --name cisi [--category question] [--points 10 25 0]."""
    defaults = CurveSettings()
    parser = argparse.ArgumentParser(prog="python -m lib.learning_curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="dnd-default", help="a run whose stage 00 is done (make stage-00 DOMAIN=… DATA=…)")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--name", default="", help="the results file's name (default: the run's)")
    parser.add_argument("--category", default=defaults.category)
    parser.add_argument("--points", type=int, nargs="+", default=list(defaults.points))
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--base-model", default="", help="a SentenceTransformer folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--write-docs", action="store_true", help="only render the results files into docs/results.md")
    args = parser.parse_args(argv)
    if args.write_docs:
        print("docs/results.md " + ("written" if write_docs() else "unchanged"))
        return
    settings = CurveSettings(points=tuple(args.points), category=args.category, max_steps=args.max_steps)
    result = learning_curve(Run(args.run, args.runs_root), settings, Path(args.base_model) if args.base_model else base_student_path())
    out = RESULTS / f"{args.name or args.run}.json"
    write_json(out, result)
    print(f"wrote {shown_path(out)}")
    write_docs()


if __name__ == "__main__":
    main()
