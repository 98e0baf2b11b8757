"""A few real MNRL steps on SRD pairs lower the training loss; the saved model has a card."""
from lib import finetune
from lib.io import write_jsonl


def test_mnrl_steps_lower_the_loss(tmp_path, student_path, srd_slice):
    items, queries, _, _ = srd_slice
    spells = [i for i in items if i["type"] == "power"][:32]
    # name → own text: a task the base model only half knows, so the loss must fall
    rows = [{"anchor": s["name"], "positive": s["text"]} for s in spells]
    write_jsonl(tmp_path / "train.jsonl", rows)
    ds = finetune.pairs_dataset(tmp_path / "train.jsonl")
    assert ds.column_names == ["anchor", "positive"]
    dev_queries = [q for q in queries if q["category"] == "monster_spells"][:4]
    evaluator = finetune.ir_evaluator(dev_queries, items, "dev")
    model, history = finetune.finetune(student_path, ds, ds, evaluator, tmp_path, num_train_epochs=1,
                                       per_device_train_batch_size=8, learning_rate=5e-4, warmup_steps=0.0,
                                       max_seq_length=64, seed=0, max_steps=12, eval_steps=6)
    steps, losses = finetune.loss_curve(history)
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert (tmp_path / "model" / "README.md").exists()
    assert any(k.startswith("eval_dev-power") for h in history for k in h)


def test_negative_column_only_when_every_row_has_one(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"anchor": "a", "positive": "b", "negative": "c"}, {"anchor": "d", "positive": "e"}])
    assert finetune.pairs_dataset(tmp_path / "p.jsonl").column_names == ["anchor", "positive"]
    write_jsonl(tmp_path / "p.jsonl", [{"anchor": "a", "positive": "b", "negative": "c"}])
    assert finetune.pairs_dataset(tmp_path / "p.jsonl").column_names == ["anchor", "positive", "negative"]
