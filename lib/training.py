"""Training plumbing shared by stages 03 and 04: bf16 where it is fast, resumable checkpoints, log histories."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback

from lib import cpu
from lib.progress import REDRAW_SECONDS, duration, note, on_terminal


def use_bf16(requested: bool) -> bool:
    """bf16 autocast where it is native and fast: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX (emulated
    bf16 is slower); never on Apple MPS (fp32 there: its bf16 support depends on the macOS version, untested here)."""
    if not requested:
        return False
    device = cpu.best_device()
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu.bf16_supported()


def checkpoint_key(config, start_model: str | Path, train_datasets) -> dict:
    """What a checkpoint must match to be resumed from: the configuration dataclass (without `resume`), the start
    model, the training rows (one dataset or a dict of them) and the number of processes."""
    import dataclasses

    datasets = train_datasets.values() if isinstance(train_datasets, dict) else [train_datasets]
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "resume"}
    return {"config": json.loads(json.dumps(settings)), "start_model": str(start_model),
            "train_rows": [d._fingerprint for d in datasets], "world_size": int(os.environ.get("WORLD_SIZE", 1))}


def resumable_checkpoints(checkpoints: Path, key: dict, resume: bool) -> bool:
    """True when `checkpoints` holds a checkpoint made under `key`; otherwise clear it for a fresh start."""
    key_file = checkpoints / "run_key.json"
    found = any(checkpoints.glob("checkpoint-*")) and key_file.is_file() and json.loads(key_file.read_text()) == key
    if resume and found:
        return True
    if is_main_process():
        shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir(parents=True)
        key_file.write_text(json.dumps(key, indent=1))
    return False


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process."""
    return int(os.environ.get("RANK", 0)) == 0


def finished_training_state(checkpoint: str | None) -> dict | None:
    """The Trainer state saved in `checkpoint` when it is the final step of its run, else None."""
    if not checkpoint:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state if state.get("max_steps") and state["global_step"] >= state["max_steps"] else None


def finite_log_history(log_history: list[dict]) -> list[dict]:
    """The log history without NaN values: the Trainer logs a loss component as 0/0 for a logging window in which
    none of its batches came (e.g. `distill` between two item batches)."""
    return [{k: v for k, v in h.items() if not (isinstance(v, float) and v != v)} for h in log_history]


def loss_curve(log_history: list[dict], key: str = "loss") -> tuple[list[int], list[float]]:
    """(step, value) points of one logged quantity (training loss by default) from a Trainer log history."""
    points = [(h["step"], h[key]) for h in log_history if key in h]
    return [s for s, _ in points], [v for _, v in points]


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The highest-step checkpoint-N folder whose trainer state was written (the Trainer writes it after the weights
    and optimizer): a run killed while saving leaves a partial folder, which is skipped."""
    found = sorted(Path(checkpoints).glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)
    return next((str(p) for p in found if (p / "trainer_state.json").is_file()), None)


def train_or_resume(trainer, checkpoints: Path, resume: bool, load_weights, label: str = "training") -> dict:
    """trainer.train(), from the last checkpoint when `resume`; a run that already finished only reloads its final
    weights through `load_weights(checkpoint)` (a resume would add a step). Under the runner, a progress line on the
    terminal every few seconds. Returns the run's facts and log history."""
    if on_terminal():
        budget = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TimeBudget)), None)
        trainer.add_callback(TrainingProgress(label, budget))
    last = last_complete_checkpoint(checkpoints) if resume else None
    state = finished_training_state(last)
    if state:
        load_weights(last)
    else:
        trainer.train(resume_from_checkpoint=last)
        state = {"global_step": trainer.state.global_step, "log_history": trainer.state.log_history}
    return {"resumed_from_step": int(last.rsplit("-", 1)[1]) if last else 0, "global_step": state["global_step"],
            "train_runtime_s": next((h["train_runtime"] for h in state["log_history"] if "train_runtime" in h), None),
            "log_history": finite_log_history(state["log_history"])}


class TimeBudget(TrainerCallback):
    """A wall-clock budget for training (0: none) that holds on slow CPUs (AVX2, fp32) as on fast ones. After
    `probe_steps` steps (or half the budget, if that comes first) it measures the median step time, plans the steps
    that fit in what is left of the budget and, when that is fewer than the run's, shortens the linear learning-rate schedule to end there (warm-up scaled
    alike), so a short run still decays to zero. Training stops at the planned step, or, whatever the plan said,
    once the budget is spent; a checkpoint is saved where it stops."""

    def __init__(self, minutes: float, probe_steps: int = 8):
        self.minutes, self.probe_steps = minutes, probe_steps
        self.start, self.step_start, self.step_seconds = 0.0, 0.0, []
        self.planned_steps: int | None = None
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.monotonic()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.minutes <= 0:
            return control
        now = time.monotonic()
        self.step_seconds.append(now - self.step_start)
        probe_done = len(self.step_seconds) >= self.probe_steps or (  # or half the budget gone (a very slow machine)
            len(self.step_seconds) >= 2 and now - self.start >= self.minutes * 30)
        if self.planned_steps is None and probe_done:
            step_s = statistics.median(self.step_seconds[1:])  # the first step carries one-off costs
            fit = state.global_step + int((self.minutes * 60 - (now - self.start)) / (step_s * 1.05))
            if fit < state.max_steps:
                self.planned_steps = max(fit, state.global_step)
                shorten_linear_schedule(lr_scheduler, self.planned_steps)
        planned_end = self.planned_steps is not None and state.global_step >= self.planned_steps
        if planned_end or now - self.start >= self.minutes * 60:
            control.should_training_stop = control.should_save = True
            self.stopped_at_step = state.global_step
        return control


