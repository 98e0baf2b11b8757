"""Entity-aware training batches for stage 04: rows whose anchor or positive is another row's candidate, or in its
false-negative guard, never share a batch (MNRL would score them as negatives of each other); and how many such
in-batch false negatives each sampler leaves."""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import numpy as np
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

BATCH_SAMPLERS = ("entity", "no_duplicates", "random")


def entity_lookup(rows: list[dict]) -> tuple[dict[str, frozenset], dict[str, frozenset]]:
    """From stage-02 rows: text → the items it stands for, and anchor text → the items it must never be contrasted
    with (its source item, its positives and the row's guard: shared names and aliases, known relations, every item
    its query fits)."""
    entities: dict[str, set] = defaultdict(set)
    protected: dict[str, set] = defaultdict(set)
    for r in rows:
        entities[r["positive"]].add(r["positive_id"])
        for k, negative_id in enumerate(r.get("negative_ids", []), start=1):
            entities[r[f"negative_{k}"]].add(negative_id)
        if r.get("kind") == "item":
            entities[r["anchor"]].add(r["anchor_id"])
        protected[r["anchor"]] |= {r["anchor_id"], r["positive_id"], *r.get("guard_ids", [])}
    return ({t: frozenset(v) for t, v in entities.items()}, {t: frozenset(v) for t, v in protected.items()})


def row_keys(texts: list[list[str]], lookup: tuple[dict, dict]) -> tuple[list[frozenset], list[frozenset]]:
    """Per row (anchor first, then positive and negatives): the items its candidates stand for, and the items its
    anchor must not meet as another row's candidate. A text missing from the lookup stands for itself."""
    entities, protected = lookup

    def of(text: str) -> frozenset:
        return entities.get(text) or frozenset([text])

    candidates, guards = [], []
    for row in texts:
        candidates.append(frozenset().union(*(of(t) for t in row[1:] or row[:1])))
        guards.append(protected.get(row[0], frozenset()) | of(row[0]) | (of(row[1]) if len(row) > 1 else frozenset()))
    return candidates, guards


def entity_batches(order: list[int], candidates: list[frozenset], guards: list[frozenset], batch_size: int,
                   drop_last: bool) -> list[list[int]]:
    """Greedy batches in `order`: a row joins a batch only if none of its candidates is guarded by a row already in
    it and none of theirs by it; a row that does not fit waits, first in line, for the next batch."""
    batches, remaining = [], list(order)
    while remaining:
        batch, batch_candidates, batch_guards, waiting = [], set(), set(), []
        for n, index in enumerate(remaining):
            if len(batch) == batch_size:
                waiting.extend(remaining[n:])
                break
            if candidates[index].isdisjoint(batch_guards) and guards[index].isdisjoint(batch_candidates):
                batch.append(index)
                batch_candidates |= candidates[index]
                batch_guards |= guards[index]
            else:
                waiting.append(index)
        if len(batch) == batch_size or not drop_last:
            batches.append(batch)
        remaining = waiting
    return batches


def in_batch_false_negatives(batches: list[list[int]], candidates: list[frozenset], guards: list[frozenset]) -> int:
    """How many (anchor, item of another row in its batch) pairs contrast the anchor with an item it is guarded
    against: its own entity, an alias, a related item or another right answer."""
    return sum(len(candidates[j] & guards[i]) for batch in batches for i in batch for j in batch if i != j)


class EntityAwareBatchSampler(DefaultBatchSampler):
    """Batches without in-batch false negatives: no anchor meets, among the other rows' positives and negatives, an
    item it is guarded against (`entity_lookup`). The exact-text NoDuplicatesBatchSampler misses aliases, relations
    and the other items a query fits. Seeded per epoch; the plan is made once per epoch so __len__ is exact."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns: list[str] | None = None,
                 generator: torch.Generator | None = None, seed: int = 0, lookup: tuple[dict, dict] = ({}, {})):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        skip = set(valid_label_columns or []) | {"dataset_name", "label"}
        columns = [dataset[c] for c in dataset.column_names if c not in skip]
        self.candidates, self.guards = row_keys([list(row) for row in zip(*columns)], lookup)
        self._plan: tuple[int, list[list[int]]] | None = None

    def batches(self) -> list[list[int]]:
        """This epoch's batches."""
        if self._plan is None or self._plan[0] != self.epoch:
            order = torch.randperm(len(self.candidates), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            self._plan = (self.epoch, entity_batches(order.tolist(), self.candidates, self.guards, self.batch_size,
                                                     self.drop_last))
        return self._plan[1]

    def __iter__(self):
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())


def batch_sampler(name: str, lookup: tuple[dict, dict]):
    """The `batch_sampler` training argument for a sampler name."""
    from sentence_transformers.base.sampler import BatchSamplers

    if name == "entity":
        return partial(EntityAwareBatchSampler, lookup=lookup)
    return BatchSamplers.NO_DUPLICATES if name == "no_duplicates" else BatchSamplers.BATCH_SAMPLER


def false_negatives_by_sampler(dataset, lookup: tuple[dict, dict], batch_size: int, seed: int) -> dict[str, dict]:
    """One epoch of each batch sampler over `dataset`: batches, mean batch size and in-batch false negatives."""
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
    from torch.utils.data import RandomSampler

    generator = torch.Generator().manual_seed(seed)
    entity = EntityAwareBatchSampler(dataset, batch_size, False, seed=seed, lookup=lookup)
    samplers = {
        "random": DefaultBatchSampler(RandomSampler(dataset, generator=generator), batch_size=batch_size, drop_last=False),
        "no_duplicates": NoDuplicatesBatchSampler(dataset, batch_size, False, generator=generator, seed=seed),
        "entity": entity,
    }
    out = {}
    for name, sampler in samplers.items():
        batches = [list(b) for b in sampler]
        out[name] = {"batches": len(batches), "mean_batch_size": round(float(np.mean([len(b) for b in batches])), 2),
                     "false_negatives": in_batch_false_negatives(batches, entity.candidates, entity.guards)}
    return out
