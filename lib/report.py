"""reports/<run>/index.html: the run's story on one self-contained page (headline table, parameters,
provenance, wall times, links to every stage report)."""
from __future__ import annotations

import base64
import hashlib
import json
import html
import platform
import re
from pathlib import Path

from lib import bench, recommend
from lib.ablation import summary_frame
from lib.config import redact, secret_values
from lib.domains.records import skipped_line
from lib.evaluate import format_interval, hybrid_label
from lib.facts import (CorpusFacts, DomainAdaptFacts, EvaluationFacts, ExportFacts, MapsFacts, PairsFacts,
                       TrainingFacts)
from lib.io import read_json, write_text
from lib.paths import (CORPUS, DOMAIN_ADAPT, EVALUATE, EXPORT, FINETUNE, MAPS, PAIRS, REPORTS_DIR, REPO_ROOT, STAGES,
                       TEACHER, Run, shown_path)
from lib.provenance import fill_generated, git_commit, machine, machine_label, package_versions
from lib.release import headline_queries
from lib.teacher import TeacherFacts, TeacherUsage

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#f3f3f3}.better{background:#e5f6e5}
.worse{background:#fbe9e9}code{background:#f3f3f3;padding:1px 4px}img{max-width:100%}"""


def table(rows: dict[str, dict], columns: list[str], highlight_vs: str = "") -> str:
    """An HTML table of {row: {column: value}}; cells better/worse than row `highlight_vs` are shaded."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for name, values in rows.items():
        cells = []
        for c in columns:
            v = values.get(c, "")
            cls = ""
            if highlight_vs and name != highlight_vs and isinstance(v, float):
                ref = rows.get(highlight_vs, {}).get(c)
                cls = " class='better'" if ref is not None and v > ref else " class='worse'" if ref is not None and v < ref else ""
            cells.append(f"<td{cls}>{v:.3f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
        body.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def verdict(headline: dict[str, dict[str, float]], metric: str = "ndcg@10", ci: dict | None = None,
            p_values: dict | None = None) -> str:
    """One sentence: fine-tuned vs base on `metric`, with the change, the 95% intervals and the paired p-value."""
    if "fine-tuned" not in headline or "base" not in headline:
        return "No fine-tuned vs base comparison in this run."
    after, before = headline["fine-tuned"][metric], headline["base"][metric]
    change = after - before
    word = "better" if change > 0 else "worse" if change < 0 else "no different"
    interval = lambda s: f" [{ci[s][metric][1]:.3f}, {ci[s][metric][2]:.3f}]" if ci and metric in ci.get(s, {}) else ""
    sentence = (f"<b>Fine-tuned vs base student: {metric.upper()} {after:.3f}{interval('fine-tuned')} vs "
                f"{before:.3f}{interval('base')} ({change:+.3f}, {word}).</b>")
    p = (p_values or {}).get("fine-tuned", {}).get(metric)
    if p is not None:
        sentence += (f" Paired randomisation test: p = {p:.3g} "
                     f"({'significant' if p < 0.05 else 'not significant'} at 0.05).")
    return sentence


def interval_table(ci: dict[str, dict[str, list[float]]], columns: list[str]) -> str:
    """An HTML table of 'mean [low, high]' cells from {row: {column: [mean, low, high]}}."""
    rows = {name: {c: format_interval(v[c]) for c in columns if c in v} for name, v in ci.items()}
    return table(rows, columns)


def data_hashes(corpus_dir: Path) -> dict[str, str]:
    """sha256 (first 16 hex digits) of each corpus file, so two reports can be checked for the same data."""
    return {f"sha256 {p.name}": hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(corpus_dir.glob("*.jsonl"))}


def blend_line(trained: TrainingFacts) -> str:
    """What stage 04 shipped: the weight-averaging α chosen on dev and the dev scores behind the choice."""
    scores = trained.dev_by_alpha
    if not scores:
        return ""
    alpha = trained.blend_alpha
    shipped = ("the start model itself (α = 0): training did not beat it on the dev queries" if alpha == 0 else
               "the trained weights as they are (α = 1)" if alpha == 1 else
               f"θ = {1 - alpha:g}·θ_start + {alpha:g}·θ_trained")
    served = " as served (the best of dense, BM25 and the hybrids)" if "served_ndcg@10" in trained.dev_after else ""
    return (f"Shipped fine-tuned model: {shipped}; dev NDCG@10{served} by α: "
            + ", ".join(f"{float(a):g} → {v:.3f}" for a, v in scores.items()) + ".")


def feedback_line(counts: dict) -> str:
    """Stage 02's use of search feedback in one sentence."""
    trusted = counts.get("trusted") or {}
    learned = (f"{trusted.get('training_queries', 0)} trusted judged questions (API key or judged-questions file, used in "
               f"full) → {counts.get('judged_rows', 0)} training rows, from {', '.join(counts.get('from', [])) or 'the store'}; "
               "anonymous feedback: " if trusted.get("judgements") else "")
    return learned + (f"{counts.get('judgements', 0)} judgements on {counts.get('queries', 0)} queries → {counts.get('rows', 0)} "
            f"training rows ({counts.get('train_rows', 0)} in train); refused: {counts.get('refused_eval_copies', 0)} "
            f"queries copying an evaluation query, {counts.get('unknown_or_held_out_items', 0)} judgements of items not "
            f"in this corpus or kept out of training, {counts.get('without_positive', 0)} queries with no Good judgement."
            + (f" Feedback is {counts['share_of_train_rows']:.1%} of the training rows (at most "
               f"{counts.get('max_share', 1):.0%} of the training queries; {counts.get('over_share_cap', 0)} queries over "
               "it left out)." if "share_of_train_rows" in counts else ""))


def cost_line(metrics: dict[str, dict], timings: dict[str, float]) -> str:
    """What the run cost: wall time, teacher texts embedded (cache misses), tokens and dollars, training steps."""
    parts = [f"{sum(timings.values()) / 60:.1f} min of stages on this machine"] if timings else []
    if TEACHER in metrics:
        used = TeacherUsage.from_metrics(metrics[TEACHER])
        parts.append(f"teacher {TeacherFacts.from_metrics(metrics[TEACHER]).label()}: {used.misses()} of {used.texts()} "
                     f"texts embedded ({used.tokens:,} tokens, ${used.cost_usd:.4f}), the rest from the cache")
    if (steps := TrainingFacts.from_metrics(metrics.get(FINETUNE, {})).steps) is not None:
        parts.append(f"{steps} fine-tuning steps")
    return "; ".join(parts) + "." if parts else ""


def training_section(trained: TrainingFacts, run: str, here: dict) -> str:
    """Stage 04's run facts (steps, bf16, resume, in-batch false negatives per sampler) and `make bench`'s training
    speed for this run when it exists."""
    if not trained.in_batch_false_negatives:
        return ""
    facts = {k: {"value": getattr(trained, k)} for k in ("loss", "distill", "batch_sampler", "steps", "bf16",
                                                        "resumed_from_step", "train_runtime_s", "max_train_minutes",
                                                        "planned_steps_in_budget", "blend_alpha")}
    if trained.dev_by_alpha:
        facts["dev NDCG@10 by α (weight averaging with the start model)"] = {"value": ", ".join(
            f"α {a}: {v:.4f}" for a, v in trained.dev_by_alpha.items())}
    out = ("<h2>Training</h2>" + table(facts, ["value"])
           + "<h3>In-batch false negatives in one epoch, per batch sampler</h3><p>An anchor contrasted with its own "
             "entity under another text, an alias, a related item or another item its query fits.</p>"
           + table({name: {"false negatives": n} for name, n in trained.in_batch_false_negatives.items()},
                   ["false negatives"]))
    speed, note = bench.for_run("finetune_speed", run, here)
    if speed:
        out += (f"<h3>Training speed (make bench)</h3><p>{html.escape(note)}</p>"
                + table(speed["variants"], ["median_step_s", "steps_per_s", "speedup_vs_fp32", "dev_ndcg@10"]))
    return out


def search_section(exported: ExportFacts, run: str, here: dict) -> str:
    """Stage 05's parity gate per backend, and `make bench`'s figures for this run when they exist."""
    if not exported.backends:
        return ""
    rows = {b: {k: v for k, v in r.items() if k != "failed"} | {"gate": "pass" if r["passed"] else r["failed"]}
            for b, r in exported.backends.items()}
    rows |= {b: {"gate": f"skipped: {why}"} for b, why in exported.skipped_backends.items()}
    out = (f"<h2>Local search</h2><p>Default backend of the saved index: <b>{html.escape(exported.default_backend)}"
           f"</b> (the fastest that passes the parity gate on {html.escape(machine_label(here))}). Search from a shell: "
           f"<code>python -m lib.search --run {html.escape(run)} \"a query\"</code>.</p>"
           + table(rows, ["min_cosine", "ndcg@10", "ndcg_delta", "items_per_second", "speed_vs_torch_fp32", "gate"]))
    measured, note = bench.for_run("encode_throughput", run, here)
    if measured:
        speed = {f"{b} · {name}": {"texts/s": r["texts_per_second"], "× torch fp32": r["ratio_to_torch_fp32"],
                                   "share of fp32 peak": r["share_of_fp32_peak"]}
                 for name, block in measured["encode"].items() for b, r in block["backends"].items()}
        latency = {f"{key} · {b}": {"encode + search p50 (ms)": t["p50"], "p95 (ms)": t["p95"],
                                     "search alone p50 (ms)": r["search_ms"]["p50"],
                                     "recall@10 vs exact": r.get("recall@10_vs_exact", "")}
                   for key, r in measured["search"].items() for b, t in r["encode_plus_search_ms"].items()}
        out += (f"<h3>Speed (make bench)</h3><p>{html.escape(note)}</p>"
                + table(speed, ["texts/s", "× torch fp32", "share of fp32 peak"])
                + table(latency, ["encode + search p50 (ms)", "p95 (ms)", "search alone p50 (ms)", "recall@10 vs exact"]))
    return out


def ablation_sections(run: str, domain_method: str | None, runs_root: str | None, out_dir: Path) -> str:
    """One section per finished ablation of this run (data/runs/<run>/ablation-<name>/results.json): the arms' dev and
    held-out test scores, what stage 03 did in each, links to each arm's stage reports."""
    out = []
    for path in sorted(Run(run, runs_root).path.glob("ablation-*/results.json")):
        results, name = read_json(path), path.parent.name
        frame = summary_frame(results)
        summary = {arm: row.to_dict() for arm, row in frame.iterrows()}
        stage03 = {arm: {"method": row["domain_method"], "steps": row["adapt_steps"],
                         "train time (s)": row["adapt_runtime_s"] or "",
                         "held-out before → after": " → ".join(
                             f"{m.get('perplexity', m.get('loss')):.4g}" for m in (row["heldout"].get("before"), row["heldout"].get("after")) if m),
                         "cosine to base": row["embedding_cosine_to_base"]}
                   for arm, row in results["arms"].items() if "domain_method" in row}
        arm_links = lambda arm: " · ".join(
            f"<a href='{name}/{arm}/{run}/{s}.html'>{s[:2]}</a>" for s in STAGES
            if (out_dir / name / arm / run / f"{s}.html").exists())
        note = f" This run uses <b>{html.escape(domain_method)}</b>." if domain_method else ""
        out.append(
            f"<h2>Ablation: {html.escape(name.removeprefix('ablation-'))} (make {html.escape(name)})</h2><p>Stages rerun per arm on this run's own corpus, teacher vectors "
            f"and training pairs, same seed. Winner on the dev queries (stage 04, NDCG@10 after fine-tuning): "
            f"<b>{html.escape(results['winner_on_dev'])}</b>.{note} Test: the {results['arms'][results['winner_on_dev']]['test_queries']} "
            f"held-out queries with independent ground truth, mean [95% bootstrap interval]; p: paired randomisation "
            f"test of the fine-tuned NDCG@10 against the <b>{html.escape(results['reference'])}</b> arm.</p>"
            + table(summary, list(frame.columns))
            + ("<h3>What stage 03 did in each arm</h3><p>Held-out: MLM perplexity (fixed masks) or TSDAE "
               "reconstruction loss; cosine to base: mean cosine between the base and adapted embeddings of held-out "
               "chunks.</p>" + table(stage03, ["method", "steps", "train time (s)", "held-out before → after", "cosine to base"])
               if stage03 else "")
            + "<p>Arm reports: " + "; ".join(f"{html.escape(arm)}: {arm_links(arm) or '—'}" for arm in results["arms"]) + "</p>")
    return "".join(out)


def next_steps_section(metrics: dict[str, dict], log_history: Path) -> str:
    """"What to try next": lib.recommend's rules over this run's measurements, each with the number behind it."""
    found = recommend.recommendations(metrics, recommend.loss_curve(read_json(log_history) if log_history.exists() else []))
    code = lambda text: re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    items = "".join(f"<li data-rule='{r.rule}'>{code(r.advice)} <i>({code(r.evidence)})</i></li>" for r in found)
    return ("<h2 id='next'>What to try next</h2>" + (f"<ul>{items}</ul>" if found else
            "<p>No rule fired: nothing in this run's measurements points at an obvious next step.</p>")
            + "<p>Written by explicit rules (lib/recommend.py) from this run's metrics; each cites the number that "
            "triggered it.</p>")


def embedded_png(path: Path) -> str:
    """An <img> with the PNG inlined, so the page opens offline as one file."""
    if not path.exists():
        return ""
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"


def write_index(run: str, params: dict, param_files: list[Path], runs_root: str | None = None,
                reports_root: str | None = None) -> Path:
    """Write reports/<run>/index.html from the stages' metrics.json files; return its path."""
    out_dir = Path(reports_root or REPORTS_DIR) / run
    folders = Run(run, runs_root)
    metrics = {s: folders.metrics(s) for s in STAGES if folders.metrics_path(s).exists()}
    trained, exported = (TrainingFacts.from_metrics(metrics.get(FINETUNE, {})),
                         ExportFacts.from_metrics(metrics.get(EXPORT, {})))
    timings_path = out_dir / "timings.json"
    timings = read_json(timings_path) if timings_path.exists() else {}
    evaluation = EvaluationFacts.from_metrics(metrics[EVALUATE]) if EVALUATE in metrics else None
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>codex-forge · {html.escape(run)}</title>"
             f"<style>{STYLE}</style></head><body><h1>codex-forge · {html.escape(run)}</h1>"]
    if skipped := CorpusFacts.from_metrics(metrics.get(CORPUS, {})).skipped:
        parts.append(f"<p id='skipped'><b>Data:</b> {html.escape(skipped_line(skipped))} (counted by stage 00; the "
                     "rest of the run uses what remains).</p>")
    if evaluation:
        columns, ci = evaluation.metrics, evaluation.headline_ci
        ordered = lambda rows: {s: rows[s] for s in evaluation.systems or rows if s in rows}
        parts.append(f"<h2>Did it work?</h2><p>{verdict(evaluation.headline, ci=ci, p_values=evaluation.p_values_vs_base)}</p>"
                     f"<p>Held-out <b>{evaluation.split}</b> queries (n={headline_queries(evaluation)}; ground truth "
                     "from the corpus's own fields and relations, not from the teacher). Green: better than the base "
                     "student; red: worse.</p>")
        if blend := blend_line(trained):
            parts.append(f"<p>{html.escape(blend)}</p>")
        if counts := PairsFacts.from_metrics(metrics.get(PAIRS, {})).feedback:
            parts.append(f"<p id='feedback'><b>Search feedback:</b> {html.escape(feedback_line(counts))}</p>")
        if cost := cost_line(metrics, timings):
            parts.append(f"<p><b>Cost:</b> {html.escape(cost)}</p>")
        parts.append(embedded_png(folders.stage(EVALUATE) / "metric_bars.png"))
        parts.append(table(ordered(evaluation.headline), columns, highlight_vs="base"))
        if ci:
            parts.append("<h3>95% bootstrap intervals</h3>" + interval_table(
                ordered(ci), [c for c in ("ndcg@10", "mrr@10", "precision@1", "recall@10") if c in columns]))
        if p_values := evaluation.p_values_vs_base:
            parts.append("<h3>Paired randomisation test vs the base student (p-values)</h3>"
                         + table(ordered(p_values), list(next(iter(p_values.values())))))
        beside, holm = set(evaluation.beside_headline), evaluation.p_values_by_category_holm
        by_category = {f"{c} (n={evaluation.queries_by_category.get(c, '?')})"
                       + (", synthetic" if c.startswith("synthetic:") else ", beside the headline" if c in beside else ""):
                       {s: v["ndcg@10"] for s, v in rows.items()} | ({"p fine-tuned vs base (Holm)": holm[c]} if c in holm else {})
                       for c, rows in evaluation.by_category.items()}
        systems = [s for s in evaluation.systems if any(s in r for r in by_category.values())]
        parts.append("<h3>NDCG@10 per kind of query</h3><p>Synthetic queries and those marked beside the headline "
                     "are not in the headline; p: paired randomisation test of the fine-tuned student against the "
                     "base on that kind, Holm-corrected across kinds. Every metric per kind is in the evaluation "
                     "report.</p>" + table(by_category, systems + (["p fine-tuned vs base (Holm)"] if holm else []),
                                           highlight_vs=""))
        for key, title in (("by_difficulty", "NDCG@10 per difficulty"),
                           ("topic_coverage_by_difficulty", "Topic coverage (1–5) per difficulty")):
            if per_difficulty := getattr(evaluation, key):
                rows = {f"{d} (n={v['n']})": {s: v[s] for s in systems if s in v} for d, v in per_difficulty.items()}
                parts.append(f"<h3>{title}</h3>" + table(rows, [s for s in systems if any(s in r for r in rows.values())],
                                                         highlight_vs=""))
        parts.append(next_steps_section(metrics, folders.stage(FINETUNE) / "log_history.json"))
    else:
        parts.append("<p><b>No evaluation yet</b>: stage 06 has not finished for this run.</p>")
    maps = MapsFacts.from_metrics(metrics.get(MAPS, {}))
    parts.append("<h2>Maps</h2><p>The fine-tuned map is aligned onto the base map (same axes).</p>"
                 + embedded_png(folders.stage(MAPS) / "umap_category.png"))
    if maps.knn10_label_agreement:
        quality = {f"{measure} by {label}": values for measure in ("knn10_label_agreement", "silhouette")
                   for label, values in getattr(maps, measure).items()}
        parts.append("<h3>Cluster quality</h3>" + table(quality, ["before", "after"]))
    here = exported.machine or machine()  # the machine this run's speed figures come from
    parts.append(training_section(trained, run, here))
    parts.append(search_section(exported, run, here))
    parts.append(ablation_sections(run, DomainAdaptFacts.from_metrics(metrics[DOMAIN_ADAPT]).domain_method
                                   if DOMAIN_ADAPT in metrics else None, runs_root, out_dir))
    links = lambda s: " · ".join(f"<a href='{name}'>{name}</a>" for name in (f"{s}.html", f"{s}.code.html")
                                 if (out_dir / name).exists()) or "—"
    parts.append("<h2>Stages</h2><p>Each stage's report: <code>NN_stage.html</code> (shared, code hidden) and "
                 "<code>NN_stage.code.html</code> (with code).</p><table><thead><tr><th>stage</th><th>reports</th>"
                 "<th>wall time (s)</th><th>finished</th></tr></thead><tbody>" + "".join(
                     f"<tr><td>{s}</td><td>{links(s)}</td><td>{timings.get(s, '—')}</td>"
                     f"<td>{'yes' if s in metrics else 'no'}</td></tr>" for s in STAGES) + "</tbody></table>")
    teacher = TeacherFacts.from_metrics(metrics[TEACHER]).label() if TEACHER in metrics else "?"
    provenance = {"git commit": git_commit(), "teacher": teacher,
                  "machine": f"{machine_label(here)}, {here['system']} {here['arch']}, Python {platform.python_version()}",
                  "parameter files": ", ".join(str(p.relative_to(REPO_ROOT)) for p in param_files)}
    provenance |= data_hashes(folders.stage(CORPUS))
    provenance |= package_versions()
    parts.append("<h2>Provenance</h2>" + table({k: {"value": v} for k, v in provenance.items()}, ["value"]))
    shown = shown_paths(params)
    parts.append("<h2>Parameters (layered files)</h2>" + table({k: {"value": str(v)} for k, v in sorted(shown.items())}, ["value"]))
    parts.append("<h2>Stage metrics</h2>" + "".join(
        f"<h3>{s}</h3><pre>{html.escape(json.dumps(shown_paths(m), indent=1, ensure_ascii=False)[:4000])}</pre>" for s, m in metrics.items()))
    parts.append("</body></html>")
    index = out_dir / "index.html"
    write_text(index, redact("\n".join(parts), secret_values(params)))
    return index