def shorten_linear_schedule(lr_scheduler, planned_steps: int) -> bool:
    """Make a transformers linear warm-up/decay schedule (a LambdaLR of partials) end at `planned_steps` instead of
    its own `num_training_steps`, the warm-up shortened in proportion. False (untouched) for any other schedule."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if not lambdas or not all(isinstance(f, partial) and "num_training_steps" in f.keywords for f in lambdas):
        return False
    lr_scheduler.lr_lambdas = [
        partial(f.func, **{**f.keywords, "num_training_steps": planned_steps, "num_warmup_steps": round(
            f.keywords.get("num_warmup_steps", 0) * planned_steps / max(f.keywords["num_training_steps"], 1))})
        for f in lambdas]
    return True


class ResourceMonitor(TrainerCallback):
    """What training uses: wall time per epoch, and every `every_seconds` the process's CPU utilisation (its CPU time
    over the wall time, as a share of all cores) and its resident memory; peak RSS (the kernel's, whole process) and,
    on CUDA, peak GPU memory."""

    def __init__(self, every_seconds: float = 5.0):
        self.every = every_seconds
        self.samples: list[dict] = []
        self.epoch_seconds: list[float] = []
        self.process, self.last, self.last_cpu, self.epoch_start = None, 0.0, 0.0, 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU time of this process so far."""
        times = self.process.cpu_times()
        return times.user + times.system

    def on_train_begin(self, args, state, control, **kwargs):
        import psutil

        self.process = psutil.Process()
        self.last = self.epoch_start = time.monotonic()
        self.last_cpu = self.cpu_seconds()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_start = time.monotonic()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_seconds.append(round(time.monotonic() - self.epoch_start, 1))

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last >= self.every:
            self.sample(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.sample(state.global_step)

    def sample(self, step: int) -> None:
        """One sample since the last: CPU % of all cores, RSS in MiB, and GPU memory in MiB on CUDA."""
        now, cpu = time.monotonic(), self.cpu_seconds()
        share = (cpu - self.last_cpu) / max(now - self.last, 1e-6) / (os.cpu_count() or 1)
        row = {"step": step, "cpu_percent": round(100 * share, 1), "rss_mib": round(self.process.memory_info().rss / 2**20)}
        if torch.cuda.is_available():
            row["gpu_mib"] = round(torch.cuda.memory_allocated() / 2**20)
        self.samples.append(row)
        self.last, self.last_cpu = now, cpu

    def summary(self) -> dict:
        """Epoch times, mean CPU %, peak RSS (MiB) and peak GPU memory (MiB, CUDA only), and the samples; {} when
        nothing was trained."""
        if not self.samples:
            return {}
        import resource

        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; ≥ every sample
        out = {"epoch_seconds": self.epoch_seconds,
               "cpu_percent_mean": round(statistics.mean(s["cpu_percent"] for s in self.samples), 1),
               "peak_rss_mib": round(peak_rss),
               "cores": os.cpu_count(), "samples": self.samples}
        if torch.cuda.is_available():
            out["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        return out


class TrainingProgress(TrainerCallback):
    """Step, loss, time per step and time left as a stderr line every few seconds (the runner's terminal). With a
    TimeBudget, the end is its planned step (once planned) and the time left never exceeds the budget's."""

    def __init__(self, label: str, budget: TimeBudget | None = None):
        self.label, self.budget = label, budget
        self.start, self.first_step, self.shown, self.loss = 0.0, 0, 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.monotonic(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        end = (self.budget and self.budget.planned_steps) or state.max_steps
        if now - self.shown < REDRAW_SECONDS and state.global_step < end:
            return
        self.shown = now
        per_step = (now - self.start) / max(state.global_step - self.first_step, 1)
        left = per_step * max(end - state.global_step, 0)
        if self.budget and self.budget.minutes > 0:
            left = min(left, max(self.budget.minutes * 60 - (now - self.budget.start), 0))
        loss = f" · loss {self.loss:.4f}" if isinstance(self.loss, float) else ""
        note(f"{self.label}: step {state.global_step}/{end}{loss} · {per_step:.2f} s/step · "
             f"{duration(now - self.start)} elapsed, ≤{duration(left)} left")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        shown = {k: round(v, 4) for k, v in (metrics or {}).items() if "ndcg" in k or k.endswith("eval_loss")}
        note(f"{self.label}: evaluated at step {state.global_step}: {shown}")
