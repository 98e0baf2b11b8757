"""Releases: a run's shipped model packaged under models/<domain>/<version>/ (the SentenceTransformer folder with its
model card, the ONNX int8 graph, the search index, the evaluation it was measured on, and a manifest of sha256s),
immutable and ordered (v3-20261201-<hash>); models/<domain>/current names the one in use.

    python -m lib.release make --domain dnd --profile default   (make release)
    python -m lib.release list --domain dnd                (make releases)
    python -m lib.release rollback --domain dnd            (make rollback)
    python -m lib.release verify models/dnd/current
    python -m lib.release push v1-20261202-ab12cd34 --domain dnd --repo user/name   (token from HF_TOKEN)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from lib.facts import EvaluationFacts, ExportFacts, PairsFacts, TrainingFacts
from lib.io import atomic_dir, read_json, write_json, write_text
from lib.paths import (CORPUS, EVALUATE, EXPORT, FINETUNE, METRICS_FILE, PAIRS, RELEASE_VERSION, RELEASES_DIR, TEACHER,
                       Run, release_folder, run_name)
from lib.provenance import git_commit, package_versions
from lib.teacher import TeacherFacts

HEADLINE_SYSTEMS = ("base", "fine-tuned", "hybrid", "teacher", "bm25")
TOKEN_ENV = "HF_TOKEN"


class ReleaseError(RuntimeError):
    """A release cannot be made, found or moved; the message says why and what to do."""


def sha256_file(path: Path) -> str:
    """The sha256 of a file (hashlib.file_digest reads it in blocks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


SEAL = "manifest.sha256"  # the manifest's own sha256, beside it: an edited manifest is caught like any other file


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the manifest and its seal, by relative POSIX path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in ("manifest.json", SEAL)}


def write_manifest(release: Path, manifest: dict) -> None:
    """manifest.json with the sha256 of every file of the release, and the manifest's own sha256 beside it."""
    write_json(release / "manifest.json", manifest | {"files": file_hashes(release)})
    write_text(release / SEAL, f"{sha256_file(release / 'manifest.json')}  manifest.json\n")


def manifest_intact(release: Path) -> bool:
    """Whether a release's manifest.json still has the sha256 written beside it when it was released."""
    seal = release / SEAL
    return seal.is_file() and seal.read_text(encoding="utf-8").split()[:1] == [sha256_file(release / "manifest.json")]


@contextmanager
def domain_lock(folder: Path) -> Iterator[None]:
    """Hold models/<domain>/ for one `make release` at a time (an flock; a second waits, saying so)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".release.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another `make release` is writing {folder}; waiting for it to finish", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def domain_dir(domain: str, root: str | Path | None = None) -> Path:
    """models/<domain>/ (or <root>/<domain>/), where a domain's releases live."""
    return Path(root or RELEASES_DIR) / domain


def releases(folder: Path) -> list[dict]:
    """The manifests of a domain's releases, oldest first (by version number)."""
    found = []
    for path in folder.glob("v*/manifest.json"):
        match = RELEASE_VERSION.match(path.parent.name)
        if match:
            found.append((int(match.group(1)), read_json(path) | {"path": str(path.parent)}))
    return [manifest for _, manifest in sorted(found, key=lambda pair: pair[0])]


def next_version(existing: list[str], model_sha: str, day: str) -> str:
    """The next version name: v<n+1>-<YYYYMMDD>-<first 8 hex of the model's sha256>."""
    numbers = [int(m.group(1)) for m in map(RELEASE_VERSION.match, existing) if m]
    return f"v{max(numbers, default=0) + 1}-{day}-{model_sha[:8]}"


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model folder's files (names and contents): two releases of the same weights share it."""
    digest = hashlib.sha256()
    for name, sha in file_hashes(model_dir).items():
        if name != "README.md":  # the card differs between releases of the same weights
            digest.update(f"{name} {sha}\n".encode())
    return digest.hexdigest()


def pointer(folder: Path) -> Path:
    """models/<domain>/current, the one-line file naming the release in use; a ReleaseError when something else (a
    folder, a link to one) sits there."""
    path = folder / "current"
    if path.exists() and not path.is_file():
        raise ReleaseError(f"{path}: a folder, not the one-line file naming the current release; move it out of "
                           f"{folder} (it is not a release) and run again")
    return path


