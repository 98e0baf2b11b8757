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

from lib import bench, pairs
from lib.paths import REPO_ROOT


def synthetic_items(n: int, dims: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """n unit vectors around n/20 cluster centres sharing a common direction (cosines compressed like e5's)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 20), dims)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.8 * rng.normal(size=(n, dims)).astype(np.float32) + 2.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [f"item:{i}" for i in range(n)], ["monster" if i % 2 else "power" for i in range(n)], vectors


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(n: int, k: int, seed: int) -> dict:
    """Mine one synthetic corpus of n items and time each step."""
    ids, types, vectors = synthetic_items(n, 384, seed)
    out = {"items": n, "vectors_mb": round(vectors.nbytes / 2**20, 1), "seconds": {}}
    start = time.perf_counter()
    neighbours = pairs.neighbours_by_type(vectors, types, k)
    out["seconds"]["neighbours"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    thresholds = pairs.relation_thresholds(vectors, types, "calibrated", 0.8, 0.4, 99.0, 50.0, seed)
    out["seconds"]["calibrated_thresholds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    rows = pairs.mine_item_pairs(ids, types, neighbours, thresholds, 1, set())
    out["seconds"]["item_pairs"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    kept, dropped = pairs.add_negatives(rows, pairs.row_guards(rows, {}, []), ids, types, vectors, neighbours,
                                        thresholds, 3, 3, 0.02, set(), seed)
    out["seconds"]["hard_negatives"] = round(time.perf_counter() - start, 2)
    out["seconds"]["total"] = round(sum(out["seconds"].values()), 2)
    out |= {"rows": len(kept), "dropped": dropped, "peak_rss_mb": round(peak_rss_mb(), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--neighbours-k", type=int, default=50)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.neighbours_k, seed=0)))
        return
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--neighbours-k", str(args.neighbours_k)],
                              capture_output=True, text=True, check=True, cwd=REPO_ROOT)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    path = bench.write_result("pair_mining", {"neighbours_k": args.neighbours_k, "goal": "100k items within 2 GB peak RSS",
                                              "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
