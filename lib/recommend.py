"""What to try next, written from a run's own measurements by explicit rules: each rule reads the stages' metrics,
and when its condition holds says what to change and the number that triggered it. The index page lists them."""
from __future__ import annotations

from dataclasses import dataclass

from lib.facts import EvaluationFacts, TrainingFacts
from lib.paths import EVALUATE, FINETUNE

MARGIN = 0.02  # an NDCG@10 difference smaller than this is not worth a recommendation
MIN_QUERIES = 10  # a kind of query with fewer is too small to act on
ALPHA = 0.05


@dataclass(frozen=True)
class Recommendation:
    """One suggestion: the rule that made it, what to try, and the measurement behind it."""

    rule: str
    advice: str
    evidence: str


def ndcg(rows: dict, system: str) -> float | None:
    """NDCG@10 of a system in a {system: {metric: value}} table, or None."""
    return rows.get(system, {}).get("ndcg@10")


def bm25_beats_student(evaluation: EvaluationFacts) -> list[Recommendation]:
    """BM25 ahead of the fine-tuned student on a kind of query (of at least MIN_QUERIES) → the hybrid, or lexical
    training rows for that kind when the hybrid does not close the gap."""
    out = []
    for category, rows in sorted(evaluation.by_category.items()):
        keyword, student, hybrid = ndcg(rows, "bm25"), ndcg(rows, "fine-tuned"), ndcg(rows, "hybrid")
        n = evaluation.queries_by_category.get(category, 0)
        if category.startswith("synthetic:") or keyword is None or student is None or keyword < student + MARGIN \
                or n < MIN_QUERIES:
            continue
        lexical = "add training rows that keep their exact words (name and keyword queries, `synthetic_expansion_factor`)"
        if hybrid is None:
            advice = f"{category} queries: search with the hybrid (BM25 + the student, `search_mode: hybrid`), or {lexical}"
        elif hybrid >= keyword - MARGIN:
            advice = f"{category} queries: keep the hybrid as the served search, it closes the gap; or {lexical}"
        else:
            advice = f"{category} queries: the hybrid does not close the gap; {lexical}"
        out.append(Recommendation("bm25_beats_student", advice, f"BM25 {keyword:.3f} vs fine-tuned {student:.3f}"
                                  + (f" and hybrid {hybrid:.3f}" if hybrid is not None else "")
                                  + f" NDCG@10 on {category} (n = {n})"))
    return out


def not_better_than_base(evaluation: EvaluationFacts, finetune: TrainingFacts) -> list[Recommendation]:
    """The fine-tuned student not better than the base on dev, or not significantly on test → change the recipe."""
    before = finetune.dev_before.get("dev-all_cosine_ndcg@10")
    after = finetune.dev_after.get("dev-all_cosine_ndcg@10")
    p = evaluation.p_values_vs_base.get("fine-tuned", {}).get("ndcg@10")
    test = evaluation.headline
    advice = ("try another training recipe (`make ablation-finetune`: loss, batch sampler, negatives), a stronger "
              "teacher, or more pairs before shipping this model")
    if before is not None and after is not None and after <= before:
        return [Recommendation("not_better_than_base", advice, f"dev NDCG@10 {before:.3f} before training → {after:.3f} after")]
    if p is not None and p >= ALPHA and ndcg(test, "fine-tuned") is not None and ndcg(test, "base") is not None:
        return [Recommendation("not_better_than_base", advice,
                               f"test NDCG@10 fine-tuned {ndcg(test, 'fine-tuned'):.3f} vs base {ndcg(test, 'base'):.3f}, p = {p:.3g}")]
    return []


def weak_teacher(evaluation: EvaluationFacts) -> list[Recommendation]:
    """The teacher not better than the base student → the pairs it mines teach little: a stronger teacher."""
    rows = evaluation.headline
    teacher, base = ndcg(rows, "teacher"), ndcg(rows, "base")
    if teacher is None or base is None or teacher > base + MARGIN:
        return []
    return [Recommendation("weak_teacher", "use a stronger teacher: `PROFILE=teacher-mpnet` (all-mpnet-base-v2, local) "
                           "or an OpenAI-compatible endpoint (`teacher_backend: openai`, docs/teachers.md)",
                           f"teacher {teacher:.3f} vs base student {base:.3f} NDCG@10 on test")]


def loss_still_falling(loss_curve: list[tuple[int, float]], drop: float = 0.05) -> list[Recommendation]:
    """Training loss still falling over the last third of the logged steps → more steps."""
    if len(loss_curve) < 4:
        return []
    tail = loss_curve[-max(3, len(loss_curve) // 3):]
    (first_step, first), (last_step, last) = tail[0], tail[-1]
    if first <= 0 or (first - last) / first < drop:
        return []
    return [Recommendation("loss_still_falling", "train longer: raise `max_train_minutes` (or `max_steps`); the loss had "
                           "not levelled off", f"training loss {first:.3f} at step {first_step} → {last:.3f} at step "
                           f"{last_step} ({(last - first) / first:+.0%} over the last {last_step - first_step} steps)")]


def in_batch_false_negatives(finetune: TrainingFacts, share: float = 0.02) -> list[Recommendation]:
    """Many in-batch false negatives with the sampler used → the entity batch sampler."""
    sampler = finetune.batch_sampler
    counts = finetune.in_batch_false_negatives
    pairs = finetune.train_pairs or 0
    found = counts.get(sampler)
    if not pairs or found is None or found / pairs < share:
        return []
    return [Recommendation("in_batch_false_negatives", "use `batch_sampler: entity`, which keeps rows of related items "
                           "out of one batch", f"{found} in-batch false negatives over {pairs} training rows with the "
                           f"{sampler} sampler (entity: {counts.get('entity', '?')})")]


def dev_and_test_disagree(evaluation: EvaluationFacts, finetune: TrainingFacts, gap: float = 0.1) -> list[Recommendation]:
    """The gain on dev and the gain on test far apart, or of opposite sign → more evaluation queries."""
    before = finetune.dev_before.get("dev-all_cosine_ndcg@10")
    after = finetune.dev_after.get("dev-all_cosine_ndcg@10")
    rows = evaluation.headline
    if None in (before, after, ndcg(rows, "fine-tuned"), ndcg(rows, "base")):
        return []
    dev_gain, test_gain = after - before, ndcg(rows, "fine-tuned") - ndcg(rows, "base")
    if abs(dev_gain - test_gain) <= gap and (dev_gain > 0) == (test_gain > 0):
        return []
    return [Recommendation("dev_and_test_disagree", "add evaluation queries (your own `queries.jsonl`, docs/domains.md) "
                           "so choices made on dev hold on test", f"NDCG@10 gain {dev_gain:+.3f} on dev vs "
                           f"{test_gain:+.3f} on test")]


def recommendations(metrics: dict[str, dict], loss_curve: list[tuple[int, float]]) -> list[Recommendation]:
    """Every rule's recommendations for a run, from its stages' metrics.json and the training loss (step, loss)."""
    evaluation = EvaluationFacts.from_metrics(metrics.get(EVALUATE, {}))
    finetune = TrainingFacts.from_metrics(metrics.get(FINETUNE, {}))
    return (not_better_than_base(evaluation, finetune) + weak_teacher(evaluation) + bm25_beats_student(evaluation)
            + loss_still_falling(loss_curve) + in_batch_false_negatives(finetune)
            + dev_and_test_disagree(evaluation, finetune))


def loss_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, training loss) from a Trainer's log history."""
    return [(int(r["step"]), float(r["loss"])) for r in log_history if "loss" in r and "step" in r]
