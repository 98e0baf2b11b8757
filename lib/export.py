"""Stage 05: ONNX export of the fine-tuned student (torch.onnx.export), int8 quantisation, the inference
backends (torch fp32/bf16, onnxruntime fp32/int8) and the parity gate that decides which may be used."""
from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lib.cpu import bf16_supported, has_vnni
from lib.io import read_json
from lib.search import with_prompt

if TYPE_CHECKING:
    import pandas as pd

ENCODER_BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
ONNX_FILES = {"onnx-fp32": "model.onnx", "onnx-int8": "model-int8.onnx"}
FFN_OUTPUT = r"layer\.\d+/output/dense/"  # the feed-forward down-projections: int8 there costs the most quality


POOLING_MODES = ("mean", "cls")  # what the exported graph can pool with
PROMPTS_FILE = "prompts.json"  # beside the exported tokenizer: the prefixes queries and documents get


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


def model_pooling(model) -> str:
    """The pooling of a transformer → pooling (→ normalise) SentenceTransformer, refused with the reason when the
    export could not reproduce it (another mode, or prompts kept out of the pooling)."""
    config = model[1].get_config_dict() if len(model) > 1 and hasattr(model[1], "get_config_dict") else {}
    mode = config.get("pooling_mode", "mean")
    if mode not in POOLING_MODES:
        raise ValueError(f"this student pools with {mode!r}; the project exports and serves {' or '.join(POOLING_MODES)} "
                         "pooling: re-pool it (sentence_transformers Pooling) or choose another base_model")
    if not config.get("include_prompt", True):
        raise ValueError("this student's pooling leaves its prompt out (include_prompt: false); the project serves "
                         "prompts as text prefixes: choose a model whose pooling includes them")
    return mode


def model_prompts(model) -> dict[str, str]:
    """The prefixes a SentenceTransformer puts before queries and documents, chosen as its encode_query and
    encode_document choose them ("query"; the first of "document", "passage", "corpus"; else the default prompt);
    "" where it has none."""
    prompts, default = model.prompts or {}, (model.prompts or {}).get(model.default_prompt_name or "", "")
    document = next((prompts[name] for name in ("document", "passage", "corpus") if prompts.get(name)), default)
    return {"query": prompts.get("query") or default, "document": document}


def export_onnx(model_dir: str | Path, onnx_path: str | Path, opset: int = 17) -> None:
    """Export a mean- or CLS-pooling SentenceTransformer folder to ONNX with dynamic batch and sequence axes; its
    tokenizer and prompts go beside it (tokenizer/)."""
    from sentence_transformers import SentenceTransformer

    from lib.io import atomic_path, write_json

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

    from lib.io import atomic_path

    matmuls = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "MatMul"]
    kept = [name for name in matmuls if keep_fp32 and re.search(keep_fp32, name)]
    with atomic_path(int8_path) as tmp:
        quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=not has_vnni() if reduce_range is None else reduce_range,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=kept,
                         extra_options={"MatMulConstBOnly": True,  # fused graphs (com.microsoft ops) have
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})  # outputs shape inference cannot type
    return kept


class TorchEncoder:
    """Sentence embeddings from a SentenceTransformer folder with torch: fp32 on the best device (CUDA, Apple MPS,
    else CPU), or bf16 weights on the CPU — the one torch encoder of the project (evaluation, maps, serving).

    bf16 casts the weights (measured on an AVX512-BF16 CPU: 2.5-2.9x fp32, against 2.3-2.5x under autocast,
    which re-casts every weight at every call)."""

    def __init__(self, model_dir: str | Path, max_seq_length: int | None = 256, bf16: bool = False):
        from sentence_transformers import SentenceTransformer

        from lib.training import best_device

        self.name = Path(model_dir).name if Path(model_dir).name != "model" else Path(model_dir).parent.name
        self.model = SentenceTransformer(str(model_dir), device="cpu" if bf16 else best_device())
        if max_seq_length:  # None keeps the model's own
            self.model.max_seq_length = max_seq_length
        self.max_seq_length = self.model.max_seq_length
        if bf16:
            self.model.to(torch.bfloat16)
        self.tokenizer = self.model.tokenizer
        self.prompts = model_prompts(self.model)

    def encode(self, texts: list[str], batch_size: int = 32, role: str = "document") -> np.ndarray:
        """Normalised fp32 embeddings of `texts` as documents, or as queries (role="query"), each with the model's
        prompt for its role (the model sorts batches by length and runs in inference mode itself; normalising after
        the cast to fp32 keeps bf16 vectors at unit length). Long calls show progress."""
        from lib.progress import note, on_terminal

        long_call = len(texts) > 256
        if long_call and on_terminal():
            note(f"encoding {len(texts)} texts with {self.name}")
        vectors = self.model.encode(with_prompt(texts, self.prompts, role), prompt="", batch_size=batch_size,
                                    convert_to_tensor=True, show_progress_bar=long_call and not on_terminal())
        return torch.nn.functional.normalize(vectors.float(), dim=1).cpu().numpy()


