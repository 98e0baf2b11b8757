"""Stage-02 mining at scale: wall time and peak RSS of nearest neighbours, calibrated thresholds, item pairs and
hard negatives for 10k, 50k and 100k synthetic items (384-d, two types, clustered). Each size runs in its own
process so its peak RSS is its own. Goal: 100k items within 2 GB.

    python bench/pair_mining.py            (or: make bench)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from lib import neighbours, pairs  # only: lib.bench brings torch (190 MB) into the measured process
from lib.paths import REPO_ROOT


def synthetic_items(n: int, dims: int, seed: int, branching: int = 8, leaf: int = 8, decay: float = 0.9,
                    noise: float = 4.0) -> tuple[list[str], list[str], np.ndarray]:
    """n unit vectors from a topic hierarchy (`branching` subtopics per topic down to leaves of about `leaf` items,
    each level `decay` times the spread of the one above, isotropic noise below) sharing a common direction: graded
    neighbourhoods like real sentence embeddings. With the defaults, 651 items have the nearest-neighbour contrast
    ((cosine − median) / std at ranks 1, 10, 50) of stage 01's D&D teacher vectors: 2.9 / 2.0 / 1.3 against 3.2 / 2.1 / 1.3."""
    rng = np.random.default_rng(seed)
    leaves = max(1, n // leaf)
    levels = max(1, int(np.ceil(np.log(leaves) / np.log(branching))))
    leaf_of = rng.integers(0, leaves, n)
    vectors = np.full((n, dims), 1.0, np.float32)
    for start in range(0, n, 65536):
        vectors[start:start + 65536] += noise * decay**levels * rng.normal(size=(min(65536, n - start), dims)).astype(np.float32)
    nodes = leaves
    for level in range(levels, 0, -1):  # the leaves first, then ever broader topics
        centres = (decay ** (level - 1) * rng.normal(size=(nodes, dims))).astype(np.float32)
        node_of = np.minimum(leaf_of // branching ** (levels - level), nodes - 1)
        for start in range(0, n, 65536):
            vectors[start:start + 65536] += centres[node_of[start:start + 65536]]
        nodes = max(1, -(-nodes // branching))
    for start in range(0, n, 65536):
        vectors[start:start + 65536] /= np.linalg.norm(vectors[start:start + 65536], axis=1, keepdims=True)
    return [f"item:{i}" for i in range(n)], ["monster" if i % 2 else "power" for i in range(n)], vectors


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(n: int, k: int, seed: int, ann_threshold: int = 0) -> dict:
    """Mine one synthetic corpus of n items and time each step (nearest lists approximate for a type of at least
    `ann_threshold` items, 0: exact; then their recall@10 against exact on 1,000 items)."""
    ids, types, vectors = synthetic_items(n, 384, seed)
    out = {"items": n, "vectors_mb": round(vectors.nbytes / 2**20, 1), "seconds": {}}
    start = time.perf_counter()
    nearest = neighbours.neighbours_by_type(vectors, types, k, ann_threshold=ann_threshold, seed=seed)
    out["seconds"]["neighbours"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mb_by_step"] = {"neighbours": round(peak_rss_mb(), 1)}
    out["neighbours"] = "approximate" if ann_threshold and n // 2 >= ann_threshold else "exact"
    if out["neighbours"] == "approximate":
        out["ann_recall@10"] = round(neighbours.ann_recall(vectors, types, nearest, seed=seed), 4)
    start = time.perf_counter()
    thresholds = pairs.relation_thresholds(vectors, types, "calibrated", 0.8, 0.4, 99.0, 50.0, seed)
    out["seconds"]["calibrated_thresholds"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mb_by_step"]["calibrated_thresholds"] = round(peak_rss_mb(), 1)
    start = time.perf_counter()
    rows = pairs.mine_item_pairs(ids, types, nearest, thresholds, 1, set())
    out["seconds"]["item_pairs"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mb_by_step"]["item_pairs"] = round(peak_rss_mb(), 1)
    start = time.perf_counter()
    kept, dropped = pairs.add_negatives(rows, pairs.row_guards(rows, {}, []), ids, types, vectors, nearest,
                                        thresholds, set(), pairs.NegativeSettings(seed=seed))
    out["seconds"]["hard_negatives"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mb_by_step"]["hard_negatives"] = round(peak_rss_mb(), 1)
    out["seconds"]["total"] = round(sum(out["seconds"].values()), 2)  # the recall check is not part of mining
    out |= {"rows": len(kept), "dropped": dropped, "peak_rss_mb": round(peak_rss_mb(), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--neighbours-k", type=int, default=50)
    parser.add_argument("--ann-threshold", type=int, default=0, help="items of a type from which search is approximate (0: exact)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.neighbours_k, 0, args.ann_threshold)))
        return
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--neighbours-k", str(args.neighbours_k)],
                              capture_output=True, text=True, check=True, cwd=REPO_ROOT)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    from lib import bench

    path = bench.write_result("pair_mining", {"neighbours_k": args.neighbours_k, "goal": "100k items within 2 GB peak RSS",
                                              "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
