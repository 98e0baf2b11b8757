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
# # 05 · Export, parity gate and local search
# **Purpose:** export the fine-tuned student to ONNX (`torch.onnx.export`: transformer + mean pooling +
# normalisation in one graph), quantise it to int8 with `onnxruntime.quantization`, and put every backend —
# torch fp32, torch bf16 (on CPUs with native bf16), ONNX fp32, ONNX int8 — through a **parity gate**: every
# item's cosine to the torch fp32 embedding at least `parity_min_cosine`, and NDCG@10 on the evaluation
# queries within `parity_max_ndcg_delta` of torch fp32. The fastest backend that passes becomes the default of
# the saved `Retriever` index that `python -m lib.search` and `python -m lib.serve` use. The index's default search
# (dense, BM25, or the hybrid of both by RRF or by a weighted sum of normalised scores) is the one with the best
# NDCG@10 on the **dev** queries; its test figure is shown beside, never used to choose. A corpus of more than
# `parity_max_items` items is gated on a sample (by type, with every item a query needs) and then encoded once with
# the chosen backend — by `encode_devices` worker processes in saved shards when given (a rerun resumes).
#
# **Reads:** `04_finetune/model/`, `00_corpus/items.jsonl`, `00_corpus/queries.jsonl` (dev and test splits).
# **Writes:** `05_export/model.onnx`, `model-int8.onnx`, `tokenizer/`, `index/` (the saved Retriever),
# `bench.json`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
eval_max_seq_length: int = 256  # tokens per text when encoding
parity_min_cosine: float = 0.99  # gate: every item's cosine to torch fp32 must reach this
parity_max_ndcg_delta: float = 0.005  # gate: largest allowed change in NDCG@10 on the test queries
int8_keep_fp32: str = r"layer\.\d+/output/dense/"  # regex of MatMul names int8 leaves in fp32 (empty: quantise all)
hnsw_threshold: int = 50000  # the Retriever switches from exact numpy search to faiss HNSW at this many items
search_mode: str = "auto"  # the index's default search: auto (the best on dev), dense, bm25 or hybrid
rrf_k: int = 60  # reciprocal rank fusion constant of the hybrid system
fusion_dense_weights: list = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # weighted hybrids compared on dev
base_model: str = "all-MiniLM-L6-v2"  # the student the run started from, named on a release's model card
model_license: str = "apache-2.0"  # the model card's licence (all-MiniLM-L6-v2's; set yours for another base model)
data_license: str = "not stated"  # the corpus's licence, as a release's model card states it
parity_max_items: int = 20000  # items every backend encodes for the parity gate; above it a sample by type plus every item a query needs
encode_devices: list = []  # worker processes that encode the whole corpus for the index, one per device (e.g. cpu, cpu or cuda:0, cuda:1), in saved shards; empty: this process
seed: int = 42  # seeds the parity sample of a large corpus
matryoshka_dims: list = []  # the sizes stage 04 trained with MatryoshkaLoss: the server's `dimensions` may ask for them
index_dimensions: int = 0  # store the index's vectors cut to this size, one of matryoshka_dims (0: the full width)
example_queries: list = ["a creature that turns people to stone", "a spell that brings the dead back to life"]  # shown with results
# %%
# Opened in JupyterLab rather than run by `make`? Then the run's own parameters replace the cell above (DOMAIN,
# PROFILE and DATA as `make lab` was given them), and the run is held as `make` holds it. Under `make`: nothing.
from lib.paths import EXPORT
from lib.pipeline import lab_parameters

globals().update(lab_parameters(EXPORT))

# %%
import shutil

from lib import corpus, cpu, encoders, evaluate, export
from lib.facts import ExportFacts
from lib.provenance import machine
from lib.io import write_json, write_metrics
from lib.paths import CORPUS, Run
from lib.search import Retriever, truncate

export.check_index_dimensions(index_dimensions, matryoshka_dims)
run = Run(run_name, runs_root)
model_dir = run.model
out_dir = run.stage(EXPORT, create=True)
corpus_dir = run.stage(CORPUS)
items = corpus.load_items(corpus_dir)
queries = corpus.load_queries(corpus_dir, split="test")
headline_queries = {split: [q for q in qs if q["category"] in evaluate.headline_categories(qs)]
                    for split, qs in {"dev": corpus.load_queries(corpus_dir, split="dev"), "test": queries}.items()}