class OnnxEncoder:
    """Sentence embeddings from an exported ONNX model with onnxruntime."""

    def __init__(self, onnx_path: str | Path, tokenizer_dir: str | Path | None = None, max_seq_length: int = 256,
                 threads: int = 0):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would slow the search after it
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        tokenizer_dir = Path(tokenizer_dir or Path(onnx_path).parent / "tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.prompts = read_json(tokenizer_dir / PROMPTS_FILE) if (tokenizer_dir / PROMPTS_FILE).exists() else {}
        self.max_seq_length = max_seq_length

    def encode(self, texts: list[str], batch_size: int = 32, role: str = "document") -> np.ndarray:
        """Normalised embeddings of `texts` as documents, or as queries (role="query"), each with the model's prompt
        for its role; batches sorted by length to waste less padding."""
        texts = with_prompt(texts, self.prompts, role)
        order = np.argsort([len(t) for t in texts])
        chunks = []
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_seq_length, return_tensors="np")
            chunks.append(self.session.run(["embedding"], {"input_ids": enc["input_ids"].astype(np.int64),
                                                           "attention_mask": enc["attention_mask"].astype(np.int64)})[0])
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(chunks)[np.argsort(order)]


def load_encoder(backend: str, model_dir: str | Path, export_dir: str | Path, max_seq_length: int = 256, threads: int = 0):
    """The encoder of one backend: torch on the SentenceTransformer folder, onnxruntime on the exported files (on
    `threads` threads; 0: onnxruntime's choice)."""
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(ENCODER_BACKENDS)}")
    if backend.startswith("torch"):
        return TorchEncoder(model_dir, max_seq_length, bf16=backend == "torch-bf16")
    path = Path(export_dir) / ONNX_FILES[backend]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stage 05 (make all) first")
    return OnnxEncoder(path, max_seq_length=max_seq_length, threads=threads)


_SHARD_ENCODER: dict = {}  # the encoder of a shard-encoding worker process, loaded once


def _start_shard_worker(backend: str, model_dir: str, export_dir: str, max_seq_length: int, device: str,
                        threads: int) -> None:
    """Load one worker's encoder: on `device` (cpu, or cuda:N as the only GPU the process sees), `threads` CPU threads."""
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    torch.set_num_threads(threads)
    _SHARD_ENCODER["encoder"] = load_encoder(backend, model_dir, export_dir, max_seq_length, threads)


def _encode_shard(texts: list[str], path: str, batch_size: int) -> str:
    """Encode one shard in a worker and save it (atomically: a killed worker leaves no partial shard)."""
    from lib.io import atomic_path

    vectors = _SHARD_ENCODER["encoder"].encode(texts, batch_size=batch_size)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        np.save(out, vectors)
    return path


def shard_paths(texts: list[str], shard_dir: str | Path, shard_size: int) -> list[tuple[list[str], Path]]:
    """The shards of `texts` and the file of each, named by position and by a hash of its texts (a shard saved for
    other texts is never taken for these)."""
    shards = [texts[start:start + shard_size] for start in range(0, len(texts), shard_size)]
    digest = lambda chunk: hashlib.sha256("\x00".join(chunk).encode()).hexdigest()[:16]
    return [(chunk, Path(shard_dir) / f"shard-{n:05d}-{digest(chunk)}.npy") for n, chunk in enumerate(shards)]