def shown_paths(value):
    """A parameter or metrics value with every absolute path in it as `shown_path` shows it (no home folder)."""
    if isinstance(value, dict):
        return {k: shown_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shown_paths(v) for v in value]
    return shown_path(value) if isinstance(value, str) and value.startswith(("/", "~/")) and "\n" not in value else value


# --- markdown tables for the README (generated from a run's metrics, never typed in) ----------------------------

SYSTEM_LABELS = {"bm25": "BM25 (bm25s, stemmed)", "base": "base all-MiniLM-L6-v2", "domain-adapted": "domain-adapted",
                 "fine-tuned": "fine-tuned (shipped)", "onnx-int8": "fine-tuned, int8 ONNX", "teacher": "teacher",
                 "base-hybrid": "base + BM25 (the hybrid's fusion)"}


def system_label(evaluation: EvaluationFacts, system: str) -> str:
    """A system's name in the tables; the hybrid's says its fusion (runs before stage 05 chose one used RRF)."""
    if system == "hybrid":
        return hybrid_label(evaluation.hybrid or {"fusion": "rrf"})
    return SYSTEM_LABELS.get(system, system)


def table_systems(evaluation: EvaluationFacts) -> list[str]:
    """The systems a result table shows: all but a domain-adapted row that is the base copied (domain_method none)."""
    headline = evaluation.headline
    return [s for s in evaluation.systems if not (s == "domain-adapted" and headline[s] == headline.get("base"))]


