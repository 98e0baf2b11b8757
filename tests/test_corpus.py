"""The D&D SRD corpus: real counts, independent ground truth, validation, splits."""
import re

import pytest

from lib import corpus
from lib.domains import dnd

pytestmark = pytest.mark.xdist_group("full-srd")  # its module fixtures are built once, on one worker


def test_full_srd_counts():
    monsters, spells = dnd.load_monsters(), dnd.load_spells()
    assert len(monsters) == 332 and len(spells) == 319
    casters = [m for m in monsters if dnd.cast_spells(m)]
    assert len(casters) == 36


def test_spellcasting_relations_point_at_real_spells(srd_slice):
    items, queries, relations, _ = srd_slice
    ids = {i["id"] for i in items}
    assert relations and all(r["head"] in ids and r["tail"] in ids for r in relations)
    assert all(r["head"].startswith("monster:") and r["tail"].startswith("power:") for r in relations)


def test_monster_spell_queries_do_not_name_their_spells(srd_slice):
    items, queries, _, _ = srd_slice
    names = {i["id"]: i["name"] for i in items}
    spell_queries = [q for q in queries if q["category"] == "monster_spells"]
    assert spell_queries
    for q in spell_queries:
        assert q["meta"]["target_types"] == ["power"]
        for spell_id in q["relevant"]:
            assert not re.search(rf"(?i)\b{re.escape(names[spell_id])}\b", q["text"]), (q["qid"], names[spell_id])


def test_remove_names_is_whole_word():
    text = "Cantrips (at will): light, sacred flame\nIt glows in sunlight."
    out = corpus.remove_names(text, ["Light", "Sacred Flame"])
    assert "sacred" not in out.lower() and "sunlight" in out
    assert "light," not in out


def test_attribute_queries_match_structured_fields(srd_slice):
    items, queries, _, _ = srd_slice
    by_id = {i["id"]: i for i in items}
    size_type = [q for q in queries if re.fullmatch(r"an? (tiny|small|medium|large|huge|gargantuan) \w+", q["text"])]
    for q in size_type:
        _, size, kind = q["text"].split(" ", 2)
        expected = {i["id"] for i in items if i["type"] == "monster" and i["meta"]["size"].lower() == size
                    and i["meta"]["creature_type"] == kind}
        assert set(q["relevant"]) == expected
    assert all(q["relevant"] and all(r in by_id for r in q["relevant"]) for q in queries)


def test_check_corpus_names_the_problem(srd_slice):
    items, queries, relations, _ = srd_slice
    bad = [dict(queries[0], relevant={"power:nope": 1})]
    with pytest.raises(ValueError, match="names unknown items"):
        corpus.check_corpus(items, bad, relations)
    with pytest.raises(ValueError, match="ids must be unique"):
        corpus.check_corpus(items + items[:1], queries, relations)


def test_splits_are_seeded_and_stratified(srd_slice):
    _, queries, _, _ = srd_slice
    a = corpus.assign_splits(queries, 0.3, seed=1)
    b = corpus.assign_splits(queries, 0.3, seed=1)
    c = corpus.assign_splits(queries, 0.3, seed=2)
    assert [q["split"] for q in a] == [q["split"] for q in b]
    assert [q["split"] for q in a] != [q["split"] for q in c]
    assert all(q["split"] == "train" for q in a if q["category"] == "field")  # training queries keep their split
    for category in {q["category"] for q in a} - {"field"}:
        group = [q for q in a if q["category"] == category]
        fraction = group[0].get("meta", {}).get("dev_fraction", 0.3)  # the player questions: half and half
        assert abs(sum(q["split"] == "dev" for q in group) - round(fraction * len(group))) == 0


def test_write_and_load_corpus(tmp_path, srd_slice):
    items, queries, relations, background = srd_slice
    queries = corpus.assign_splits(queries, 0.3, seed=0)
    corpus.write_corpus(tmp_path, items, queries, relations, background)
    assert corpus.load_items(tmp_path) == items
    assert sum(len(corpus.load_queries(tmp_path, split=s)) for s in ("train", "dev", "test")) == len(queries)
    assert set(corpus.load_background(tmp_path)) == {f"{name}.md" for name in background}
    sources = {q["meta"]["source_item"] for q in queries if q["meta"].get("source_item")}
    sources |= {i for q in queries for i in q["meta"].get("source_items", [])}  # the held-out entities
    assert corpus.held_out_items(queries) == sources and sources


def test_catalogue_names_and_name_queries():
    assert corpus.catalogue_name("Adult Red Dragon") == "dragon, adult red"
    assert corpus.catalogue_name("Goblin") is None and corpus.catalogue_name("Shield of Faith") is None
    items = [{"id": "p1", "type": "power", "name": "Acid Arrow", "aliases": ["Melf's Acid Arrow"]},
             {"id": "m1", "type": "monster", "name": "Giant Spider", "aliases": []},
             {"id": "m2", "type": "monster", "name": "Goblin", "aliases": []}]
    queries = corpus.name_queries(items, paraphrases_per_type=5, seed=0)
    by_text = {q["text"]: q for q in queries}
    assert set(by_text) == {"Melf's Acid Arrow", "spider, giant"}  # p1 has an alias query, so no paraphrase
    assert by_text["Melf's Acid Arrow"]["relevant"] == {"p1": 1} and by_text["Melf's Acid Arrow"]["category"] == "alias"
    assert by_text["spider, giant"]["meta"]["source_item"] == "m1"
    assert by_text["spider, giant"]["expected_topics"] == ["Giant Spider"]


