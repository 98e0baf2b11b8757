"""The sentence encoders of the project: torch (fp32 on the best device, or bf16 weights on the CPU) on a
SentenceTransformer folder, onnxruntime (fp32 or int8) on stage 05's exported files, each putting the model's prompt
before queries and documents; and the corpus encoded by worker processes in resumable shards."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from lib.cpu import best_device, bf16_supported
from lib.io import atomic_path, read_json
from lib.progress import bar, note, on_terminal

ENCODER_BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
ONNX_FILES = {"onnx-fp32": "model.onnx", "onnx-int8": "model-int8.onnx"}
PROMPTS_FILE = "prompts.json"  # beside the exported tokenizer: the prefixes queries and documents get
POOLING_MODES = ("mean", "cls")  # what the exported graph can pool with


def with_prompt(texts: list[str], prompts: dict[str, str], role: str) -> list[str]:
    """`texts` as the encoder sees them in `role` ("query", "document"; "text": as given, already prefixed)."""
    if role not in ("query", "document", "text"):
        raise ValueError(f"unknown role {role!r}; choose query, document or text")
    prefix = prompts.get(role, "")
    return [prefix + t for t in texts] if prefix else list(texts)


def model_prompts(model) -> dict[str, str]:
    """The prefixes a SentenceTransformer puts before queries and documents, chosen as its encode_query and
    encode_document choose them ("query"; the first of "document", "passage", "corpus"; else the default prompt);
    "" where it has none."""
    prompts, default = model.prompts or {}, (model.prompts or {}).get(model.default_prompt_name or "", "")
    document = next((prompts[name] for name in ("document", "passage", "corpus") if prompts.get(name)), default)
    return {"query": prompts.get("query") or default, "document": document}


class TorchEncoder:
    """Sentence embeddings from a SentenceTransformer folder with torch: fp32 on the best device (CUDA, Apple MPS,
    else CPU), or bf16 weights on the CPU — the one torch encoder of the project (evaluation, maps, serving).

    bf16 casts the weights (measured on an AVX512-BF16 CPU: 2.5-2.9x fp32, against 2.3-2.5x under autocast,
    which re-casts every weight at every call)."""

    def __init__(self, model_dir: str | Path, max_seq_length: int | None = 256, bf16: bool = False):
        import torch  # torch is imported where it is used: the ONNX encoders and the teacher start without it
        from sentence_transformers import SentenceTransformer

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
        import torch

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


def native_backends() -> tuple[list[str], dict[str, str]]:
    """The backends this CPU runs natively, and {backend: why not} for the others."""
    if bf16_supported():
        return list(ENCODER_BACKENDS), {}
    return [b for b in ENCODER_BACKENDS if b != "torch-bf16"], {"torch-bf16": "CPU has no native bf16 (avx512_bf16 / amx_bf16)"}


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
    import torch

    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    torch.set_num_threads(threads)
    _SHARD_ENCODER["encoder"] = load_encoder(backend, model_dir, export_dir, max_seq_length, threads)


def _encode_shard(texts: list[str], path: str, batch_size: int) -> str:
    """Encode one shard in a worker and save it (atomically: a killed worker leaves no partial shard)."""
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
