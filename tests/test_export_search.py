"""ONNX export parity with torch, int8 quantisation, the parity gate, and the Retriever (exact and HNSW,
save/load, the command line) on real SRD items with the bundled student."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib import cpu, encoders, export
from lib.facts import ExportFacts
from lib.paths import REPO_ROOT
from lib.search import Bm25, Retriever, exact_top_k, fuse, min_max, rrf_scores

pytestmark = pytest.mark.xdist_group("onnx-export")  # its module fixtures are built once, on one worker


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, student_path):
    out = tmp_path_factory.mktemp("export")
    export.export_onnx(student_path, out / "model.onnx")
    kept = export.quantize_int8(out / "model.onnx", out / "model-int8.onnx")
    assert len(kept) == 6 and all("output/dense" in name for name in kept)  # one FFN down-projection per layer
    return out


@pytest.fixture(scope="module")
def retriever(onnx_dir, srd_slice):
    out = Retriever(encoders.OnnxEncoder(onnx_dir / "model.onnx", max_seq_length=128))
    out.index(srd_slice[0])
    return out


def test_onnx_backends_agree_with_torch(onnx_dir, student_path, srd_slice):
    texts = [i["text"] for i in srd_slice[0][:24]] + ["short", "a much longer sentence about a red dragon"]
    reference = encoders.TorchEncoder(student_path, max_seq_length=128).encode(texts)
    fp32 = encoders.load_encoder("onnx-fp32", student_path, onnx_dir, 128).encode(texts, batch_size=5)
    assert export.parity(reference, fp32)["min_cosine"] > 0.9999
    assert np.allclose(np.linalg.norm(fp32, axis=1), 1, atol=1e-4)
    int8 = encoders.load_encoder("onnx-int8", student_path, onnx_dir, 128).encode(texts)
    assert export.parity(reference, int8)["min_cosine"] > 0.98


def test_bf16_weights_agree_with_fp32(student_path, srd_slice):
    texts = [i["text"] for i in srd_slice[0][:6]]
    fp32 = encoders.TorchEncoder(student_path, max_seq_length=64).encode(texts)
    encoder = encoders.TorchEncoder(student_path, max_seq_length=64, bf16=True)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    bf16 = encoder.encode(texts)
    assert bf16.dtype == np.float32 and export.parity(fp32, bf16)["min_cosine"] > 0.99


def test_parity_gate_says_what_failed():
    assert export.parity_gate(0.995, -0.004) == []
    assert export.parity_gate(0.98, 0.0) == ["min cosine 0.9800 < 0.99"]
    assert export.parity_gate(0.999, 0.01, max_ndcg_delta=0.005) == ["|ΔNDCG@10| 0.0100 > 0.005"]
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        encoders.load_encoder("gpu", ".", ".")


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


def test_max_temporal_order_hides_later_items_in_every_mode_and_over_hnsw(retriever):
    """Items with meta.temporal_order (codex chunks) past the limit are not searched; items without one always are."""
    items = [dict(i, meta={**i.get("meta", {}), **({"temporal_order": n} if n % 3 else {})})
             for n, i in enumerate(retriever.items)]
    later = {i["id"] for i in items if i["meta"].get("temporal_order", -1) > 20}
    for threshold in (50_000, 1):  # exact, then HNSW
        timed = Retriever(retriever.encoder, hnsw_threshold=threshold)
        timed.set_vectors(items, retriever.vectors)
        for mode in ("dense", "bm25", "hybrid"):
            target = next(i for i in items if i["id"] in later)
            assert timed.retrieve(target["text"], top_k=1, mode=mode)[0]["id"] == target["id"]
            hits = timed.retrieve(target["text"], top_k=10, mode=mode, max_temporal_order=20)
            assert len(hits) == 10 and not {h["id"] for h in hits} & later
    every_timed = Retriever(retriever.encoder)
    every_timed.set_vectors([dict(i, meta={"temporal_order": n}) for n, i in enumerate(retriever.items)], retriever.vectors)
    with pytest.raises(ValueError, match="no indexed item of those types has a temporal_order at or below -1"):
        every_timed.retrieve("x", types=["monster"], max_temporal_order=-1)


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


def test_reciprocal_rank_fusion_and_weighted_fusion_by_hand():
    a = np.array([[3.0, 2.0, 1.0]])  # ranks 1, 2, 3
    b = np.array([[1.0, 3.0, 2.0]])  # ranks 3, 1, 2
    assert rrf_scores([a, b], k=1)[0] == pytest.approx([1 / 2 + 1 / 4, 1 / 3 + 1 / 2, 1 / 4 + 1 / 3])
    assert fuse(a, b, "rrf", rrf_k=1)[0] == pytest.approx([1 / 2 + 1 / 4, 1 / 3 + 1 / 2, 1 / 4 + 1 / 3])
    # min-max per row: a → [1, .5, 0], b → [0, 1, .5]; -inf (not reached by HNSW) counts as the row's minimum
    assert fuse(a, b, "weighted", 0.8)[0] == pytest.approx([0.8, 0.6, 0.1])
    assert min_max(np.array([[2.0, -np.inf, 4.0]]))[0] == pytest.approx([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="unknown fusion 'max'"):
        fuse(a, b, "max")


def test_every_search_mode_and_the_saved_bm25(retriever, onnx_dir, student_path, tmp_path):
    name_query = "Acolyte"
    for mode, score_type in [("dense", "cosine"), ("bm25", "bm25"), ("hybrid", "rrf")]:
        hits = retriever.retrieve(name_query, 3, ["monster"], mode)
        assert hits[0]["id"] == "monster:acolyte" and {h["score_type"] for h in hits} == {score_type}, mode
        assert {h["type"] for h in hits} == {"monster"}
    hybrid = retriever.retrieve(name_query, 3, mode="hybrid")[0]
    assert hybrid["cosine"] == pytest.approx(retriever.retrieve(name_query, 1, mode="dense")[0]["score"], abs=1e-5)
    assert hybrid["bm25"] == pytest.approx(retriever.retrieve(name_query, 1, mode="bm25")[0]["score"], abs=1e-5)
    assert retriever.retrieve("qwzxv", 3, mode="bm25") == []  # no word in common: no hits, not 3 at score 0
    assert len(retriever.retrieve("qwzxv", 3, mode="hybrid")) == 3
    with pytest.raises(ValueError, match="unknown search mode 'fuzzy'"):
        retriever.retrieve(name_query, mode="fuzzy")
    weighted = Retriever(retriever.encoder, mode="hybrid", fusion="weighted", dense_weight=0.7)
    weighted.set_vectors(retriever.items, retriever.vectors)
    weighted.save(tmp_path / "index", {"backend": "onnx-fp32", "model_dir": student_path, "export_dir": onnx_dir})
    assert (tmp_path / "index" / "bm25").is_dir()
    loaded = Retriever.load(tmp_path / "index", max_seq_length=128)
    assert (loaded.mode, loaded.fusion, loaded.dense_weight) == ("hybrid", "weighted", 0.7)
    queries = ["a fire spell", "a creature that turns people to stone"]
    assert loaded.retrieve_many(queries, 5) == weighted.retrieve_many(queries, 5)
    assert loaded.retrieve(queries[0])[0]["score_type"] == "weighted"
    assert Bm25.load(tmp_path / "index" / "bm25").scores(queries).shape == (2, len(retriever.items))


def test_hybrid_over_hnsw_agrees_with_exact_at_the_top(retriever, srd_slice):
    hnsw = Retriever(retriever.encoder, hnsw_threshold=1, mode="hybrid", fusion="weighted", dense_weight=0.6)
    hnsw.set_vectors(retriever.items, retriever.vectors)
    exact = Retriever(retriever.encoder, mode="hybrid", fusion="weighted", dense_weight=0.6)
    exact.set_vectors(retriever.items, retriever.vectors)
    queries = ["a fire spell", "a dragon", "a healing prayer"]
    assert [[h["id"] for h in row] for row in hnsw.retrieve_many(queries, 5)] == \
        [[h["id"] for h in row] for row in exact.retrieve_many(queries, 5)]


def test_the_default_search_is_the_best_on_dev(retriever, srd_slice):
    items, queries = srd_slice[0], srd_slice[1]
    dev = [q for q in queries if q["split"] != "train"][:12]
    table = export.search_settings_table(retriever, {"dev": dev, "test": dev[:4]}, items, [0.3, 0.7])
    assert list(table["mode"]) == ["dense", "hybrid", "hybrid", "hybrid", "bm25"]
    assert list(table["fusion"]) == ["rrf", "rrf", "weighted", "weighted", "rrf"]
    assert table["dev ndcg@10"].between(0, 1).all() and "test ndcg@10" in table
    best = export.best_search_setting(table)
    assert table.loc[table["dev ndcg@10"].idxmax(), "mode"] == best["mode"]
    assert retriever.mode == "dense"  # left as it was
    weighted = Retriever(retriever.encoder, mode="hybrid", fusion="weighted", dense_weight=0.7)
    weighted.set_vectors(retriever.items, retriever.vectors)
    texts = [q["text"] for q in dev]
    scores = weighted.score_matrix(texts, retriever.encoder.encode(texts, role="query"))  # as retrieve() embeds them
    from lib.evaluate import evaluate_scores
    assert table.loc[3, "dev ndcg@10"] == pytest.approx(evaluate_scores("dev", scores, dev, items)["ndcg@10"].mean())


def test_the_server_keeps_the_indexs_backend_unless_this_cpu_cannot_run_it(monkeypatch):
    from lib import serve

    gate = ExportFacts({"torch-fp32": {"passed": True, "items_per_second": 10},
                        "onnx-int8": {"passed": True, "items_per_second": 30},
                        "onnx-fp32": {"passed": True, "items_per_second": 20}}, "onnx-int8")
    assert serve.serving_backend("onnx-int8", gate) == ("onnx-int8", "")
    monkeypatch.setattr(encoders, "bf16_supported", lambda flags=None: False)
    backend, note = serve.serving_backend("torch-bf16", gate)
    assert backend == "onnx-int8" and "does not run natively here" in note


def test_empty_retriever_says_what_to_do(onnx_dir):
    with pytest.raises(RuntimeError, match="index"):
        Retriever(encoders.OnnxEncoder(onnx_dir / "model.onnx")).retrieve("x")


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


def test_shards_encoded_by_two_processes_match_one_and_a_rerun_resumes(tmp_path, student_path, srd_slice):
    texts = [i["text"] for i in srd_slice[0]]  # 70
    shard_dir = tmp_path / "shards"
    vectors = encoders.encode_in_shards("torch-fp32", student_path, tmp_path, texts, shard_dir, ["cpu", "cpu"],
                                      shard_size=30, max_seq_length=128)
    np.testing.assert_allclose(vectors, encoders.TorchEncoder(student_path, 128).encode(texts), atol=1e-5)
    shards = sorted(shard_dir.glob("shard-*.npy"))
    assert [p.name[:11] for p in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert not list(shard_dir.glob(".*.tmp"))  # nothing half-written
    kept = {p: p.stat().st_mtime_ns for p in shards[:2]}
    shards[2].unlink()  # as if the job had been killed before the last shard
    again = encoders.encode_in_shards("torch-fp32", student_path, tmp_path, texts, shard_dir, ["cpu"], shard_size=30,
                                    max_seq_length=128)
    np.testing.assert_array_equal(again[:60], vectors[:60])  # the saved shards were taken as they were
    assert {p: p.stat().st_mtime_ns for p in shards[:2]} == kept and shards[2].exists()
    changed = encoders.shard_paths(texts[:29] + ["another text"] + texts[30:], shard_dir, 30)
    assert changed[0][1] not in shards and changed[1][1] == shards[1]  # a shard of other texts is never reused


def test_the_corpus_is_encoded_whole_when_the_gate_saw_a_sample(tmp_path, student_path, srd_slice):
    items = srd_slice[0][:12]
    encoder = encoders.TorchEncoder(student_path, 128)
    gated = {"torch-fp32": encoder.encode([i["text"] for i in items[:5]])}
    whole = export.corpus_vectors(encoder, "torch-fp32", student_path, tmp_path, items, gated, items[:5], [], 128)
    assert whole.shape[0] == 12
    np.testing.assert_allclose(whole[:5], gated["torch-fp32"], atol=1e-5)
    all_gated = {"torch-fp32": whole}
    assert export.corpus_vectors(encoder, "torch-fp32", student_path, tmp_path, items, all_gated, items, [], 128) is whole


def test_a_large_corpus_is_gated_on_a_sample_that_keeps_every_item_a_query_needs(srd_slice):
    items, queries = srd_slice[0], srd_slice[1]
    assert export.parity_items(items, queries, len(items), seed=0) is items
    sample = export.parity_items(items, queries, 10, seed=0)
    needed = {i for q in queries for i in q["relevant"]}
    assert needed <= {i["id"] for i in sample} and len(sample) < len(items)
    assert {i["type"] for i in sample} == {i["type"] for i in items}


def test_a_cls_pooled_student_with_prompts_exports_and_encodes_like_sentence_transformers(cls_student_path, tmp_path):
    """Pooling and prompts travel: the ONNX graph pools the first token, each role gets the model's prompt, and torch,
    ONNX and SentenceTransformer's own encode_query/encode_document agree."""
    from sentence_transformers import SentenceTransformer

    export.export_onnx(cls_student_path, tmp_path / "model.onnx")
    assert (tmp_path / "tokenizer" / encoders.PROMPTS_FILE).is_file()
    texts = ["a creature whose gaze turns people to stone", "Medusa: her gaze petrifies those who meet it."]
    model = SentenceTransformer(str(cls_student_path), device="cpu")
    torch_encoder, onnx_encoder = encoders.TorchEncoder(cls_student_path, 128), encoders.OnnxEncoder(tmp_path / "model.onnx", max_seq_length=128)
    for role, own in (("query", model.encode_query), ("document", model.encode_document)):
        reference = own(texts, normalize_embeddings=True)
        assert export.parity(reference, torch_encoder.encode(texts, role=role))["min_cosine"] > 0.9999
        assert export.parity(reference, onnx_encoder.encode(texts, role=role))["min_cosine"] > 0.999
    as_query, as_document = onnx_encoder.encode(texts, role="query"), onnx_encoder.encode(texts)
    assert export.parity(as_query, as_document)["min_cosine"] < 0.999  # the prompts change the vectors
    assert export.parity(onnx_encoder.encode(["query: " + t for t in texts], role="text"), as_query)["min_cosine"] > 0.9999