def current(folder: Path) -> str | None:
    """The version models/<domain>/current names, or None."""
    path = pointer(folder)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def set_current(folder: Path, version: str) -> None:
    """Point models/<domain>/current at a version (a one-line text file, written atomically)."""
    if not (folder / version / "manifest.json").is_file():
        raise ReleaseError(f"{folder / version}: no such release; `make releases` lists them")
    write_text(pointer(folder), version + "\n")


def resolve(path: str | Path, verified: bool = True) -> Path:
    """A release folder from its path, models/<domain>/current, models/<domain>/v<n> (its number), or a version name
    under models/*/; `verified`: a ReleaseError unless every file matches its (sealed) manifest, so nothing loads a
    tampered or damaged release."""
    path = Path(path)
    if path.name == "current":
        pointer(path.parent)  # a folder sitting there is refused, with what to do
    found = release_folder(path)
    if found is None:
        raise ReleaseError(f"{path}: not a release (no manifest.json); give models/<domain>/<version>, "
                           "models/<domain>/current or a version name (`make releases` lists them)")
    path = found
    problems = verify(path) if verified else []
    if problems:
        raise ReleaseError(f"{path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                           + f" — its files differ from its manifest, so it is not used; `python -m lib.release verify "
                           f"{path}` lists them; `make rollback` serves the release before it")
    return path


def headline_queries(evaluation: EvaluationFacts) -> int:
    """How many queries the headline pools (stage 06's headline categories)."""
    counts = evaluation.queries_by_category
    return sum(counts.get(c, 0) for c in evaluation.headline_categories) or evaluation.queries


def headline(evaluation: EvaluationFacts) -> dict:
    """The headline systems' metrics with their 95 % intervals, as the card and `make releases` show them."""
    ci = evaluation.headline_ci
    return {system: {metric: ci[system][metric] for metric in ("ndcg@10", "mrr@10", "recall@10") if metric in ci[system]}
            for system in HEADLINE_SYSTEMS if system in ci}


def model_card(manifest: dict) -> str:
    """The model card (README.md): metadata the hub reads, then what it is, how it was made and measured, how to load it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    numbers = manifest["headline"]
    results = [EvalResult(task_type="sentence-similarity", task_name="Retrieval", dataset_type=f"codex-forge/{manifest['domain']}",
                          dataset_name=f"{manifest['domain']} held-out {manifest['split']} queries", dataset_split=manifest["split"],
                          metric_type=metric.replace("@", "_at_"), metric_name=metric.upper(), metric_value=values[0])
               for metric, values in numbers.get("fine-tuned", {}).items()]
    data = ModelCardData(eval_results=results or None,
        library_name="sentence-transformers", pipeline_tag="sentence-similarity", license=manifest["model_license"],
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "codex-forge", manifest["domain"]],
        base_model=manifest["base_model"] if "/" in manifest["base_model"] else None,
        model_name=f"codex-forge {manifest['domain']} {manifest['version']}")
    rows = "\n".join(f"| {system} | " + " | ".join(f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for v in metrics.values()) + " |"
                     for system, metrics in numbers.items())
    metric_names = next(iter(numbers.values()), {}).keys()
    p = manifest.get("p_values_vs_base", {}).get("fine-tuned", {}).get("ndcg@10")
    body = f"""
# codex-forge · {manifest['domain']} · {manifest['version']}

A sentence-embedding model fine-tuned for the **{manifest['domain']}** corpus by codex-forge:
{manifest['base_model']} → domain pre-training → contrastive
fine-tuning (MultipleNegativesRankingLoss) on pairs mined with the teacher **{manifest['teacher']}**.
{manifest['dimensions']}-dimensional, normalised embeddings; {manifest['max_seq_length']} tokens.

## Measured (test queries the model never trained on)

{manifest['queries']} {manifest['split']} queries; mean [95 % bootstrap interval]; fine-tuned vs base NDCG@10 paired
randomisation p = {p if p is not None else 'n/a'}.

| system | {' | '.join(metric_names)} |
|---|{'---|' * len(metric_names)}
{rows}

The search this release serves: **{manifest['search']['mode']}** ({manifest['search']['fusion']}, dense weight
{manifest['search']['dense_weight']}), backend {manifest['search']['backend']}.

## Use

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("path/to/{manifest['version']}/model")
queries = model.encode_query(["a creature that turns people to stone"], normalize_embeddings=True)
documents = model.encode_document(["Medusa: a gaze that turns flesh to stone."], normalize_embeddings=True)
```

`encode_query` and `encode_document` put the model's own prompts (if it has any) before the texts.

Search with the release's index: `python -m lib.search --index path/to/{manifest['version']} "your query"`, or serve
it: `python -m lib.serve --index path/to/{manifest['version']}`.

## Made from

- run `{manifest['run']}`, commit `{manifest['git_commit']}`, released {manifest['created']}
- corpus: {manifest['corpus']['items']} items, fingerprint `{manifest['corpus']['fingerprint']}`; data licence:
  {manifest['data_license']}
- training: {', '.join(f'{k} {v}' for k, v in manifest['training'].items())}
- every file's sha256: `manifest.json` beside this folder
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def run_facts(run: Run) -> dict:
    """What a release says about the run it packages: teacher, training, search, corpus fingerprint."""
    teacher = TeacherFacts.read(run.stage(TEACHER))
    trained = TrainingFacts.read(run.stage(FINETUNE))
    exported = ExportFacts.read(run.stage(EXPORT))
    index = read_json(run.index / "retriever.json")
    corpus = run.stage(CORPUS)
    digest = hashlib.sha256()
    for name in ("items.jsonl", "queries.jsonl", "relations.jsonl"):
        if (corpus / name).exists():
            digest.update(sha256_file(corpus / name).encode())
    return {
        "teacher": teacher.label(),
        "dimensions": int(index.get("dimension", 0)),
        "max_seq_length": int(index.get("encoder", {}).get("max_seq_length", trained.eval_max_seq_length)),
        "training": {k: getattr(trained, k) for k in ("loss", "batch_sampler", "steps", "train_pairs", "blend_alpha",
                                                      "distill")},
        "search": {k: index.get(k) for k in ("mode", "fusion", "dense_weight", "rrf_k")}
                  | {"backend": index.get("encoder", {}).get("backend", exported.default_backend)},
        "corpus": {"items": int(index.get("items", 0)), "fingerprint": digest.hexdigest()[:16]},
        "feedback": PairsFacts.read(run.stage(PAIRS)).feedback,
    }


def copy_index(source: Path, target: Path, backend: str, max_seq_length: int) -> None:
    """The run's saved index, its encoder pointed at the release's own model and ONNX folders."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("retriever.json"))
    settings = read_json(source / "retriever.json")
    settings["encoder"] = {"backend": backend, "model_dir": "../model", "export_dir": "../onnx",
                           "max_seq_length": max_seq_length,
                           **{k: v for k, v in settings.get("encoder", {}).items() if k == "dimensions"}}
    write_json(target / "retriever.json", settings)


def make_release(run_name: str, domain: str, runs_root: str | Path | None = None, root: str | Path | None = None,
                 now: datetime | None = None) -> Path:
    """Package a finished run as the domain's next release and make it current; the existing release when these
    weights were released before (versions are immutable: nothing is overwritten)."""
    folder = domain_dir(domain, root)
    pointer(folder)  # something else where `current` goes stops the release before any work
    run = Run(run_name, runs_root)
    needed = [run.model / "modules.json", run.index / "retriever.json",
              run.metrics_path(EVALUATE)]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ReleaseError(f"run {run_name!r} is not finished ({', '.join(missing)} missing): `make all` first")
    with domain_lock(folder):  # the version chosen, copied and made current by one release at a time
        return release_locked(run, domain, folder, now)


def release_locked(run: Run, domain: str, folder: Path, now: datetime | None) -> Path:
    """make_release's work, with models/<domain>/ held."""
    run_name = run.name
    model_dir = run.model
    fingerprint = model_fingerprint(model_dir)
    for manifest in releases(folder):
        if manifest["model_sha256"] == fingerprint:
            set_current(folder, manifest["version"])
            print(f"{manifest['version']}: these weights are already released; it is current again")
            return Path(manifest["path"])

    now = now or datetime.now(timezone.utc)
    version = next_version([p.name for p in folder.glob("v*")], fingerprint, now.strftime("%Y%m%d"))
    evaluation = EvaluationFacts.read(run.stage(EVALUATE))
    facts = run_facts(run)
    export_dir = run.stage(EXPORT)
    backend = facts["search"]["backend"]
    manifest = {
        "version": version, "domain": domain, "run": run_name, "created": now.isoformat(timespec="seconds"),
        "git_commit": git_commit(), "model_sha256": fingerprint,
        **({"base_model": "all-MiniLM-L6-v2", "model_license": "apache-2.0", "data_license": "not stated"}
           | ExportFacts.read(export_dir).model_card),
        **facts, "split": evaluation.split, "queries": headline_queries(evaluation),
        "headline": headline(evaluation), "p_values_vs_base": evaluation.p_values_vs_base,
        "packages": package_versions(),
    }
    with atomic_dir(folder / version) as tmp:
        print(f"{version}: copying the model, the ONNX graphs, the index and the evaluation of run {run_name}", flush=True)
        shutil.copytree(model_dir, tmp / "model")
        write_text(tmp / "model" / "README.md", model_card(manifest))
        (tmp / "onnx").mkdir()
        shutil.copytree(export_dir / "tokenizer", tmp / "onnx" / "tokenizer")
        for name in ["model-int8.onnx"] + (["model.onnx"] if backend == "onnx-fp32" else []):
            shutil.copy2(export_dir / name, tmp / "onnx" / name)
        copy_index(export_dir / "index", tmp / "index", backend, facts["max_seq_length"])
        (tmp / "evaluation").mkdir()
        shutil.copy2(run.metrics_path(EVALUATE), tmp / "evaluation" / METRICS_FILE)
        shutil.copy2(export_dir / METRICS_FILE, tmp / "evaluation" / "export.json")  # the backends' parity gate
        for name in ("per_query.csv",):
            if (run.stage(EVALUATE) / name).exists():
                shutil.copy2(run.stage(EVALUATE) / name, tmp / "evaluation" / name)
        for name in ("items.jsonl", "queries.jsonl", "relations.jsonl"):
            if (run.stage(CORPUS) / name).exists():
                shutil.copy2(run.stage(CORPUS) / name, tmp / "evaluation" / name)
        if (run.stage(PAIRS) / "held_out_queries.jsonl").exists():
            shutil.copy2(run.stage(PAIRS) / "held_out_queries.jsonl", tmp / "evaluation" / "held_out_queries.jsonl")
        write_manifest(tmp, manifest)
    set_current(folder, version)
    return folder / version


def verify(release: Path) -> list[str]:
    """Files of a release whose sha256 differs from its manifest, or that are missing or extra, the manifest itself
    first when it differs from its seal (empty: intact)."""
    if not manifest_intact(release):
        return [f"changed: manifest.json (its sha256 is not the one in {SEAL})" if (release / SEAL).is_file()
                else f"missing: {SEAL} (the manifest's own sha256)"]
    listed = read_json(release / "manifest.json")["files"]
    found = file_hashes(release)
    return sorted([f"changed: {n}" for n in listed if n in found and found[n] != listed[n]]
                  + [f"missing: {n}" for n in listed if n not in found] + [f"extra: {n}" for n in found if n not in listed])


def rollback(folder: Path) -> tuple[str, str]:
    """Point `current` at the release before it; (from, to)."""
    versions = [m["version"] for m in releases(folder)]
    now = current(folder)
    if now not in versions:
        raise ReleaseError(f"{folder}: no current release to roll back from (`make release` makes one)")
    position = versions.index(now)
    if position == 0:
        raise ReleaseError(f"{folder}: {now} is the oldest release; there is nothing to roll back to")
    set_current(folder, versions[position - 1])
    return now, versions[position - 1]


def releases_table(folder: Path) -> str:
    """One line per release, oldest first: version, run, date, test NDCG@10 of fine-tuned and hybrid, current marked."""
    now = current(folder)
    lines = [f"{'':2}{'version':28} {'run':22} {'created':20} {'fine-tuned NDCG@10':24} {'hybrid NDCG@10':24} search"]
    for m in releases(folder):
        if not manifest_intact(Path(m["path"])):
            lines.append(f"  {m['version']:28} manifest.json differs from its {SEAL}: not shown (python -m lib.release "
                         f"verify {m['path']})")
            continue
        cells = []
        for system in ("fine-tuned", "hybrid"):
            v = m["headline"].get(system, {}).get("ndcg@10")
            cells.append(f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "-")
        mark = "* " if m["version"] == now else "  "
        lines.append(f"{mark}{m['version']:28} {m['run']:22} {m['created'][:19]:20} {cells[0]:24} {cells[1]:24} "
                     f"{m['search']['mode']}/{m['search']['backend']}")
    return "\n".join(lines)


def push(release: Path, repo: str, token_env: str = TOKEN_ENV) -> str:
    """Upload a release's model folder (with its card), ONNX graphs and manifest to the Hugging Face hub; the token
    comes from the environment only."""
    token = os.environ.get(token_env, "")
    if not token:
        raise ReleaseError(f"no hub token: set the environment variable {token_env} (a write token from "
                           "https://huggingface.co/settings/tokens); it is never read from a file or an argument")
    if verify(release):
        raise ReleaseError(f"{release}: files differ from its manifest ({'; '.join(verify(release)[:5])}); not pushed")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(release / "model"), repo_id=repo, commit_message=f"codex-forge {release.name}")
    api.upload_folder(folder_path=str(release / "onnx"), path_in_repo="onnx", repo_id=repo)
    api.upload_file(path_or_fileobj=str(release / "manifest.json"), path_in_repo="manifest.json", repo_id=repo)
    return f"https://huggingface.co/{repo}"


def main(argv: list[str] | None = None) -> None:
    """CLI: make, list, rollback, verify, push."""
    parser = argparse.ArgumentParser(prog="python -m lib.release", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    made = sub.add_parser("make", help="package a finished run as the domain's next release and make it current")
    made.add_argument("--domain", default="dnd")
    made.add_argument("--profile", default="default")
    made.add_argument("--runs-root", default=None)
    for name in ("list", "rollback"):
        p = sub.add_parser(name, help={"list": "the domain's releases", "rollback": "make the release before current current"}[name])
        p.add_argument("--domain", required=True)
    for p in sub.choices.values():
        p.add_argument("--root", default=None, help="where releases live (default models/)")
    checked = sub.add_parser("verify", help="check a release's files against its manifest")
    checked.add_argument("release")
    pushed = sub.add_parser("push", help=f"upload a release to the hub (token from ${TOKEN_ENV})")
    pushed.add_argument("release", help="a version name, models/<domain>/<version> or models/<domain>/current")
    pushed.add_argument("--domain", default=None)
    pushed.add_argument("--repo", required=True, help="user/name on the hub")
    args = parser.parse_args(argv)
    try:
        if args.command == "make":
            path = make_release(run_name(args.domain, args.profile), args.domain, args.runs_root, args.root)
            print(f"released {path} (current); `make releases` lists them, `make rollback` goes back")
        elif args.command == "list":
            folder = domain_dir(args.domain, args.root)
            print(releases_table(folder) if releases(folder) else f"no releases in {folder} yet: `make release` after `make all`")
        elif args.command == "rollback":
            before, after = rollback(domain_dir(args.domain, args.root))
            print(f"current: {before} → {after}")
        elif args.command == "verify":
            problems = verify(resolve(args.release, verified=False))
            print("\n".join(problems) or "intact: every file matches the manifest")
            sys.exit(1 if problems else 0)
        else:
            target = domain_dir(args.domain) / args.release if args.domain and RELEASE_VERSION.match(args.release) else args.release
            print(f"pushed to {push(resolve(target), args.repo)}")
    except ReleaseError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
