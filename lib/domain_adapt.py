"""Stage 03: domain pre-training of the student encoder on the domain's background text: MLM (optionally with
next-sentence prediction) through transformers' Trainer, or TSDAE through SentenceTransformerTrainer; resumable."""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from lib.encoders import TorchEncoder
from lib.cpu import best_device
from lib.training import checkpoint_key, resumable_checkpoints, train_or_resume, use_bf16


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


# --- configuration -----------------------------------------------------------------------------------------------

METHODS = ("none", "mlm", "mlm_nsp", "tsdae")


@dataclass
class AdaptConfig:
    """Settings of stage 03 (the notebook's parameters)."""
    method: str = "none"  # none | mlm | mlm_nsp (MLM + next-sentence prediction) | tsdae
    max_seq_length: int = 128  # tokens per packed chunk (MLM) or sentence (TSDAE)
    batch_size: int = 16  # chunks or sentences per step
    mlm_probability: float = 0.15  # share of tokens (or whole words) masked
    whole_word_mask: bool = True  # mask every word piece of a chosen word ("be ##hold ##er"), not single pieces
    head_warmup_steps: int = 30  # first steps train only the untrained MLM (and NSP) head; the encoder is frozen
    head_learning_rate: float = 1e-3  # peak learning rate of the head (it starts random)
    mlm_max_steps: int = 90  # steps after the head warm-up, whole model
    mlm_learning_rate: float = 2e-5  # peak learning rate of the encoder
    tsdae_max_steps: int = 300  # TSDAE steps
    tsdae_learning_rate: float = 3e-5  # the TSDAE paper's learning rate
    tsdae_deletion_ratio: float = 0.6  # share of words deleted from the encoder's input (the paper's best noise)
    warmup_steps: float = 0.1  # a float < 1 is a ratio of the total steps
    heldout_every: int = 15  # steps between held-out measurements (logged as heldout_*)
    save_steps: int = 30  # checkpoint interval (a rerun resumes from the last one)
    bf16: bool = True  # bf16 autocast when the CPU (AVX512-BF16/AMX) or GPU has it
    seed: int = 42
    resume: bool = True  # resume from the last checkpoint of the same configuration and data

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"domain_method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0 < self.tsdae_deletion_ratio < 1:
            raise ValueError(f"tsdae_deletion_ratio must be in (0, 1), got {self.tsdae_deletion_ratio}")
        if min(self.batch_size, self.save_steps, self.heldout_every) < 1 or min(self.head_warmup_steps, self.mlm_max_steps, self.tsdae_max_steps) < 0:
            raise ValueError("batch_size, save_steps and heldout_every must be ≥ 1; step counts ≥ 0")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the chosen method."""
        return {"none": 0, "tsdae": self.tsdae_max_steps}.get(self.method, self.head_warmup_steps + self.mlm_max_steps)


# --- MLM and MLM + NSP --------------------------------------------------------------------------------------------

def tokenize_chunks(chunks: list[str], tokenizer, max_seq_length: int):
    """A datasets.Dataset of the chunks, padded to max_seq_length, with the offsets whole-word masking needs."""
    from datasets import Dataset

    encoded = tokenizer(chunks, truncation=True, max_length=max_seq_length, padding="max_length",
                        return_special_tokens_mask=True, return_offsets_mapping=True)
    return Dataset.from_dict(dict(encoded))


def split_in_two(text: str) -> tuple[str, str]:
    """A chunk cut into two halves on a sentence boundary (on a word boundary when it has one sentence)."""
    parts = split_sentences(text)
    if len(parts) < 2:
        parts = text.split()
    middle = max(1, len(parts) // 2)
    return " ".join(parts[:middle]), " ".join(parts[middle:])


def next_sentence_pairs(chunks: list[str], seed: int) -> list[tuple[str, str, int]]:
    """BERT's NSP examples: (first half, second half, 0) or, for half of them, (first half, another chunk's second
    half, 1)."""
    rng = random.Random(seed)
    halves = [split_in_two(c) for c in chunks]
    pairs = []
    for i, (first, second) in enumerate(halves):
        if len(halves) > 1 and rng.random() < 0.5:
            j = rng.choice([k for k in range(len(halves)) if k != i])
            pairs.append((first, halves[j][1], 1))
        else:
            pairs.append((first, second, 0))
    return pairs


def tokenize_pairs(pairs: list[tuple[str, str, int]], tokenizer, max_seq_length: int):
    """A datasets.Dataset of sentence pairs with their `next_sentence_label`."""
    from datasets import Dataset

    encoded = tokenizer([a for a, _, _ in pairs], [b for _, b, _ in pairs], truncation="longest_first",
                        max_length=max_seq_length, padding="max_length", return_special_tokens_mask=True,
                        return_offsets_mapping=True)
    return Dataset.from_dict(dict(encoded) | {"next_sentence_label": [label for _, _, label in pairs]})


def mlm_collator(tokenizer, mlm_probability: float, whole_word_mask: bool, seed: int):
    """transformers' MLM collator; whole-word masking replaces every chosen word by [MASK] (it has no random swap)."""
    from transformers import DataCollatorForLanguageModeling

    swap = {"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_word_mask else {}
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, whole_word_mask=whole_word_mask,
                                           seed=seed, **swap)


