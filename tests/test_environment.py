"""The project's install files agree, git tracks the lib package, and every entry point is offline."""
import os
import subprocess
import tomllib

import yaml

from lib.paths import REPO_ROOT


def test_environment_yml_installs_what_pyproject_declares():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(pip_section) == sorted(declared)


def test_torch_is_pinned_to_the_cpu_build_on_disk():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in declared


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