def test_a_pooling_the_export_cannot_reproduce_is_refused_with_the_reason(student_path):
    assert encoders.TorchEncoder(student_path).prompts == {"query": "", "document": ""}  # the default student has none
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    model = SentenceTransformer(str(student_path), device="cpu")
    assert encoders.model_pooling(model) == "mean"
    max_pooled = SentenceTransformer(modules=[model[0], Pooling(384, "max")], device="cpu")
    with pytest.raises(ValueError, match="pools with 'max'; the project exports and serves mean or cls pooling"):
        encoders.model_pooling(max_pooled)
    without_prompt = SentenceTransformer(modules=[model[0], Pooling(384, "mean", include_prompt=False)], device="cpu")
    with pytest.raises(ValueError, match="include_prompt: false"):
        encoders.model_pooling(without_prompt)
    with pytest.raises(ValueError, match="unknown role 'passage'"):
        encoders.TorchEncoder(student_path).encode(["x"], role="passage")


def test_the_server_reuses_the_indexs_vectors_for_another_backend_that_passed_the_gate(onnx_dir, srd_slice, tmp_path):
    """Serving with another backend than the index's embeds the corpus again, unless stage 05's parity gate passed
    both (their vectors agree to cosine 0.99): then the index's vectors are used as they are."""
    from lib import serve
    from lib.io import write_json
    from lib.paths import stage_dir

    items = srd_slice[0][:60]
    saved = Retriever(encoders.OnnxEncoder(onnx_dir / "model.onnx", max_seq_length=128))
    saved.index(items)
    export_dir = stage_dir("dnd-gate", "05_export", tmp_path)
    saved.save(export_dir / "index", {"backend": "onnx-fp32", "model_dir": onnx_dir, "export_dir": onnx_dir,
                                      "max_seq_length": 128})
    stored = np.load(export_dir / "index" / "vectors.npy")
    for int8_passed, reused in ((True, True), (False, False)):
        write_json(export_dir / "metrics.json", {"backends": {"onnx-fp32": {"passed": True},
                                                              "onnx-int8": {"passed": int8_passed}}})
        service = serve.load_service("dnd-gate", str(tmp_path), backend="onnx-int8")
        assert service.retriever.backend == "onnx-int8"
        assert np.array_equal(service.retriever.vectors, stored) is reused
        assert service.retriever.retrieve(items[5]["text"], 1)[0]["id"] == items[5]["id"]