def test_srd_aliases_become_held_out_alias_queries():
    items, queries, _, _ = dnd.build_corpus(max_background_docs=1)
    alias = {q["text"]: q for q in queries if q["category"] == "alias"}
    assert alias["Melf's Acid Arrow"]["relevant"] == {"power:acid-arrow": 1}
    assert alias["Svirfneblin"]["meta"]["source_item"] == "monster:deep-gnome-svirfneblin"
    assert sum(q["category"] == "name_paraphrase" for q in queries) == 20


@pytest.fixture(scope="module")
def full_srd():
    """The whole SRD corpus, as the default run builds it."""
    return dnd.build_corpus(seed=42)


def test_field_training_queries_are_true_to_the_fields_and_unlike_every_evaluation_query(full_srd):
    from lib import leakage

    items, queries, _, _ = full_srd
    by_id = {i["id"]: i for i in items}
    field = [q for q in queries if q["category"] == "field"]
    evaluation = [q for q in queries if q["split"] != "train"]
    assert len(field) > 300 and all(q["split"] == "train" for q in field)
    for q in field:  # every relevant item has the fact the query asks for: the same field, the same values
        facts = [set(f for f in dnd.field_facts(by_id[i]) if f[0] == q["meta"]["field"]) for i in q["relevant"]]
        assert set.intersection(*facts), q["text"]
    assert not leakage.near_duplicates([q["text"] for q in field], [q["text"] for q in evaluation], 0.9)
    assert {q["text"] for q in field}.isdisjoint(q["text"] for q in evaluation)


def test_held_out_entities_are_never_trained_on_and_are_the_only_candidates_of_their_queries(full_srd):
    from lib import pairs
    from lib.evaluate import headline_categories

    items, queries, _, _ = full_srd
    unseen = [q for q in queries if q["category"] == "attribute_unseen"]
    types = {i["id"]: i["type"] for i in items}
    assert len(unseen) >= 30 and {types[next(iter(q["relevant"]))] for q in unseen} == {"monster", "power"}
    held_out = corpus.held_out_items(queries)
    for q in unseen:
        assert q["meta"]["beside_headline"] and set(q["relevant"]) < set(q["meta"]["candidates"]) <= held_out
    train = [q for q in queries if q["split"] == "train"]
    evaluation = [q for q in queries if q["split"] != "train"]
    supervised, _ = pairs.supervised_queries(train, evaluation, 3, 0.9, held_out)
    assert supervised and not {i for q in supervised for i in q["relevant"]} & held_out
    assert "attribute_unseen" not in headline_categories(evaluation) and "monster_spells" in headline_categories(evaluation)


def test_a_category_beside_the_headline_leaves_the_headline_split_as_it_was(full_srd):
    _, queries, _, _ = full_srd
    without = [q for q in queries if q["category"] not in ("attribute_unseen", "question", "field")]
    split = {q["qid"]: q["split"] for q in corpus.assign_splits(queries, 0.3, seed=42)}
    assert {q["qid"]: q["split"] for q in corpus.assign_splits(without, 0.3, seed=42)}.items() <= split.items()
    assert {"dev", "test"} == {split[q["qid"]] for q in queries if q["category"] == "attribute_unseen"}


def test_player_questions_name_real_items_split_half_and_half_and_stay_out_of_training(full_srd):
    from lib import pairs
    from lib.evaluate import headline_categories

    items, queries, _, _ = full_srd
    names = {i["name"] for i in items}
    rows = dnd.read_questions()
    assert len(rows) >= 80 and all(set(r["relevant"]) <= names for r in rows)  # every graded name is an SRD item
    queries = corpus.assign_splits(queries, 0.3, seed=42)
    questions = [q for q in queries if q["category"] == "question"]
    assert len(questions) == len(rows) and sum(q["split"] == "dev" for q in questions) == round(len(rows) / 2)
    assert "question" not in headline_categories(queries)
    held_out = corpus.held_out_items(queries)
    assert {i for q in questions for i in q["relevant"]} <= held_out
    train = [q for q in queries if q["split"] == "train"]
    supervised, _ = pairs.supervised_queries(train, [q for q in queries if q["split"] != "train"], 3, 0.9, held_out)
    assert not {i for q in supervised for i in q["relevant"]} & held_out


def test_a_slice_keeps_the_questions_whose_items_it_has(srd_slice):
    items, queries, _, _ = srd_slice
    ids = {i["id"] for i in items}
    questions = [q for q in queries if q["category"] == "question"]
    assert 0 < len(questions) < len(dnd.read_questions())
    assert all(q["relevant"] and set(q["relevant"]) <= ids for q in questions)


def test_a_question_without_graded_items_names_its_file_and_line(tmp_path):
    from lib.domains.records import DataError

    path = tmp_path / "questions.jsonl"
    path.write_text('{"qid": "q1", "text": "a winged horse", "relevant": {"Pegasus": 2}}\n'
                    '{"qid": "q2", "text": "a cloak that hides me"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"questions\.jsonl:2: .*'relevant'"):
        dnd.read_questions(path)
