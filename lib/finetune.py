"""Stage 04: contrastive fine-tuning of the student with MultipleNegativesRankingLoss (SentenceTransformerTrainer)."""
from __future__ import annotations

from pathlib import Path


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
    """InformationRetrievalEvaluators over `items` for `queries`, one per target-type group, run in sequence."""
    from sentence_transformers.base.evaluation.sequential import SequentialEvaluator
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    groups: dict[tuple, list[dict]] = {}
    for q in queries:
        groups.setdefault(tuple(q.get("meta", {}).get("target_types") or ()), []).append(q)
    evaluators = []
    for types, group in sorted(groups.items()):
        corpus = {i["id"]: i["text"] for i in items if not types or i["type"] in types}
        evaluators.append(InformationRetrievalEvaluator(
            queries={q["qid"]: q["text"] for q in group},
            corpus=corpus,
            relevant_docs={q["qid"]: set(q["relevant"]) for q in group},
            name=f"{name}-{'-'.join(types) or 'all'}",
            ndcg_at_k=[5, 10], precision_recall_at_k=[1, 3, 5, 10], write_csv=False,
        ))
    return SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))


def finetune(
    model_path: str | Path,
    train_dataset,
    eval_dataset,
    evaluator,
    output_dir: str | Path,
    num_train_epochs: int,
    per_device_train_batch_size: int,
    learning_rate: float,
    warmup_steps: float,
    max_seq_length: int,
    seed: int,
    max_steps: int = -1,
    eval_steps: int = 50,
    model_name: str = "",
) -> tuple[object, list[dict]]:
    """Train with MNRL (no duplicate texts in a batch); save the model with its card; return it and the log history."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerModelCardData,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    # 1. Load the student (domain-adapted or base) with a model card
    card = SentenceTransformerModelCardData(language="en", model_name=model_name or None)
    model = SentenceTransformer(str(model_path), device="cpu", model_card_data=card)
    model.max_seq_length = max_seq_length
    # 2. Loss: in-batch negatives plus the hard-negative columns negative_1..k
    loss = MultipleNegativesRankingLoss(model)
    # 3. Arguments: the method's defaults come from the notebook parameters
    args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(output_dir) / "checkpoints"),
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_train_batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        eval_strategy="steps",
        eval_steps=eval_steps,
        logging_steps=max(1, eval_steps // 5),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        report_to="none",
        use_cpu=True,
        seed=seed,
        data_seed=seed,
    )
    # 4. Train, evaluating on the dev queries before, during and after
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, loss=loss, evaluator=evaluator,
    )
    trainer.train()
    # 5. Save the final model (with its model card)
    model.save(str(Path(output_dir) / "model"))
    return model, trainer.state.log_history


def loss_curve(log_history: list[dict]) -> tuple[list[int], list[float]]:
    """(step, training loss) points from a Trainer log history."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    return [s for s, _ in points], [l for _, l in points]
