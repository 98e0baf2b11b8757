"""Judgements of search results (👍 +1 / 👎 −1 per query and item, from the search page or POST /v1/feedback): the
sqlite store the server writes, reading it (or a JSONL export of the same rows), the operator's own judged questions
(JSONL, trusted), turning them into stage 02's training queries, and each model version's share of 👍 for the compare
page. A judgement is trusted when it came from a client holding the server's API key or from a judged-questions file:
trusted judgements train in full, anonymous ones within a share cap."""
from __future__ import annotations

import hashlib
import math
import random
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from lib.config import parameter_fields
from lib.io import iter_jsonl
from lib.leakage import near_duplicates, normal_text

REQUIRED = {"query": str, "item_id": str, "judgement": int}


def model_version(model_dir: str | Path) -> str:
    """A short content hash of a model folder's weights (what a feedback row was judged against)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.onnx")):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]



class FeedbackStore:
    """Judgements of search results in a sqlite file (WAL): what a later training step needs to learn from them."""

    COLUMNS = ("created_at", "run", "model_version", "query", "item_id", "item_type", "judgement", "rank", "mode", "comment",
               "trusted")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, run TEXT NOT NULL, "
                        "model_version TEXT NOT NULL, query TEXT NOT NULL, item_id TEXT NOT NULL, item_type TEXT, "
                        "judgement INTEGER NOT NULL CHECK (judgement IN (-1, 1)), rank INTEGER, mode TEXT, comment TEXT, "
                        "trusted INTEGER NOT NULL DEFAULT 0)")
        if "trusted" not in {row[1] for row in self.db.execute("PRAGMA table_info(feedback)")}:  # a store from before
            self.db.execute("ALTER TABLE feedback ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0")
        self.db.commit()

    def add(self, row: dict) -> int:
        """Store one judgement; return its id."""
        with self.lock:
            cursor = self.db.execute(f"INSERT INTO feedback ({', '.join(self.COLUMNS)}) VALUES ({', '.join('?' * len(self.COLUMNS))})",
                                     [int(bool(row.get(c))) if c == "trusted" else row.get(c) for c in self.COLUMNS])
            self.db.commit()
            return int(cursor.lastrowid)

    def rows(self) -> list[dict]:
        """Every judgement, oldest first."""
        with self.lock:
            cursor = self.db.execute(f"SELECT id, {', '.join(self.COLUMNS)} FROM feedback ORDER BY id")
            return [dict(zip(("id", *self.COLUMNS), values)) for values in cursor.fetchall()]

    def close(self) -> None:
        self.db.close()


def read_judgements(path: str | Path) -> list[dict]:
    """Every judgement of a feedback store: the server's sqlite file, or JSONL with one row per line ({query,
    item_id, judgement: 1 or -1}, optionally model_version, rank, created_at, trusted); a bad row is an error naming
    the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feedback file; give the server's feedback.sqlite or a JSONL export "
                                "(python -m lib.serve feedback --run <run> --export <path>)")
    if path.suffix != ".jsonl":
        store = FeedbackStore(path)
        try:
            return store.rows()
        finally:
            store.close()
    rows = []
    for line, row in iter_jsonl(path):
        for field, kind in REQUIRED.items():
            value = row.get(field)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value.strip()):
                raise ValueError(f"{path}:{line}: field {field!r} must be a non-empty {kind.__name__}, got {value!r}")
        if row["judgement"] not in (1, -1):
            raise ValueError(f"{path}:{line}: field 'judgement' must be 1 (a good result) or -1 (a wrong one), "
                             f"got {row['judgement']!r}")
        rows.append(row)
    return rows


