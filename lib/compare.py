"""Compare any two models — runs (data/runs/<run>) or releases (models/<domain>/<version>) — on the same held-out
queries: paired tests per metric and per kind of query, the queries each wins and loses, the feedback each version
got, and a plain verdict, on reports/compare/<A>-vs-<B>.html.

    python -m lib.compare models/dnd/v1-20261201-ab12cd34 dnd-default      (make compare A=… B=…)
"""
from __future__ import annotations

import argparse
import html
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from lib import evaluate
from lib.encoders import TorchEncoder
from lib.facts import EvaluationFacts, PairsFacts
from lib.feedback import model_version, read_judgements, share_by_version
from lib.io import read_json, read_jsonl, write_text
from lib.leakage import normal_text
from lib.paths import CORPUS, EVALUATE, PAIRS, PARAMS_DIR, REPORTS_DIR, Run, locate
from lib.release import ReleaseError, resolve
from lib.report import STYLE, table
from lib.search import Bm25, fuse

METRICS = ("ndcg@10", "mrr@10", "recall@10", "precision@1")
MIN_QUERIES = 10
ALPHA = 0.05


class CompareError(ValueError):
    """Two sides that cannot be compared; the message says why."""


@dataclass(frozen=True)
class Side:
    """One model to compare: its name, domain, weights, corpus folder (items.jsonl, queries.jsonl), saved search
    settings, and when it was made."""

    name: str
    domain: str  # "" for a bare model (e.g. the base student): it takes the other side's queries
    model_dir: Path
    corpus_dir: Path | None
    search: dict
    created: str
    feedback: Path | None
    evaluation: EvaluationFacts
    feedback_rows: int = 0  # training rows stage 02 made from search feedback


def run_domain(run: str) -> str:
    """The domain of a run name (<domain>-<profile>): the longest domain file name it starts with."""
    known = sorted((p.stem for p in (PARAMS_DIR / "domains").glob("*.yaml")), key=len, reverse=True)
    return next((d for d in known if run.startswith(d + "-")), run.split("-", 1)[0])


def load_side(spec: str, runs_root: str | Path | None = None) -> Side:
    """A Side from a release path (or models/<domain>/current, or a version name), a run name, or a bare model (the
    base student's name, or a SentenceTransformer folder: scored on the other side's queries, base vs fine-tuned)."""
    where = locate(spec, runs_root)
    if where is not None and where.kind == "release":
        try:
            release = resolve(where.path)  # a tampered or damaged release is not scored
        except ReleaseError as error:
            raise CompareError(str(error)) from None
        manifest = read_json(release / "manifest.json")
        return Side(release.name, manifest["domain"], release / "model", release / "evaluation",
                    read_json(release / "index" / "retriever.json"), manifest["created"],
                    release.parent / "feedback.sqlite", EvaluationFacts.read(release / "evaluation"),
                    manifest.get("feedback", {}).get("rows", 0))
    if where is not None and where.kind == "model":
        return Side(Path(spec).name, "", where.path, None, {"mode": "dense"}, "", None, EvaluationFacts())
    run = Run(spec, runs_root)
    needed = [run.model / "modules.json", run.metrics_path(EVALUATE)]
    if not all(p.exists() for p in needed):
        raise CompareError(f"{spec!r} is neither a release (models/<domain>/<version>) nor a finished run "
                           f"({', '.join(str(p) for p in needed if not p.exists())} missing): `make all` or `make releases`")
    index = run.index / "retriever.json"
    finished = (run.metrics_path(EVALUATE)).stat().st_mtime
    feedback = PairsFacts.read(run.metrics_path(PAIRS)).feedback if run.metrics_path(PAIRS).exists() else {}
    return Side(spec, run_domain(spec), run.model, run.stage(CORPUS),
                read_json(index) if index.exists() else {"mode": "dense"},
                datetime.fromtimestamp(finished, timezone.utc).isoformat(timespec="seconds"),
                run.path / "feedback.sqlite", EvaluationFacts.read(run.stage(EVALUATE)), feedback.get("rows", 0))


