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
# # 03 · Domain adaptation (masked-language modelling)
# **Purpose:** teach the student encoder the domain's vocabulary before contrastive training:
# MLM with `AutoModelForMaskedLM` + transformers `Trainer` + `DataCollatorForLanguageModeling` on the
# background markdown (SRD rules, features, conditions, traits, magic items). No BERT with a pretrained MLM
# head ships here, so the head's transform layer starts untrained (its decoder is tied to the word
# embeddings): a short head-only warm-up runs first, then the whole model trains.
# Held-out perplexity and masked-token accuracy are measured before and after on the same masks.
#
# **Reads:** `00_corpus/background/*.md` (+ `background_dir` if given). **Writes:** `03_domain_adapt/model/`
# (a SentenceTransformer: adapted encoder + mean pooling + normalisation), `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student: bundled all-MiniLM-L6-v2, or a SentenceTransformer folder
adapt_domain: bool = True  # False skips MLM and pass the base student on unchanged
background_dir: str = ""  # extra folder of .md files, e.g. ../shared/data/dnd-srd51-wiki-markdown
mlm_max_seq_length: int = 128  # tokens per packed background chunk
mlm_probability: float = 0.15  # share of tokens masked
head_warmup_steps: int = 30  # steps training only the MLM head (encoder frozen)
mlm_max_steps: int = 90  # steps training the whole model
mlm_batch_size: int = 16  # chunks per step
mlm_learning_rate: float = 2e-5  # AdamW peak learning rate (full model)
mlm_warmup_steps: float = 0.1  # a float < 1 is a ratio of the total steps
mlm_eval_fraction: float = 0.1  # share of chunks held out for perplexity
max_chunks: int = 0  # cap on background chunks (0 for all)
seed: int = 42  # seeds the split, the masks and training
# %%
import shutil

import pandas as pd
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, set_seed

from lib import corpus, domain_adapt
from lib.io import write_json
from lib.paths import resolve_model_path, stage_dir

set_seed(seed)
corpus_dir = stage_dir(run_name, "00_corpus", runs_root or None)
out_dir = stage_dir(run_name, "03_domain_adapt", runs_root or None, create=True)
student_path = resolve_model_path(base_model)
tokenizer = AutoTokenizer.from_pretrained(str(student_path))

# %% [markdown]
# ## 1. Background text → packed chunks

# %%
docs = corpus.load_background(corpus_dir, background_dir or None)
texts = [domain_adapt.markdown_to_text(t) for t in docs.values()]
chunks = domain_adapt.pack_chunks(texts, tokenizer, mlm_max_seq_length - 2)
if max_chunks:
    chunks = chunks[:max_chunks]
train_chunks, eval_chunks = domain_adapt.split_chunks(chunks, mlm_eval_fraction, seed)
print(f"{len(docs)} background files, {sum(map(len, texts)):,} characters → {len(chunks)} chunks "
      f"({len(train_chunks)} train, {len(eval_chunks)} held out)")
print(train_chunks[0][:400])

# %% [markdown]
# ## 2. MLM: head warm-up, then the whole model

# %%
model_dir = out_dir / "model"
if adapt_domain:
    model = AutoModelForMaskedLM.from_pretrained(str(student_path))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    train_ds = domain_adapt.tokenize_chunks(train_chunks, tokenizer, mlm_max_seq_length)
    eval_batches = domain_adapt.masked_eval_batches(
        domain_adapt.tokenize_chunks(eval_chunks, tokenizer, mlm_max_seq_length),
        DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed + 1),
        mlm_batch_size)
    before = domain_adapt.masked_lm_metrics(model, eval_batches)
    history = []
    if head_warmup_steps:
        domain_adapt.set_encoder_trainable(model, False)
        history += domain_adapt.train_mlm(model, tokenizer, train_ds, collator, out_dir / "checkpoints",
                                          head_warmup_steps, mlm_batch_size, 1e-3, 0.0, seed)
        domain_adapt.set_encoder_trainable(model, True)
    after_warmup = domain_adapt.masked_lm_metrics(model, eval_batches)
    history += domain_adapt.train_mlm(model, tokenizer, train_ds, collator, out_dir / "checkpoints",
                                      mlm_max_steps, mlm_batch_size, mlm_learning_rate, mlm_warmup_steps, seed)
    after = domain_adapt.masked_lm_metrics(model, eval_batches)
    domain_adapt.save_as_sentence_transformer(model, student_path, model_dir)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    display(pd.DataFrame({"before": before, "after head warm-up": after_warmup, "after MLM": after}).T)
else:
    shutil.copytree(student_path, model_dir, dirs_exist_ok=True)
    before = after_warmup = after = {}
    history = []

# %%
from lib.plots import line_plot

losses = [(i, h["loss"]) for i, h in enumerate(history) if "loss" in h]
if losses:
    line_plot([i for i, _ in losses], [l for _, l in losses], "MLM training loss (warm-up, then full model)",
              "log step", "loss");

# %%
metrics = {
    "adapt_domain": adapt_domain,
    "chunks_train": len(train_chunks),
    "chunks_heldout": len(eval_chunks),
    "perplexity_before": before.get("perplexity"),
    "perplexity_after_head_warmup": after_warmup.get("perplexity"),
    "perplexity_after": after.get("perplexity"),
    "masked_accuracy_before": before.get("masked_accuracy"),
    "masked_accuracy_after": after.get("masked_accuracy"),
    "steps": head_warmup_steps + mlm_max_steps if adapt_domain else 0,
}
write_json(out_dir / "metrics.json", metrics)
metrics
