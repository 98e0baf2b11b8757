"""lib.config: the seed project's .env keys on top of the parameter files, and errors that say where."""
import os
import subprocess

import pytest
from conftest import SEED_DOTENV

from lib import config, pipeline
from lib.config import ConfigError


def env_file(tmp_path, text: str):
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_env_keys_map_onto_notebook_parameters(tmp_path):
    path = env_file(tmp_path, """# the seed project's .env
BASE_MODEL=/models/my-student
MODEL_BACKEND=huggingface
LEARNING_RATE=3e-5
BATCH_SIZE_GPU=64
BATCH_SIZE_CPU=12
NUM_EPOCHS=2
MAX_SEQ_LENGTH=256
NUM_HARD_NEGATIVES=2
POSITIVES_PER_QUERY=4
SYNTHETIC_EXPANSION_FACTOR=7
MIN_TOPIC_COVERAGE=0.5
RECALL_K_VALUES=[1,3,5,10]
OPENAI_API_KEY=not-a-parameter
""")
    params = config.env_parameters(path, environ={}, has_gpu=False)
    assert params == {"base_model": "/models/my-student", "teacher_backend": "local", "learning_rate": 3e-5,
                      "per_device_train_batch_size": 12, "num_train_epochs": 2.0, "max_seq_length": 256,
                      "num_hard_negatives": 2, "positives_per_query": 4, "synthetic_expansion_factor": 7,
                      "min_topic_coverage": 3.0, "recall_k_values": [1, 3, 5, 10]}
    assert config.env_parameters(path, environ={}, has_gpu=True)["per_device_train_batch_size"] == 64
    assert "OPENAI_API_KEY" not in str(params)  # secrets stay in the environment, never in parameters


def test_environment_overrides_the_file_and_every_name_is_declared(tmp_path):
    path = env_file(tmp_path, "NUM_EPOCHS=2\n")
    assert config.env_parameters(path, environ={"NUM_EPOCHS": "5"}, has_gpu=False) == {"num_train_epochs": 5.0}
    declared = {name for stage in pipeline.STAGES for name in pipeline.declared_parameters(stage)}
    assert set(config.ENV_KEYS.values()) <= declared


def test_layers_default_domain_env_profile_overrides(tmp_path):
    path = env_file(tmp_path, "NUM_EPOCHS=4\nBATCH_SIZE_CPU=12\nBATCH_SIZE_GPU=12\n")
    merged = config.layered_parameters("dnd", "default", env_file=path, environ={})
    assert merged["num_train_epochs"] == 4.0 and merged["per_device_train_batch_size"] == 12  # .env over default.yaml
    smoke = config.layered_parameters("dnd", "smoke", {"seed": 7}, env_file=path, environ={})
    assert smoke["per_device_train_batch_size"] == 8  # the profile over .env
    assert smoke["seed"] == 7 and smoke["domain"] == "dnd"


def test_the_seed_projects_example_env_runs_as_written(tmp_path, capsys):
    root = tmp_path / "project"
    root.mkdir()
    path = env_file(tmp_path, f"# Project paths\nPROJECT_ROOT={root}\n\n" + SEED_DOTENV)
    params = config.env_parameters(path, environ={}, has_gpu=False)
    assert params["teacher_backend"] == "openai" and params["teacher_base_url"] == "http://localhost:11434/v1"
    assert params["teacher_model"] == "nomic-embed-text" and "base_model" not in params  # Ollama's model, not the student
    assert params["teacher_dimensions"] == 768 and params["per_device_train_batch_size"] == 8
    assert capsys.readouterr().err == ""  # every key is known
    assert config.project_root(path, environ={}) == str(root.resolve())
    assert config.env_parameters(env_file(tmp_path, "MODEL_BACKEND=ollama\n"), environ={}, has_gpu=False)[
        "teacher_model"] == "nomic-embed-text"


