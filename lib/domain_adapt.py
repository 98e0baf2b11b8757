"""Stage 03: masked-language-model pre-training of the student encoder on the domain's background text."""
from __future__ import annotations

import math
import random
import re
from pathlib import Path

import torch


def markdown_to_text(markdown: str) -> str:
    """Markdown cleaned to plain prose: no tables, heading marks, emphasis, links or list bullets."""
    lines = []
    for line in markdown.splitlines():
        if line.lstrip().startswith("|"):
            continue  # tables read badly as prose
        line = re.sub(r"^\s*#+\s*", "", line)
        line = re.sub(r"^\s*[-*+]\s+", "", line)
        line = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", line)
        line = re.sub(r"[*_`]{1,3}", "", line)
        lines.append(line.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_sentences(text: str) -> list[str]:
    """Sentences and heading lines of a text."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


def pack_chunks(texts: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Greedily pack sentences into chunks of at most `max_tokens` tokens, never cutting a sentence
    (a sentence longer than the limit becomes its own chunk and is truncated later)."""
    chunks: list[str] = []
    for text in texts:
        current, size = [], 0
        for sentence in split_sentences(text):
            n = len(tokenizer.tokenize(sentence))
            if current and size + n > max_tokens:
                chunks.append(" ".join(current))
                current, size = [], 0
            current.append(sentence)
            size += n
        if current:
            chunks.append(" ".join(current))
    return chunks


def split_chunks(chunks: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train / held-out split of the chunks."""
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(chunks) * eval_fraction))
    return [chunks[i] for i in order[n_eval:]], [chunks[i] for i in order[:n_eval]]


def tokenize_chunks(chunks: list[str], tokenizer, max_seq_length: int):
    """A datasets.Dataset of input_ids/attention_mask for the chunks."""
    from datasets import Dataset

    encoded = tokenizer(chunks, truncation=True, max_length=max_seq_length, return_special_tokens_mask=True)
    return Dataset.from_dict(dict(encoded))


def masked_eval_batches(dataset, collator, batch_size: int) -> list[dict]:
    """The held-out set masked once (seeded collator), so before/after perplexities use the same masks."""
    rows = [dataset[i] for i in range(len(dataset))]
    return [collator(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def masked_lm_metrics(model, batches: list[dict]) -> dict[str, float]:
    """Perplexity and masked-token accuracy of an MLM on pre-masked batches."""
    model.eval()
    total_loss, total_correct, total_masked = 0.0, 0, 0
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        mask = batch["labels"] != -100
        n = int(mask.sum())
        total_loss += float(out.loss) * n
        total_correct += int((out.logits.argmax(-1)[mask] == batch["labels"][mask]).sum())
        total_masked += n
    loss = total_loss / max(total_masked, 1)
    return {"perplexity": math.exp(loss), "masked_accuracy": total_correct / max(total_masked, 1), "loss": loss}


def set_encoder_trainable(model, trainable: bool) -> None:
    """Freeze or unfreeze the encoder body; the MLM head stays trainable."""
    for param in model.base_model.parameters():
        param.requires_grad = trainable


def train_mlm(model, tokenizer, train_dataset, collator, output_dir: str | Path, max_steps: int,
              per_device_train_batch_size: int, learning_rate: float, warmup_steps: float, seed: int) -> list[dict]:
    """One transformers Trainer run of masked-language modelling; returns its log history."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=0.01,
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
    trainer.train()
    return trainer.state.log_history


def save_as_sentence_transformer(mlm_model, base_student: str | Path, output_dir: str | Path) -> None:
    """Put the adapted encoder weights into the student's SentenceTransformer (mean pooling + normalise) and save it."""
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(base_student), device="cpu")
    encoder = student[0].auto_model
    missing, unexpected = encoder.load_state_dict(mlm_model.base_model.state_dict(), strict=False)
    if unexpected or [m for m in missing if not m.startswith("pooler.")]:
        raise RuntimeError(f"adapted encoder does not match the student: missing={missing[:5]} unexpected={unexpected[:5]}")
    student.save(str(output_dir))
