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
# # 03 · Domain pre-training (MLM, MLM + NSP or TSDAE)
# **Purpose:** teach the student encoder the domain's language before contrastive training, with one of
# - **`mlm`**: masked-language modelling (`AutoModelForMaskedLM` + transformers `Trainer` +
#   `DataCollatorForLanguageModeling`, whole-word masking by default) on background chunks packed on sentence boundaries;
# - **`mlm_nsp`**: MLM plus BERT's next-sentence prediction (`AutoModelForPreTraining`): each chunk is cut in two and,
#   for half of them, the second half is swapped for another chunk's;
# - **`tsdae`**: sentence-transformers' `DenoisingAutoEncoderLoss`: the encoder embeds a sentence with 60 % of its
#   words deleted and a decoder tied to the encoder rebuilds the sentence from that single vector;
# - **`none`**: the base student passes on unchanged.
#
# No BERT with a pretrained MLM head ships here, so the MLM (and NSP) head starts untrained: for the first
# `head_warmup_steps` only the head learns (encoder frozen), then the whole model. The held-out curves below show the
# effect. `make ablation-domain` runs stages 03, 04 and 06 for every method and picks the default.
#
# **Reads:** `00_corpus/background/*.md` (+ `background_dir` if given). **Writes:** `03_domain_adapt/model/`
# (a SentenceTransformer: adapted encoder + the student's own pooling and prompts), `checkpoints/` (while training),
# `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
base_model: str = "all-MiniLM-L6-v2"  # the student: bundled all-MiniLM-L6-v2, or a SentenceTransformer folder
domain_method: str = "none"  # none | mlm | mlm_nsp | tsdae; none won `make ablation-domain` on the dev queries (README)
background_dir: str = ""  # extra folder of .md files, e.g. the SRD 5.1 wiki's markdown pages
mlm_max_seq_length: int = 128  # tokens per packed background chunk (and per TSDAE sentence)
mlm_probability: float = 0.15  # share of tokens masked
whole_word_mask: bool = True  # mask all pieces of a chosen word ("be ##hold ##er") instead of single pieces
head_warmup_steps: int = 30  # MLM/NSP: steps training only the untrained head (encoder frozen)
head_learning_rate: float = 1e-3  # MLM/NSP: the head's peak learning rate
mlm_max_steps: int = 90  # MLM/NSP: steps training the whole model after the warm-up
mlm_batch_size: int = 16  # chunks (or TSDAE sentences) per step
mlm_learning_rate: float = 2e-5  # MLM/NSP: the encoder's peak learning rate
tsdae_max_steps: int = 300  # TSDAE: steps
tsdae_learning_rate: float = 3e-5  # TSDAE: peak learning rate
tsdae_deletion_ratio: float = 0.6  # TSDAE: share of words deleted from the input
mlm_warmup_steps: float = 0.1  # a float < 1 is a ratio of the total steps
mlm_eval_fraction: float = 0.1  # share of chunks held out for the before/after measurements
heldout_every: int = 15  # steps between held-out measurements during training
domain_save_steps: int = 30  # checkpoint interval; a rerun after an interruption resumes from the last checkpoint
domain_bf16: bool = True  # bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU has it (stage 04: bf16)
max_chunks: int = 0  # cap on background chunks (0 for all)
seed: int = 42  # seeds the split, the masks, the noise and training
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import DOMAIN_ADAPT
from lib.pipeline import lab_parameters

globals().update(lab_parameters(DOMAIN_ADAPT))

# %%
import pandas as pd
from transformers import AutoTokenizer, set_seed

from lib import corpus, domain_adapt, training
from lib.facts import DomainAdaptFacts
from lib.io import write_metrics
from lib.paths import CORPUS, Run, resolve_model_path
from lib.plots import line_plot

