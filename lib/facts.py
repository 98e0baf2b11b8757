"""The facts of stages 04 and 05 that later code reads, one dataclass each: written into the stage's metrics.json by
its notebook (as_metrics), read back with read() or from_metrics(); nothing else parses those keys. Kept apart from
lib/finetune.py and lib/export.py, which import torch: the server, releases and the report read these without it.
(Stage 01's are teacher.TeacherFacts.)"""
from __future__ import annotations

from dataclasses import dataclass, field

from lib.io import StageFacts


@dataclass(frozen=True)
class ExportFacts(StageFacts):
    """Stage 05's facts for serving, releases, the report and the benchmarks: the parity gate per backend, the
    backends it skipped and why, the index's default backend, the machine its speeds were measured on, and the names
    and licences a release's model card states."""

    backends: dict = field(default_factory=dict)  # backend → its gate: passed, min_cosine, ndcg delta, items/s, …
    default_backend: str = "torch-fp32"  # the saved index's: the fastest that passed
    skipped_backends: dict = field(default_factory=dict)  # backend → why it was not tried on this machine
    machine: dict = field(default_factory=dict)  # where the speeds were measured (CPU model, ISA flags, cores)
    model_card: dict = field(default_factory=dict)  # base_model, model_license, data_license

    def passed(self, backend: str) -> bool:
        """Whether the parity gate passed this backend."""
        return bool(self.backends.get(backend, {}).get("passed"))


@dataclass(frozen=True)
class TrainingFacts(StageFacts):
    """Stage 04's facts for releases, the report, its recommendations and the ablations: what was trained, how, and
    the dev scores behind the shipped weights."""

    start_model: str = ""  # 03_domain_adapt/model or the base student (no home folder)
    train_pairs: int = 0  # stage 02's training rows
    steps: int | None = None  # optimiser steps taken (None: stage 04 has not run)
    loss: str = "mnrl"
    batch_sampler: str = "entity"
    distill: bool = False
    bf16: bool = False
    resumed_from_step: int = 0
    train_runtime_s: float = 0.0
    max_train_minutes: float = 0.0
    planned_steps_in_budget: int | None = None
    eval_max_seq_length: int = 256  # tokens per text in the dev evaluations, as in stage 06
    in_batch_false_negatives: dict = field(default_factory=dict)  # batch sampler → false negatives in one epoch
    dev_before: dict = field(default_factory=dict)  # the dev evaluator's scores of the start model
    dev_after: dict = field(default_factory=dict)  # … of the shipped weights
    blend_alpha: float = 1.0  # weight averaging with the start model: (1-α)·start + α·trained
    dev_by_alpha: dict = field(default_factory=dict)  # α → dev NDCG@10

    def dev_ndcg(self, when: str) -> float | None:
        """Dev NDCG@10 over every dev query, "before" or "after" fine-tuning (None when not scored)."""
        scores = self.dev_before if when == "before" else self.dev_after
        if "sequential_score" in scores:  # NDCG@10 per query over every dev query
            return scores["sequential_score"]
        return next((v for k, v in scores.items() if k.endswith("ndcg@10")), None)
