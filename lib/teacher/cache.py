"""The teacher cache: vectors by (endpoint, model, dimensions, input type, sha256 of the text) in sqlite, and each
run's spending."""
from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

class TeacherCache:
    """Content-addressed sqlite cache (WAL) of teacher vectors: (endpoint, model, dimensions, input type, sha256)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (endpoint TEXT, model TEXT, dimensions INTEGER, input_type TEXT,"
            " sha256 TEXT, vector BLOB, PRIMARY KEY (endpoint, model, dimensions, input_type, sha256))"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS spending (run TEXT PRIMARY KEY, tokens INTEGER)")

    def get(self, key: tuple, texts: list[str]) -> dict[str, np.ndarray]:
        """Cached vectors by text hash for the texts found under `key`."""
        found = {}
        hashes = sorted({text_hash(t) for t in texts})
        for start in range(0, len(hashes), 500):
            chunk = hashes[start:start + 500]
            rows = self.db.execute(
                "SELECT sha256, vector FROM vectors WHERE endpoint=? AND model=? AND dimensions=? AND input_type=?"
                f" AND sha256 IN ({','.join('?' * len(chunk))})", (*key, *chunk),
            )
            found.update({h: np.frombuffer(v, dtype=np.float32) for h, v in rows})
        return usable(found)

    def put(self, key: tuple, texts: list[str], vectors: np.ndarray) -> None:
        """Store one batch and commit it at once."""
        rows = [(*key, text_hash(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in zip(texts, vectors)]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?)", rows)

    def spent(self, run: str) -> int:
        """Tokens the run's teacher calls have spent so far (every stage, every rerun)."""
        row = self.db.execute("SELECT tokens FROM spending WHERE run=?", (run,)).fetchone()
        return int(row[0]) if row else 0

    def add_spent(self, run: str, tokens: int) -> None:
        """Add to the run's spending and commit."""
        with self.db:
            self.db.execute("INSERT INTO spending VALUES (?, ?) ON CONFLICT(run) DO UPDATE SET tokens = tokens + ?",
                            (run, tokens, tokens))

    def reset_spent(self, run: str) -> int:
        """Forget the run's spending (its budget starts again); return what it was."""
        spent = self.spent(run)
        with self.db:
            self.db.execute("DELETE FROM spending WHERE run=?", (run,))
        return spent

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def usable(vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cached vectors worth keeping: finite, not all zero, of the most common dimension (the rest is asked again)."""
    dims = [v.shape[0] for v in vectors.values()]
    dim = max(set(dims), key=dims.count) if dims else 0
    return {h: v for h, v in vectors.items() if v.shape[0] == dim and np.isfinite(v).all() and np.abs(v).sum() > 0}


def text_hash(text: str) -> str:
    """sha256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows (float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
