"""Stage 05: ONNX export of the fine-tuned student (torch.onnx.export), int8 quantisation, the parity gate that
decides which inference backends (lib.encoders) may be used, and the search settings the index is saved with."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lib.cpu import has_vnni
from lib.encoders import (PROMPTS_FILE, OnnxEncoder, TorchEncoder, encode_in_shards, load_encoder, model_pooling,
                          model_prompts, native_backends)
from lib.evaluate import dense_scores, evaluate_scores
from lib.io import atomic_path, write_json
from lib.maps import stratified_sample
from lib.progress import note
from lib.served import search_settings, settings_ndcg

if TYPE_CHECKING:
    import pandas as pd

FFN_OUTPUT = r"layer\.\d+/output/dense/"  # the feed-forward down-projections: int8 there costs the most quality




class PooledEncoder(torch.nn.Module):
    """Transformer + pooling (attention-masked mean, or the first token's state) + L2 normalisation, as one
    exportable module."""

    def __init__(self, transformer: torch.nn.Module, pooling: str = "mean"):
        super().__init__()
        self.transformer, self.pooling = transformer, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings for a padded batch."""
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def export_onnx(model_dir: str | Path, onnx_path: str | Path, opset: int = 17) -> None:
    """Export a mean- or CLS-pooling SentenceTransformer folder to ONNX with dynamic batch and sequence axes; its
    tokenizer and prompts go beside it (tokenizer/)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    wrapper = PooledEncoder(model[0].auto_model, model_pooling(model)).eval()
    sample = model.tokenizer(["a sample sentence", "another one, a bit longer"], padding=True, return_tensors="pt")
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}}
    with atomic_path(onnx_path) as tmp, torch.no_grad():
        torch.onnx.export(wrapper, (sample["input_ids"], sample["attention_mask"]), str(tmp),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    tokenizer_dir = Path(onnx_path).parent / "tokenizer"
    model.tokenizer.save_pretrained(str(tokenizer_dir))
    write_json(tokenizer_dir / PROMPTS_FILE, model_prompts(model))


def quantize_int8(onnx_path: str | Path, int8_path: str | Path, keep_fp32: str = FFN_OUTPUT,
                  reduce_range: bool | None = None) -> list[str]:
    """Dynamic int8 quantisation (onnxruntime.quantization) of the weight matrices, per channel; MatMuls whose
    name matches `keep_fp32` stay fp32. reduce_range (7-bit weights) defaults to on for CPUs without VNNI,
    where full-range int8 saturates. Returns the names of the MatMuls kept in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    matmuls = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "MatMul"]
    kept = [name for name in matmuls if keep_fp32 and re.search(keep_fp32, name)]
    with atomic_path(int8_path) as tmp:
        quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=not has_vnni() if reduce_range is None else reduce_range,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=kept,
                         extra_options={"MatMulConstBOnly": True,  # fused graphs (com.microsoft ops) have
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})  # outputs shape inference cannot type
    return kept


ITEM_SHARDS = "item_shards"  # under the export folder: the corpus encoded by worker processes, kept until the index is saved


def corpus_vectors(encoder: TorchEncoder | OnnxEncoder, backend: str, model_dir: str | Path, export_dir: str | Path,
                   items: list[dict], gated: dict[str, np.ndarray], gated_items: list[dict], devices: list[str],
                   max_seq_length: int) -> np.ndarray:
    """The whole corpus encoded with the chosen backend: by one worker process per entry of `devices` in saved shards
    when given, else the parity gate's vectors (`gated`) when the gate saw every item, else by `encoder` here."""
    texts = [i["text"] for i in items]
    if devices:
        return encode_in_shards(backend, model_dir, export_dir, texts, Path(export_dir) / ITEM_SHARDS, devices,
                                max_seq_length=max_seq_length)
    if len(gated_items) == len(items):
        return gated[backend]
    return encoder.encode(texts)


def parity_items(items: list[dict], queries: list[dict], most: int, seed: int) -> list[dict]:
    """The items the parity gate encodes with every backend: all of them, or above `most` a sample stratified by type
    together with every item a query is relevant to (so that NDCG compares like with like)."""
    if len(items) <= most:
        return items
    needed = {item_id for q in queries for item_id in q["relevant"]}
    chosen = set(stratified_sample([i["type"] for i in items], most, seed).tolist())
    return [item for n, item in enumerate(items) if n in chosen or item["id"] in needed]


def check_index_dimensions(index_dimensions: int, matryoshka_dims: list[int]) -> None:
    """Refuse an index size the student was not trained for (cut vectors of a model trained at full width only
    lose far more)."""
    if index_dimensions and index_dimensions not in [int(d) for d in matryoshka_dims]:
        raise ValueError(f"index_dimensions: {index_dimensions} is not a size the student was trained for "
                         f"(matryoshka_dims: {list(matryoshka_dims)}); set one of them, or 0 for the full width")


