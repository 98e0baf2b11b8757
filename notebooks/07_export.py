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
# # 07 · Export and local search
# **Purpose:** export the fine-tuned student to ONNX (`torch.onnx.export`: transformer + mean pooling +
# normalisation in one graph), quantise it to int8 with `onnxruntime.quantization`, check both against
# torch on every item, and search the items with the `Retriever` (monsters, powers or both).
#
# **Reads:** `04_finetune/model/`, `00_corpus/items.jsonl`. **Writes:** `07_export/model.onnx`,
# `model-int8.onnx`, `tokenizer/`, `bench.json`, `metrics.json`.

# %% tags=["parameters"]
run_name: str = "dnd-default"  # run folder under data/runs: <domain>-<profile>
runs_root: str = ""  # where runs live; empty means <repo>/data/runs
eval_max_seq_length: int = 256  # tokens per text when encoding
parity_min_cosine: float = 0.999  # the fp32 ONNX export must agree with torch at least this well
example_queries: list = ["a creature that turns people to stone", "a spell that brings the dead back to life"]  # shown with results
# %%
import time

import pandas as pd

from lib import corpus, evaluate, export
from lib.io import write_json
from lib.paths import stage_dir
from lib.search import Retriever

model_dir = stage_dir(run_name, "04_finetune", runs_root or None) / "model"
out_dir = stage_dir(run_name, "07_export", runs_root or None, create=True)
items = corpus.load_items(stage_dir(run_name, "00_corpus", runs_root or None))
texts = [i["text"] for i in items]

# %% [markdown]
# ## Export, quantise, check parity with torch

# %%
export.export_onnx(model_dir, out_dir / "model.onnx")
export.quantize_int8(out_dir / "model.onnx", out_dir / "model-int8.onnx")
timings, vectors = {}, {}
start = time.perf_counter()
vectors["torch"] = evaluate.encode(model_dir, texts, max_seq_length=eval_max_seq_length)
timings["torch"] = time.perf_counter() - start
for name in ("model", "model-int8"):
    encoder = export.OnnxEncoder(out_dir / f"{name}.onnx", max_seq_length=eval_max_seq_length)
    start = time.perf_counter()
    vectors[name] = encoder.encode(texts)
    timings[name] = time.perf_counter() - start
parity = {name: export.parity(vectors["torch"], vectors[name]) for name in ("model", "model-int8")}
if parity["model"]["min_cosine"] < parity_min_cosine:
    raise AssertionError(f"ONNX export disagrees with torch: min cosine {parity['model']['min_cosine']:.5f} "
                         f"< {parity_min_cosine}")
bench = {name: {"seconds": round(s, 2), "items_per_second": round(len(texts) / s, 1)} for name, s in timings.items()}
write_json(out_dir / "bench.json", bench)
pd.concat({"parity": pd.DataFrame(parity).T, "speed (one run, this machine)": pd.DataFrame(bench).T}, axis=1)

# %% [markdown]
# ## Search with the exported model

# %%
retriever = Retriever(export.OnnxEncoder(out_dir / "model.onnx", max_seq_length=eval_max_seq_length))
retriever.index(items)
for query in example_queries:
    for types in (None, ["monster"], ["power"]):
        hits = retriever.retrieve(query, top_k=3, types=types)
        print(f"{query!r} in {types or 'all'}: " + "; ".join(f"{h['name']} ({h['score']:.2f})" for h in hits))

# %%
self_hits = sum(retriever.retrieve(i["text"], top_k=1)[0]["id"] == i["id"] for i in items[:50])
metrics = {
    "onnx_min_cosine": round(parity["model"]["min_cosine"], 6),
    "int8_min_cosine": round(parity["model-int8"]["min_cosine"], 6),
    "int8_mean_cosine": round(parity["model-int8"]["mean_cosine"], 6),
    "self_retrieval_at_1": self_hits / min(50, len(items)),
    "items_per_second": {k: v["items_per_second"] for k, v in bench.items()},
}
write_json(out_dir / "metrics.json", metrics)
metrics
