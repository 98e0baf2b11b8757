"""Training plumbing shared by stages 03 and 04: bf16 where it is fast, resumable checkpoints, log histories."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def use_bf16(requested: bool) -> bool:
    """bf16 autocast where it is fast: a GPU with bf16, or a CPU with AVX512-BF16 / AMX (emulated bf16 is slower)."""
    from lib.export import bf16_supported

    if not requested:
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bf16_supported()


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


def train_or_resume(trainer, checkpoints: Path, resume: bool, load_weights) -> dict:
    """trainer.train(), from the last checkpoint when `resume`; a run that already finished only reloads its final
    weights through `load_weights(checkpoint)` (a resume would add a step). Returns the run's facts and log history."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(checkpoints)) if resume else None
    state = finished_training_state(last)
    if state:
        load_weights(last)
    else:
        trainer.train(resume_from_checkpoint=last)
        state = {"global_step": trainer.state.global_step, "log_history": trainer.state.log_history}
    return {"resumed_from_step": int(last.rsplit("-", 1)[1]) if last else 0, "global_step": state["global_step"],
            "train_runtime_s": next((h["train_runtime"] for h in state["log_history"] if "train_runtime" in h), None),
            "log_history": finite_log_history(state["log_history"])}


class WallClockLimit(TrainerCallback):
    """Stop training, with a checkpoint, once `minutes` of training have passed (0: no limit): a budget that holds on
    slow CPUs (AVX2 without bf16) as on fast ones. The learning-rate schedule stays the one planned for every step."""

    def __init__(self, minutes: float):
        self.minutes, self.start, self.stopped_at_step = minutes, 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.minutes > 0 and time.monotonic() - self.start >= self.minutes * 60:
            control.should_training_stop = control.should_save = True
            self.stopped_at_step = state.global_step
        return control
