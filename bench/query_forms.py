"""Which training-query forms and negatives move the student on a BEIR folder's dev questions (a quality experiment, not a
speed benchmark): each arm trains the base student for the same steps from the corpus alone, then scores the dev split
that stage 00 draws (30 % of the evaluation queries, seed 42), dense and fused with BM25, at weight-averaging α 1 and 0.5.

Arms (queries come from every document; a document's title, when it has one, is its name):
  template       today's stage-02 forms: "a document about k1, k2 and k3", "a document: <sentence>", the title;
                 one hard negative from the base student's own ranking (ranks 3+)
  template_inbatch  the same queries, in-batch negatives only
  plain_hybrid   plain forms (four keywords, a sentence, the title), the sentence and the title taken out of the
                 positive (inverse cloze); kept only if the hybrid (BM25 + base cosine, weighted 0.5) ranks the source
                 document in its top 3; one negative from the hybrid's ranks 3+, skipping any scored within 0.05 of
                 the source (a likely false negative)
  plain_inbatch  the plain, filtered queries, in-batch negatives only
  plain_distill  the plain, filtered queries; the hybrid is the teacher: its scores over the source and four of its
                 top 12 (ranks 1, 2, 4, 8 after the source) are distilled listwise (DistillKLDivLoss, teacher and
                 student temperature 0.05), GPL-style with the hybrid in the cross-encoder's place
  generated_inbatch  queries a chat model writes (lib.querygen, stage 02's query_generator_*: a question and keywords
                 per document) for --generator-items documents, in-batch negatives only; needs --generator-model and
                 --generator-url (any OpenAI-compatible endpoint; replies cached in data/cache/generated_queries.sqlite)

  .venv/bin/python bench/query_forms.py --data <BEIR folder> [--arms template,plain_hybrid] [--steps 50]
  .venv/bin/python bench/query_forms.py --data <BEIR folder> --arms "" --score-model data/models/all-mpnet-base-v2
  .venv/bin/python bench/query_forms.py --data <BEIR folder> --arms generated_inbatch --generator-model M --generator-url U
writes bench/results/<machine>/query_forms.json (with --arms "": teachers_on_dev.json, the base and the --score-model
folders only).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import corpus, pairs, querygen  # noqa: E402
from lib.bench import write_result  # noqa: E402
from lib.domains import beir  # noqa: E402
from lib.evaluate import evaluate_scores  # noqa: E402
from lib.finetune import blend_weights  # noqa: E402
from lib.paths import generation_cache_path, resolve_model_path  # noqa: E402
from lib.search import Bm25, fuse  # noqa: E402

ARMS = ("template", "template_inbatch", "plain_hybrid", "plain_inbatch", "plain_distill")  # generated_inbatch: on request
DISTILL_RANKS = (0, 1, 3, 7)  # which of the hybrid's top candidates (after the source) a distilled row carries


def encode(model, texts: list[str], max_seq_length: int) -> np.ndarray:
    """Normalised vectors at a given length."""
    model.max_seq_length = max_seq_length
    return model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)


def dev_scores(model, items: list[dict], dev: list[dict], bm25: Bm25, item_vecs=None) -> dict[str, float]:
    """Dev NDCG@10: dense, RRF with BM25, and weighted 0.8 dense (as stage 05 may choose); `item_vecs` when the
    model's item vectors are already at hand."""
    if item_vecs is None:
        item_vecs = encode(model, [i["text"] for i in items], 256)
    dense = encode(model, [q["text"] for q in dev], 256) @ item_vecs.T
    keyword = bm25.scores([q["text"] for q in dev])
    systems = {"dense": dense, "rrf": fuse(dense, keyword, "rrf"), "weighted_0.8": fuse(dense, keyword, "weighted", 0.8)}
    return {name: round(float(evaluate_scores(name, s, dev, items)["ndcg@10"].mean()), 4) for name, s in systems.items()}