def read_judged_questions(path: str | Path) -> list[dict]:
    """The operator's judged questions, JSONL, one question a line: {"question": text, "relevant": {item_id: grade > 0}
    (or a list of ids), "wrong": [item ids judged wrong] (optional)} → trusted judgement rows, each with its line. A
    bad line is an error naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such judged-questions file; give a JSONL file of "
                                '{"question": …, "relevant": {"<item id>": 1}, "wrong": ["<item id>"]} lines')
    rows = []
    for line, row in iter_jsonl(path):
        question, relevant, wrong = row.get("question"), row.get("relevant"), row.get("wrong", [])
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{path}:{line}: field 'question' must be the question's non-empty text, got {question!r}")
        if isinstance(relevant, list):
            relevant = {i: 1 for i in relevant}
        if (not isinstance(relevant, dict) or not relevant or not all(isinstance(k, str) and k for k in relevant)
                or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0 for g in relevant.values())):
            raise ValueError(f"{path}:{line}: field 'relevant' must map each relevant item id to a grade > 0 (or list the "
                             f"ids), got {relevant!r}")
        if not isinstance(wrong, list) or not all(isinstance(i, str) and i for i in wrong):
            raise ValueError(f"{path}:{line}: field 'wrong' must be a list of item ids judged wrong, got {wrong!r}")
        rows += [{"query": question, "item_id": i, "judgement": 1, "trusted": 1, "line": line} for i in relevant]
        rows += [{"query": question, "item_id": i, "judgement": -1, "trusted": 1, "line": line} for i in wrong if i not in relevant]
    return rows


def refuse_evaluation_copies(path: str | Path, rows: list[dict], eval_queries: list[dict], threshold: float) -> None:
    """Stop when a judged question repeats or near-duplicates (word TF-IDF ≥ threshold) an evaluation query: the
    error names the file and line, for a question may not both train and score the model."""
    texts = list(dict.fromkeys(r["query"] for r in rows))
    line = {r["query"]: r.get("line", "?") for r in reversed(rows)}
    seen = {normal_text(q["text"]): q["qid"] for q in eval_queries}
    copies = {i: seen[normal_text(t)] for i, t in enumerate(texts) if normal_text(t) in seen}
    copies |= {i: eval_queries[j]["qid"] for i, j, _ in near_duplicates(texts, [q["text"] for q in eval_queries], threshold)
               if i not in copies}
    if copies:
        first = min(copies)
        raise ValueError(f"{path}:{line[texts[first]]}: question {texts[first]!r} is also the evaluation query "
                         f"{copies[first]!r} ({len(copies)} such): a question cannot both train and score the model; "
                         "remove it from this file (or from the evaluation set)")


@dataclass
class FeedbackSettings:
    """How stage 02 learns from judgements (its parameters of the same names)."""
    near_duplicate_threshold: float = 0.9  # word TF-IDF cosine at which a judged query copies an evaluation query
    positives_per_query: int = 3  # most Good items per judged query
    max_feedback_share: float = 0.1  # anonymous judged queries: at most this share of all training queries
    seed: int = 42

    @classmethod
    def from_params(cls, params: dict) -> FeedbackSettings:
        """The settings from stage 02's parameters."""
        return cls(**parameter_fields(cls, params))


def learned_queries(judgements: list[dict], item_ids: set[str], exclude: set[str], eval_queries: list[dict],
                    other_queries: int, settings: FeedbackSettings) -> tuple[list[dict], dict]:
    """Stage 02's training queries from judgements: the trusted ones (the server's API key, a judged-questions file)
    in full as kind `judged`, the anonymous ones as kind `feedback` within `max_feedback_share` of all training
    queries (`other_queries` are the rest). Returns the queries and the counts (the trusted ones under `trusted`)."""
    trusted = [r for r in judgements if r.get("trusted")]
    anonymous = [r for r in judgements if not r.get("trusted")]
    common = (item_ids, exclude, eval_queries, settings.near_duplicate_threshold, settings.positives_per_query)
    learned, trusted_counts = training_queries(trusted, *common, kind="judged")
    judged, counts = training_queries(anonymous, *common)
    judged, counts["over_share_cap"] = within_share(judged, other_queries + len(learned), settings.max_feedback_share,
                                                    settings.seed)
    return learned + judged, counts | {"training_queries": len(judged), "trusted": trusted_counts}