def p_text(value: float | None) -> str:
    """A p-value as the tables print it (two significant digits, — for none)."""
    return "—" if value is None else f"{value:.2g}"


def ndcg_with_interval(evaluation: EvaluationFacts, system: str) -> str:
    """A system's headline NDCG@10 with its 95% interval."""
    return format_interval([evaluation.headline[system]["ndcg@10"], *evaluation.headline_ci[system]["ndcg@10"][1:]])


def markdown_results(evaluation: EvaluationFacts) -> str:
    """The README's result tables of one run: the headline per system (NDCG@10 with its 95% interval, MRR@10, P@1,
    Recall@10, p vs base) and NDCG@10 per kind of query with the fine-tuned-vs-base p-values (raw and Holm)."""
    headline, p = evaluation.headline, evaluation.p_values_vs_base
    lines = ["| system | NDCG@10 | MRR@10 | P@1 | Recall@10 | p vs base |", "|---|---|---|---|---|---|"]
    for s in table_systems(evaluation):
        lines.append(f"| {system_label(evaluation, s)} | {ndcg_with_interval(evaluation, s)} | "
                     f"{headline[s]['mrr@10']:.3f} | {headline[s]['precision@1']:.3f} | {headline[s]['recall@10']:.3f} | "
                     f"{p_text(p.get(s, {}).get('ndcg@10'))} |")
    systems = [s for s in ("bm25", "base", "fine-tuned", "hybrid", "teacher") if s in evaluation.systems]
    beside = set(evaluation.beside_headline)
    lines += ["", "| kind of query (n) | " + " | ".join(systems) + " | p fine-tuned vs base | Holm |",
              "|---|" + "---|" * (len(systems) + 2)]
    for c, rows in evaluation.by_category.items():
        if c.startswith("synthetic:"):
            continue
        label = f"{c}{' (beside the headline)' if c in beside else ''} ({evaluation.queries_by_category.get(c, '?')})"
        cells = " | ".join(f"{rows[s]['ndcg@10']:.3f}" if s in rows else "—" for s in systems)
        lines.append(f"| {label} | {cells} | {p_text(evaluation.p_values_by_category.get(c))} | "
                     f"{p_text(evaluation.p_values_by_category_holm.get(c))} |")
    return "\n".join(lines)


