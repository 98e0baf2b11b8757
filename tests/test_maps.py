"""Map alignment, cluster quality and pair-cosine helpers of stage 07 on fixtures with known answers."""
import math

import numpy as np
import pytest

from lib import maps, plots


def test_align_2d_undoes_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 2))
    angle = np.radians(70)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 3.0 * reference @ rotation + np.array([5.0, -2.0])
    assert maps.align_2d(reference, moved) == pytest.approx(reference, abs=1e-9)
    mirrored = reference * np.array([-1.0, 1.0])  # UMAP may flip a map: a reflection is undone too
    assert maps.align_2d(reference, mirrored) == pytest.approx(reference, abs=1e-9)


def test_cluster_quality_rises_when_labels_match_the_geometry():
    rng = np.random.default_rng(1)
    centres = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    vectors = np.concatenate([c + 0.05 * rng.normal(size=(20, 3)) for c in centres])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    good, shuffled = ["a"] * 20 + ["b"] * 20, list(rng.permutation(["a"] * 20 + ["b"] * 20))
    assert maps.knn_label_agreement(vectors, good) == 1.0 and maps.knn_label_agreement(vectors, shuffled) < 0.8
    assert maps.silhouette(vectors, good) > 0.8 > maps.silhouette(vectors, shuffled)
    assert math.isnan(maps.silhouette(vectors, ["a"] * 40))


def test_pair_similarities_and_triplet_accuracy():
    vectors = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    row_of = {"q": 0, "pos": 1, "neg": 2, "far": 3}
    rows = [{"anchor": "q", "positive": "pos", "negative_1": "neg", "negative_2": "far"},
            {"anchor": "q", "positive": "neg", "negative_1": "pos"}]
    cosines = maps.pair_similarities(rows, vectors, row_of)
    assert cosines["positive"] == pytest.approx([0.8, 0.0]) and cosines["negative"] == pytest.approx([0.0, -1.0, 0.8])
    assert maps.triplet_accuracy(rows, vectors, row_of) == 0.5


def test_item_names_with_dollars_are_drawn_as_text(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    points = np.array([[0.0, 0.0], [1.0, 1.0]])
    plots.scatter_by_label(ax, points, [r"$\badmacro$", "$5 or $10"], "names $x$", {0: r"$\badmacro$", 1: "$5 or $10"})
    fig.savefig(tmp_path / "map.png")  # mathtext would raise on \badmacro
    assert [t.get_text() for t in ax.texts] == [r"$\badmacro$", "$5 or $10"]
    plt.close(fig)


def test_a_stratified_sample_keeps_each_labels_share_and_every_label():
    labels = ["dragon"] * 900 + ["undead"] * 90 + ["ooze"] * 10
    assert list(maps.stratified_sample(labels, 1000, seed=0)) == list(range(1000))  # no more than asked: all, in order
    rows = maps.stratified_sample(labels, 100, seed=0)
    assert len(rows) == 100 and list(rows) == sorted(set(rows))
    picked = [labels[n] for n in rows]
    assert (picked.count("dragon"), picked.count("undead"), picked.count("ooze")) == (90, 9, 1)
    assert set(maps.stratified_sample(labels + ["lich"], 100, seed=0)) & {1000}  # a label of one row still shows
    assert list(maps.stratified_sample(labels, 100, seed=0)) == list(rows)  # seeded
