"""Stage 07: ONNX export of the fine-tuned student (torch.onnx.export), int8 quantisation, onnxruntime encoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class MeanPooledEncoder(torch.nn.Module):
    """Transformer + attention-masked mean pooling + L2 normalisation, as one exportable module."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings for a padded batch."""
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def check_mean_pooled(model) -> None:
    """Refuse models whose pipeline is not transformer → mean pooling (→ normalise): the export assumes it."""
    pooling = model[1]
    mode = getattr(pooling, "pooling_mode", None) or pooling.get_config_dict().get("pooling_mode")
    if mode not in (None, "mean"):
        raise ValueError(f"export supports mean pooling only; this model pools with {mode!r}")


def export_onnx(model_dir: str | Path, onnx_path: str | Path, opset: int = 17) -> None:
    """Export a mean-pooling SentenceTransformer folder to ONNX with dynamic batch and sequence axes."""
    from sentence_transformers import SentenceTransformer

    from lib.io import atomic_path

    model = SentenceTransformer(str(model_dir), device="cpu")
    check_mean_pooled(model)
    wrapper = MeanPooledEncoder(model[0].auto_model).eval()
    sample = model.tokenizer(["a sample sentence", "another one, a bit longer"], padding=True, return_tensors="pt")
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}}
    with atomic_path(onnx_path) as tmp, torch.no_grad():
        torch.onnx.export(wrapper, (sample["input_ids"], sample["attention_mask"]), str(tmp),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    model.tokenizer.save_pretrained(str(Path(onnx_path).parent / "tokenizer"))


def quantize_int8(onnx_path: str | Path, int8_path: str | Path) -> None:
    """Dynamic int8 quantisation of the weights with onnxruntime.quantization."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lib.io import atomic_path

    with atomic_path(int8_path) as tmp:
        quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8)


class OnnxEncoder:
    """Sentence embeddings from an exported ONNX model with onnxruntime."""

    def __init__(self, onnx_path: str | Path, tokenizer_dir: str | Path | None = None, max_seq_length: int = 256,
                 threads: int = 0):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or Path(onnx_path).parent / "tokenizer"))
        self.max_seq_length = max_seq_length

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Normalised embeddings, batches sorted by length to waste less padding."""
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


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Row-wise cosine agreement between two sets of normalised embeddings."""
    cos = (reference * candidate).sum(axis=1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
