"""The runner `make` calls: layered parameters → papermill → HTML report, one stage at a time.

With lib/config.py, the only module that reads parameter files; stage modules get plain arguments from the notebooks."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from lib import ablation, domains
from lib.config import ConfigError, env_passthrough, layered_parameters, param_files, redact, secret_values
from lib.domains.records import DataError
from lib.io import PENDING_MARKER_ENV, PENDING_METRICS, read_json, write_json, write_text
from lib.paths import CORPUS, NOTEBOOKS_DIR, REPORTS_DIR, STAGES, Run, run_name
from lib.progress import HEARTBEAT_SECONDS, TERMINAL_ENV, duration
from lib.report import write_index

KERNEL = "python3"
# the kernel's sockets encrypted with CurveZMQ keys the manager makes (ipykernel supports it; without, every stage
# warns "Kernel is running over TCP without encryption")
KERNEL_CONFIG = {"KernelManager": {"transport_encryption": "auto"}}


def read_notebook(stage: str):
    """The stage's Jupytext percent source as a notebook bound to the python3 kernel."""
    import jupytext

    source = NOTEBOOKS_DIR / f"{stage}.py"
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    return nb


@functools.lru_cache(maxsize=None)
def declared_parameters(stage: str) -> dict:
    """The names (and defaults) in a stage notebook's `parameters` cell."""
    import nbformat
    import papermill

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stage}.ipynb"
        nbformat.write(read_notebook(stage), path)
        return papermill.inspect_notebook(str(path))


def stage_parameters(stage: str, params: dict, files: list[Path]) -> dict:
    """The subset of `params` the stage declares; a name no stage declares is an error (a typo guard)."""
    every = {name for s in STAGES for name in declared_parameters(s)}
    unknown = sorted(set(params) - every)
    if unknown:
        raise ConfigError(f"unknown parameters {unknown} (from {[str(f) for f in files]}, .env or --set): no notebook "
                          "declares them; check the spelling against the notebooks' parameters cells")
    declared = declared_parameters(stage)
    return {k: v for k, v in params.items() if k in declared}


LAB_ENV = ("DOMAIN", "PROFILE", "DATA", "RUNS", "CACHE")  # what `make lab` hands the notebooks it opens


def lab_parameters(stage: str, environ: dict | None = None) -> dict:
    """For a stage notebook opened in JupyterLab (no runner, so papermill injected nothing): the parameters `make all`
    gives this stage — its DOMAIN, PROFILE, DATA, RUNS and CACHE from the environment `make lab` sets (else dnd,
    default) through the same layers (.env included) — and the run's lease, held while the kernel lives, as `make`
    holds it. Under the runner: {} (its parameters are already injected)."""
    environ = os.environ if environ is None else environ
    if environ.get(PENDING_MARKER_ENV):
        return {}
    domain, profile = environ.get("DOMAIN") or "dnd", environ.get("PROFILE") or "default"
    runs_root = str(Path(environ["RUNS"]).expanduser().resolve()) if environ.get("RUNS") else ""
    overrides = ({"data_path": str(Path(environ["DATA"]).expanduser().resolve())} if environ.get("DATA") else {}) | (
        {"cache_root": environ["CACHE"]} if environ.get("CACHE") else {})
    params = stage_parameters(stage, layered_parameters(domain, profile, overrides), param_files(domain, profile))
    run = run_name(domain, profile)
    # the kernel is the owner, not a `make lab` (or `make test`) above it that outlives the run: never left, it ends with
    # this kernel
    run_lease(Run(run, runs_root).path, owner_pid=os.getpid()).__enter__()
    print(f"run {run}: this stage's parameters as `make all DOMAIN={domain} PROFILE={profile}` sets them "
          f"({len(params)} from the parameter files, .env and DATA; the cell above is replaced)")
    return params | {"run_name": run, "runs_root": runs_root}


def kernel_environment() -> None:
    """Environment the kernels inherit: offline hubs, this venv's kernelspec first, .env's OPENAI_*/HF_* keys."""
    for key, value in env_passthrough().items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # load reports and deprecation chatter
    os.environ["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")
    os.environ[PENDING_MARKER_ENV] = "1"  # the stage's metrics.json is written here, after its reports
    os.environ[TERMINAL_ENV] = "1"  # progress as text lines on stderr, which the console echoes


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def offline_outputs(outputs: list, keep_stderr: bool) -> list:
    """Outputs that render without a network: widget views (progress bars) reduced to their text, stderr optional."""
    kept = []
    for out in outputs:
        if out.output_type == "stream" and out.name == "stderr" and not keep_stderr:
            continue
        if WIDGET_VIEW in out.get("data", {}):
            out.data.pop(WIDGET_VIEW)
            if not out.data:
                continue
        kept.append(out)
    return kept


