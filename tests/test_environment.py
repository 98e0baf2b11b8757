"""The project's install files agree, and git tracks the lib package."""
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