def shared_queries(newer: Side, older: Side) -> tuple[list[dict], list[str]]:
    """The newer side's headline test queries that neither side trained on, and why any were dropped; a CompareError
    when fewer than MIN_QUERIES remain or the domains differ."""
    if newer.corpus_dir is None:
        raise CompareError(f"{newer.name} and {older.name} are both bare models: one side must be a run or a release, "
                           "whose held-out queries the two are scored on")
    if older.domain and newer.domain != older.domain:
        raise CompareError(f"{older.name} is a {older.domain!r} model and {newer.name} a {newer.domain!r} one: they share "
                           "no evaluation queries; compare models of one domain")
    split = newer.evaluation.split
    categories = set(newer.evaluation.headline_categories)
    queries = [q for q in read_jsonl(newer.corpus_dir / "queries.jsonl")
               if q.get("split") == split and (not categories or q["category"] in categories)]
    trained = {normal_text(q["text"]) for side in (newer, older) if side.corpus_dir
               for q in read_jsonl(side.corpus_dir / "queries.jsonl") if q.get("split") == "train"}
    kept = [q for q in queries if normal_text(q["text"]) not in trained]
    notes = [f"{len(queries) - len(kept)} of {newer.name}'s {split} queries dropped: one side trained on them"] \
        if len(kept) < len(queries) else []
    if len(kept) < MIN_QUERIES:
        raise CompareError(f"only {len(kept)} of {newer.name}'s {len(queries)} {split} queries were held out from both "
                           f"models' training (at least {MIN_QUERIES} are needed for a paired test)")
    return kept, notes


def side_scores(side: Side, label: str, queries: list[dict], items: list[dict], bm25: np.ndarray) -> dict[str, np.ndarray]:
    """(queries × items) scores of a side's model (cosine, torch fp32) and, when it serves a hybrid, of its search."""
    encoder = TorchEncoder(side.model_dir, side.search.get("encoder", {}).get("max_seq_length", 256))
    dense = encoder.encode([q["text"] for q in queries], role="query") @ encoder.encode([i["text"] for i in items]).T
    out = {label: dense}
    mode = side.search.get("mode", "dense")
    if mode == "hybrid":
        out[f"{label} search"] = fuse(dense, bm25, side.search.get("fusion", "rrf"), side.search.get("dense_weight", 0.5),
                                      side.search.get("rrf_k", 60))
    elif mode == "bm25":
        out[f"{label} search"] = bm25
    return out


def paired_table(per_query: pd.DataFrame, a: str, b: str, metrics: tuple[str, ...], samples: int, seed: int) -> dict:
    """{metric: {A, B, delta, p}} of B against A on the same queries (paired randomisation)."""
    pair = per_query[per_query.system.isin([a, b])]
    p = evaluate.paired_tests(pair, a, list(metrics), samples, seed)[b]
    means = pair.groupby("system")[list(metrics)].mean()
    return {m: {"A": float(means.loc[a, m]), "B": float(means.loc[b, m]), "delta": float(means.loc[b, m] - means.loc[a, m]),
                "p": p[m]} for m in metrics}


def category_table(per_query: pd.DataFrame, a: str, b: str, samples: int, seed: int, metric: str = "ndcg@10") -> dict:
    """{category: {n, A, B, delta, p, p (Holm)}} of B against A on `metric`, Holm-corrected across categories."""
    rows = {}
    for category, frame in per_query[per_query.system.isin([a, b])].groupby("category"):
        row = paired_table(frame, a, b, (metric,), samples, seed)[metric]
        rows[category] = {"n": int(frame.qid.nunique())} | row
    adjusted = evaluate.holm({c: r["p"] for c, r in rows.items()})
    return {c: r | {"p (Holm)": adjusted[c]} for c, r in rows.items()}


