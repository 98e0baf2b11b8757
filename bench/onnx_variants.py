"""What makes ONNX Runtime fast or slow here: int8 variants of a finished run's exported model against torch fp32 —
the FFN down-projections kept in fp32 or not, 7-bit weights (reduce_range) or not, ONNX Runtime's transformer graph
fusions (onnxruntime.transformers.optimizer) or not — with each variant's agreement with fp32 (the parity gate's
cosine). Medians of repeats in one process.

    make bench      (python bench/onnx_variants.py --run dnd-default)

ONNX Runtime picks its kernels from the CPU itself: the AVX2 imitation (make bench-avx2) holds torch to AVX2, not
these variants, so only a real AVX2 CPU measures them there.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lib import bench, corpus, export
from lib.encoders import OnnxEncoder, TorchEncoder
from lib.paths import CORPUS, EXPORT, Run


def fused(onnx_path: Path, out: Path, config) -> Path:
    """The model with ONNX Runtime's BERT fusions (attention, layer norm, GELU) applied offline."""
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(str(onnx_path), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size, opt_level=1)
    model.save_model_to_file(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs-root", default=None, help="where runs live (default data/runs)")
    args = parser.parse_args()
    run = Run(args.run, args.runs_root)
    model_dir, export_dir = run.model, run.stage(EXPORT)
    if not (export_dir / "model.onnx").exists():
        raise SystemExit(f"{export_dir}/model.onnx not found: run `make all` for run {args.run!r} first")
    corpus_dir = run.stage(CORPUS)
    sets = {"passages": [i["text"] for i in corpus.load_items(corpus_dir)][: args.texts],
            "queries": [q["text"] for q in corpus.load_queries(corpus_dir)][: args.texts]}
    torch_fp32 = TorchEncoder(model_dir)
    config = torch_fp32.model[0].auto_model.config
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_fp32 = export_dir / "model.onnx"
        graph_fused = fused(onnx_fp32, tmp / "fused.onnx", config)
        int8 = lambda name, source, keep, reduce_range: (
            export.quantize_int8(source, tmp / f"{name}.onnx", keep_fp32=keep, reduce_range=reduce_range), tmp / f"{name}.onnx")[1]
        variants = {
            "onnx-fp32": onnx_fp32,
            "onnx-fp32 fused": graph_fused,
            "int8, FFN down fp32, 8-bit (stage 05 with VNNI)": int8("a", onnx_fp32, export.FFN_OUTPUT, False),
            "int8, FFN down fp32, 7-bit (stage 05 without VNNI)": int8("b", onnx_fp32, export.FFN_OUTPUT, True),
            "int8, every MatMul, 8-bit": int8("c", onnx_fp32, "", False),
            "int8, every MatMul, 7-bit": int8("d", onnx_fp32, "", True),
            "int8 fused, FFN down fp32, 8-bit": int8("e", graph_fused, export.FFN_OUTPUT, False),
            "int8 fused, every MatMul, 8-bit": int8("f", graph_fused, "", False),
        }
        encoders = {"torch-fp32": torch_fp32} | {name: OnnxEncoder(path, tokenizer_dir=export_dir / "tokenizer")
                                                  for name, path in variants.items()}
        rows: dict[str, dict] = {name: {} for name in encoders}
        for set_name, texts in sets.items():
            reference = torch_fp32.encode(texts)
            for name, encoder in encoders.items():
                seconds = bench.median_seconds(lambda: encoder.encode(texts), args.repeats)
                rows[name][f"{set_name}_per_second"] = round(len(texts) / seconds, 1)
                rows[name][f"{set_name}_min_cosine"] = round(export.parity(reference, encoder.encode(texts))["min_cosine"], 5)
            for name in encoders:
                rows[name][f"{set_name}_ratio_to_torch_fp32"] = round(
                    rows[name][f"{set_name}_per_second"] / rows["torch-fp32"][f"{set_name}_per_second"], 2)
        for name, encoder in encoders.items():  # one short query at a time, as a search box sends them
            encoder.encode(sets["queries"][:5])
            seconds = []
            for query in sets["queries"][:200]:
                start = time.perf_counter()
                encoder.encode([query])
                seconds.append(time.perf_counter() - start)
            rows[name]["query_p50_ms"] = round(float(np.median(seconds)) * 1000, 2)
    summary = {"run": args.run, "texts": args.texts, "repeats": args.repeats, "variants": rows, "order": list(rows)}
    for name, row in rows.items():
        print(f"{name:52s} {row}")
    print(f"wrote {bench.write_result('onnx_variants', summary)}")


if __name__ == "__main__":
    main()