def test_an_index_of_cut_matryoshka_vectors_cuts_the_queries_to_match(onnx_dir, srd_slice, tmp_path):
    from lib.search import truncate

    items = srd_slice[0][:50]
    encoder = encoders.OnnxEncoder(onnx_dir / "model.onnx", max_seq_length=128)
    full = encoder.encode([i["text"] for i in items])
    cut = Retriever(encoder, mode="hybrid")
    cut.set_vectors(items, truncate(full, 128))
    query = encoder.encode([items[3]["text"]], role="query")
    assert cut.vectors.shape[1] == 128 and cut.retrieve(items[3]["text"], 1, mode="dense")[0]["id"] == items[3]["id"]
    position = {item["id"]: n for n, item in enumerate(items)}
    cosines = (truncate(query, 128) @ truncate(full, 128).T)[0]
    for hit in cut.retrieve(items[3]["text"], 3):  # hybrid hits carry the cosine at the index's width
        assert hit["cosine"] == pytest.approx(float(cosines[position[hit["id"]]]), abs=1e-5)
    expected = truncate(query, 128) @ truncate(full, 128).T
    assert np.allclose(cut.dense_scores(query), expected, atol=1e-6)
    cut.save(tmp_path / "index", {"backend": "onnx-fp32", "model_dir": onnx_dir, "export_dir": onnx_dir,
                                  "max_seq_length": 128, "dimensions": [128, 384]})
    again = Retriever.load(tmp_path / "index", backend="onnx-int8")  # another backend re-embeds, at the index's width
    assert again.vectors.shape[1] == 128 and again.dimensions == [128, 384]
    assert export.check_index_dimensions(128, [384, 128]) is None
    with pytest.raises(ValueError, match="index_dimensions: 100 is not a size the student was trained for"):
        export.check_index_dimensions(100, [384, 128])


def test_stage_05_scores_the_search_settings_with_queries_embedded_as_retrieve_embeds_them(cls_student_path, srd_slice):
    items, queries = srd_slice[0], srd_slice[1]
    dev = [q for q in queries if q["split"] != "train"][:12]
    retriever = Retriever(encoders.TorchEncoder(cls_student_path, 128))  # a student with a query prompt
    retriever.index(items)
    dense = export.search_settings_table(retriever, {"dev": dev}, items, [0.5]).loc[0, "dev ndcg@10"]
    from lib.evaluate import evaluate_scores
    texts = [q["text"] for q in dev]
    as_queries, as_documents = (evaluate_scores("dev", retriever.dense_scores(retriever.encoder.encode(texts, role=role)),
                                                dev, items)["ndcg@10"].mean() for role in ("query", "document"))
    assert dense == pytest.approx(as_queries) and as_queries != pytest.approx(as_documents)
