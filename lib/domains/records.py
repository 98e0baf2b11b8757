"""Strict reading of users' domain files: every problem is a DataError naming file, line and field."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from pathlib import Path


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


CSV_FIELD_LIMIT = 16 * 1024 * 1024  # characters in one CSV cell (a whole story or chunk fits)


def not_a_folder(path: Path) -> None:
    """A DataError when `path`, named as a file to read, is a folder."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file; rename it or move it out of DATA")


def unreadable(path: Path, err: OSError) -> DataError:
    """The DataError for a file the system would not read (a broken link, permissions, an I/O error)."""
    return DataError(f"{path}: cannot be read ({err.strerror or type(err).__name__}); check the file and its "
                     "permissions")


def read_text(path: Path) -> str:
    """A user file's text (UTF-8, a leading BOM dropped); a folder, a broken link or any read error is a DataError."""
    not_a_folder(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise unreadable(path, err) from None


def parse_json(text: str, where: str) -> object:
    """json.loads with every failure as a DataError at `where` (file or file:line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}{f':{err.lineno}' if ':' not in where else ''}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; flatten the record") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: unreadable JSON value ({err}); write long ids as strings") from None


def read_json_file(path: Path) -> object:
    """One JSON document; every problem names the file (and line), a lone surrogate in a string included."""
    text = read_text(path)
    value = parse_json(text, str(path))
    if may_hold_surrogate(text) and not utf8_encodable(value):
        raise DataError(f"{path}: a string holds a lone surrogate (a \\ud800-\\udfff escape with no pair), which is "
                        "not text; fix the encoding of that record")
    return value


def blank(text: str) -> bool:
    """Whether a text has nothing to embed: only spaces, control or invisible format characters (NUL, U+200B …)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def utf8_encodable(value) -> bool:
    """Whether a JSON value's strings are all valid Unicode (no lone surrogate, which JSON's \\u escapes can carry)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def may_hold_surrogate(json_text: str) -> bool:
    """Whether JSON text has a \\ud800-\\udfff escape, the only way a lone surrogate gets into decoded UTF-8 text."""
    return SURROGATE_ESCAPE.search(json_text) is not None


RECORD_LIMIT = CSV_FIELD_LIMIT  # characters in one JSONL line, as in one CSV cell


def text_lines(path: Path, limit: int = RECORD_LIMIT):
    """(line number, line) of a UTF-8 text file, read a line at a time (a leading BOM dropped); a line over `limit`
    characters is a DataError before more of it is read, so one huge line cannot take the memory."""
    not_a_folder(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            lineno = 0
            while line := fh.readline(limit + 1):
                lineno += 1
                if len(line) > limit and not line.endswith("\n"):
                    raise DataError(f"{path}:{lineno}: the line has more than {limit:,} characters; split the record "
                                    "or shorten its text")
                yield lineno, line.rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} of a block near line {lineno + 1}); save it as "
                        "UTF-8") from None
    except OSError as err:
        raise unreadable(path, err) from None


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a bad line (or a lone surrogate in a field, or a line over 16 MB)
    names file:line."""
    rows = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}:{lineno}")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; each line must be one object")
        if may_hold_surrogate(line) and not utf8_encodable(row):
            field = next(k for k, v in row.items() if not utf8_encodable([k, v]))
            raise DataError(f"{path}:{lineno}: field {field!r} holds a lone surrogate (a \\ud800-\\udfff escape with no "
                            "pair), which is not text; fix the encoding of that record")
        rows.append((lineno, row))
    return rows


def read_csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV file with a header line; empty cells are left out of the row; a repeated column
    name is refused (csv would keep only the last one)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = []
    try:
        header = [h.strip() for h in reader.fieldnames or []]
        repeated = sorted({h for h in header if h and header.count(h) > 1})
        if repeated:
            raise DataError(f"{path}:1: column {repeated[0]!r} appears more than once in the header; keep one")
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more cells than header columns {reader.fieldnames}")
            rows.append((reader.line_num, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return rows


def inside(root: Path) -> None:
    """Refuse a link in `root` (DATA) that is broken or resolves outside it: nothing outside DATA is read."""
    root = root.resolve()
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            target = path.resolve()
            if not target.exists():
                raise DataError(f"{path}: a broken link (to {os.readlink(path)}); remove it or restore its target")
            if not target.is_relative_to(root):
                raise DataError(f"{path}: a link to {target}, outside DATA ({root}); copy the file into DATA instead")


def unique_slugs(ids: list[str]) -> dict[str, str]:
    """A distinct file-name slug per id (a second id with the same slug gets -2, -3, …)."""
    out, taken = {}, set()
    for item_id in ids:
        base = slug(item_id) or "item"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        out[item_id] = name
        taken.add(name)
    return out


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
    if required and blank(value):
        raise DataError(f"{path}:{lineno}: field {field!r} is empty (or only invisible characters); give it text or "
                        "remove the record")
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


def skipped_line(skipped: dict[str, int]) -> str:
    """'skipped from DATA: empty documents 2, qrels unknown document 1', or '' when nothing was skipped."""
    counts = [f"{what.replace('_', ' ')} {n}" for what, n in sorted(skipped.items()) if n]
    return f"skipped from DATA: {', '.join(counts)}" if counts else ""


def slug(text: str) -> str:
    """Lower-case words joined by '-', for ids."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