def training_queries(items: list[dict], arm: str, seed: int) -> list[tuple[str, int, str]]:
    """(query, source index, positive text) per document for the arm's query forms."""
    rng = random.Random(seed)
    words = pairs.keywords([i["text"] for i in items], [i["name"] for i in items])
    out = []
    for n, item in enumerate(items):
        has_title = item["text"].startswith(item["name"] + ". ")
        body = item["text"][len(item["name"]) + 2:] if has_title else item["text"]
        found = pairs.sentences(body)
        if arm.startswith("template"):
            if len(words[n]) >= 3:
                picked = rng.sample(words[n], 3)
                out.append((f"a document about {picked[0]}, {picked[1]} and {picked[2]}", n, item["text"]))
            out += [(f"a document: {s[0].lower()}{s[1:]}", n, item["text"]) for s in rng.sample(found, min(2, len(found)))]
            out += [(item["name"], n, item["text"])] if has_title else []
        else:
            if len(words[n]) >= 4:
                out.append((" ".join(rng.sample(words[n], 4)), n, item["text"]))
            if found:
                sentence = rng.choice(found)
                out.append((sentence, n, body.replace(sentence, " ").strip()))
            out += [(item["name"], n, body)] if has_title else []
    return out


def generated_training_queries(items: list[dict], settings: querygen.GeneratorSettings, seed: int) -> list[tuple[str, int, str]]:
    """(query, source index, document text) for the queries a chat model writes for the documents."""
    index = {item["id"]: n for n, item in enumerate(items)}
    written, counts = querygen.generated_queries(items, {}, set(), settings, generation_cache_path(), seed)
    print("generated", counts, flush=True)
    return [(q["text"], index[q["source_id"]], items[index[q["source_id"]]]["text"]) for q in written]


def training_rows(arm: str, queries: list[tuple[str, int, str]], ranker: np.ndarray, texts: list[str],
                  keep_top: int, margin: float) -> list[dict]:
    """Rows (anchor, positive[, negative_1]) for the arm, given the ranker's (queries × items) scores."""
    order = np.argsort(-ranker, axis=1)
    rows = []
    for k, (query, source, positive) in enumerate(queries):
        if keep_top and source not in order[k, :keep_top]:
            continue
        row = {"anchor": query, "positive": positive}
        if arm.endswith("distill"):
            others = [int(c) for c in order[k, :12] if c != source]
            picked = [others[r] for r in DISTILL_RANKS if r < len(others)]
            rows.append({**row, **{f"negative_{j + 1}": texts[c] for j, c in enumerate(picked)},
                         "label": [float(ranker[k, c]) for c in [source, *picked]]})
            continue
        if not arm.endswith("inbatch"):
            allowed = [int(c) for c in order[k, 3:40]
                       if c != source and (not keep_top or ranker[k, c] <= ranker[k, source] - margin)]
            if not allowed:
                continue
            row["negative_1"] = texts[allowed[0]]
        rows.append(row)
    return rows


