"""Background text cleaning, chunk packing and a short real MLM run on SRD text."""
import pytest
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

from lib import domain_adapt


@pytest.fixture(scope="module")
def tokenizer(student_path):
    return AutoTokenizer.from_pretrained(str(student_path))


def test_markdown_to_text_drops_tables_and_marks():
    md = "## Blinded\n\n- A **blinded** creature can't [see](x.md).\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    assert domain_adapt.markdown_to_text(md) == "Blinded\n\nA blinded creature can't see."


def test_pack_chunks_respects_the_token_budget_on_sentence_boundaries(tokenizer, srd_slice):
    text = domain_adapt.markdown_to_text(srd_slice[3]["rule-sections"])
    chunks = domain_adapt.pack_chunks([text], tokenizer, max_tokens=64)
    assert len(chunks) > 3
    sizes = [len(tokenizer.tokenize(c)) for c in chunks]
    multi_sentence = [s for c, s in zip(chunks, sizes) if len(domain_adapt.split_sentences(c)) > 1]
    assert multi_sentence and max(multi_sentence) <= 64
    assert all(c.rstrip()[-1] in ".!?:" or len(domain_adapt.split_sentences(c)) >= 1 for c in chunks)


def test_short_mlm_run_lowers_heldout_perplexity(tmp_path, tokenizer, student_path, srd_slice):
    text = domain_adapt.markdown_to_text("\n\n".join(srd_slice[3].values()))
    chunks = domain_adapt.pack_chunks([text], tokenizer, 62)[:72]
    train, held = domain_adapt.split_chunks(chunks, 0.15, seed=0)
    model = AutoModelForMaskedLM.from_pretrained(str(student_path))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    batches = domain_adapt.masked_eval_batches(domain_adapt.tokenize_chunks(held, tokenizer, 64),
                                               DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=1), 8)
    before = domain_adapt.masked_lm_metrics(model, batches)
    domain_adapt.set_encoder_trainable(model, False)
    domain_adapt.train_mlm(model, tokenizer, domain_adapt.tokenize_chunks(train, tokenizer, 64), collator,
                           tmp_path, 8, 8, 1e-3, 0.0, seed=0)
    after = domain_adapt.masked_lm_metrics(model, batches)
    assert after["perplexity"] < before["perplexity"] / 2
    out = tmp_path / "st"
    domain_adapt.save_as_sentence_transformer(model, student_path, out)
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out), device="cpu").encode(["a goblin"]).shape == (1, 384)
