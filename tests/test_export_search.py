"""ONNX export parity with torch, int8 quantisation, and the Retriever on real SRD items."""
import numpy as np
import pytest

from lib import evaluate, export
from lib.search import Retriever


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, student_path):
    out = tmp_path_factory.mktemp("export")
    export.export_onnx(student_path, out / "model.onnx")
    export.quantize_int8(out / "model.onnx", out / "model-int8.onnx")
    return out


def test_onnx_matches_torch(onnx_dir, student_path, srd_slice):
    texts = [i["text"] for i in srd_slice[0][:24]] + ["short", "a much longer sentence about a red dragon"]
    reference = evaluate.encode(student_path, texts, max_seq_length=128)
    fp32 = export.OnnxEncoder(onnx_dir / "model.onnx", max_seq_length=128).encode(texts, batch_size=5)
    assert export.parity(reference, fp32)["min_cosine"] > 0.9999
    int8 = export.OnnxEncoder(onnx_dir / "model-int8.onnx", max_seq_length=128).encode(texts)
    assert export.parity(reference, int8)["mean_cosine"] > 0.9
    assert np.allclose(np.linalg.norm(fp32, axis=1), 1, atol=1e-4)


def test_retriever_finds_items_by_their_own_text_and_filters_types(onnx_dir, srd_slice):
    items = srd_slice[0]
    retriever = Retriever(export.OnnxEncoder(onnx_dir / "model.onnx", max_seq_length=128))
    retriever.index(items)
    for item in items[::10]:
        assert retriever.retrieve(item["text"], top_k=1)[0]["id"] == item["id"]
    hits = retriever.retrieve("a spell", top_k=5, types=["power"])
    assert len(hits) == 5 and {h["type"] for h in hits} == {"power"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    with pytest.raises(ValueError, match="no indexed item"):
        retriever.retrieve("x", types=["vehicle"])


def test_empty_retriever_says_what_to_do(onnx_dir):
    with pytest.raises(RuntimeError, match="index"):
        Retriever(export.OnnxEncoder(onnx_dir / "model.onnx")).retrieve("x")