def test_project_root_places_runs_reports_and_cache(tmp_path):
    with pytest.raises(ConfigError, match=r"\.env:1: PROJECT_ROOT='/no/such/folder' is not a folder"):
        config.project_root(env_file(tmp_path, "PROJECT_ROOT=/no/such/folder\n"), environ={})
    assert config.project_root(None, environ={"PROJECT_ROOT": str(tmp_path)}) == str(tmp_path.resolve())
    dry = subprocess.run(["make", "-n", "all"], cwd=config.REPO_ROOT, capture_output=True, text=True,
                         env=os.environ | {"PROJECT_ROOT": str(tmp_path)})
    assert f'--runs-root "{tmp_path.resolve()}/data/runs" --reports-root "{tmp_path.resolve()}/reports"' in dry.stdout
    assert f"cache_root={tmp_path.resolve()}/data/cache" in dry.stdout
    wrong = subprocess.run(["make", "help"], cwd=config.REPO_ROOT, capture_output=True, text=True,
                           env=os.environ | {"PROJECT_ROOT": str(tmp_path / "missing")})
    assert wrong.returncode != 0 and "is not a folder; create it" in wrong.stderr


def test_env_errors_name_file_line_and_key(tmp_path, capsys):
    params = config.env_parameters(env_file(tmp_path, "NUM_EPOCHS=1\nWARMUP_STEPS=100\n"), environ={}, has_gpu=False)
    assert params == {"num_train_epochs": 1.0}  # an unknown key does not stop the run: one warning line names it
    warned = capsys.readouterr().err
    assert warned.count("\n") == 1 and ".env:2: unknown key 'WARMUP_STEPS' ignored" in warned
    with pytest.raises(ConfigError, match=r"\.env:1: NUM_HARD_NEGATIVES='three' is not valid"):
        config.env_parameters(env_file(tmp_path, "NUM_HARD_NEGATIVES=three\n"), environ={}, has_gpu=False)
    with pytest.raises(ConfigError, match=r"MIN_TOPIC_COVERAGE='3' is not valid \(expected the share"):
        config.env_parameters(env_file(tmp_path, "MIN_TOPIC_COVERAGE=3\n"), environ={}, has_gpu=False)
    with pytest.raises(ConfigError, match=r"\.env:1: expected KEY=VALUE"):
        config.env_parameters(env_file(tmp_path, "just words\n"), environ={}, has_gpu=False)
    with pytest.raises(ConfigError, match="environment variable MODEL_BACKEND"):
        config.env_parameters(None, environ={"MODEL_BACKEND": "carrier-pigeon"}, has_gpu=False)



def test_secrets_in_env_go_to_the_environment_not_parameters(tmp_path):
    path = env_file(tmp_path, "OPENAI_API_KEY=sk-test-123\nOPENAI_BASE_URL=http://127.0.0.1:9/v1\nNUM_EPOCHS=1\n")
    assert config.env_passthrough(path) == {"OPENAI_API_KEY": "sk-test-123", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    merged = config.layered_parameters("dnd", "default", env_file=path, environ={})
    assert "sk-test-123" not in repr(merged)


def test_an_endpoint_key_in_env_is_read_by_the_teacher_and_redacted(tmp_path):
    from lib import teacher

    path = env_file(tmp_path, "MY_GATEWAY_KEY=gw-key-55555555\nNUM_EPOCHS=1\n")
    assert "gw-key-55555555" not in repr(config.env_parameters(path, environ={}, has_gpu=False))
    assert teacher.read_secret("MY_GATEWAY_KEY", path) == "gw-key-55555555"
    secrets = config.secret_values({"teacher_api_key_env": "MY_GATEWAY_KEY"}, path, environ={"GATEWAY": "short"})
    assert secrets == ["gw-key-55555555"]
    assert config.redact("key gw-key-55555555 at https://u:p4ss@h/v1", secrets) == "key [redacted] at https://[redacted]@h/v1"


def test_a_parameter_set_twice_in_one_file_is_refused_with_its_line(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("max_steps: 8\nloss: mnrl\n# a comment\nmax_steps: 9\n")
    with pytest.raises(ConfigError, match=r"p.yaml:4: 'max_steps' is set twice in this file"):
        config.load_params([profile])
    profile.write_text("max_steps: 8\nloss: mnrl\n")
    assert config.load_params([profile]) == {"max_steps": 8, "loss": "mnrl"}


def test_every_shipped_parameter_file_sets_each_key_once():
    from lib.paths import PARAMS_DIR

    for path in sorted(PARAMS_DIR.rglob("*.yaml")):
        assert config.repeated_key(path) is None, path
