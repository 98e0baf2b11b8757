"""Each stage's metrics.json as a dataclass: the notebook writes it (as_metrics), later code reads it back with read()
or from_metrics(); nothing else parses those keys. Kept apart from the stages' modules, some of which import torch:
the server, releases and the report read these without it. (Stage 01's: teacher.TeacherFacts, teacher.TeacherUsage.)"""
from __future__ import annotations

from dataclasses import dataclass, field

from lib.io import StageFacts


@dataclass(frozen=True)
class CorpusFacts(StageFacts):
    """Stage 00's metrics: what the adapter read (items, relations, queries per category and split, background) and
    what it skipped from DATA (the report shows it)."""

    items: int = 0
    items_by_type: dict = field(default_factory=dict)
    relations: int = 0
    queries: int = 0
    queries_by_category: dict = field(default_factory=dict)
    queries_by_split: dict = field(default_factory=dict)
    background_chars: int = 0
    skipped: dict = field(default_factory=dict)  # kind of unusable record → how many (records.skipped_line)


@dataclass(frozen=True)
class PairsFacts(StageFacts):
    """Stage 02's metrics: the training rows by kind and how they were mined; the search feedback they include (the
    report and a release's manifest show it)."""

    rows: int = 0
    train: int = 0
    dev: int = 0
    threshold_mode: str = ""
    item_pairs_by_mode: dict = field(default_factory=dict)
    train_by_kind: dict = field(default_factory=dict)
    negatives_by_tier: dict = field(default_factory=dict)
    excluded_items: int = 0
    held_out_synthetic_queries: int = 0
    corpus_training_queries: int = 0
    teacher_query_scores: bool = False
    feedback: dict = field(default_factory=dict)  # judgements read, rows made, refused (feedback.feedback_counts)
    approximate_neighbours: dict = field(default_factory=dict)
    leakage_dropped: dict = field(default_factory=dict)
    generated_queries: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DomainAdaptFacts(StageFacts):
    """Stage 03's metrics: the method, its chunks and steps, held-out loss before and after, and how far the
    embeddings moved (the report and the domain ablation read them)."""

    domain_method: str = "none"
    whole_word_mask: bool | None = None
    chunks_train: int = 0
    chunks_heldout: int = 0
    heldout: dict = field(default_factory=dict)  # "before", "after head warm-up", "after" → loss, perplexity, …
    embedding_cosine_to_base: float = 1.0
    steps: int = 0
    resumed_from_step: int = 0
    train_runtime_s: float = 0.0
    bf16: bool = False


@dataclass(frozen=True)
class EvaluationFacts(StageFacts):
    """Stage 06's metrics: every system's scores on the held-out split (headline, intervals, p-values, per category
    and difficulty) and the checks behind them; the report, releases, comparisons and recommendations read them."""

    split: str = "test"
    queries: int = 0
    queries_by_category: dict = field(default_factory=dict)
    headline_categories: list = field(default_factory=list)  # the categories whose ground truth is independent
    systems: list = field(default_factory=list)
    hybrid: dict = field(default_factory=dict)  # the served search's settings and where they come from
    metrics: list = field(default_factory=list)  # the headline's columns
    headline: dict = field(default_factory=dict)  # system → metric → value
    headline_ci: dict = field(default_factory=dict)  # system → metric → [value, low, high]
    p_values_vs_base: dict = field(default_factory=dict)
    by_category: dict = field(default_factory=dict)
    by_difficulty: dict = field(default_factory=dict)
    topic_coverage_by_difficulty: dict = field(default_factory=dict)
    by_category_ci: dict = field(default_factory=dict)
    p_values_by_category: dict = field(default_factory=dict)
    p_values_by_category_holm: dict = field(default_factory=dict)
    p_values_hybrid_vs_base_hybrid_by_category: dict = field(default_factory=dict)
    beside_headline: list = field(default_factory=list)
    topic_coverage: dict = field(default_factory=dict)
    teacher_agreement: dict = field(default_factory=dict)
    fine_tuned_wins: int = 0
    fine_tuned_losses: int = 0
    leakage_check: dict = field(default_factory=dict)
    bootstrap_samples: int = 0
    permutation_samples: int = 0
    beir: dict = field(default_factory=dict)  # the run's own BEIR folder, scored beside the headline when given
    ndcg_at_dimensions: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MapsFacts(StageFacts):
    """Stage 07's metrics: cluster quality and separation before and after fine-tuning (the report's maps section)."""

    items: int = 0
    items_on_maps: int = 0  # a stratified sample when the corpus has more than map_max_items
    knn10_label_agreement: dict = field(default_factory=dict)  # label → before/after
    silhouette: dict = field(default_factory=dict)
    related_pair_cosine: dict = field(default_factory=dict)
    held_out_pairs: dict = field(default_factory=dict)
    landmarks: list = field(default_factory=list)


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
