"""Grouping against masks and colour matching across blocks, on hand-built label maps."""

from __future__ import annotations

import numpy as np
import pytest

from fanlens import FanlensError
from fanlens.capture import TokenLayout
from fanlens.grouping import best_cluster_iou, mask_scores, match_labels, upsample_labels
from fanlens.results import BlockInfo, GroupsResult, Provenance


def _groups(label_maps_per_block, n_img):
    blocks = tuple(BlockInfo(i, f"b{i}", TokenLayout("NCHW", 0, lm.shape[1:], 4), lm.shape[1:])
                   for i, lm in enumerate(label_maps_per_block))
    prov = Provenance("m", "random init", "random init", 0, {}, [f"i{k}" for k in range(n_img)], {}, "now")
    return GroupsResult(blocks, tuple(f"i{k}" for k in range(n_img)), tuple(label_maps_per_block),
                        np.full((len(blocks), n_img), 2), np.zeros((n_img, 8, 8, 3), np.uint8), prov)


def test_upsample_labels_nearest():
    lab = np.array([[0, 1], [2, 3]])
    up = upsample_labels(lab, (4, 4))
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert upsample_labels(lab, (3, 2)).tolist() == [[0, 1], [2, 3], [2, 3]]


def test_best_cluster_iou_by_hand():
    lab = np.array([[0, 0, 1], [0, 1, 1], [2, 2, 2]])
    mask = np.array([[0, 0, 1], [0, 1, 1], [0, 0, 1]], bool)
    # cluster 1 covers 3 of the 4 object pixels exactly: IoU 3/4
    assert best_cluster_iou(lab, mask) == pytest.approx(0.75)


def test_mask_scores_perfect_and_chance():
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:6, 2:6] = True
    perfect = mask[:, ::2, ::2].astype(int)  # 4x4 labels that upsample to the mask exactly
    stripes = np.tile(np.array([0, 1, 0, 1]), (2, 4, 1))  # unrelated to the object
    g = _groups([perfect, stripes], 2)
    sc = mask_scores(g, mask)
    np.testing.assert_allclose(sc.ari[0], 1.0)
    np.testing.assert_allclose(sc.iou[0], 1.0)
    assert (sc.ari[1] < 0.1).all() and (sc.iou[1] < 0.5).all()
    rows = sc.rows()
    assert {r["metric"] for r in rows} == {"mask_ari", "mask_best_iou"}
    assert len(rows) == 2 * 2 * 4


def test_match_labels_keeps_colours_across_blocks():
    a = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    b = np.array([[2, 0], [1, 1]])  # same partition on a coarser grid, other numbering
    c = np.array([[5, 5, 7, 7], [5, 5, 7, 7], [9, 9, 9, 9], [9, 9, 9, 3]])
    out = match_labels([a, b, c])
    assert out[0].tolist() == a.tolist()
    assert out[1].tolist() == [[0, 1], [2, 2]]
    assert out[2][:2].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]] and out[2][3, 3] not in (0, 1, 2)


def test_bincount_ari_and_iou_equal_the_direct_definitions():
    from sklearn.metrics import adjusted_rand_score

    from fanlens.grouping import adjusted_rand, best_cluster_iou, contingency

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, ka, n), rng.integers(0, kb, n)) for n, ka, kb in
             [(4096, 2, 4), (4096, 2, 2), (500, 7, 3), (64, 2, 9), (10, 3, 3)]]
    a = rng.integers(0, 2, 300)
    cases += [
        (a, a), (a, 1 - a), (a, a * 5 + 3),  # identical up to names
        (np.zeros(50, int), np.zeros(50, int)), (np.zeros(50, int), np.arange(50)),  # one cluster / singletons
        (np.arange(50), np.arange(50)), (np.array([1]), np.array([0])), (np.array([0, 1]), np.array([0, 0])),
        (np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])), (np.array([-1, 3, 3, 8]), np.array([2, 2, 0, 1])),
    ]
    for x, y in cases:
        assert adjusted_rand(x, y) == pytest.approx(adjusted_rand_score(x, y), abs=1e-15)
        m = x == x[0]
        direct = max(np.count_nonzero((y == c) & m) / np.count_nonzero((y == c) | m) for c in np.unique(y))
        assert best_cluster_iou(y, m) == pytest.approx(direct, abs=1e-15)
    assert best_cluster_iou(np.array([0, 1, 1]), np.zeros(3, bool)) == 0.0
    np.testing.assert_array_equal(contingency(np.array([2, 2, 5]), np.array([0, 1, 1])), [[1, 1], [0, 1]])
    with pytest.raises(FanlensError, match="same length"):
        contingency(np.zeros(3), np.zeros(4))