def verdict(a: str, b: str, metrics: dict, categories: dict, alpha: float = ALPHA) -> str:
    """One plain sentence: where B is better and worse than A (p < alpha; kinds Holm-corrected), no difference elsewhere."""
    said = lambda rows, p_key: [(name, r) for name, r in rows.items() if r[p_key] < alpha]
    better = [f"{n} ({r['delta']:+.3f}, p = {r['p']:.3g})" for n, r in said(metrics, "p") if r["delta"] > 0]
    worse = [f"{n} ({r['delta']:+.3f}, p = {r['p']:.3g})" for n, r in said(metrics, "p") if r["delta"] < 0]
    better += [f"{n} queries (NDCG@10 {r['delta']:+.3f}, Holm p = {r['p (Holm)']:.3g})"
               for n, r in said(categories, "p (Holm)") if r["delta"] > 0]
    worse += [f"{n} queries (NDCG@10 {r['delta']:+.3f}, Holm p = {r['p (Holm)']:.3g})"
              for n, r in said(categories, "p (Holm)") if r["delta"] < 0]
    if not better and not worse:
        return f"No difference between {b} and {a} at p < {alpha} on any metric or kind of query."
    parts = ([f"better on {', '.join(better)}"] if better else []) + ([f"worse on {', '.join(worse)}"] if worse else [])
    return f"{b} against {a}: {'; '.join(parts)}; no difference elsewhere (p < {alpha})."


def feedback_p(shares: dict[str, dict]) -> float | None:
    """Fisher's exact test of A's and B's share of Good judgements (None unless both versions were judged)."""
    from scipy.stats import fisher_exact

    a, b = shares["A"], shares["B"]
    if not a["judgements"] or not b["judgements"] or a["version"] == b["version"]:
        return None
    table = [[a["positive"], a["judgements"] - a["positive"]], [b["positive"], b["judgements"] - b["positive"]]]
    return float(fisher_exact(table).pvalue)


def compare(spec_a: str, spec_b: str, runs_root: str | Path | None = None, samples: int = 10000, seed: int = 42) -> dict:
    """Score A and B on the newer side's held-out queries; everything the page shows, as one dict."""
    a, b = load_side(spec_a, runs_root), load_side(spec_b, runs_root)
    newer, older = (b, a) if b.created >= a.created else (a, b)
    queries, notes = shared_queries(newer, older)
    items = read_jsonl(newer.corpus_dir / "items.jsonl")
    bm25 = Bm25([i["text"] for i in items]).scores([q["text"] for q in queries])
    scores = side_scores(a, "A", queries, items, bm25) | side_scores(b, "B", queries, items, bm25)
    per_query = pd.concat([evaluate.evaluate_scores(name, s, queries, items) for name, s in scores.items()], ignore_index=True)
    result = {"A": a.name, "B": b.name, "queries": len(queries), "corpus_of": newer.name, "notes": notes,
              "split": newer.evaluation.split, "metrics": paired_table(per_query, "A", "B", METRICS, samples, seed),
              "categories": category_table(per_query, "A", "B", samples, seed)}
    result["verdict"] = verdict(a.name, b.name, result["metrics"], result["categories"])
    if "A search" in scores and "B search" in scores:
        result["search"] = paired_table(per_query, "A search", "B search", METRICS, samples, seed)
        result["search_settings"] = {name: {k: s.search.get(k) for k in ("mode", "fusion", "dense_weight")} for name, s in (("A", a), ("B", b))}
        result["search_verdict"] = verdict(f"{a.name}'s search", f"{b.name}'s search", result["search"], {})
    changes = evaluate.wins_and_losses(per_query, "B", "A", "ndcg@10")
    texts = {q["qid"]: q["text"] for q in queries}
    changed = changes[changes.delta != 0].assign(query=lambda f: f.qid.map(texts))
    result["losses"] = changed[changed.delta < 0].head(15).to_dict("records")
    result["wins"] = changed[changed.delta > 0].sort_values("delta", ascending=False).head(15).to_dict("records")
    result["wins_losses_ties"] = [int((changes.delta > 0).sum()), int((changes.delta < 0).sum()), int((changes.delta == 0).sum())]
    versions = {"A": model_version(a.model_dir), "B": model_version(b.model_dir)}
    judgements = [row for path in dict.fromkeys([a.feedback, b.feedback]) if path and path.exists()
                  for row in read_judgements(path)]
    result["feedback"] = share_by_version(judgements, versions)
    result["feedback_p"] = feedback_p(result["feedback"])
    result["trained_on_feedback"] = {"A": a.feedback_rows, "B": b.feedback_rows}
    return result


