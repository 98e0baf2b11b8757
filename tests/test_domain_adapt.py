"""Background text cleaning, chunk packing, and short real MLM / MLM+NSP / TSDAE runs on SRD text (with resume)."""
import dataclasses
import itertools
import random

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

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
    # no sentence is cut: the chunks hold the text's sentences in order, and every chunk ends where a sentence ends
    sentences = domain_adapt.split_sentences(text)
    sentence_ends = set(itertools.accumulate(len(s) + 1 for s in sentences))
    assert " ".join(chunks) == " ".join(sentences)
    assert set(itertools.accumulate(len(c) + 1 for c in chunks)) <= sentence_ends


@pytest.fixture(scope="module")
def chunks(tokenizer, srd_slice):
    """~70 packed chunks of real SRD background text (rules, conditions, …)."""
    text = domain_adapt.markdown_to_text("\n\n".join(srd_slice[3].values()))
    return domain_adapt.pack_chunks([text], tokenizer, 60)[:72]


def tiny_config(method: str, **overrides) -> domain_adapt.AdaptConfig:
    """A few steps of `method` on short chunks; checkpoints every 5 steps."""
    settings = dict(method=method, max_seq_length=64, batch_size=8, head_warmup_steps=4, mlm_max_steps=8,
                    tsdae_max_steps=10, heldout_every=4, save_steps=5, seed=0)
    return domain_adapt.AdaptConfig(**(settings | overrides))


def test_config_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="domain_method must be one of .*tsdae"):
        domain_adapt.AdaptConfig(method="simcse")


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(tokenizer):
    text = "the beholder and the displacer beast watched the mind flayer cast counterspell " * 3
    dataset = domain_adapt.tokenize_chunks([text] * 16, tokenizer, 96)
    batch = domain_adapt.mlm_collator(tokenizer, 0.3, True, seed=0)([dataset[i] for i in range(16)])
    pieces = tokenizer.tokenize("beholder")
    assert len(pieces) > 1  # a word the vocabulary splits
    masked_words = 0
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        words = tokenizer.convert_ids_to_tokens([lab if lab != -100 else tok for tok, lab in zip(ids, labels)])
        for i, token in enumerate(words):
            if token == pieces[0] and words[i + 1:i + len(pieces)] == pieces[1:]:
                span = [lab != -100 for lab in labels[i:i + len(pieces)]]
                assert all(span) or not any(span)  # the whole word or none of it
                masked_words += all(span)
    assert masked_words > 0


def test_next_sentence_pairs_mix_true_continuations_and_random_ones(chunks):
    pairs = domain_adapt.next_sentence_pairs(chunks, seed=0)
    assert len(pairs) == len(chunks) and 0.3 < sum(label for _, _, label in pairs) / len(pairs) < 0.7
    halves = [domain_adapt.split_in_two(c) for c in chunks]
    for (first, second, label), (own_first, own_second) in zip(pairs, halves):
        assert first == own_first and (second == own_second) == (label == 0 or own_second == second)