def load_mlm_model(student_path: str | Path, nsp: bool):
    """The student with an MLM head (AutoModelForMaskedLM) or MLM + NSP heads (AutoModelForPreTraining).
    The heads' transform layers start untrained; the MLM decoder is tied to the word embeddings."""
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

    return (AutoModelForPreTraining if nsp else AutoModelForMaskedLM).from_pretrained(str(student_path))


def masked_eval_batches(dataset, collator, batch_size: int) -> list[dict]:
    """The held-out set masked once (seeded collator), so every measurement uses the same masks."""
    rows = [dataset[i] for i in range(len(dataset))]
    return [collator(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def masked_lm_metrics(model, batches: list[dict]) -> dict[str, float]:
    """Perplexity and masked-token accuracy of an MLM (with or without an NSP head) on pre-masked batches."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, total_masked = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}  # the Trainer may have moved the model to a GPU
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"))
        logits = out.logits if hasattr(out, "logits") else out.prediction_logits
        mask = batch["labels"] != -100
        total_loss += float(torch.nn.functional.cross_entropy(logits[mask].float(), batch["labels"][mask], reduction="sum"))
        total_correct += int((logits[mask].argmax(-1) == batch["labels"][mask]).sum())
        total_masked += int(mask.sum())
    model.train(was_training)
    loss = total_loss / max(total_masked, 1)
    return {"perplexity": math.exp(loss), "masked_accuracy": total_correct / max(total_masked, 1), "loss": loss}


@torch.no_grad()
def next_sentence_accuracy(model, batches: list[dict]) -> float:
    """Share of held-out pairs whose is-next / random label the NSP head gets right."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        correct += int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum())
        total += len(batch["next_sentence_label"])
    model.train(was_training)
    return correct / max(total, 1)


def set_encoder_trainable(model, trainable: bool) -> None:
    """Freeze or unfreeze the encoder body (and with it the tied decoder); the heads stay trainable."""
    for param in model.base_model.parameters():
        param.requires_grad = trainable


class HeadWarmup(TrainerCallback):
    """Keeps the encoder frozen for the first `steps` optimizer steps (a resumed run re-freezes as needed)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        set_encoder_trainable(model, state.global_step >= self.steps)


class HeldOutLog(TrainerCallback):
    """Measures held-out metrics every `every` steps (and at `extra_steps`) into the log history as heldout_*."""

    def __init__(self, measure, every: int, extra_steps: tuple[int, ...] = ()):
        self.measure, self.every, self.extra_steps = measure, every, set(extra_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 or step in self.extra_steps or step == state.max_steps:
            state.log_history.append({"step": step} | {f"heldout_{k}": v for k, v in self.measure().items()})


def training_arguments(cls, output_dir: Path, config: AdaptConfig, max_steps: int, learning_rate: float, **extra):
    """Trainer arguments shared by the MLM and TSDAE runs: checkpoints every save_steps, bf16 where fast, seeded."""
    return cls(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=config.batch_size,
               learning_rate=learning_rate, warmup_steps=config.warmup_steps, logging_steps=max(1, max_steps // 40),
               save_strategy="steps", save_steps=config.save_steps, save_total_limit=1, report_to="none",
               use_cpu=best_device() == "cpu", bf16=use_bf16(config.bf16), seed=config.seed,
               data_seed=config.seed, disable_tqdm=False, **extra)


def train_mlm(model, train_dataset, collator, checkpoints: Path, config: AdaptConfig, student_path: str | Path,
              callbacks: list) -> dict:
    """MLM (or MLM + NSP) with transformers' Trainer: the head alone at head_learning_rate for head_warmup_steps, then
    the whole model (encoder at mlm_learning_rate); resumes from the last checkpoint of the same run."""
    from transformers import Trainer, TrainingArguments

    resume = resumable_checkpoints(checkpoints, checkpoint_key(config, student_path, train_dataset), config.resume)
    encoder_ids = {id(p) for p in model.base_model.parameters()}
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    optimizer = torch.optim.AdamW([{"params": head, "lr": config.head_learning_rate},
                                   {"params": list(model.base_model.parameters()), "lr": config.mlm_learning_rate}],
                                  weight_decay=0.01)
    args = training_arguments(TrainingArguments, checkpoints, config, config.total_steps, config.mlm_learning_rate,
                              remove_unused_columns=False)  # the collator needs the offsets for whole-word masks
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                      optimizers=(optimizer, None), callbacks=[HeadWarmup(config.head_warmup_steps), *callbacks])
    load = lambda last: model.load_state_dict(type(model).from_pretrained(last).state_dict())
    return train_or_resume(trainer, checkpoints, resume, load, config.method) | {"bf16": args.bf16}


def save_as_sentence_transformer(mlm_model, base_student: str | Path, output_dir: str | Path) -> None:
    """Put the adapted encoder weights into the student's SentenceTransformer (its own pooling and prompts) and save it."""
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(base_student), device="cpu")
    encoder = student[0].auto_model
    missing, unexpected = encoder.load_state_dict(mlm_model.base_model.state_dict(), strict=False)
    if unexpected or [m for m in missing if not m.startswith("pooler.")]:
        raise RuntimeError(f"adapted encoder does not match the student: missing={missing[:5]} unexpected={unexpected[:5]}")
    student.save(str(output_dir))


# --- TSDAE -------------------------------------------------------------------------------------------------------

def background_sentences(chunks: list[str], min_words: int = 5) -> list[str]:
    """The sentences of the chunks with at least `min_words` words (headings and fragments dropped)."""
    return [s for c in chunks for s in split_sentences(c) if len(s.split()) >= min_words]


def delete_words(text: str, ratio: float, rng: random.Random) -> str:
    """TSDAE's noise: each word deleted with probability `ratio`, at least one word kept."""
    words = text.split()
    kept = [w for w in words if rng.random() >= ratio]
    return " ".join(kept or [rng.choice(words)]) if words else text


def denoising_dataset(sentences: list[str], ratio: float, seed: int):
    """(noisy, text) rows for DenoisingAutoEncoderLoss; the noise is drawn once, seeded, so a resume sees the same rows."""
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict({"noisy": [delete_words(s, ratio, rng) for s in sentences], "text": sentences})


@torch.no_grad()
def denoising_loss(loss, dataset, batch_size: int) -> float:
    """Mean reconstruction loss (cross-entropy per token) of a DenoisingAutoEncoderLoss on (noisy, text) rows."""
    model = loss.encoder
    was_training = model.training
    model.eval(), loss.decoder.eval()
    total, n = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        rows = dataset[i:i + batch_size]
        features = [model.preprocess(rows["noisy"]), model.preprocess(rows["text"])]
        total += float(loss(features, None)) * len(rows["text"])
        n += len(rows["text"])
    model.train(was_training), loss.decoder.train(was_training)
    return total / max(n, 1)


class DecoderCheckpoint(TrainerCallback):
    """Saves the TSDAE decoder (cross-attention and LM head live in the loss, not the model) with each checkpoint and
    restores it on resume."""

    def __init__(self, decoder):
        self.decoder = decoder

    def on_save(self, args, state, control, **kwargs):
        torch.save(self.decoder.state_dict(), Path(args.output_dir) / f"checkpoint-{state.global_step}" / "decoder.pt")

    def on_train_begin(self, args, state, control, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "decoder.pt"
        if state.global_step and saved.is_file():
            self.decoder.load_state_dict(torch.load(saved, weights_only=True))


def tsdae_model(student_path: str | Path, max_seq_length: int):
    """The student SentenceTransformer and its DenoisingAutoEncoderLoss (a decoder tied to the encoder's weights)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

    model = SentenceTransformer(str(student_path), device=best_device())
    model.max_seq_length = max_seq_length
    return model, DenoisingAutoEncoderLoss(model, tie_encoder_decoder=True)


def train_tsdae(model, loss, train_dataset, checkpoints: Path, config: AdaptConfig, student_path: str | Path,
                callbacks: list) -> dict:
    """TSDAE with SentenceTransformerTrainer: the encoder embeds the noisy sentence, the tied decoder rebuilds the
    original from that one vector; resumes from the last checkpoint of the same run."""
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    resume = resumable_checkpoints(checkpoints, checkpoint_key(config, student_path, train_dataset), config.resume)
    args = training_arguments(SentenceTransformerTrainingArguments, checkpoints, config, config.tsdae_max_steps,
                              config.tsdae_learning_rate)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                                         callbacks=[DecoderCheckpoint(loss.decoder), *callbacks])
    load = lambda last: model.load_state_dict(SentenceTransformer(last, device=model.device).state_dict())
    return train_or_resume(trainer, checkpoints, resume, load, "tsdae") | {"bf16": args.bf16}


# --- effect on the sentence embeddings ----------------------------------------------------------------------------

def embedding_drift(before: str | Path, after: str | Path, texts: list[str]) -> float:
    """Mean cosine between the base and the adapted encoder's embeddings of the same texts (1.0 = unchanged)."""
    vectors = [TorchEncoder(path, max_seq_length=None).encode(texts) for path in (before, after)]
    return float((vectors[0] * vectors[1]).sum(axis=1).mean())


def adapt(student_path: Path, tokenizer, train_chunks: list[str], eval_chunks: list[str], config: AdaptConfig,
          model_dir: Path, checkpoints: Path) -> tuple[dict, dict]:
    """Stage 03: train `config.method` on the background chunks and save the encoder as a SentenceTransformer in
    `model_dir` ("none": a copy of the student). Returns the held-out measurements (before, after the MLM head
    warm-up, after) and the run's facts (log history, steps, runtime, bf16)."""
    import shutil

    measures = {}
    run = {"log_history": [], "global_step": 0, "resumed_from_step": 0, "train_runtime_s": None, "bf16": False}
    if config.method in ("mlm", "mlm_nsp"):
        model = load_mlm_model(student_path, config.method == "mlm_nsp")
        collator = mlm_collator(tokenizer, config.mlm_probability, config.whole_word_mask, config.seed)
        heldout_collator = mlm_collator(tokenizer, config.mlm_probability, config.whole_word_mask, config.seed + 1)
        batches = lambda dataset: masked_eval_batches(dataset, heldout_collator, config.batch_size)
        eval_batches = batches(tokenize_chunks(eval_chunks, tokenizer, config.max_seq_length))
        if config.method == "mlm_nsp":
            train_ds = tokenize_pairs(next_sentence_pairs(train_chunks, config.seed), tokenizer, config.max_seq_length)
            nsp_batches = batches(tokenize_pairs(next_sentence_pairs(eval_chunks, config.seed + 1), tokenizer,
                                                 config.max_seq_length))
            measure = lambda: masked_lm_metrics(model, eval_batches) | {
                "nsp_accuracy": next_sentence_accuracy(model, nsp_batches)}
        else:
            train_ds = tokenize_chunks(train_chunks, tokenizer, config.max_seq_length)
            measure = lambda: masked_lm_metrics(model, eval_batches)
        measures["before"] = measure()
        run = train_mlm(model, train_ds, collator, checkpoints, config, student_path,
                        [HeldOutLog(measure, config.heldout_every, (config.head_warmup_steps,))])
        after_warmup = [h for h in run["log_history"] if h.get("step") == config.head_warmup_steps and "heldout_loss" in h]
        if config.head_warmup_steps and after_warmup:
            measures["after head warm-up"] = {k.removeprefix("heldout_"): v for k, v in after_warmup[-1].items()
                                              if k != "step"}
        measures["after"] = measure()
        save_as_sentence_transformer(model, student_path, model_dir)
    elif config.method == "tsdae":
        sentences = background_sentences(train_chunks)
        heldout_ds = denoising_dataset(background_sentences(eval_chunks)[:256], config.tsdae_deletion_ratio, config.seed + 1)
        print(f"TSDAE: {len(sentences)} training sentences, {len(heldout_ds)} held out")
        model, loss = tsdae_model(student_path, config.max_seq_length)
        train_ds = denoising_dataset(sentences, config.tsdae_deletion_ratio, config.seed)
        measure = lambda: {"loss": denoising_loss(loss, heldout_ds, config.batch_size)}
        measures["before"] = measure()
        run = train_tsdae(model, loss, train_ds, checkpoints, config, student_path, [HeldOutLog(measure, config.heldout_every)])
        measures["after"] = measure()
        model.save(str(model_dir))
    else:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(student_path, model_dir)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return measures, run
