"""The index page: verdict, metric order, stage links, partial runs."""
import json

from lib import bench, provenance, report
from lib.facts import EvaluationFacts, ExportFacts, TrainingFacts
from lib.io import write_json
from lib.paths import PARAMS_DIR, stage_dir


def _evaluation(base: float, tuned: float) -> dict:
    row = lambda v: {"precision@1": v, "ndcg@10": v}
    return {"split": "test", "queries": 3, "queries_by_category": {"c": 3}, "metrics": ["precision@1", "ndcg@10"],
            "headline": {"base": row(base), "fine-tuned": row(tuned)}, "by_category": {"c": {"base": row(base)}}}


def test_index_leads_with_the_verdict_and_keeps_metric_order(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    write_json(stage_dir("r", "06_evaluate", runs, create=True) / "metrics.json", _evaluation(0.25, 0.31))
    (reports / "r").mkdir(parents=True)
    (reports / "r" / "06_evaluate.html").write_text("<html></html>")
    page = report.write_index("r", {"seed": 1}, [PARAMS_DIR / "default.yaml"], runs, reports).read_text()
    assert "NDCG@10 0.310 vs 0.250 (+0.060, better)" in page
    assert page.index("<th>precision@1</th>") < page.index("<th>ndcg@10</th>")
    assert "href='06_evaluate.html'" in page and "href='04_finetune.html'" not in page


def test_index_of_a_run_without_evaluation_says_so(tmp_path):
    page = report.write_index("r", {}, [PARAMS_DIR / "default.yaml"], tmp_path / "runs", tmp_path / "reports").read_text()
    assert "No evaluation yet" in page


def test_verdict_words():
    assert report.verdict({"base": {"ndcg@10": 0.3}, "fine-tuned": {"ndcg@10": 0.2}}) == (
        "<b>Fine-tuned vs base student: NDCG@10 0.200 vs 0.300 (-0.100, worse).</b>")
    assert "(+0.000, no different)" in report.verdict({"base": {"ndcg@10": 0.3}, "fine-tuned": {"ndcg@10": 0.3}})
    assert "No fine-tuned" in report.verdict({"base": {"ndcg@10": 0.3}})


def test_verdict_gives_intervals_and_the_p_value():
    ci = {"base": {"ndcg@10": [0.25, 0.2, 0.3]}, "fine-tuned": {"ndcg@10": [0.31, 0.26, 0.36]}}
    text = report.verdict({"base": {"ndcg@10": 0.25}, "fine-tuned": {"ndcg@10": 0.31}}, ci=ci,
                          p_values={"fine-tuned": {"ndcg@10": 0.012}})
    assert "0.310 [0.260, 0.360] vs 0.250 [0.200, 0.300]" in text and "p = 0.012 (significant at 0.05)" in text


def test_search_section_shows_the_gate_and_skipped_backends():
    row = lambda passed, why="": {"min_cosine": 0.95 if why else 1.0, "ndcg@10": 0.4, "ndcg_delta": 0.0,
                                  "items_per_second": 30.0, "speed_vs_torch_fp32": 1.0, "passed": passed, "failed": why}
    exported = ExportFacts.from_metrics({"backends": {"torch-fp32": row(True), "onnx-int8": row(False, "min cosine 0.9500 < 0.99")},
                                         "skipped_backends": {"torch-bf16": "CPU has no native bf16"},
                                         "default_backend": "torch-fp32", "int8_fp32_matmuls": 12})  # other keys: ignored
    section = report.search_section(exported, "no-such-run", provenance.machine())
    assert "<b>torch-fp32</b>" in section and "min cosine 0.9500 &lt; 0.99" in section
    assert "skipped: CPU has no native bf16" in section and "Speed (make bench" not in section
    assert report.search_section(ExportFacts.from_metrics({}), "r", provenance.machine()) == ""  # stage 05 not run


def test_index_says_which_blend_was_shipped_and_why(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    write_json(stage_dir("r", "06_evaluate", runs, create=True) / "metrics.json", _evaluation(0.25, 0.25))
    write_json(stage_dir("r", "04_finetune", runs, create=True) / "metrics.json",
               {"blend_alpha": 0.0, "dev_by_alpha": {"0.0": 0.41, "0.5": 0.405, "1.0": 0.39}})
    page = report.write_index("r", {}, [PARAMS_DIR / "default.yaml"], runs, reports).read_text()
    assert "the start model itself (α = 0): training did not beat it on the dev queries" in page
    assert "0 → 0.410, 0.5 → 0.405, 1 → 0.390" in page
    assert "0.5·θ_start + 0.5·θ_trained" in report.blend_line(TrainingFacts(blend_alpha=0.5, dev_by_alpha={"0.5": 0.4}))


def test_readme_tables_come_from_the_metrics():
    row = lambda v: {"ndcg@10": v, "mrr@10": v, "precision@1": v, "recall@10": v}
    evaluation = {"systems": ["base", "domain-adapted", "fine-tuned"],
                  "headline": {"base": row(0.4), "domain-adapted": row(0.4), "fine-tuned": row(0.6)},
                  "headline_ci": {s: {"ndcg@10": [v, v - 0.1, v + 0.1]} for s, v in (("base", 0.4), ("domain-adapted", 0.4), ("fine-tuned", 0.6))},
                  "p_values_vs_base": {"fine-tuned": {"ndcg@10": 0.0001}},
                  "by_category": {"a": {"base": row(0.2), "fine-tuned": row(0.7)}, "u": {"base": row(0.3), "fine-tuned": row(0.9)},
                                  "synthetic:x": {"base": row(0.1)}},
                  "queries_by_category": {"a": 5, "u": 7}, "beside_headline": ["u"],
                  "p_values_by_category": {"a": 0.01, "u": 0.02}, "p_values_by_category_holm": {"a": 0.02, "u": 0.02}}
    text = report.markdown_results(EvaluationFacts.from_metrics(evaluation))
    assert "| fine-tuned (shipped) | 0.600 [0.500, 0.700] | 0.600 | 0.600 | 0.600 | 0.0001 |" in text
    assert "domain-adapted" not in text and "synthetic:x" not in text  # a copy of the base; not a headline kind
    assert "| u (beside the headline) (7) | 0.300 | 0.900 | 0.02 | 0.02 |" in text


def test_index_shows_no_home_folder_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_GATEWAY_KEY", "gateway-secret-42424242")
    params = {"data_path": str(tmp_path / "home" / "alice" / "corpora" / "wiki"), "teacher_api_key_env": "MY_GATEWAY_KEY",
              "teacher_base_url": "https://bob:hunter2hunter2@gw.example.com/v1", "note": "gateway-secret-42424242",
              "cache_root": str(tmp_path / "home" / "alice" / ".cache" / "codex-forge")}
    write_json(tmp_path / "runs" / "r" / "04_finetune" / "metrics.json",
               {"start_model": str(tmp_path / "home" / "alice" / "models" / "my-student"), "steps": 3})
    page = report.write_index("r", params, [PARAMS_DIR / "default.yaml"], tmp_path / "runs", tmp_path / "reports").read_text()
    assert "alice" not in page and "…/corpora/wiki" in page and "…/.cache/codex-forge" in page
    assert "…/models/my-student" in page  # stage metrics too
    assert "hunter2" not in page and "gateway-secret" not in page and "https://[redacted]@gw.example.com/v1" in page
    assert report.shown_path(str(PARAMS_DIR / "default.yaml")) == "params/default.yaml"


def _measured(kind_isa: list[str], imitation: dict, run: str = "r") -> dict:
    info = {"cpu": "Test CPU 9000", "arch": "x86_64", "system": "Linux", "cores": 2, "isa": kind_isa,
            "cpu_isa": ["avx2", "fma", "avx512f", "avx512_bf16"], "imitation": imitation, "device": "cpu",
            "libraries": {"torch": "2.13.0", "onnxruntime": "1.32.0"}}
    backends = {b: {"texts_per_second": 10.0 * (n + 1), "ratio_to_torch_fp32": n + 1.0, "share_of_fp32_peak": 0.5,
                    "parity_min_cosine": 0.999} for n, b in enumerate(["torch-fp32", "onnx-int8"])}
    latency = {b: {"p50": 3.0, "p95": 4.0} for b in backends}
    return {"machine": info, "machine_label": provenance.machine_label(info), "run": run, "default_backend": "onnx-int8",
            "encode": {k: {"backends": backends} for k in ("passages", "queries")}, "query_encode_latency_ms": latency,
            "search": {"10000/exact": {"encode_plus_search_ms": latency, "search_ms": {"p50": 0.5}}}}


def test_bench_tables_name_the_machine_they_came_from(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    avx512, avx2 = _measured(["avx2", "fma", "avx512f", "avx512_bf16"], {}), _measured(["avx2", "fma"], {"ATEN_CPU_CAPABILITY": "avx2"})
    for result in (avx512, avx2):
        (tmp_path / provenance.machine_kind(result["machine"])).mkdir()
        (tmp_path / provenance.machine_kind(result["machine"]) / "encode_throughput.json").write_text(json.dumps(result))
    assert sorted(bench.results("encode_throughput")) == ["avx2-imitated", "avx512-bf16"]
    # the index shows this machine kind's figures, named; another kind's only with a word that it differs
    chosen, note = bench.for_run("encode_throughput", "r", avx2["machine"])
    assert chosen["machine"]["imitation"] and "held to AVX2" in note and "differs" not in note
    (tmp_path / "avx2-imitated" / "encode_throughput.json").unlink()
    chosen, note = bench.for_run("encode_throughput", "r", avx2["machine"])
    assert "Test CPU 9000 (AVX-512, BF16), 2 cores (bench/results/avx512-bf16/" in note
    assert "this run's machine differs: Test CPU 9000 (AVX-512, BF16), 2 cores held to AVX2" in note
    assert bench.for_run("encode_throughput", "another-run", avx2["machine"]) == ({}, "")
    section = report.search_section(ExportFacts({"onnx-int8": {
        "min_cosine": 0.99, "ndcg@10": 0.4, "ndcg_delta": 0.0, "items_per_second": 30.0, "speed_vs_torch_fp32": 2.0,
        "passed": True, "failed": ""}}, "onnx-int8"), "r", avx2["machine"])
    assert "Speed (make bench)" in section and "this run&#x27;s machine differs" in section
    doc = bench.markdown_tables()
    assert "## Encoding and search · Test CPU 9000 (AVX-512, BF16), 2 cores" in doc and "| onnx-int8 | 20.0 | 2.0 |" in doc


def test_bench_results_record_this_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    path = bench.write_result("probe", {"run": "r"})
    saved = json.loads(path.read_text())
    assert path.parent.name == provenance.machine_kind(saved["machine"]) and saved["run"] == "r"
    info = saved["machine"]
    assert info["cores"] >= 1 and info["cpu"] and set(info["isa"]) <= set(info["cpu_isa"]) <= set(provenance.ISA_FLAGS)
    assert {"torch", "onnxruntime", "transformers", "sentence-transformers"} <= set(info["libraries"])
    assert saved["machine_label"].startswith(info["cpu"])
