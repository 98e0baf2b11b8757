"""Strict reading of users' domain files: every problem is a DataError naming file, line and field."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from lib.io import iter_jsonl


class DataError(ValueError):
    """A domain file that cannot be used; the message names the file (and line, field) and what to do."""


def require_path(path: Path, what: str, folder: bool = False) -> Path:
    """`path` itself, or a DataError saying what was expected there."""
    if not path.exists():
        raise DataError(f"{path}: not found; expected {what}")
    if folder and not path.is_dir():
        raise DataError(f"{path}: not a folder; expected {what}")
    if not folder and not path.is_file():
        raise DataError(f"{path}: not a file; expected {what}")
    return path


def read_json_file(path: Path) -> object:
    """One JSON document; a syntax error names file:line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a bad line names file:line."""
    try:
        return list(iter_jsonl(path))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except ValueError as err:
        raise DataError(str(err)) from None


def read_csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV file with a header line; empty cells are left out of the row."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = []
            for row in reader:
                if None in row:
                    raise DataError(f"{path}:{reader.line_num}: more cells than header columns {reader.fieldnames}")
                rows.append((reader.line_num, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{path}: not valid CSV ({err})") from None
    return rows


def read_table(path: Path) -> list[tuple[int, dict]]:
    """Rows of a .jsonl or .csv file, by its extension."""
    if path.suffix.lower() == ".jsonl":
        return read_jsonl_rows(path)
    if path.suffix.lower() == ".csv":
        return read_csv_rows(path)
    raise DataError(f"{path}: unsupported format {path.suffix or '(no extension)'!r}; give a .csv or .jsonl file")


def text_field(path: Path, lineno: int, row: dict, field: str, required: bool = True) -> str:
    """A string field, stripped; missing, non-string or empty text is a DataError (unless optional and absent)."""
    if field not in row or row[field] is None:
        if required:
            raise DataError(f"{path}:{lineno}: missing field {field!r}; every record needs one")
        return ""
    value = row[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field {field!r} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{path}:{lineno}: field {field!r} is empty; give it text or remove the record")
    return value.strip()


def list_field(path: Path, lineno: int, row: dict, field: str) -> list[str]:
    """A list of strings: a JSON list, or in CSV a string split on ';' or '|' (or ',' when neither is present)."""
    value = row.get(field)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        sep = ";" if ";" in value else "|" if "|" in value else ","
        value = [v for v in value.split(sep)]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}:{lineno}: field {field!r} must be a list of strings (in CSV: 'a; b; c')")
    return [v.strip() for v in value if v.strip()]


def unique_ids(path: Path, ids: list[tuple[int, str]], field: str) -> None:
    """A DataError naming both lines when an id repeats."""
    first: dict[str, int] = {}
    for lineno, value in ids:
        if value in first:
            raise DataError(f"{path}:{lineno}: duplicate {field} {value!r} (first on line {first[value]}); ids must be unique")
        first[value] = lineno


def slug(text: str) -> str:
    """Lower-case words joined by '-', for ids."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
