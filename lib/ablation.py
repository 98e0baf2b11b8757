"""Ablations: one set of stages rerun per arm (a few parameters changed) on a run's shared upstream artefacts,
and the comparison table (dev score, held-out test metrics with intervals, paired tests against the first arm)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import yaml

from lib.evaluate import paired_randomisation
from lib.facts import DomainAdaptFacts, EvaluationFacts, TrainingFacts
from lib.paths import DOMAIN_ADAPT, EVALUATE, FINETUNE, PARAMS_DIR, REPO_ROOT, STAGES, Run

SPEC_KEYS = {"stages", "overrides", "arms"}


def load_spec(name: str) -> dict:
    """params/ablations/<name>.yaml (or a .yaml path), checked: known stages in order, at least two arms, mappings of
    parameters."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PARAMS_DIR / "ablations" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (PARAMS_DIR / "ablations").glob("*.yaml"))
        raise FileNotFoundError(f"{path} not found: the ablation must be one of {known}")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(spec, dict) or set(spec) - SPEC_KEYS or not {"stages", "arms"} <= set(spec):
        raise ValueError(f"{path}: expected the keys {sorted(SPEC_KEYS)} (overrides optional)")
    stages = spec["stages"]
    if not stages or any(s not in STAGES for s in stages) or stages != sorted(stages):
        raise ValueError(f"{path}: stages must be stage names in pipeline order, got {stages}")
    arms = spec["arms"]
    if not isinstance(arms, dict) or len(arms) < 2 or not all(isinstance(v, dict) for v in arms.values()):
        raise ValueError(f"{path}: arms must map at least two arm names to parameter mappings")
    return {"name": path.stem, "stages": stages, "overrides": spec.get("overrides") or {}, "arms": arms, "path": path}


def ablation_dir(run: str, name: str, runs_root: str | Path | None = None) -> Path:
    """data/runs/<run>/ablation-<name>/: one folder per arm (each an arm's runs_root) and results.json."""
    return Run(run, runs_root).path / f"ablation-{name}"


def code_fingerprint(stages: list[str], files: list[Path]) -> str:
    """Hash of what an arm's results depend on: the ablated notebooks, lib/, the parameter files given."""
    paths = [REPO_ROOT / "notebooks" / f"{s}.py" for s in stages] + sorted((REPO_ROOT / "lib").rglob("*.py")) + files
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def link_upstream(run: str, first_stage: str, runs_root: str | Path | None, arm_root: Path) -> None:
    """Symlink the run's stages before `first_stage` into the arm, so every arm reads the same artefacts."""
    main_run, arm_run = Run(run, runs_root), Run(run, arm_root)
    for stage in STAGES[:STAGES.index(first_stage)]:
        source, link = main_run.stage(stage).resolve(), arm_run.stage(stage)
        if not main_run.metrics_path(stage).is_file():
            raise FileNotFoundError(f"{source} is not finished: run the pipeline up to {stage} first (make stage-{stage[:2]})")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(source, target_is_directory=True)


def results_table(run: str, arm_roots: dict[str, Path], n_permutations: int = 10000, seed: int = 42) -> dict:
    """Per arm: stage 03's facts, stage 04's dev NDCG@10, stage 06's test metrics of the domain-adapted and fine-tuned
    encoders with 95% intervals and paired tests (NDCG@10) against the first arm; the dev winner."""
    rows, per_query = {}, {}
    for arm, root in arm_roots.items():
        arm_run = Run(run, root)
        adapt, evaluated = DomainAdaptFacts.read(arm_run.stage(DOMAIN_ADAPT)), EvaluationFacts.read(arm_run.stage(EVALUATE))
        tuned = TrainingFacts.read(arm_run.stage(FINETUNE))
        frame = pd.read_csv(arm_run.stage(EVALUATE) / "per_query.csv")
        frame = frame[frame["category"].isin(evaluated.headline_categories)]  # the independent test queries
        per_query[arm] = {s: g.set_index("qid")["ndcg@10"] for s, g in frame.groupby("system")}
        test = {s: {m: evaluated.headline[s][m] for m in ("ndcg@10", "mrr@10", "precision@1", "recall@10")}
                | {"ndcg@10_ci": evaluated.headline_ci[s]["ndcg@10"][1:],
                   "p_vs_base": evaluated.p_values_vs_base.get(s, {}).get("ndcg@10")}
                for s in ("domain-adapted", "fine-tuned")}
        rows[arm] = {"domain_method": adapt.domain_method, "adapt_steps": adapt.steps,
                     "adapt_runtime_s": adapt.train_runtime_s, "heldout": adapt.heldout,
                     "embedding_cosine_to_base": adapt.embedding_cosine_to_base,
                     "dev_ndcg@10_adapted": tuned.dev_ndcg("before"), "dev_ndcg@10_fine_tuned": tuned.dev_ndcg("after"),
                     "test": test, "test_queries": evaluated.queries,
                     "beside_headline": {c: evaluated.by_category[c]["fine-tuned"]["ndcg@10"]
                                         for c in evaluated.beside_headline if c in evaluated.by_category}}
    reference = next(iter(arm_roots))
    for arm, row in rows.items():
        for system in ("domain-adapted", "fine-tuned"):
            a, b = per_query[arm][system], per_query[reference][system].reindex(per_query[arm][system].index)
            row["test"][system][f"p_vs_{reference}"] = (
                None if arm == reference else paired_randomisation(a.to_numpy(), b.to_numpy(), n_permutations, seed))
    winner = max(rows, key=lambda arm: rows[arm]["dev_ndcg@10_fine_tuned"])
    return {"reference": reference, "winner_on_dev": winner, "order": list(rows), "arms": rows}


def summary_frame(results: dict) -> pd.DataFrame:
    """One row per arm: dev NDCG@10 (adapted, fine-tuned) and test NDCG@10 [95% CI], MRR@10, P@1, p vs reference."""
    reference, lines = results["reference"], []
    for arm in results.get("order", results["arms"]):
        row = results["arms"][arm]
        tuned, adapted = row["test"]["fine-tuned"], row["test"]["domain-adapted"]
        p = tuned.get(f"p_vs_{reference}")
        lines.append({
            "arm": arm + (" (winner)" if arm == results["winner_on_dev"] else ""),
            "dev NDCG@10 adapted": round(row["dev_ndcg@10_adapted"], 3),
            "dev NDCG@10 fine-tuned": round(row["dev_ndcg@10_fine_tuned"], 3),
            "test NDCG@10 adapted": f"{adapted['ndcg@10']:.3f} [{adapted['ndcg@10_ci'][0]:.3f}, {adapted['ndcg@10_ci'][1]:.3f}]",
            "test NDCG@10 fine-tuned": f"{tuned['ndcg@10']:.3f} [{tuned['ndcg@10_ci'][0]:.3f}, {tuned['ndcg@10_ci'][1]:.3f}]",
            "test MRR@10": round(tuned["mrr@10"], 3), "test P@1": round(tuned["precision@1"], 3),
            f"p vs {reference}": "—" if p is None else f"{p:.2g}",
        } | {f"test NDCG@10 {c} (beside the headline)": round(v, 3) for c, v in row.get("beside_headline", {}).items()})
    return pd.DataFrame(lines).set_index("arm")