def page(result: dict) -> str:
    """The comparison as a self-contained HTML page."""
    a, b = result["A"], result["B"]
    esc = html.escape
    fmt = lambda rows: {name: {k: (f"{v:.4f}" if k == "p" or k == "p (Holm)" else v) for k, v in r.items()} for name, r in rows.items()}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>codex-forge · {esc(a)} vs {esc(b)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{esc(a)} (A) vs {esc(b)} (B)</h1>",
             f"<p id='verdict'><b>{esc(result['verdict'])}</b></p>",
             f"<p>{result['queries']} held-out {esc(result['split'])} queries of {esc(result['corpus_of'])}'s corpus (the newer), "
             "each model scored by cosine (torch fp32) among each query's candidates; p: paired randomisation test of B "
             "against A on the same queries; kinds of query Holm-corrected. "
             + esc(" ".join(result["notes"])) + "</p>",
             "<h2>Metrics</h2>" + table(fmt(result["metrics"]), ["A", "B", "delta", "p"]),
             "<h2>NDCG@10 per kind of query</h2>" + table(fmt(result["categories"]), ["n", "A", "B", "delta", "p", "p (Holm)"])]
    if "search" in result:
        settings = "; ".join(f"{k}: {v['mode']} {v['fusion']} {v['dense_weight']}" for k, v in result["search_settings"].items())
        parts.append(f"<h2>The search each serves</h2><p>{esc(result['search_verdict'])} ({esc(settings)})</p>"
                     + table(fmt(result["search"]), ["A", "B", "delta", "p"]))
    w, l, t = result["wins_losses_ties"]
    parts.append(f"<h2>Queries that changed</h2><p>NDCG@10 per query: B wins {w}, loses {l}, ties {t}.</p>")
    for title, rows in (("B's largest wins", result["wins"]), ("B's largest losses", result["losses"])):
        short = lambda text: text if len(text) <= 120 else text[:119] + "…"  # stat-block queries run to a page
        parts.append(f"<h3>{title}</h3>" + table({f"{r['qid']}": {"query": short(r["query"]), "kind": r["category"], "A": r["A"],
                                                                  "B": r["B"], "delta": r["delta"]} for r in rows},
                                                 ["query", "kind", "A", "B", "delta"]))
    feedback = result["feedback"]
    rows = {f"{name} ({v['version']})": {"judgements": v["judgements"], "Good": v["positive"],
                                         "share Good [95 %]": (f"{v['share'][0]:.2f} [{v['share'][1]:.2f}, {v['share'][2]:.2f}]"
                                                            if v["judgements"] else "—")} for name, v in feedback.items()}
    parts.append("<h2>Feedback from the search page (A/B)</h2><p>Judgements stored by <code>make serve</code> for each "
                 "version (Wilson 95 % interval)"
                 + (f"; A vs B, Fisher's exact test: p = {result['feedback_p']:.3g}" if result["feedback_p"] is not None else "")
                 + ". Trained on feedback rows: "
                 + ", ".join(f"{k} {v}" for k, v in result["trained_on_feedback"].items()) + ".</p>"
                 + table(rows, ["judgements", "Good", "share Good [95 %]"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def slug(name: str) -> str:
    """A side's name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def main(argv: list[str] | None = None) -> None:
    """CLI: compare two runs or releases and write the page."""
    parser = argparse.ArgumentParser(prog="python -m lib.compare", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a run name (dnd-default) or a release (models/dnd/<version>, models/dnd/current)")
    parser.add_argument("b", help="the other one")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--reports-root", default=None)
    parser.add_argument("--samples", type=int, default=10000, help="sign flips of the paired randomisation test")
    args = parser.parse_args(argv)
    try:
        result = compare(args.a, args.b, args.runs_root, args.samples)
    except CompareError as error:
        raise SystemExit(f"cannot compare: {error}") from None
    out = Path(args.reports_root or REPORTS_DIR) / "compare" / f"{slug(result['A'])}-vs-{slug(result['B'])}.html"
    write_text(out, page(result))
    print(result["verdict"])
    if "search_verdict" in result:
        print(result["search_verdict"])
    print(f"→ {out}")


if __name__ == "__main__":
    main()
