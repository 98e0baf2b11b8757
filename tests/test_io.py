"""Atomic writes and JSONL errors that name the file, line and field."""
import json

import pytest

from lib.io import atomic_dir, atomic_path, read_jsonl, write_jsonl


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_until_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise ValueError
    assert target.read_text() == "old"


def test_atomic_dir_replaces_the_folder_only_on_success(tmp_path):
    target = tmp_path / "index"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_jsonl_roundtrip(tmp_path):
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    assert write_jsonl(tmp_path / "r.jsonl", rows) == 2
    assert read_jsonl(tmp_path / "r.jsonl") == rows


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"items\.jsonl:2: invalid JSON"):
        read_jsonl(path)


def test_missing_and_mistyped_fields_are_named(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "t"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"items\.jsonl:2: missing field 'text'"):
        read_jsonl(path, {"id": str, "text": str})
    path.write_text(json.dumps({"id": 3, "text": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"items\.jsonl:1: field 'id' must be str, got int"):
        read_jsonl(path, {"id": str, "text": str})
