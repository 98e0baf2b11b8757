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
# # 07 · Export, parity gate and local search
# **Purpose:** export the fine-tuned student to ONNX (`torch.onnx.export`: transformer + mean pooling +
# normalisation in one graph), quantise it to int8 with `onnxruntime.quantization`, and put every backend —
# torch fp32, torch bf16 (on CPUs with native bf16), ONNX fp32, ONNX int8 — through a **parity gate**: every
# item's cosine to the torch fp32 embedding at least `parity_min_cosine`, and NDCG@10 on the evaluation
# queries within `parity_max_ndcg_delta` of torch fp32. The fastest backend that passes becomes the default of
# the saved `Retriever` index that `python -m lib.search` uses.
#
# **Reads:** `04_finetune/model/`, `00_corpus/items.jsonl`, `00_corpus/queries.jsonl` (test split).
# **Writes:** `07_export/model.onnx`, `model-int8.onnx`, `tokenizer/`, `index/` (the saved Retriever),
# `bench.json`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
eval_max_seq_length: int = 256  # tokens per text when encoding
parity_min_cosine: float = 0.99  # gate: every item's cosine to torch fp32 must reach this
parity_max_ndcg_delta: float = 0.005  # gate: largest allowed change in NDCG@10 on the test queries
int8_keep_fp32: str = r"layer\.\d+/output/dense/"  # regex of MatMul names int8 leaves in fp32 (empty: quantise all)
hnsw_threshold: int = 50000  # the Retriever switches from exact numpy search to faiss HNSW at this many items
example_queries: list = ["a creature that turns people to stone", "a spell that brings the dead back to life"]  # shown with results
# %%
import time

import pandas as pd

from lib import corpus, evaluate, export
from lib.bench import machine
from lib.io import write_json, write_metrics
from lib.paths import stage_dir
from lib.search import Retriever

model_dir = stage_dir(run_name, "04_finetune", runs_root or None) / "model"
out_dir = stage_dir(run_name, "07_export", runs_root or None, create=True)
corpus_dir = stage_dir(run_name, "00_corpus", runs_root or None)
items = corpus.load_items(corpus_dir)
queries = corpus.load_queries(corpus_dir, split="test")
item_texts, query_texts = [i["text"] for i in items], [q["text"] for q in queries]

# %% [markdown]
# ## Export and quantise

# %%
export.export_onnx(model_dir, out_dir / "model.onnx")
kept_fp32 = export.quantize_int8(out_dir / "model.onnx", out_dir / "model-int8.onnx", keep_fp32=int8_keep_fp32)
print(f"int8: {len(kept_fp32)} MatMuls kept in fp32; 7-bit weights (for CPUs without VNNI): {not export.has_vnni()}")

# %% [markdown]
# ## Parity gate: every backend against torch fp32, on the items and on the evaluation queries

# %%
backends = [b for b in export.BACKENDS if b != "torch-bf16" or export.bf16_supported()]
skipped = {} if "torch-bf16" in backends else {"torch-bf16": "CPU has no native bf16 (avx512_bf16 / amx_bf16)"}
item_vectors, rows = {}, {}
for backend in backends:
    encoder = export.load_encoder(backend, model_dir, out_dir, eval_max_seq_length)
    encoder.encode(item_texts[:32])  # warm-up
    start = time.perf_counter()
    item_vectors[backend] = encoder.encode(item_texts)
    seconds = time.perf_counter() - start
    scores = evaluate.dense_scores(encoder.encode(query_texts), item_vectors[backend])
    rows[backend] = {**export.parity(item_vectors["torch-fp32"], item_vectors[backend]),
                     "ndcg@10": float(evaluate.evaluate_scores(backend, scores, queries, items)["ndcg@10"].mean()),
                     "items_per_second": len(items) / seconds}
gate = pd.DataFrame(rows).T
gate["ndcg_delta"] = gate["ndcg@10"] - gate.loc["torch-fp32", "ndcg@10"]
gate["speed_vs_torch_fp32"] = gate["items_per_second"] / gate.loc["torch-fp32", "items_per_second"]
gate["failed"] = [", ".join(export.parity_gate(r.min_cosine, r.ndcg_delta, parity_min_cosine, parity_max_ndcg_delta))
                  for r in gate.itertuples()]
passing = gate[gate["failed"] == ""]
default_backend = str(passing["items_per_second"].idxmax())
if gate.loc["onnx-fp32", "min_cosine"] < 0.999:
    raise AssertionError(f"the fp32 ONNX export disagrees with torch: min cosine {gate.loc['onnx-fp32', 'min_cosine']:.5f}")
print(f"default backend: {default_backend} (the fastest that passes); skipped: {skipped or 'none'}")
gate.round(4)

# %% [markdown]
# ## The Retriever: saved index, search with the default backend

# %%
retriever = Retriever(export.load_encoder(default_backend, model_dir, out_dir, eval_max_seq_length), hnsw_threshold)
retriever.set_vectors(items, item_vectors[default_backend])
retriever.save(out_dir / "index", {"backend": default_backend, "model_dir": model_dir, "export_dir": out_dir})
item_types = sorted({i["type"] for i in items})
for query in example_queries:
    for types in [None] + ([[t] for t in item_types] if len(item_types) > 1 else []):
        hits = retriever.retrieve(query, top_k=3, types=types)
        print(f"{query!r} in {types or 'all'}: " + "; ".join(f"{h['name']} ({h['score']:.2f})" for h in hits))

# %%
self_hits = sum(hits[0]["id"] == item["id"] for hits, item in
                zip(retriever.retrieve_many(item_texts[:100], top_k=1), items[:100]))
bench = {b: {"items_per_second": round(float(gate.loc[b, "items_per_second"]), 1)} for b in gate.index}
write_json(out_dir / "bench.json", bench)
metrics = {
    "backends": {b: {"min_cosine": round(float(r["min_cosine"]), 5), "mean_cosine": round(float(r["mean_cosine"]), 5),
                     "ndcg@10": round(float(r["ndcg@10"]), 4), "ndcg_delta": round(float(r["ndcg_delta"]), 4),
                     "items_per_second": round(float(r["items_per_second"]), 1),
                     "speed_vs_torch_fp32": round(float(r["speed_vs_torch_fp32"]), 2),
                     "passed": not r["failed"], "failed": r["failed"]} for b, r in gate.iterrows()},
    "skipped_backends": skipped,
    "default_backend": default_backend,
    "machine": machine(),  # the speed figures above are this machine's (CPU model, ISA flags, cores, libraries)
    "gate": {"min_cosine": parity_min_cosine, "max_ndcg_delta": parity_max_ndcg_delta, "queries": len(queries)},
    "int8_fp32_matmuls": len(kept_fp32),
    "self_retrieval_at_1": self_hits / min(100, len(items)),
}
write_metrics(out_dir, metrics)
metrics