# %% [markdown]
# ## Export and quantise

# %%
export.export_onnx(model_dir, out_dir / "model.onnx")
kept_fp32 = export.quantize_int8(out_dir / "model.onnx", out_dir / "model-int8.onnx", keep_fp32=int8_keep_fp32)
print(f"int8: {len(kept_fp32)} MatMuls kept in fp32; 7-bit weights (for CPUs without VNNI): {not cpu.has_vnni()}")

# %% [markdown]
# ## Parity gate: every backend against torch fp32, on the items and on the evaluation queries

# %%
parity_items = export.parity_items(items, queries, parity_max_items, seed)
if len(parity_items) < len(items):
    print(f"parity gate on {len(parity_items):,} of {len(items):,} items (a sample by type, with every item a query needs)")
gate, item_vectors = export.parity_table(model_dir, out_dir, parity_items, queries, eval_max_seq_length, parity_min_cosine,
                                         parity_max_ndcg_delta)
default_backend, skipped = export.fastest_passing(gate), encoders.native_backends()[1]
print(f"default backend: {default_backend} (the fastest that passes); skipped: {skipped or 'none'}")
gate.round(4)

# %% [markdown]
# ## The Retriever's default search, chosen on the dev queries
# NDCG@10 of each search setting on the dev queries (the choice) and on the test queries (shown, not used), each query
# among its own candidates as stage 06 scores it; stage 06's hybrid is the RRF row with torch fp32.

# %%
retriever = Retriever(encoders.load_encoder(default_backend, model_dir, out_dir, eval_max_seq_length), hnsw_threshold,
                      rrf_k=rrf_k)
corpus_vectors = export.corpus_vectors(retriever.encoder, default_backend, model_dir, out_dir, items, item_vectors,
                                       parity_items, encode_devices, eval_max_seq_length)
retriever.set_vectors(items, truncate(corpus_vectors, index_dimensions) if index_dimensions else corpus_vectors)
settings = export.search_settings_table(retriever, headline_queries, items, fusion_dense_weights)
if search_mode != "auto":
    chosen = {"mode": search_mode, "fusion": "rrf", "dense_weight": 0.5}
elif headline_queries["dev"]:
    chosen = export.best_search_setting(settings, "dev")
else:
    chosen = {"mode": "hybrid", "fusion": "rrf", "dense_weight": 0.5}
    print("no dev queries: the default is the hybrid by RRF")
retriever.set_mode(**chosen, rrf_k=rrf_k)
print(f"default search: {chosen} ({'set by search_mode' if search_mode != 'auto' else 'best NDCG@10 on dev'})")
settings.round(4)

# %% [markdown]
# ## The saved index, searched with its defaults

# %%
retriever.save(out_dir / "index", {"backend": default_backend, "model_dir": model_dir, "export_dir": out_dir,
                                   "max_seq_length": eval_max_seq_length,
                                   **({"dimensions": export.served_dimensions(matryoshka_dims, corpus_vectors.shape[1])}
                                      if matryoshka_dims else {})})
shutil.rmtree(out_dir / export.ITEM_SHARDS, ignore_errors=True)  # merged into the index: no longer needed to resume
retriever.show_examples(example_queries)

# %%
self_hits = retriever.self_retrieval(items[:100])
write_json(out_dir / "bench.json", {b: {"items_per_second": round(float(gate.loc[b, "items_per_second"]), 1)} for b in gate.index})
exported = ExportFacts(  # what serving, releases, the report and the benchmarks read
    backends=export.gate_summary(gate),
    default_backend=default_backend,
    skipped_backends=skipped,
    machine=machine(),  # the speed figures above are this machine's (CPU model, ISA flags, cores, libraries)
    model_card={"base_model": base_model, "model_license": model_license, "data_license": data_license},
)
metrics = {
    **exported.as_metrics(),
    "gate": {"min_cosine": parity_min_cosine, "max_ndcg_delta": parity_max_ndcg_delta, "queries": len(queries)},
    "int8_fp32_matmuls": len(kept_fp32),
    "self_retrieval_at_1": self_hits,
    "search": {**retriever.settings(), "chosen_on": "dev" if search_mode == "auto" and headline_queries["dev"] else "parameter",
               "queries": {split: len(qs) for split, qs in headline_queries.items()},
               "settings": settings.round(4).to_dict(orient="records")},
}
write_metrics(out_dir, metrics)
metrics
