"""Reading and writing artefacts: atomic writes, JSONL with errors that name file, line and field."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lib.config import parameter_fields
from lib.paths import METRICS_FILE


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    try:
        yield tmp
        if path.exists():
            path.rename(old)  # two renames: a reader never sees a half-deleted folder (the run lease keeps writers apart)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented, NaN refused)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


PENDING_MARKER_ENV = "CODEX_FORGE_PENDING_MARKER"  # set by the runner: it writes metrics.json after the reports
PENDING_METRICS = "metrics.pending.json"  # what a stage writes under the runner, renamed to metrics.json by it


def write_metrics(folder: str | Path, metrics: dict) -> None:
    """A stage's last act: its metrics.json, the done-marker. Under the runner (which sets CODEX_FORGE_PENDING_MARKER)
    it is metrics.pending.json, renamed to metrics.json once the stage's reports are written."""
    write_json(Path(folder) / (PENDING_METRICS if os.environ.get(PENDING_MARKER_ENV) else METRICS_FILE), metrics)


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file and position on a syntax error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); fix or regenerate the file") from None


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write one JSON object per line atomically; return the number of rows."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a bad line raises ValueError with file:line."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path, required: dict[str, type] | None = None) -> list[dict]:
    """Read JSONL; a bad line or a missing/mistyped `required` field raises with file:line and field."""
    rows = []
    for lineno, row in iter_jsonl(path):
        for field, kind in (required or {}).items():
            if field not in row:
                raise ValueError(f"{path}:{lineno}: missing field {field!r}; add it to every line")
            if not isinstance(row[field], kind):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be {kind.__name__}, got {type(row[field]).__name__}")
        rows.append(row)
    return rows


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save a numpy array atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


class StageFacts:
    """Base of a stage's typed facts (a frozen dataclass): written into its metrics.json by the notebook
    (as_metrics) and read back by later code (read), so nothing else parses those keys."""

    def as_metrics(self) -> dict:
        """The facts as the stage's metrics.json holds them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_metrics(cls, metrics: dict):
        """The facts inside the stage's metrics (keys it lacks keep their defaults)."""
        return cls(**parameter_fields(cls, metrics))

    @classmethod
    def read(cls, path: str | Path):
        """The facts a finished stage wrote: its folder, or the metrics file itself."""
        path = Path(path)
        return cls.from_metrics(read_json(path / METRICS_FILE if path.is_dir() else path))
