"""ONNX export parity with torch, int8 quantisation, the parity gate, and the Retriever (exact and HNSW,
save/load, the command line) on real SRD items with the bundled student."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib import cpu, export
from lib.paths import REPO_ROOT
from lib.search import Retriever, exact_top_k


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, student_path):
    out = tmp_path_factory.mktemp("export")
    export.export_onnx(student_path, out / "model.onnx")
    kept = export.quantize_int8(out / "model.onnx", out / "model-int8.onnx")
    assert len(kept) == 6 and all("output/dense" in name for name in kept)  # one FFN down-projection per layer
    return out


@pytest.fixture(scope="module")
def retriever(onnx_dir, srd_slice):
    out = Retriever(export.OnnxEncoder(onnx_dir / "model.onnx", max_seq_length=128))
    out.index(srd_slice[0])
    return out


def test_onnx_backends_agree_with_torch(onnx_dir, student_path, srd_slice):
    texts = [i["text"] for i in srd_slice[0][:24]] + ["short", "a much longer sentence about a red dragon"]
    reference = export.TorchEncoder(student_path, max_seq_length=128).encode(texts)
    fp32 = export.load_encoder("onnx-fp32", student_path, onnx_dir, 128).encode(texts, batch_size=5)
    assert export.parity(reference, fp32)["min_cosine"] > 0.9999
    assert np.allclose(np.linalg.norm(fp32, axis=1), 1, atol=1e-4)
    int8 = export.load_encoder("onnx-int8", student_path, onnx_dir, 128).encode(texts)
    assert export.parity(reference, int8)["min_cosine"] > 0.98


def test_bf16_weights_agree_with_fp32(student_path, srd_slice):
    texts = [i["text"] for i in srd_slice[0][:6]]
    fp32 = export.TorchEncoder(student_path, max_seq_length=64).encode(texts)
    encoder = export.TorchEncoder(student_path, max_seq_length=64, bf16=True)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    bf16 = encoder.encode(texts)
    assert bf16.dtype == np.float32 and export.parity(fp32, bf16)["min_cosine"] > 0.99


def test_parity_gate_says_what_failed():
    assert export.parity_gate(0.995, -0.004) == []
    assert export.parity_gate(0.98, 0.0) == ["min cosine 0.9800 < 0.99"]
    assert export.parity_gate(0.999, 0.01, max_ndcg_delta=0.005) == ["|ΔNDCG@10| 0.0100 > 0.005"]
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        export.load_encoder("gpu", ".", ".")


def test_cpu_feature_detection_reads_flags():
    assert cpu.bf16_supported({"avx2", "amx_bf16"}) and not cpu.bf16_supported({"avx2", "fma"})
    assert cpu.has_vnni({"avx512_vnni"}) and not cpu.has_vnni({"avx2"})
    assert "fpu" in cpu.cpu_flags()  # every x86-64 CPU lists it


def test_exact_top_k_matches_a_full_sort():
    scores = np.random.default_rng(0).normal(size=(4, 50))
    for k in (1, 7, 50, 60):
        assert (exact_top_k(scores, k) == np.argsort(-scores, axis=1)[:, :k]).all()


def test_retriever_finds_items_by_their_own_text_and_filters_types(retriever, srd_slice):
    items = srd_slice[0]
    for item in items[::10]:
        assert retriever.retrieve(item["text"], top_k=1)[0]["id"] == item["id"]
    hits = retriever.retrieve("a spell", top_k=5, types=["power"])
    assert len(hits) == 5 and {h["type"] for h in hits} == {"power"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    with pytest.raises(ValueError, match="no indexed item"):
        retriever.retrieve("x", types=["vehicle"])


def test_hnsw_search_agrees_with_exact_search(retriever, srd_slice):
    hnsw = Retriever(retriever.encoder, hnsw_threshold=1)
    hnsw.set_vectors(retriever.items, retriever.vectors)
    assert hnsw.hnsw is not None and retriever.hnsw is None
    queries = [i["text"] for i in srd_slice[0][::7]] + ["a fire spell", "a dragon"]
    for types in (None, ["monster"], ["power"]):
        exact, approximate = retriever.retrieve_many(queries, 3, types), hnsw.retrieve_many(queries, 3, types)
        assert [[h["id"] for h in row] for row in approximate] == [[h["id"] for h in row] for row in exact]


def test_saved_retriever_gives_identical_results(retriever, onnx_dir, student_path, tmp_path):
    queries = ["a creature that turns people to stone", "a healing spell", "undead"]
    retriever.save(tmp_path / "index", {"backend": "onnx-fp32", "model_dir": student_path, "export_dir": onnx_dir})
    loaded = Retriever.load(tmp_path / "index", max_seq_length=128)
    assert loaded.backend == "onnx-fp32"
    assert loaded.retrieve_many(queries, 5) == retriever.retrieve_many(queries, 5)
    assert loaded.retrieve_many(queries, 5, ["power"]) == retriever.retrieve_many(queries, 5, ["power"])
    with pytest.raises(FileNotFoundError, match="retriever.json not found"):
        Retriever.load(tmp_path / "nowhere")


def test_empty_retriever_says_what_to_do(onnx_dir):
    with pytest.raises(RuntimeError, match="index"):
        Retriever(export.OnnxEncoder(onnx_dir / "model.onnx")).retrieve("x")


def test_command_line_searches_a_run(retriever, onnx_dir, student_path, tmp_path):
    index_dir = tmp_path / "runs" / "dnd-test" / "05_export" / "index"
    retriever.save(index_dir, {"backend": "onnx-fp32", "model_dir": student_path, "export_dir": onnx_dir})
    cli = [sys.executable, "-m", "lib.search", "--runs-root", str(tmp_path / "runs"), "--run", "dnd-test"]
    done = subprocess.run([*cli, "--top-k", "3", "--types", "power", "a fire spell", "a healing prayer"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith(("1.", "2.", "3."))]
    assert len(lines) == 6 and all("[power]" in line for line in lines)
    assert "backend onnx-fp32" in done.stdout
    missing = subprocess.run([*cli[:-1], "dnd-nothing", "x"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "run `make all`" in missing.stderr