config = domain_adapt.AdaptConfig(
    method=domain_method, max_seq_length=mlm_max_seq_length, batch_size=mlm_batch_size, mlm_probability=mlm_probability,
    whole_word_mask=whole_word_mask, head_warmup_steps=head_warmup_steps, head_learning_rate=head_learning_rate,
    mlm_max_steps=mlm_max_steps, mlm_learning_rate=mlm_learning_rate, tsdae_max_steps=tsdae_max_steps,
    tsdae_learning_rate=tsdae_learning_rate, tsdae_deletion_ratio=tsdae_deletion_ratio, warmup_steps=mlm_warmup_steps,
    heldout_every=heldout_every, save_steps=domain_save_steps, bf16=domain_bf16, seed=seed)
set_seed(seed)
run = Run(run_name, runs_root)
corpus_dir = run.stage(CORPUS)
out_dir = run.stage(DOMAIN_ADAPT, create=True)
model_dir, checkpoints = out_dir / "model", out_dir / "checkpoints"
student_path = resolve_model_path(base_model)
tokenizer = AutoTokenizer.from_pretrained(str(student_path))

# %% [markdown]
# ## 1. Background text → packed chunks

# %%
docs = corpus.load_background(corpus_dir, background_dir or None)
texts = [domain_adapt.markdown_to_text(t) for t in docs.values()]
chunks = domain_adapt.pack_chunks(texts, tokenizer, mlm_max_seq_length - 3)
if max_chunks:
    chunks = chunks[:max_chunks]
train_chunks, eval_chunks = domain_adapt.split_chunks(chunks, mlm_eval_fraction, seed)
print(f"{len(docs)} background files, {sum(map(len, texts)):,} characters → {len(chunks)} chunks "
      f"({len(train_chunks)} train, {len(eval_chunks)} held out) · method {domain_method}, "
      f"bf16 {training.use_bf16(domain_bf16)}")
print(train_chunks[0][:400])

# %% [markdown]
# ## 2. Training
# MLM / MLM + NSP: held-out perplexity and masked-token accuracy on fixed masks before training, after the head
# warm-up and at the end (NSP: held-out is-next accuracy too). TSDAE: held-out reconstruction loss (cross-entropy per
# token of the original sentence given the embedding of its noisy copy) before and after.

# %%
measures, trained = domain_adapt.adapt(student_path, tokenizer, train_chunks, eval_chunks, config, model_dir, checkpoints)
if measures:
    display(pd.DataFrame(measures).T.round(4))

# %% [markdown]
# ## 3. Curves: training loss and held-out measurements
# For MLM the dashed line marks where the encoder is unfrozen: before it only the head learns, so the held-out
# perplexity falls from the random head's level without the head's random gradients reaching the encoder.

# %%
history = trained["log_history"]
steps, losses = training.loss_curve(history)
if steps:
    line_plot(steps, losses, f"{domain_method}: training loss", "step", "loss");
key = "heldout_perplexity" if domain_method.startswith("mlm") else "heldout_loss"
held_steps, held_values = training.loss_curve(history, key)
if held_steps:
    name = key.removeprefix("heldout_")
    ax = line_plot([0] + held_steps, [measures["before"][name]] + held_values, f"{domain_method}: held-out {name}",
                   "step", name).axes[0]
    if domain_method.startswith("mlm") and head_warmup_steps:
        ax.axvline(head_warmup_steps, ls="--", color="grey")
    if domain_method.startswith("mlm"):
        ax.set_yscale("log")

# %% [markdown]
# ## 4. How far the sentence embeddings moved
# Mean cosine between the base student's and the adapted encoder's embeddings of the held-out chunks (1.0 = unchanged).

# %%
drift = domain_adapt.embedding_drift(student_path, model_dir, eval_chunks)
print(f"mean cosine(base, adapted) on {len(eval_chunks)} held-out chunks: {drift:.3f}")

# %%
metrics = DomainAdaptFacts(
    domain_method=domain_method,
    whole_word_mask=whole_word_mask if domain_method.startswith("mlm") else None,
    chunks_train=len(train_chunks),
    chunks_heldout=len(eval_chunks),
    heldout=measures,
    embedding_cosine_to_base=drift,
    steps=trained["global_step"],
    resumed_from_step=trained["resumed_from_step"],
    train_runtime_s=trained["train_runtime_s"],
    bf16=trained["bf16"],
).as_metrics()
write_metrics(out_dir, metrics)
metrics