def train(start: str, rows: list[dict], steps: int, batch_size: int, seed: int):
    """MNRL (or, for rows with a teacher's 'label', listwise KL distillation) for `steps` steps from the start model;
    returns the trained model."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MultipleNegativesRankingLoss

    model = SentenceTransformer(start, device="cpu")
    model.max_seq_length = 128
    args = SentenceTransformerTrainingArguments(
        output_dir=f"/tmp/query_forms-{seed}", max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=2e-5, warmup_steps=0.1, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
        seed=seed, batch_sampler="no_duplicates")
    random.Random(seed).shuffle(rows)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               loss=DistillKLDivLoss(model, student_temperature=0.05, teacher_temperature=0.05)
                               if "label" in rows[0] else MultipleNegativesRankingLoss(model)).train()
    return model


def averaged(model, start_state: dict, trained_state: dict, alpha: float):
    """The model with (1 − α)·start + α·trained weights (lib.finetune.blend_weights), returned for scoring."""
    blend_weights(model, start_state, trained_state, alpha)
    return model


def with_earlier_arms(name: str, out: dict) -> dict:
    """`out` with the arms this machine kind measured before under the same data, split, steps and batch (each arm
    keeps the commit it was measured at), so one arm rerun does not drop the others."""
    from lib.bench import RESULTS
    from lib.io import read_json
    from lib.provenance import git_commit, machine, machine_kind

    for arm in out["arms"].values():
        arm.setdefault("commit", git_commit())
    path = RESULTS / machine_kind(machine()) / f"{name}.json"
    same = ("data", "dev_queries", "steps", "batch_size", "seed")
    earlier = read_json(path) if path.is_file() else {}
    if all(earlier.get(k) == out[k] for k in same):
        out["arms"] = {**earlier.get("arms", {}), **out["arms"]}
        if earlier.get("models") or out.get("models"):
            out["models"] = {**earlier.get("models", {}), **out.get("models", {})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--score-model", action="append", default=[], metavar="PATH",
                        help="also score this SentenceTransformer folder on dev, untrained (a candidate teacher); repeatable")
    parser.add_argument("--generator-model", default="", help="generated_inbatch: the chat model")
    parser.add_argument("--generator-url", default="", help="generated_inbatch: its OpenAI-compatible endpoint")
    parser.add_argument("--generator-items", type=int, default=400, help="generated_inbatch: documents (seeded sample)")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    items, queries, _, _ = beir.build_corpus(args.data)
    dev = [q for q in corpus.assign_splits(queries, 0.3, args.seed) if q["split"] == "dev"]
    texts = [i["text"] for i in items]
    bm25 = Bm25(texts)
    start = str(resolve_model_path("all-MiniLM-L6-v2"))
    base = SentenceTransformer(start, device="cpu")
    item_vecs = encode(base, texts, 256)
    out = {"data": Path(args.data).name, "dev_queries": len(dev), "steps": args.steps,
           "batch_size": args.batch_size, "seed": args.seed, "base": dev_scores(base, items, dev, bm25, item_vecs), "arms": {}}
    print("base", out["base"], flush=True)
    for path in args.score_model:  # is this model above the student on these questions?
        out.setdefault("models", {})[Path(path).name] = dev_scores(SentenceTransformer(path, device="cpu"), items, dev, bm25)
        print(Path(path).name, out["models"][Path(path).name], flush=True)
    for arm in [a for a in args.arms.split(",") if a]:
        made = (generated_training_queries(items, querygen.GeneratorSettings(
                    args.generator_model, args.generator_url, per_item=2, max_items=args.generator_items,
                    max_concurrency=2), args.seed) if arm.startswith("generated") else training_queries(items, arm, args.seed))
        dense = encode(base, [q for q, _, _ in made], 64) @ item_vecs.T
        plain = arm.startswith("plain")
        ranker = fuse(dense, bm25.scores([q for q, _, _ in made]), "weighted", 0.5) if plain else dense
        rows = training_rows(arm, made, ranker, texts, keep_top=3 if plain else 0, margin=0.05)
        began = time.monotonic()
        model = train(start, rows, args.steps, args.batch_size, args.seed)
        trained, start_state = {k: v.clone() for k, v in model.state_dict().items()}, base.state_dict()
        out["arms"][arm] = {"queries": len(made), "rows": len(rows), "train_s": round(time.monotonic() - began),
                            **{f"alpha_{a:g}": dev_scores(averaged(model, start_state, trained, a), items, dev, bm25)
                               for a in (1.0, 0.5)}}
        print(arm, out["arms"][arm], flush=True)
    name = "query_forms" if out["arms"] else "teachers_on_dev"
    print(f"wrote {write_result(name, with_earlier_arms(name, out))}")


if __name__ == "__main__":
    main()
