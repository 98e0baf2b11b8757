"""Stage 04: contrastive fine-tuning of the student (SentenceTransformerTrainer): MNRL with the stage-02 hard
negatives, entity-aware batches, bf16 autocast on CPUs that have it, resumable checkpoints, and the same code under
torchrun (`python -m lib.finetune --help`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss

from lib import corpus
from lib.batches import BATCH_SAMPLERS, batch_sampler, entity_lookup
from lib.config import parameter_fields
from lib.cpu import best_device
from lib.encoders import model_pooling, model_prompts
from lib.io import read_jsonl, write_json
from lib.paths import CORPUS, DOMAIN_ADAPT, FINETUNE, PAIRS, TEACHER, Run, resolve_model_path
from lib.teacher import stage_vectors
from lib.training import (ResourceMonitor, TimeBudget, checkpoint_key, is_main_process, resumable_checkpoints,
                          train_or_resume, use_bf16)

LOSSES = ("mnrl", "cached_mnrl", "gist", "mnrl+margin_mse")
DISTILL_PROJECTION_LR = 1e-3


@dataclass
class FinetuneConfig:
    """Training settings of stage 04 (the notebook's parameters; the CLI's flags)."""
    num_train_epochs: float = 3.0  # passes over the training rows
    max_steps: int = -1  # > 0 stops after this many steps (overrides epochs)
    per_device_train_batch_size: int = 16  # rows per step (per process); MNRL's in-batch negatives
    learning_rate: float = 2e-5  # AdamW peak learning rate
    warmup_steps: float = 0.1  # a float < 1 is a ratio of the total steps
    max_seq_length: int = 128  # tokens per passage (positive, negatives)
    query_max_seq_length: int = 64  # tokens per anchor (queries are short; the anchor column is padded on its own)
    eval_max_seq_length: int = 256  # tokens per text in every dev evaluation (before, during, after: the same)
    blend_alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)  # weight averaging with the start model, α chosen on dev; () keeps α = 1
    max_train_minutes: float = 0.0  # training budget in minutes (0: none): the steps that fit, the schedule shortened to them
    eval_steps: int = 50  # dev loss (and, with ndcg_during_training, dev NDCG) and training-loss logging interval
    ndcg_during_training: bool = False  # also score the dev queries at every evaluation (a full dev encode each time)
    save_steps: int = 50  # checkpoint interval (a rerun resumes from the last one)
    seed: int = 42
    loss: str = "mnrl"  # mnrl | cached_mnrl | gist | mnrl+margin_mse (needs stage 02's teacher_query_scores)
    margin_mse_weight: float = 1.0  # mnrl+margin_mse: weight of the MarginMSE term (margins in MNRL's logit units)
    mini_batch_size: int = 8  # cached_mnrl: rows per forward pass (memory), the batch stays per_device_train_batch_size
    guide_model: str = ""  # gist: the guide SentenceTransformer folder
    matryoshka_dims: tuple = ()  # e.g. (384, 256, 128, 64): wrap the loss in MatryoshkaLoss
    batch_sampler: str = "entity"  # entity | no_duplicates | random
    bf16: bool = True  # bf16 autocast when the CPU computes bf16 natively (or on a GPU); fp32 otherwise
    resume: bool = True  # resume from the last checkpoint of the same configuration and data
    distill: bool = False  # also match the teacher's cached item vectors (EmbedDistillLoss) on batches of items
    model_name: str = ""  # the model card's name

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.batch_sampler not in BATCH_SAMPLERS:
            raise ValueError(f"batch_sampler={self.batch_sampler!r}: expected one of {', '.join(BATCH_SAMPLERS)}")
        if self.loss == "gist" and not self.guide_model:
            raise ValueError("loss='gist' needs guide_model: a SentenceTransformer folder (e.g. the base student)")
        self.matryoshka_dims = tuple(int(d) for d in self.matryoshka_dims)
        if self.loss == "mnrl+margin_mse" and self.matryoshka_dims:
            raise ValueError("loss='mnrl+margin_mse' does not combine with matryoshka_dims: choose one")
        self.blend_alphas = tuple(float(a) for a in self.blend_alphas)
        if any(not 0.0 <= a <= 1.0 for a in self.blend_alphas):
            raise ValueError(f"blend_alphas={list(self.blend_alphas)}: every α must lie in [0, 1]")

    @classmethod
    def from_params(cls, params: dict, **settings) -> FinetuneConfig:
        """The settings from stage 04's parameters (the notebook's globals()): every field the notebook declares,
        then `settings` (what the notebook derives, e.g. the guide model's folder)."""
        return cls(**parameter_fields(cls, params) | settings)


# --- inputs ----------------------------------------------------------------------------------------------------

def pairs_dataset(path: str | Path):
    """The stage-02 training rows (anchor, positive, negative_1..k) saved as a Hugging Face dataset folder."""
    from datasets import load_from_disk

    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{path}: no stage-02 dataset here; run stage 02 (make stage-02) first")
    dataset = load_from_disk(str(path))
    if len(dataset) == 0:
        raise ValueError(f"{path}: no training rows; lower the positive threshold or raise synthetic_expansion_factor in stage 02")
    return dataset


def ir_evaluator(queries: list[dict], items: list[dict], name: str):
    """InformationRetrievalEvaluators over `items` for `queries`, one per candidate group (meta.target_types, and
    meta.candidates where given), run in sequence; the main score (`sequential_score`) is their NDCG@10 weighted by
    query count, the per-query mean stage 06 reports."""
    from sentence_transformers.base.evaluation.sequential import SequentialEvaluator
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    groups: dict[tuple, list[dict]] = {}
    for q in queries:
        meta = q.get("meta", {})
        groups.setdefault((tuple(meta.get("target_types") or ()), tuple(meta.get("candidates") or ())), []).append(q)
    evaluators, sizes = [], []
    for n, ((types, subset), group) in enumerate(sorted(groups.items())):
        allowed = set(subset)
        corpus = {i["id"]: i["text"] for i in items if (not types or i["type"] in types) and (not subset or i["id"] in allowed)}
        evaluators.append(InformationRetrievalEvaluator(
            queries={q["qid"]: q["text"] for q in group},
            corpus=corpus,
            relevant_docs={q["qid"]: set(q["relevant"]) for q in group},
            name=f"{name}-{'-'.join(types) or 'all'}" + (f"-subset{n}" if subset else ""),
            ndcg_at_k=[5, 10], precision_recall_at_k=[1, 3, 5, 10], write_csv=False,
        ))
        sizes.append(len(group))
    weighted = lambda scores: sum(s * n for s, n in zip(scores, sizes)) / sum(sizes)
    return SequentialEvaluator(evaluators, main_score_function=weighted)


@dataclass
class StageInputs:
    """What stage 04 reads: the loss rows, the rows' entity lookups, the dev evaluator and the start model."""
    train: object
    dev: object
    rows: list[dict]
    lookup: tuple[dict, dict]
    evaluator: object
    dev_queries: int
    teacher_items: object  # (text, label) rows: the items with their cached teacher vectors, for `distill`


def teacher_items_dataset(items: list[dict], teacher_dir: Path):
    """The corpus items (text) with the stage-01 teacher vectors (label), matched by id."""
    import hashlib

    from datasets import Dataset
    from datasets.table import InMemoryTable

    texts = [i["text"] for i in items]
    labels = stage_vectors(teacher_dir, "items", [i["id"] for i in items]).astype(np.float32)
    fingerprint = hashlib.sha256(labels.tobytes() + "\n".join(texts).encode()).hexdigest()[:16]
    return Dataset(InMemoryTable.from_pydict({"text": texts, "label": labels.tolist()}), fingerprint=fingerprint)


def load_inputs(corpus_dir: Path, pairs_dir: Path, dev_loss_rows: int, seed: int,
                teacher_dir: Path | None = None) -> StageInputs:
    """Stage 02's train/dev datasets (dev cut to a seeded sample for the eval loss), their rows' entity lookups,
    the dev-query evaluator over the stage-00 items and, given stage 01's folder, the items' teacher vectors."""
    train = pairs_dataset(pairs_dir / "train")
    dev = pairs_dataset(pairs_dir / "dev")
    dev = dev.shuffle(seed=seed).select(range(min(dev_loss_rows, len(dev))))
    rows = read_jsonl(pairs_dir / "train.jsonl") + read_jsonl(pairs_dir / "dev.jsonl")
    queries = corpus.load_queries(corpus_dir, split="dev")
    items = corpus.load_items(corpus_dir)
    return StageInputs(train, dev, rows, entity_lookup(rows), ir_evaluator(queries, items, "dev"), len(queries),
                       teacher_items_dataset(items, teacher_dir) if teacher_dir else None)


# --- training --------------------------------------------------------------------------------------------------


def build_loss(model, config: FinetuneConfig, distributed: bool):
    """MNRL (or cached MNRL / GIST), optionally inside MatryoshkaLoss; negatives gathered across processes."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    if config.loss == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size,
                                                         gather_across_devices=distributed)
    elif config.loss == "gist":
        guide = SentenceTransformer(str(resolve_model_path(config.guide_model)), device=model.device)  # never the hub
        loss = losses.GISTEmbedLoss(model, guide, gather_across_devices=distributed)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, gather_across_devices=distributed)
    if config.loss == "mnrl+margin_mse":
        loss = MnrlWithMarginMSE(model, loss, config.margin_mse_weight)
    if config.matryoshka_dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=list(config.matryoshka_dims))
    return loss


def column_routes(column_names: list[str]) -> dict[str, str]:
    """The collator's router mapping: the first column (anchor) is a query, the other text columns documents."""
    return {c: "query" if n == 0 else "document" for n, c in enumerate(column_names) if c != "label"}


def column_prompts(routes: dict, prompts: dict[str, str]) -> dict:
    """The collator's prompts: each column (per dataset when `routes` is per dataset) gets the model's prompt for its
    route (lib.encoders.model_prompts); {} when the model has none."""
    if not any(prompts.values()):
        return {}
    if all(isinstance(r, dict) for r in routes.values()):
        return {name: column_prompts(columns, prompts) for name, columns in routes.items()}
    return {column: prompts[route] for column, route in routes.items() if prompts[route]}


class MnrlWithMarginMSE(torch.nn.Module):
    """MNRL plus MarginMSE to the teacher's scores (Hofstätter et al. 2020) from one forward pass: the student's
    margins cos(q, positive) − cos(q, negative_i) are matched to the teacher's, both in MNRL's logit units (× its
    scale), the teacher's first rescaled by `teacher_scale` (set by `calibrate_teacher_scale`: e5 cosines crowd into
    0.80–0.95, the student's spread wider). Logged as {"mnrl": …, "margin_mse": …}."""

    def __init__(self, model, mnrl, weight: float):
        from sentence_transformers.sentence_transformer.losses import MarginMSELoss
        from sentence_transformers.util import pairwise_cos_sim

        super().__init__()
        self.model, self.mnrl, self.weight, self.teacher_scale = model, mnrl, weight, 1.0
        self.margin_mse = MarginMSELoss(model, similarity_fct=lambda a, b: mnrl.scale * pairwise_cos_sim(a, b))

    def forward(self, sentence_features, labels):
        from sentence_transformers.base.losses.merged_forward import embed_columns

        embeddings = embed_columns(self.model, sentence_features)
        out = {"mnrl": self.mnrl.compute_loss_from_embeddings(embeddings, labels)}
        if labels is not None:
            targets = labels.to(embeddings[0].dtype) * self.teacher_scale * self.mnrl.scale
            out["margin_mse"] = self.weight * self.margin_mse.compute_loss_from_embeddings(embeddings, targets)
        return out


def calibrate_teacher_scale(model, dataset, rows: int = 256, seed: int = 0) -> float:
    """How much wider the start student's margins cos(anchor, positive) − cos(anchor, negative_1) spread than the
    teacher's on a seeded sample of training rows (ratio of standard deviations): the teacher's temperature."""
    sample = dataset.shuffle(seed=seed).select(range(min(rows, len(dataset))))
    encode = lambda column: (model.encode_query if column == "anchor" else model.encode_document)(
        sample[column], convert_to_tensor=True, normalize_embeddings=True)
    anchor, positive, negative = encode("anchor"), encode("positive"), encode("negative_1")
    student = ((anchor * positive).sum(1) - (anchor * negative).sum(1)).float().cpu().numpy()
    labels = np.asarray(sample["label"], dtype=np.float64)
    teacher = labels[:, 0] - labels[:, 1]
    return float(np.std(student) / max(np.std(teacher), 1e-6))


class LoggedEmbedDistillLoss(EmbedDistillLoss):
    """EmbedDistillLoss returned as {"distill": loss}: the Trainer logs a dict-valued loss under its keys."""

    def forward(self, sentence_features, labels):
        return {"distill": super().forward(sentence_features, labels)}


def with_distillation(model, loss, train_dataset, eval_dataset, teacher_items) -> tuple[dict, dict, dict, dict]:
    """Two datasets and losses, batches drawn in proportion: the contrastive rows, and the items whose student
    embedding (through a learned projection) must point like its teacher vector (EmbedDistillLoss, cosine; logged
    as `distill`)."""
    from datasets import DatasetDict

    distill = LoggedEmbedDistillLoss(model, distance_metric="cosine", projection_dim=len(teacher_items[0]["label"]))
    routes = {"pairs": column_routes(train_dataset.column_names), "distill": {"text": "document"}}
    return (DatasetDict({"pairs": train_dataset, "distill": teacher_items}), DatasetDict({"pairs": eval_dataset}),
            {"pairs": loss, "distill": distill}, routes)


def finetune(start_model: str | Path, train_dataset, eval_dataset, evaluator, output_dir: str | Path,
             config: FinetuneConfig, lookup: tuple[dict, dict] = ({}, {}), callbacks: list | None = None,
             teacher_items=None, start_metrics: dict | None = None) -> tuple[object, list[dict], dict]:
    """Train; save the model with its card under output_dir/model; return it, the log history and run facts.
    `start_metrics`: the evaluator's metrics of the start model, when already computed (the blend's α = 0)."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerModelCardData,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    if config.distill and teacher_items is None:
        raise ValueError("distill=True needs the items' teacher vectors: pass teacher_items (load_inputs(..., teacher_dir))")
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    bf16 = use_bf16(config.bf16)
    checkpoints = Path(output_dir) / "checkpoints"
    key_datasets = {"pairs": train_dataset, "distill": teacher_items} if config.distill else train_dataset
    resume = resumable_checkpoints(checkpoints, checkpoint_key(config, start_model, key_datasets), config.resume)
    # 1. Load the student (domain-adapted or base) with a model card
    card = SentenceTransformerModelCardData(language="en", model_name=config.model_name or None)
    model = SentenceTransformer(str(start_model), device=best_device(), model_card_data=card)
    model.max_seq_length = config.eval_max_seq_length  # evaluation length; training lengths are the collator's
    model_pooling(model)  # a pooling stage 05 could not export stops here, before any training
    # 2. Loss: in-batch negatives plus the hard-negative columns negative_1..k
    loss = build_loss(model, config, distributed)
    teacher_scale = None
    if config.loss == "mnrl+margin_mse":
        if "label" not in train_dataset.column_names:
            raise ValueError("loss='mnrl+margin_mse' needs the teacher's scores of each row: rerun stage 02 with "
                             "teacher_query_scores: true")
        teacher_scale = loss.teacher_scale = calibrate_teacher_scale(model, train_dataset, seed=config.seed)
        print(f"teacher margins × {teacher_scale:.2f} to the start student's spread", flush=True)
    routes = column_routes(train_dataset.column_names)
    if config.distill:
        train_dataset, eval_dataset, loss, routes = with_distillation(model, loss, train_dataset, eval_dataset,
                                                                      teacher_items)
    # 3. Arguments: the method's defaults come from the notebook parameters
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        batch_sampler=batch_sampler(config.batch_sampler, lookup),
        bf16=bf16,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        logging_steps=max(1, config.eval_steps // 5),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        report_to="none",
        use_cpu=best_device() == "cpu",
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if distributed else None),
        seed=config.seed,
        data_seed=config.seed,
        # the distillation projection starts random: it learns at its own pace, the encoder at learning_rate
        learning_rate_mapping={r"^distill\.projection\.": DISTILL_PROJECTION_LR} if config.distill else {},
    )
    # 4. Queries are short: the anchor column gets its own max length (each column is padded on its own)
    collator = SentenceTransformerTrainer.data_collator_class(
        preprocess_fn=model.preprocess,
        router_mapping=routes,
        prompts=column_prompts(routes, model_prompts(model)),  # e5's "query: "/"passage: ", bge's instruction
        max_length={"query": config.query_max_seq_length, "document": config.max_seq_length},
    )
    # 5. Train, evaluating on the dev queries before, during and after; resume from the last checkpoint if allowed
    budget, monitor = TimeBudget(config.max_train_minutes), ResourceMonitor()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, loss=loss,
        evaluator=evaluator if config.ndcg_during_training else None, data_collator=collator,
        callbacks=[*(callbacks or []), budget, monitor],
    )
    load = lambda last: model.load_state_dict(SentenceTransformer(last, device=model.device).state_dict())
    run = train_or_resume(trainer, checkpoints, resume, load, "fine-tuning")
    run["planned_steps_in_budget"] = budget.planned_steps
    run["stopped_by_time_limit_at_step"] = budget.stopped_at_step
    run["resources"] = monitor.summary()
    # 6. Weight averaging with the start model (α chosen on dev), then save the model (with its card), main process only
    if trainer.is_world_process_zero():
        if config.blend_alphas and evaluator is not None and getattr(evaluator, "evaluators", [evaluator]):
            run["blend"] = choose_blend(model, start_model, evaluator, config.blend_alphas, start_metrics)
        elif config.blend_alphas:
            print("no dev evaluator to choose the weight averaging on: the trained weights are shipped (α = 1)")
        model.save(str(Path(output_dir) / "model"))
    history = run.pop("log_history")
    return model, history, {"bf16": bf16, "world_size": args.world_size, "teacher_scale": teacher_scale} | run


def blend_weights(model, start_state: dict, tuned_state: dict, alpha: float) -> None:
    """Load θ = (1 − α)·θ_start + α·θ_tuned into `model` (floating-point tensors; the others from the tuned model)."""
    model.load_state_dict({k: torch.lerp(start_state[k].to(v.dtype), v, alpha) if v.is_floating_point() else v
                           for k, v in tuned_state.items()})


def choose_blend(model, start_model: str | Path, evaluator, alphas: tuple[float, ...],
                 start_metrics: dict | None = None) -> dict:
    """Choose the WiSE-FT blend of the start model and the trained `model` on dev and leave `model` at it. α is
    tried from the largest down and the search stops at the first α that scores below the best so far (the dev
    score over α rises to one peak; each try is a full dev encode). α = 0, the start model, is always a candidate
    (scored from `start_metrics` when given, the start model's dev metrics at the same length), so the result is
    never worse on dev than where training started; ties go to the smaller α. Returns the α, the dev score of each
    α tried and the chosen α's dev metrics."""
    from sentence_transformers import SentenceTransformer

    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = SentenceTransformer(str(start_model), device=model.device).state_dict()
    score = lambda r: round(float(r[evaluator.primary_metric]), 4)
    results, scores = {}, {}
    for alpha in sorted(set(alphas) - {0.0}, reverse=True):
        blend_weights(model, start, tuned, alpha)
        results[alpha] = evaluator(model)
        scores[alpha] = score(results[alpha])
        if scores[alpha] < max(scores.values()):
            break
    blend_weights(model, start, tuned, 0.0)
    results[0.0] = start_metrics if start_metrics is not None else evaluator(model)
    scores[0.0] = score(results[0.0])
    best = max(scores, key=lambda a: (scores[a], -a))
    blend_weights(model, start, tuned, best)
    return {"alpha": best, "dev_by_alpha": dict(sorted(scores.items())), "metric": evaluator.primary_metric,
            "dev_metrics": {k: float(v) for k, v in results[best].items()}}


# --- command line (torchrun) -----------------------------------------------------------------------------------

def config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per FinetuneConfig field, typed from its default."""
    for field in dataclasses.fields(FinetuneConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=field.default)
        elif isinstance(field.default, tuple):
            element = type(field.default[0]) if field.default else int
            parser.add_argument(flag, type=element, nargs="*", default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)


def main(argv: list[str] | None = None) -> None:
    """Stage 04 without the notebook, for torchrun: `torchrun --nproc_per_node=2 -m lib.finetune --run-name dnd-default`."""
    parser = argparse.ArgumentParser(description="Stage 04 (contrastive fine-tuning) of a run, e.g. under torchrun.")
    parser.add_argument("--run-name", required=True, help="run folder under data/runs, e.g. dnd-default")
    parser.add_argument("--runs-root", default=None, help="where runs live (default <repo>/data/runs)")
    parser.add_argument("--start-model", default="", help="default: the run's stage-03 model")
    parser.add_argument("--output-dir", default="", help="default: the run's 04_finetune folder")
    parser.add_argument("--dev-loss-rows", type=int, default=128)
    config_arguments(parser)
    args = parser.parse_args(argv)
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    run = Run(args.run_name, args.runs_root)
    start = resolve_model_path(args.start_model) if args.start_model else run.stage(DOMAIN_ADAPT) / "model"
    out_dir = Path(args.output_dir) if args.output_dir else run.stage(FINETUNE, create=True)
    inputs = load_inputs(run.stage(CORPUS), run.stage(PAIRS), args.dev_loss_rows, config.seed,
                         run.stage(TEACHER) if config.distill else None)
    model, history, facts = finetune(start, inputs.train, inputs.dev, inputs.evaluator, out_dir, config, inputs.lookup,
                                     teacher_items=inputs.teacher_items)
    if is_main_process():
        write_json(out_dir / "log_history.json", history)
        write_json(out_dir / "train_facts.json", facts)
        print(json.dumps(facts), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process ends together, after the main one has saved
        torch.distributed.destroy_process_group()  # no gloo thread left behind to abort the process at exit


if __name__ == "__main__":
    main()