STAGE_LABELS = {CORPUS: "corpus", TEACHER: "teacher", PAIRS: "training data", DOMAIN_ADAPT:
                "domain pre-training", FINETUNE: "fine-tuning", EXPORT: "export", EVALUATE: "evaluation",
                MAPS: "maps"}


def markdown_headline(evaluation: EvaluationFacts) -> str:
    """The README's short result table: NDCG@10 with its 95% interval and p vs base, per system."""
    p = evaluation.p_values_vs_base
    return "\n".join(["| system | NDCG@10 [95% interval] | p vs base |", "|---|---|---|"] + [
        f"| {system_label(evaluation, s)} | {ndcg_with_interval(evaluation, s)} | {p_text(p.get(s, {}).get('ndcg@10'))} |"
        for s in table_systems(evaluation)])


def run_facts(run: str, evaluation: EvaluationFacts, runs_root: str | None, reports_root: str | None) -> str:
    """One paragraph: which run, at which commit, on which machine, how many test queries, wall time per stage."""
    folders = Run(run, runs_root)
    exported = ExportFacts.read(folders.stage(EXPORT))
    timings_file = Path(reports_root or REPORTS_DIR) / run / "timings.json"
    timings = read_json(timings_file) if timings_file.is_file() else {}
    stages = ", ".join(f"{STAGE_LABELS.get(s, s)} {timings[s]:.0f}" for s in STAGES if s in timings)
    total = f" (stages {sum(timings.get(s, 0) for s in STAGES) / 60:.1f} min: {stages} s)" if timings else ""
    steps = TrainingFacts.read(folders.stage(FINETUNE)).steps if folders.metrics_path(FINETUNE).is_file() else None
    trained = f"; {steps} fine-tuning steps" if steps is not None else ""
    return (f"Run `{run}` at commit {git_commit()}, {machine_label(exported.machine)}{total}{trained}; "
            f"{headline_queries(evaluation)} held-out {evaluation.split} queries.")


def write_docs(run: str, runs_root: str | None = None, reports_root: str | None = None) -> list[Path]:
    """Rewrite the generated blocks of README.md and docs/results.md from a finished run's metrics."""
    evaluation = EvaluationFacts.read(Run(run, runs_root).stage(EVALUATE))
    blocks = {"facts": run_facts(run, evaluation, runs_root, reports_root), "headline": markdown_headline(evaluation),
              "results": markdown_results(evaluation)}
    written = []
    for path in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results.md"):
        text = path.read_text(encoding="utf-8")
        filled = fill_generated(text, blocks)
        if filled != text:
            write_text(path, filled)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """`python -m lib.report --run dnd-default`: print the result tables of a finished run; `--write-docs` writes them
    into README.md and docs/results.md (`make docs`)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--run", default="dnd-default")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--reports-root", default=None)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.write_docs:
        for path in write_docs(args.run, args.runs_root, args.reports_root):
            print(f"wrote {path.relative_to(REPO_ROOT)}")
        return
    print(markdown_results(EvaluationFacts.read(Run(args.run, args.runs_root).stage(EVALUATE))))


if __name__ == "__main__":
    main()