def judged_queries(judgements: list[dict]) -> dict[str, dict]:
    """Per query (by normalised text; its first spelling kept): the items judged good and wrong, the latest
    judgement of an item counting."""
    latest: dict[tuple[str, str], int] = {}
    spelling: dict[str, str] = {}
    for row in judgements:  # oldest first: a later click replaces an earlier one
        key = normal_text(row["query"])
        spelling.setdefault(key, row["query"].strip())
        latest[(key, row["item_id"])] = int(row["judgement"])
    out: dict[str, dict] = {}
    for (key, item_id), judgement in latest.items():
        entry = out.setdefault(key, {"text": spelling[key], "good": [], "wrong": []})
        entry["good" if judgement > 0 else "wrong"].append(item_id)
    return out


def training_queries(judgements: list[dict], item_ids: set[str], exclude: set[str], eval_queries: list[dict],
                     threshold: float, positives_per_query: int, kind: str = "feedback") -> tuple[list[dict], dict]:
    """Stage 02's query form of the judgements (`kind` names them: feedback, or judged for trusted ones): a 👍 item
    is a positive, a 👎 item a given hard negative of that query. Refused, and counted: queries that repeat or near-duplicate (word TF-IDF ≥ threshold) an evaluation query,
    items not in this corpus or kept out of training, queries with no 👍 left. Returns the queries and the counts."""
    judged = judged_queries(judgements)
    texts = [q["text"] for q in judged.values()]
    seen = {normal_text(q["text"]) for q in eval_queries}
    copies = {i for i, _, _ in near_duplicates(texts, [q["text"] for q in eval_queries], threshold)}
    copies |= {i for i, text in enumerate(texts) if normal_text(text) in seen}
    counts = {"judgements": len(judgements), "queries": len(judged), "refused_eval_copies": len(copies),
              "unknown_or_held_out_items": 0, "without_positive": 0, "training_queries": 0}
    out = []
    for n, q in enumerate(judged.values()):
        if n in copies:
            continue
        usable = lambda ids: [i for i in ids if i in item_ids and i not in exclude]
        good, wrong = usable(q["good"]), usable(q["wrong"])
        counts["unknown_or_held_out_items"] += len(q["good"]) + len(q["wrong"]) - len(good) - len(wrong)
        if not good:
            counts["without_positive"] += 1
            continue
        out.append({"qid": f"{kind}:{n}", "text": q["text"], "kind": kind, "source_id": good[0],
                    "relevant": good[:positives_per_query], "matches": sorted(good),
                    "negatives": [[i, "hard"] for i in wrong]})
    counts["training_queries"] = len(out)
    return out, counts


def within_share(judged: list[dict], other_queries: int, share: float, seed: int) -> tuple[list[dict], int]:
    """At most `share` of all training queries from feedback (a seeded sample of `judged` when there are more), so a
    flood of judgements cannot outweigh the corpus; (kept, dropped). share 1 keeps every one."""
    if share >= 1:
        return judged, 0
    allowed = int(share / (1 - share) * other_queries + 1e-9)
    if len(judged) <= allowed:
        return judged, 0
    kept = sorted(random.Random(seed).sample(range(len(judged)), allowed))
    return [judged[i] for i in kept], len(judged) - allowed


def wilson(positive: int, total: int, z: float = 1.96) -> list[float]:
    """[share, low, high]: a proportion with its Wilson 95 % interval (NaNs for no data)."""
    if total == 0:
        return [math.nan, math.nan, math.nan]
    share = positive / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [share, max(0.0, centre - half), min(1.0, centre + half)]


def share_by_version(judgements: list[dict], versions: dict[str, str]) -> dict[str, dict]:
    """{label: {version, judgements, positive, share [share, low, high]}} for each named model version."""
    out = {}
    for label, version in versions.items():
        mine = [r for r in judgements if r.get("model_version") == version]
        positive = sum(1 for r in mine if int(r["judgement"]) > 0)
        out[label] = {"version": version, "judgements": len(mine), "positive": positive, "share": wilson(positive, len(mine))}
    return out
