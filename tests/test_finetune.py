"""A few real MNRL steps (with a hard-negative column) on SRD rows lower the training loss; the model has a card."""
from lib import finetune, pairs


def test_mnrl_steps_lower_the_loss(tmp_path, student_path, srd_slice):
    items, queries, _, _ = srd_slice
    spells = [i for i in items if i["type"] == "power"][:32]
    # name → own text: a task the base model only half knows, so the loss must fall
    rows = [{"anchor": s["name"], "positive": s["text"], "negative_1": spells[n - 1]["text"]} for n, s in enumerate(spells)]
    pairs.save_dataset(tmp_path / "train", rows, num_negatives=1)
    ds = finetune.pairs_dataset(tmp_path / "train")
    assert ds.column_names == ["anchor", "positive", "negative_1"]
    dev_queries = [q for q in queries if q["category"] == "monster_spells"][:4]
    evaluator = finetune.ir_evaluator(dev_queries, items, "dev")
    model, history = finetune.finetune(student_path, ds, ds, evaluator, tmp_path, num_train_epochs=1,
                                       per_device_train_batch_size=8, learning_rate=5e-4, warmup_steps=0.0,
                                       max_seq_length=64, seed=0, max_steps=12, eval_steps=6)
    steps, losses = finetune.loss_curve(history)
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert (tmp_path / "model" / "README.md").exists()
    assert any(k.startswith("eval_dev-power") for h in history for k in h)
