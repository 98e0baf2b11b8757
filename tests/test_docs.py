"""The front door and the docs: a short README whose links work, and result blocks written from metrics, not typed."""
import re

from lib import provenance, report
from lib.facts import EvaluationFacts
from lib.paths import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def test_the_readme_is_short():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_relative_link_leads_to_a_file():
    broken = []
    for page in PAGES:
        prose = re.sub(r"`[^`]*`", "", page.read_text())  # a link inside code is an example, not a link
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)} → {target}")
    assert not broken


def test_every_doc_page_is_reachable_from_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    for page in PAGES[1:]:
        text = "".join(p.read_text() for p in PAGES)
        assert f"docs/{page.name}" in linked or f"]({page.name})" in text, page.name


def test_generated_blocks_are_replaced_and_the_rest_is_kept():
    text = "prose\n<!-- make docs: headline -->\nold table\n<!-- /make docs -->\nmore prose\n<!-- make docs: other -->\nx\n<!-- /make docs -->\n"
    filled = provenance.fill_generated(text, {"headline": "| new |"})
    assert filled == text.replace("old table", "| new |")
    empty = "<!-- make docs: facts -->\n<!-- /make docs -->\n\n<!-- make docs: headline -->\n<!-- /make docs -->\n"
    assert provenance.fill_generated(empty, {"facts": "a", "headline": "b"}) == empty.replace("-->\n<!-- /", "-->\n{}\n<!-- /").format("a", "b")
    assert provenance.fill_generated(provenance.fill_generated(empty, {"facts": "a", "headline": "b"}), {"facts": "c", "headline": "d"}) == \
        provenance.fill_generated(empty, {"facts": "c", "headline": "d"})


def test_the_headline_table_is_written_from_the_metrics():
    evaluation = {"systems": ["base", "fine-tuned"],
                  "headline": {"base": {"ndcg@10": 0.4242}, "fine-tuned": {"ndcg@10": 0.6001}},
                  "headline_ci": {"base": {"ndcg@10": [0.4242, 0.351, 0.499]}, "fine-tuned": {"ndcg@10": [0.6001, 0.521, 0.678]}},
                  "p_values_vs_base": {"fine-tuned": {"ndcg@10": 0.0001}}}
    assert report.markdown_headline(EvaluationFacts.from_metrics(evaluation)).splitlines()[2:] == [
        "| base all-MiniLM-L6-v2 | 0.424 [0.351, 0.499] | — |",
        "| fine-tuned (shipped) | 0.600 [0.521, 0.678] | 0.0001 |"]