def render_html(executed: Path, html_path: Path, with_code: bool = False) -> None:
    """nbconvert an executed notebook to one self-contained HTML file that opens offline: no scripts from a CDN
    (require.js, MathJax, the widget manager); code and stderr (progress bars, warnings) hidden unless `with_code`."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = offline_outputs(cell.outputs, keep_stderr=with_code)
    exporter = HTMLExporter(exclude_input=not with_code, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    body = re.sub(r"<script[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>", "", body)
    write_text(html_path, body)


def check_data(params: dict) -> None:
    """Read and validate the domain's files as stage 00 will (a DataError names file, line and field)."""
    domains.build_corpus(params.get("domain", "dnd"), params.get("data_path", ""),
                         **{k: v for k, v in params.items() if k not in ("domain", "data_path")})


class StageFailed(RuntimeError):
    """A stage notebook raised: one line with the error; the traceback is in the executed notebook."""


class StageConsole:
    """The text a stage's kernel streams, echoed to the terminal line by line with the stage's name in front and
    every secret replaced; a heartbeat line (cell, elapsed time) whenever the stage printed nothing for
    HEARTBEAT_SECONDS. A file-like object for papermill's stdout_file/stderr_file."""

    def __init__(self, stage: str, cells: int, redact: Callable[[str], str], out=None):
        self.stage, self.cells, self.redact, self.out = stage, cells, redact, out or sys.stdout
        self.cell, self.start = 0, time.monotonic()
        self.last_line = self.start
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self) -> "StageConsole":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def write(self, text: str) -> None:
        """Echo each non-empty line (a carriage return, as tqdm redraws, ends a line too)."""
        with self.lock:
            for line in re.split(r"[\r\n]+", self.redact(text)):
                if line.strip():
                    print(f"  {self.stage} | {line.rstrip()}", file=self.out, flush=True)
                    self.last_line = time.monotonic()

    def flush(self) -> None:
        """Lines are printed as they come."""

    def _heartbeat(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                now = time.monotonic()
                wait = self.last_line + HEARTBEAT_SECONDS - now
                if wait <= 0:
                    where = f"cell {self.cell} of {self.cells}" if self.cell else "starting the kernel"
                    print(f"  {self.stage} | … working ({where}, {duration(now - self.start)})", file=self.out, flush=True)
                    self.last_line, wait = now, HEARTBEAT_SECONDS
            self.stopped.wait(min(wait, 1.0))


class CellTracker(logging.Handler):
    """Reads papermill's "Executing Cell N" log lines into the console's heartbeat; the cells' output reaches the
    terminal through the console (papermill's own log copies of it are dropped); other warnings are printed."""

    def __init__(self, console: StageConsole):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = re.match(r"Executing Cell (\d+)", message)
        if found:
            self.console.cell = int(found.group(1))
        elif record.funcName != "log_output_message" and record.levelno >= logging.WARNING:
            self.console.write(f"papermill: {message}\n")


@contextmanager
def stage_console(stage: str, cells: int, secrets: list[str]) -> Iterator[StageConsole]:
    """A StageConsole for one stage, fed by papermill's log while the stage runs."""
    logger = logging.getLogger("papermill")
    with StageConsole(stage, cells, lambda text: redact(text, secrets)) as console:
        handler, propagate, level = CellTracker(console), logger.propagate, logger.level
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        try:
            yield console
        finally:
            logger.removeHandler(handler)
            logger.propagate, logger.level = propagate, level


def run_stage(stage: str, domain: str, profile: str, runs_root: str | None = None,
              reports_root: str | None = None, overrides: dict | None = None) -> float:
    """Execute one stage notebook with papermill and render its report with every secret redacted (notebook, HTML,
    log lines, metrics); the done-marker metrics.json comes last. Return the wall time in seconds."""
    import nbformat
    import papermill
    from nbclient.exceptions import DeadKernelError
    from traitlets.config import Config

    kernel_environment()
    run = run_name(domain, profile)
    files = param_files(domain, profile)
    every_param = layered_parameters(domain, profile, overrides)
    params = stage_parameters(stage, every_param, files) | {"run_name": run, "runs_root": str(runs_root or "")}
    if stage == CORPUS:
        check_data(params)  # before anything is written: a bad file costs no half-run
    out_dir = Path(reports_root or REPORTS_DIR) / run
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = Run(run, runs_root).metrics_path(stage)
    pending = marker.with_name(PENDING_METRICS)
    marker.unlink(missing_ok=True)
    pending.unlink(missing_ok=True)
    executed, secrets = out_dir / f"{stage}.ipynb", secret_values(every_param)
    notebook = read_notebook(stage)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        source, raw = Path(tmp) / f"{stage}.ipynb", Path(tmp) / "executed.ipynb"
        nbformat.write(notebook, source)
        try:
            with stage_console(stage, len(notebook.cells) + 1, secrets) as console:  # + papermill's parameters cell
                papermill.execute_notebook(str(source), str(raw), parameters=params, kernel_name=KERNEL,
                                           cwd=str(NOTEBOOKS_DIR), progress_bar=False, log_output=True,
                                           stdout_file=console, stderr_file=console, config=Config(KERNEL_CONFIG))
        except papermill.PapermillExecutionError as err:
            raise StageFailed(f"{stage} failed: {redact(err.ename, secrets)}: {redact(err.evalue, secrets)} "
                              f"(the traceback is in {executed})") from None
        except DeadKernelError:
            raise StageFailed(f"{stage} failed: its notebook's kernel died (killed from outside, most often by the "
                              "out-of-memory killer: `dmesg | tail` says; a smaller batch_size or max_items needs less "
                              f"memory); what it printed is in {executed}") from None
        finally:
            if raw.exists():
                write_text(executed, redact(raw.read_text(encoding="utf-8"), secrets))
                render_html(executed, out_dir / f"{stage}.html")
                render_html(executed, out_dir / f"{stage}.code.html", with_code=True)
    if not pending.is_file():
        raise StageFailed(f"{stage} finished without writing its metrics (write_metrics in its last cell)")
    write_text(marker, redact(pending.read_text(encoding="utf-8"), secrets))  # the done-marker, after the reports
    pending.unlink()
    seconds = time.monotonic() - start
    record_timing(out_dir / "timings.json", stage, seconds)
    return seconds


class RunInUse(RuntimeError):
    """Another live `make` (or runner) holds the run folder."""


OWNER_ENV = "CODEX_FORGE_OWNER"  # the Makefile exports the pid of `make`: all its stages hold the run as one owner


def process_identity(pid: int) -> str:
    """"pid start-time" of a live process ("" when it is gone): a reused pid is not the same owner."""
    import psutil

    try:
        return f"{pid} {psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


@contextmanager
def run_lease(folder: Path, owner_pid: int | None = None) -> Iterator[None]:
    """Hold a run folder for this owner (owner_pid, else the `make` that started the runner, else the runner): a
    RunInUse error at once when another live owner holds it. The lease is the owner's identity in <run>/.owner, read and written under an
    flock; it ends with its owner, so a killed run never blocks the next one."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    me = process_identity(owner_pid or int(os.environ.get(OWNER_ENV) or os.getpid())) or process_identity(os.getpid())
    with open(folder / ".owner", "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        holder = fh.read().strip()
        pid = int(holder.split()[0]) if holder[:1].isdigit() else 0
        if holder and holder != me and process_identity(pid) == holder:
            raise RunInUse(f"run {folder.name} is in use by pid {pid} (another `make` or runner on {folder}); wait for "
                           "it to finish or stop it, or use another PROFILE or RUNS")
        fh.seek(0)
        fh.truncate()
        fh.write(me + "\n")
        fh.flush()
    yield


def run_ablation(name: str, domain: str, profile: str, runs_root: str | None = None,
                 reports_root: str | None = None, overrides: dict | None = None, arms: list[str] | None = None) -> Path:
    """Run an ablation's stages once per arm (`arms`: only these, the first is the reference) on the run's shared
    upstream artefacts; write and return results.json. An arm whose stages finished under the same code and
    parameters is reused (a rerun after an interruption continues with the first unfinished stage)."""
    import shutil

    spec = ablation.load_spec(name)
    if arms:
        unknown = [a for a in arms if a not in spec["arms"]]
        if unknown:
            raise ConfigError(f"{spec['path']}: no arm {', '.join(unknown)}; its arms are {', '.join(spec['arms'])}")
        spec["arms"] = {a: spec["arms"][a] for a in arms}
    run, files = run_name(domain, profile), param_files(domain, profile)
    name = spec["name"]
    root = ablation.ablation_dir(run, name, runs_root)
    fingerprint = ablation.code_fingerprint(spec["stages"], files + [spec["path"]])
    arm_roots = {}
    for arm, arm_overrides in spec["arms"].items():
        arm_root = arm_roots[arm] = root / arm
        settings = {"overrides": (overrides or {}) | spec["overrides"] | arm_overrides, "code": fingerprint}
        if (arm_root / "arm.json").is_file() and read_json(arm_root / "arm.json") != settings:
            shutil.rmtree(arm_root)  # code or parameters changed: the arm starts again
        ablation.link_upstream(run, spec["stages"][0], runs_root, arm_root)
        write_json(arm_root / "arm.json", settings)
        for stage in spec["stages"]:
            if Run(run, arm_root).metrics_path(stage).is_file():
                continue
            print(f"[codex-forge] ablation-{name} · {arm} · {stage} …", flush=True)
            seconds = run_stage(stage, domain, profile, str(arm_root),
                                str(Path(reports_root or REPORTS_DIR) / run / f"ablation-{name}" / arm), settings["overrides"])
            print(f"[codex-forge] ablation-{name} · {arm} · {stage} done in {seconds:.0f}s", flush=True)
    results = ablation.results_table(run, arm_roots)
    write_json(root / "results.json", results)
    print(ablation.summary_frame(results).to_string(), flush=True)
    return root / "results.json"


def record_timing(path: Path, stage: str, seconds: float) -> None:
    """Keep the latest wall time of each stage in reports/<run>/timings.json."""
    timings = read_json(path) if path.exists() else {}
    timings[stage] = round(seconds, 1)
    write_json(path, timings)


def parse_overrides(pairs: list[str]) -> dict:
    """NAME=VALUE strings → {name: YAML-parsed value}."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--set expects NAME=VALUE, got {pair!r}")
        out[name.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: `stage NAME`, `all`, `report` or `ablation NAME`, for one DOMAIN and PROFILE."""
    parser = argparse.ArgumentParser(description="Run codex-forge stages with papermill.")
    parser.add_argument("command", choices=["stage", "all", "report", "ablation"])
    parser.add_argument("stage", nargs="?", help="the stage name (stage) or the ablation name (ablation: params/ablations/<name>.yaml)")
    parser.add_argument("--domain", default="dnd")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--runs-root", default=None)
    parser.add_argument("--reports-root", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a parameter (YAML value), e.g. --set num_train_epochs=1")
    parser.add_argument("--data", default="", help="the domain's files (DATA=… of make), e.g. examples/prompts")
    parser.add_argument("--arms", default="", help="ablation: only these arms, comma-separated (the first is the reference)")
    args = parser.parse_args(argv)
    if args.command in ("stage", "ablation") and not args.stage:
        parser.error(f"{args.command} needs a name")
    if args.command == "stage" and args.stage not in STAGES:
        parser.error(f"unknown stage {args.stage!r}; expected one of {STAGES}")
    overrides = parse_overrides(args.set)
    args.runs_root = str(Path(args.runs_root).resolve()) if args.runs_root else None  # the kernels run in notebooks/
    args.reports_root = str(Path(args.reports_root).resolve()) if args.reports_root else None
    if args.data:
        overrides["data_path"] = str(Path(args.data).expanduser().resolve())
    if overrides.get("feedback_path"):  # a path from here, not from notebooks/
        overrides["feedback_path"] = str(Path(overrides["feedback_path"]).expanduser().resolve())
    try:
        with run_lease(Run(run_name(args.domain, args.profile), args.runs_root).path):
            run_command(args, overrides)
    except (ConfigError, DataError, RunInUse) as err:
        print(f"codex-forge: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except StageFailed as err:
        print(f"codex-forge: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def run_command(args: argparse.Namespace, overrides: dict) -> None:
    """Run what the command line asked for."""
    if args.command == "ablation":
        run_ablation(args.stage, args.domain, args.profile, args.runs_root, args.reports_root, overrides,
                     [a.strip() for a in args.arms.split(",") if a.strip()])
        return
    stages = [args.stage] if args.command == "stage" else STAGES if args.command == "all" else []
    for stage in stages:
        print(f"[codex-forge] {run_name(args.domain, args.profile)} · {stage} …", flush=True)
        seconds = run_stage(stage, args.domain, args.profile, args.runs_root, args.reports_root, overrides)
        print(f"[codex-forge] {stage} done in {seconds:.0f}s", flush=True)
    if args.command in ("all", "report"):
        files = param_files(args.domain, args.profile)
        index = write_index(run_name(args.domain, args.profile), layered_parameters(args.domain, args.profile, overrides), files,
                            args.runs_root, args.reports_root)
        print(f"[codex-forge] report: {index}", flush=True)


if __name__ == "__main__":
    main()
