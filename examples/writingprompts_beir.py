"""Make a BEIR folder from the WritingPrompts sample (a writingprompts-sample/ folder): a prompt → its story.

corpus.jsonl = the 600 human stories, queries.jsonl = their prompts, qrels/train.tsv = the 500 pairs of the sample's
train split, qrels/test.tsv = the 100 of its test split (real ground truth: who wrote which story for which prompt).
Usage: python examples/writingprompts_beir.py <writingprompts-sample folder> data/raw/writingprompts-beir"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lib.io import write_jsonl, write_text


def main(source: Path, out: Path) -> None:
    """Write corpus.jsonl, queries.jsonl and qrels/{train,test}.tsv under `out`."""
    rows = [json.loads(line) for line in (source / "writingprompts_sample.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    write_jsonl(out / "corpus.jsonl", [{"_id": f"story-{r['id']}", "title": "", "text": r["story"]} for r in rows])
    write_jsonl(out / "queries.jsonl", [{"_id": f"prompt-{r['id']}", "text": r["prompt"]} for r in rows])
    for split in ("train", "test"):
        lines = ["query-id\tcorpus-id\tscore"] + [f"prompt-{r['id']}\tstory-{r['id']}\t1" for r in rows if r["split"] == split]
        write_text(out / "qrels" / f"{split}.tsv", "\n".join(lines) + "\n")
    print(f"{len(rows)} stories and prompts → {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
