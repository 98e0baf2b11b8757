"""Stage 04 on the CPU: training steps per second of plain fp32 against bf16 autocast and a shorter query length,
with the dev metrics each reaches after the same steps from the same start. One process, variants run in turn.

    make bench      (python bench/finetune_speed.py --run dnd-default)

Each variant trains `--steps` steps on the run's real stage-02 rows (batch 16, passages at 128 tokens, the
entity-aware sampler, seed 42) from the run's stage-03 model, without evaluations or checkpoints in between; the
figure is the median wall time of a step (the first 3 steps, warm-up, left out). The dev NDCG@10 is the stage-04
evaluator's score after the last step. The bf16 variants run only where bf16 is native. `make bench-avx2` runs the
whole benchmark again held to AVX2 (lib.provenance.AVX2_IMITATION): an imitation of an AVX2-only laptop.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from transformers import TrainerCallback

from lib import bench, cpu, finetune
from lib.paths import CORPUS, DOMAIN_ADAPT, PAIRS, Run

VARIANTS = {
    "fp32": {"bf16": False, "query_max_seq_length": 128},
    "bf16": {"bf16": True, "query_max_seq_length": 128},
    "bf16+query64": {"bf16": True, "query_max_seq_length": 64},
}


class StepTimer(TrainerCallback):
    """Wall time of every optimisation step."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    """Run every variant this CPU can; write bench/results/<machine>/finetune_speed.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs-root", default=None, help="where runs live (default data/runs)")
    args = parser.parse_args()
    stage = Run(args.run, args.runs_root).stage
    if not (stage(DOMAIN_ADAPT) / "model").is_dir():
        raise SystemExit(f"{stage(DOMAIN_ADAPT)}/model not found: run `make all` for run {args.run!r} first")
    inputs = finetune.load_inputs(stage(CORPUS), stage(PAIRS), 128, 42)
    results = {}
    for name, settings in VARIANTS.items():
        if settings["bf16"] and not cpu.bf16_supported():
            print(f"{name}: skipped, this CPU has no native bf16 (AVX512-BF16 / AMX)", flush=True)
            continue
        config = finetune.FinetuneConfig(max_steps=args.steps, per_device_train_batch_size=16, max_seq_length=128,
                                         eval_steps=10_000, save_steps=10_000, resume=False, blend_alphas=(), **settings)
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as out:
            model, _, facts = finetune.finetune(stage(DOMAIN_ADAPT) / "model", inputs.train, inputs.dev, None, out,
                                                config, inputs.lookup, callbacks=[timer])
        dev = inputs.evaluator(model)["sequential_score"]  # the mean of the target-type groups' NDCG@10
        step_s = statistics.median(timer.seconds[3:])
        results[name] = {**settings, "bf16_used": facts["bf16"], "median_step_s": round(step_s, 3),
                         "steps_per_s": round(1 / step_s, 3), "dev_ndcg@10": round(dev, 4)}
        print(name, results[name], flush=True)
    base = results["fp32"]["median_step_s"]
    for r in results.values():
        r["speedup_vs_fp32"] = round(base / r["median_step_s"], 2)
    path = bench.write_result("finetune_speed", {"run": args.run, "steps": args.steps, "train_rows": len(inputs.train),
                                                 "batch_size": 16, "variants": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