def served_dimensions(matryoshka_dims: list[int], width: int) -> list[int]:
    """The sizes the index's vectors may be cut to when served (`dimensions`): those stage 04 trained with
    MatryoshkaLoss, below the model's width, and the width itself."""
    return sorted({int(d) for d in matryoshka_dims if 0 < int(d) < width} | {width})


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Row-wise cosine agreement between two sets of normalised embeddings."""
    cos = (reference * candidate).sum(axis=1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def parity_gate(min_cosine: float, ndcg_delta: float, cosine_floor: float = 0.99, max_ndcg_delta: float = 0.005) -> list[str]:
    """Why a backend fails the gate (empty when it passes): every item's cosine to torch fp32 at least
    `cosine_floor`, and NDCG@10 on the evaluation queries within `max_ndcg_delta` of torch fp32."""
    reasons = []
    if min_cosine < cosine_floor:
        reasons.append(f"min cosine {min_cosine:.4f} < {cosine_floor}")
    if abs(ndcg_delta) > max_ndcg_delta:
        reasons.append(f"|ΔNDCG@10| {abs(ndcg_delta):.4f} > {max_ndcg_delta}")
    return reasons


def parity_table(model_dir: str | Path, export_dir: str | Path, items: list[dict], queries: list[dict],
                 max_seq_length: int, min_cosine: float, max_ndcg_delta: float) -> tuple["pd.DataFrame", dict]:
    """Every native backend against torch fp32: cosine of each item's embedding, NDCG@10 on `queries`, items per
    second, and why it fails the gate ("" when it passes). Returns the table and each backend's item vectors."""
    import pandas as pd

    item_texts, query_texts = [i["text"] for i in items], [q["text"] for q in queries]
    vectors, rows = {}, {}
    for backend in native_backends()[0]:
        note(f"parity gate: {backend}")
        encoder = load_encoder(backend, model_dir, export_dir, max_seq_length)
        encoder.encode(item_texts[:32])  # warm-up
        start = time.perf_counter()
        vectors[backend] = encoder.encode(item_texts)
        seconds = time.perf_counter() - start
        query_vectors, item_vectors = encoder.encode(query_texts, role="query"), vectors[backend]
        scores = lambda start, stop: dense_scores(query_vectors[start:stop], item_vectors)  # a block at a time
        rows[backend] = {**parity(vectors["torch-fp32"], vectors[backend]),
                         "ndcg@10": float(evaluate_scores(backend, scores, queries, items)["ndcg@10"].mean()),
                         "items_per_second": len(items) / seconds}
    gate = pd.DataFrame(rows).T
    gate["ndcg_delta"] = gate["ndcg@10"] - gate.loc["torch-fp32", "ndcg@10"]
    gate["speed_vs_torch_fp32"] = gate["items_per_second"] / gate.loc["torch-fp32", "items_per_second"]
    gate["failed"] = [", ".join(parity_gate(r.min_cosine, r.ndcg_delta, min_cosine, max_ndcg_delta))
                      for r in gate.itertuples()]
    if gate.loc["onnx-fp32", "min_cosine"] < 0.999:
        raise AssertionError(f"the fp32 ONNX export disagrees with torch: min cosine {gate.loc['onnx-fp32', 'min_cosine']:.5f}")
    return gate, vectors


def fastest_passing(gate: "pd.DataFrame") -> str:
    """The backend with the most items per second among those that pass the gate."""
    return str(gate[gate["failed"] == ""]["items_per_second"].idxmax())


def gate_summary(gate: "pd.DataFrame") -> dict[str, dict]:
    """The parity table as metrics.json holds it: rounded figures, passed and why not per backend."""
    return {b: {"min_cosine": round(float(r["min_cosine"]), 5), "mean_cosine": round(float(r["mean_cosine"]), 5),
                "ndcg@10": round(float(r["ndcg@10"]), 4), "ndcg_delta": round(float(r["ndcg_delta"]), 4),
                "items_per_second": round(float(r["items_per_second"]), 1),
                "speed_vs_torch_fp32": round(float(r["speed_vs_torch_fp32"]), 2),
                "passed": not r["failed"], "failed": r["failed"]} for b, r in gate.iterrows()}


def search_settings_table(retriever, splits: dict[str, list[dict]], items: list[dict], dense_weights: list[float]) -> "pd.DataFrame":
    """NDCG@10 of every search setting on each split's queries (e.g. dev to choose, test to report), scored as stage 06
    scores (each query's candidates): cosine and BM25 computed once per block of queries, then fused per setting."""
    import pandas as pd

    settings = search_settings(dense_weights)
    ndcg: dict[tuple[int, str], list] = {(n, split): [] for n in range(len(settings)) for split in splits}
    step = max(1, (1 << 24) // max(1, len(items)))  # queries a block: at most 16 M scores held per matrix
    for split, queries in splits.items():
        for start in range(0, len(queries), step):
            block = queries[start:start + step]
            texts = [q["text"] for q in block]
            dense = retriever.dense_scores(retriever.encoder.encode(texts, role="query"))  # as retrieve() embeds a query
            per_setting = settings_ndcg(dense, retriever.bm25.scores(texts), block, items, settings, retriever.rrf_k)
            for n, values in enumerate(per_setting):
                ndcg[n, split] += list(values)
    return pd.DataFrame([dict(setting) | {f"{split} ndcg@10": float(np.mean(ndcg[n, split]))
                                          for split in splits if splits[split]}
                         for n, setting in enumerate(settings)])


def best_search_setting(table: "pd.DataFrame", split: str = "dev") -> dict:
    """The setting with the highest NDCG@10 on `split` (the first of equals), as set_mode's arguments."""
    best = table.loc[table[f"{split} ndcg@10"].idxmax()]
    return {"mode": str(best["mode"]), "fusion": str(best["fusion"]), "dense_weight": float(best["dense_weight"])}