class EncoderAt(TrainerCallback):
    """Copies the encoder's weights at the end of step `step`."""

    def __init__(self, step):
        self.step, self.encoder = step, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.encoder = {k: v.clone() for k, v in model.base_model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mlm", "mlm_nsp"])
def test_mlm_lowers_heldout_perplexity_and_saves_a_sentence_transformer(tmp_path, tokenizer, student_path, chunks, method):
    from sentence_transformers import SentenceTransformer

    train, held = domain_adapt.split_chunks(chunks, 0.15, seed=0)
    config = tiny_config(method)
    model = domain_adapt.load_mlm_model(student_path, nsp=method == "mlm_nsp")
    batches = domain_adapt.masked_eval_batches(domain_adapt.tokenize_chunks(held, tokenizer, 64),
                                               domain_adapt.mlm_collator(tokenizer, 0.15, True, seed=1), 8)
    train_ds = (domain_adapt.tokenize_pairs(domain_adapt.next_sentence_pairs(train, 0), tokenizer, 64)
                if method == "mlm_nsp" else domain_adapt.tokenize_chunks(train, tokenizer, 64))
    encoder_before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    at_warmup = EncoderAt(4)
    before = domain_adapt.masked_lm_metrics(model, batches)
    run = domain_adapt.train_mlm(model, train_ds, domain_adapt.mlm_collator(tokenizer, 0.15, True, seed=0),
                                 tmp_path / "checkpoints", config, student_path,
                                 [at_warmup])
    after = domain_adapt.masked_lm_metrics(model, batches)
    assert run["global_step"] == 12 and after["perplexity"] < before["perplexity"] / 2
    assert all(torch.equal(encoder_before[k], v) for k, v in at_warmup.encoder.items())  # frozen during warm-up
    assert not all(torch.equal(encoder_before[k], v) for k, v in model.base_model.state_dict().items())  # then trained
    losses = [h["loss"] for h in run["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    out = tmp_path / "st"
    domain_adapt.save_as_sentence_transformer(model, student_path, out)
    st = SentenceTransformer(str(out), device="cpu")
    assert st.encode(["a goblin"]).shape == (1, 384) and type(st[-1]).__name__ == "Normalize"


@pytest.mark.slow
def test_tsdae_lowers_heldout_reconstruction_loss_and_saves_a_sentence_transformer(tmp_path, student_path, chunks):
    from sentence_transformers import SentenceTransformer

    train, held = domain_adapt.split_chunks(chunks, 0.15, seed=0)
    sentences = domain_adapt.background_sentences(train)
    heldout = domain_adapt.denoising_dataset(domain_adapt.background_sentences(held), 0.6, seed=1)
    assert len(sentences) > 80 and len(heldout) > 5
    config = tiny_config("tsdae")
    model, loss = domain_adapt.tsdae_model(student_path, 64)
    before = domain_adapt.denoising_loss(loss, heldout, 8)
    run = domain_adapt.train_tsdae(model, loss, domain_adapt.denoising_dataset(sentences, 0.6, seed=0),
                                   tmp_path / "checkpoints", config, student_path, [])
    after = domain_adapt.denoising_loss(loss, heldout, 8)
    assert run["global_step"] == 10 and after < before - 0.5
    model.save(str(tmp_path / "st"))
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert reloaded.encode(["a goblin"]).shape == (1, 384)
    assert domain_adapt.embedding_drift(student_path, tmp_path / "st", held) < 0.999


def test_delete_words_keeps_order_and_at_least_one_word():
    rng = random.Random(0)
    text = "a red dragon breathes fire over the village"
    noisy = [domain_adapt.delete_words(text, 0.6, rng) for _ in range(200)]
    assert all(n and set(n.split()) <= set(text.split()) for n in noisy)
    assert 0.25 < sum(len(n.split()) for n in noisy) / (200 * len(text.split())) < 0.55


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    """Dies like a killed process right after step `step` (its checkpoint, if any, is not written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mlm", "tsdae"])
def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, tokenizer, student_path, chunks, method):
    config, checkpoints = tiny_config(method), tmp_path / "checkpoints"
    if method == "mlm":
        dataset = domain_adapt.tokenize_chunks(chunks, tokenizer, 64)
        collator = domain_adapt.mlm_collator(tokenizer, 0.15, True, seed=0)
        train = lambda callbacks: domain_adapt.train_mlm(domain_adapt.load_mlm_model(student_path, False), dataset,
                                                         collator, checkpoints, config, student_path, callbacks)
    else:
        dataset = domain_adapt.denoising_dataset(domain_adapt.background_sentences(chunks), 0.6, seed=0)
        train = lambda callbacks: domain_adapt.train_tsdae(*domain_adapt.tsdae_model(student_path, 64), dataset,
                                                           checkpoints, config, student_path, callbacks)
    with pytest.raises(Interrupt):
        train([StopAt(7)])
    assert [p.name for p in checkpoints.glob("checkpoint-*")] == ["checkpoint-5"]
    if method == "tsdae":
        assert (checkpoints / "checkpoint-5" / "decoder.pt").is_file()  # the decoder lives in the loss
    run = train([])
    assert run["resumed_from_step"] == 5 and run["global_step"] == config.total_steps
    again = train([])  # finished: the final weights are reloaded, no step added
    assert again["resumed_from_step"] == config.total_steps and again["global_step"] == config.total_steps
    if method == "mlm":
        config = domain_adapt.AdaptConfig(**(dataclasses.asdict(config) | {"seed": 1}))
        assert train([])["resumed_from_step"] == 0  # another configuration never resumes this one's checkpoints


def test_tsdae_decoder_checkpoint_restores_the_decoder(tmp_path, student_path):
    from types import SimpleNamespace

    _, loss = domain_adapt.tsdae_model(student_path, 32)
    (tmp_path / "checkpoint-3").mkdir()
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3)
    domain_adapt.DecoderCheckpoint(loss.decoder).on_save(args, state, None)
    _, fresh = domain_adapt.tsdae_model(student_path, 32)
    name = next(n for n, _ in loss.decoder.named_parameters() if "crossattention" in n)
    assert not torch.equal(dict(loss.decoder.named_parameters())[name], dict(fresh.decoder.named_parameters())[name])
    domain_adapt.DecoderCheckpoint(fresh.decoder).on_train_begin(args, state, None)
    assert torch.equal(dict(loss.decoder.named_parameters())[name], dict(fresh.decoder.named_parameters())[name])