def encode_in_shards(backend: str, model_dir: str | Path, export_dir: str | Path, texts: list[str],
                     shard_dir: str | Path, devices: list[str], shard_size: int = 20_000, max_seq_length: int = 256,
                     batch_size: int = 32) -> np.ndarray:
    """Normalised embeddings of `texts` by one worker process per entry of `devices` ("cpu", or "cuda:N"), a shard of
    `shard_size` texts at a time, each shard saved in `shard_dir` as it is done, then merged in order. A rerun takes
    the shards already saved (a killed job resumes where it stopped); CPU workers share the cores."""
    import multiprocessing

    from lib.progress import bar

    shards = shard_paths(texts, shard_dir, shard_size)
    todo = [(chunk, path) for chunk, path in shards if not path.exists()]
    if todo:
        Path(shard_dir).mkdir(parents=True, exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // sum(d == "cpu" for d in devices)) if "cpu" in devices else 1
        context = multiprocessing.get_context("spawn")  # no forked torch or onnxruntime state
        pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_start_shard_worker,
                                     initargs=(backend, str(model_dir), str(export_dir), max_seq_length, device, threads))
                 for device in devices]
        try:
            futures = [pools[n % len(pools)].submit(_encode_shard, chunk, str(path), batch_size)
                       for n, (chunk, path) in enumerate(todo)]
            for future in bar(as_completed(futures), total=len(futures), desc=f"encoding {len(todo)} shards"):
                future.result()
        finally:
            for pool in pools:
                pool.shutdown(cancel_futures=True)
    return np.concatenate([np.load(path) for _, path in shards]) if shards else np.zeros((0, 0), np.float32)


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
    from lib.maps import stratified_sample

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


def native_backends() -> tuple[list[str], dict[str, str]]:
    """The backends this CPU runs natively, and {backend: why not} for the others."""
    if bf16_supported():
        return list(ENCODER_BACKENDS), {}
    return [b for b in ENCODER_BACKENDS if b != "torch-bf16"], {"torch-bf16": "CPU has no native bf16 (avx512_bf16 / amx_bf16)"}


def parity_table(model_dir: str | Path, export_dir: str | Path, items: list[dict], queries: list[dict],
                 max_seq_length: int, min_cosine: float, max_ndcg_delta: float) -> tuple["pd.DataFrame", dict]:
    """Every native backend against torch fp32: cosine of each item's embedding, NDCG@10 on `queries`, items per
    second, and why it fails the gate ("" when it passes). Returns the table and each backend's item vectors."""
    import time

    import pandas as pd

    from lib.evaluate import dense_scores, evaluate_scores
    from lib.progress import note

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


def search_settings(dense_weights: list[float]) -> list[dict]:
    """The search settings stage 05 compares, in the order a tie is broken: dense, hybrid by RRF, hybrid weighted by
    each of `dense_weights`, BM25."""
    return ([{"mode": "dense", "fusion": "rrf", "dense_weight": 0.5}, {"mode": "hybrid", "fusion": "rrf", "dense_weight": 0.5}]
            + [{"mode": "hybrid", "fusion": "weighted", "dense_weight": float(w)} for w in dense_weights]
            + [{"mode": "bm25", "fusion": "rrf", "dense_weight": 0.5}])


def search_settings_table(retriever, splits: dict[str, list[dict]], items: list[dict], dense_weights: list[float]) -> "pd.DataFrame":
    """NDCG@10 of every search setting on each split's queries (e.g. dev to choose, test to report), scored as stage 06
    scores (each query's candidates): cosine and BM25 computed once per block of queries, then fused per setting."""
    import pandas as pd

    from lib.evaluate import evaluate_scores
    from lib.search import fuse

    settings = search_settings(dense_weights)
    ndcg: dict[tuple[int, str], list] = {(n, split): [] for n in range(len(settings)) for split in splits}
    step = max(1, (1 << 24) // max(1, len(items)))  # queries a block: at most 16 M scores held per matrix
    for split, queries in splits.items():
        for start in range(0, len(queries), step):
            block = queries[start:start + step]
            texts = [q["text"] for q in block]
            dense, keyword = retriever.dense_scores(retriever.encoder.encode(texts)), retriever.bm25.scores(texts)
            for n, setting in enumerate(settings):
                scores = {"dense": dense, "bm25": keyword}.get(setting["mode"])
                if scores is None:
                    scores = fuse(dense, keyword, setting["fusion"], setting["dense_weight"], retriever.rrf_k)
                ndcg[n, split] += list(evaluate_scores(split, scores, block, items)["ndcg@10"])
    return pd.DataFrame([dict(setting) | {f"{split} ndcg@10": float(np.mean(ndcg[n, split]))
                                          for split in splits if splits[split]}
                         for n, setting in enumerate(settings)])


def best_search_setting(table: "pd.DataFrame", split: str = "dev") -> dict:
    """The setting with the highest NDCG@10 on `split` (the first of equals), as set_mode's arguments."""
    best = table.loc[table[f"{split} ndcg@10"].idxmax()]
    return {"mode": str(best["mode"]), "fusion": str(best["fusion"]), "dense_weight": float(best["dense_weight"])}
