"""Quantization of raw matches into shared keypoints, on hand-made matches with known answers."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import pytest

from matchers.base import Matches
from pipeline.quantize import (
    ImageKeypoints,
    QuantizeConfig,
    aggregate_matches,
    assign_to_keypoints,
    one_to_one,
    quantize_keypoints,
    to_pair_matches,
    track_lengths,
)


def make(k0, k1, scores) -> Matches:
    return Matches(
        np.asarray(k0, np.float32).reshape(-1, 2),
        np.asarray(k1, np.float32).reshape(-1, 2),
        np.asarray(scores, np.float32),
    )


# Three images of 5 scene points, related by translations; sub-bin nodes (edge coordinates) are
# multiples of 8, so the true pixel positions are node - 0.5 and jitter < 0.5 px stays in the sub-bin.
OFFSETS = {"A": np.array([0.0, 0.0]), "B": np.array([40.0, 8.0]), "C": np.array([80.0, 16.0])}
SCENE = np.array([[24.0 + 16 * j, 40.0] for j in range(5)])


def true_points(name: str) -> np.ndarray:
    return SCENE + OFFSETS[name] - 0.5


def triplet_raw(seed: int = 0) -> tuple[list[tuple[str, str]], dict, dict]:
    """Raw matches of (A,B), (A,C), (B,C), each with its own jitter; also the raw observations per image."""
    rng = np.random.default_rng(seed)
    pairs = [("A", "B"), ("A", "C"), ("B", "C")]
    raw, observations = {}, defaultdict(list)
    for a, b in pairs:
        pa = true_points(a) + rng.uniform(-0.3, 0.3, (5, 2))
        pb = true_points(b) + rng.uniform(-0.3, 0.3, (5, 2))
        scores = rng.uniform(0.2, 1.0, 5)
        raw[(a, b)] = make(pa, pb, scores)
        observations[a].append((pa, scores))
        observations[b].append((pb, scores))
    return pairs, raw, observations


def test_shared_image_gives_one_keypoint_per_scene_point_and_tracks_of_three():
    pairs, raw, observations = triplet_raw()
    result = aggregate_matches(pairs, raw, QuantizeConfig(cell_size=8, max_error=2, position="bin"))
    for name in "ABC":
        keypoints = result.keypoints[name]
        assert len(keypoints) == 5
        # hloc position: the sub-bin node, i.e. exactly the true point; sorted by x to compare.
        np.testing.assert_allclose(np.sort(keypoints.keypoints, axis=0), true_points(name), atol=1e-6)
        # Score: summed confidence of the two raw observations of each point.
        sums = np.zeros(5)
        for points, scores in observations[name]:
            order = np.argsort(points[:, 0])
            sums += scores[order]
        np.testing.assert_allclose(keypoints.scores[np.argsort(keypoints.keypoints[:, 0])], sums, rtol=1e-6)
    for pair in pairs:
        assert result.matches[pair].num_matches == 5
    # Cycle consistency A->B->C == A->C: one keypoint per scene point is shared by all pairs.
    ab, ac, bc = (result.matches[p].matches0 for p in pairs)
    np.testing.assert_array_equal(bc[ab], ac)
    assert sorted(track_lengths(result)) == [3] * 5


def test_mean_position_is_confidence_weighted_mean_of_the_best_sub_bin():
    pairs, raw, observations = triplet_raw(seed=1)
    result = aggregate_matches(pairs, raw, QuantizeConfig(cell_size=8, max_error=2, position="mean"))
    for name in "ABC":
        weighted, total = np.zeros((5, 2)), np.zeros(5)
        for points, scores in observations[name]:
            order = np.argsort(points[:, 0])
            weighted += points[order] * scores[order, None]
            total += scores[order]
        keypoints = result.keypoints[name].keypoints
        np.testing.assert_allclose(keypoints[np.argsort(keypoints[:, 0])], weighted / total[:, None], atol=1e-5)
    assert sorted(track_lengths(result)) == [3] * 5


def brute_force_keypoints(points, scores, cell_size, max_error):
    """hloc's semantics written with dicts and loops (node-based cells), as an independent reference."""
    step = int(max_error)
    cell = max(cell_size, max_error)
    bins: dict[tuple, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for (x, y), s in zip(points, scores):
        node = (math.floor((x + 0.5) / step + 0.5) * step, math.floor((y + 0.5) / step + 0.5) * step)
        key = (math.floor(node[0] / cell + 0.5), math.floor(node[1] / cell + 0.5))
        bins[key][node] += s
    out = []
    for sub_bins in bins.values():
        node, total = max(sub_bins.items(), key=lambda item: item[1])
        out.append((node[0] - 0.5, node[1] - 0.5, total))
    return np.array(sorted(out))


@pytest.mark.parametrize("cell_size,max_error", [(8, 2), (4, 1), (1, 2), (16, 3.5)])
def test_keypoints_match_a_brute_force_reference(cell_size, max_error):
    rng = np.random.default_rng(cell_size)
    points = [rng.uniform(0, 100, (200, 2)) for _ in range(3)]
    scores = [rng.uniform(0.1, 1.0, 200) for _ in range(3)]
    config = QuantizeConfig(cell_size=cell_size, max_error=max_error, max_kps=None, position="bin")
    result = quantize_keypoints(points, scores, config)
    expected = brute_force_keypoints(np.concatenate(points), np.concatenate(scores), cell_size, max_error)
    got = np.array(sorted(np.c_[result.keypoints, result.scores].tolist()))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # At most one keypoint per cell, and scores are sorted best first.
    cells = np.floor((result.keypoints + 0.5) / max(cell_size, max_error) + 0.5)
    assert len(np.unique(cells, axis=0)) == len(cells)
    assert np.all(np.diff(result.scores) <= 0)


def test_sub_bin_on_a_cell_border_gives_one_keypoint():
    # Edge coordinates 3.6 and 4.4 share the sub-bin node 4, which lies on the border of cells 0 and 1
    # (cell 8): hloc would file them in two cells and emit the same keypoint twice.
    points = np.array([[3.1, 20.0], [3.9, 20.0]])  # pixel coordinates = edge - 0.5
    result = quantize_keypoints([points], [np.array([0.5, 0.6])], QuantizeConfig(8, 2, None, "bin"))
    assert len(result) == 1
    np.testing.assert_allclose(result.keypoints[0], [3.5, 19.5])
    assert result.scores[0] == pytest.approx(1.1)


def test_max_kps_keeps_the_best_cells_and_drops_their_matches():
    points = np.array([[10.0 + 20 * i, 10.0] for i in range(5)])
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.2])
    raw = {("A", "B"): make(points, points + [0.0, 50.0], scores)}
    result = aggregate_matches([("A", "B")], raw, QuantizeConfig(8, 2, max_kps=3))
    for name, shift in (("A", 0.0), ("B", 50.0)):
        np.testing.assert_allclose(result.keypoints[name].scores, [0.9, 0.5, 0.3], rtol=1e-6)
        np.testing.assert_allclose(result.keypoints[name].keypoints[:, 0], [70.0, 30.0, 50.0], atol=1e-5)
        np.testing.assert_allclose(result.keypoints[name].keypoints[:, 1], 10.0 + shift, atol=1e-5)
    np.testing.assert_array_equal(result.matches[("A", "B")].matches0, [0, 1, 2])
    np.testing.assert_allclose(result.matches[("A", "B")].scores0, [0.9, 0.5, 0.3], rtol=1e-6)


def test_matches_farther_than_max_error_from_the_cell_keypoint_are_dropped():
    # One cell of image A holds the winning sub-bin (two strong matches) and a weaker point 3 px away.
    # (sub-bin nodes in edge coordinates: 6 and 10, both in the cell of node 8.)
    a = np.array([[5.5, 9.5], [5.5, 9.5], [8.5, 9.5]])
    b = np.array([[9.5, 49.5], [9.5, 49.5], [29.5, 49.5]])
    raw = {("A", "B"): make(a, b, [0.6, 0.5, 0.9])}
    result = aggregate_matches([("A", "B")], raw, QuantizeConfig(cell_size=8, max_error=2))
    np.testing.assert_allclose(result.keypoints["A"].keypoints, [[5.5, 9.5]], atol=1e-6)
    assert len(result.keypoints["B"]) == 2  # the weak point's partner is in another cell of B
    pm = result.matches[("A", "B")]
    assert pm.num_matches == 1
    matched_b = result.keypoints["B"].keypoints[pm.matches0[0]]
    np.testing.assert_allclose(matched_b, [9.5, 49.5], atol=1e-6)
    assert pm.scores0[0] == pytest.approx(0.6)  # the best of the duplicates


def test_every_kept_match_has_a_raw_match_within_max_error():
    rng = np.random.default_rng(3)
    names = ["A", "B", "C", "D"]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    raw = {p: make(rng.uniform(0, 60, (150, 2)), rng.uniform(0, 60, (150, 2)), rng.uniform(0.1, 1, 150)) for p in pairs}
    config = QuantizeConfig(cell_size=4, max_error=1.5, max_kps=40)
    result = aggregate_matches(pairs, raw, config)
    for (a, b), pm in result.matches.items():
        indices = pm.index_pairs()
        assert len(indices) > 0
        assert len(np.unique(indices[:, 1])) == len(indices)  # one-to-one
        kp0 = result.keypoints[a].keypoints[indices[:, 0]]
        kp1 = result.keypoints[b].keypoints[indices[:, 1]]
        d0 = np.linalg.norm(raw[(a, b)].keypoints0[None] - kp0[:, None], axis=2)
        d1 = np.linalg.norm(raw[(a, b)].keypoints1[None] - kp1[:, None], axis=2)
        assert np.all(((d0 <= config.max_error + 1e-5) & (d1 <= config.max_error + 1e-5)).any(axis=1))
        assert len(pm.matches0) == len(result.keypoints[a])
    for kp in result.keypoints.values():
        assert len(kp) <= 40


def brute_force_greedy(ids0, ids1, scores):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    used0, used1, kept = set(), set(), []
    for i in order:
        if ids0[i] not in used0 and ids1[i] not in used1:
            used0.add(ids0[i])
            used1.add(ids1[i])
            kept.append(i)
    return sorted(kept)


def test_one_to_one_is_greedy_by_score_on_both_sides():
    # a->b 0.9, a->c 0.5, d->c 0.4: (a, b) wins a; then c is free for d.
    np.testing.assert_array_equal(one_to_one([0, 0, 1], [0, 1, 1], [0.9, 0.5, 0.4]), [0, 2])
    # b is wanted by a (0.8) and d (0.7): d keeps nothing else, a keeps b.
    np.testing.assert_array_equal(one_to_one([0, 1, 1], [0, 0, 1], [0.8, 0.7, 0.1]), [0, 2])
    rng = random.Random(5)
    for _ in range(50):
        count = rng.randint(0, 60)
        ids0 = [rng.randint(0, 9) for _ in range(count)]
        ids1 = [rng.randint(0, 9) for _ in range(count)]
        scores = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(count)]  # ties included
        assert one_to_one(ids0, ids1, scores).tolist() == brute_force_greedy(ids0, ids1, scores)


def test_pair_matches_are_padded_to_n0_and_empty_pairs_are_all_unmatched():
    pm = to_pair_matches(np.array([2, -1, 0]), np.array([1, 3, -1]), np.array([0.5, 0.9, 0.9]), 4)
    np.testing.assert_array_equal(pm.matches0, [-1, -1, 1, -1])
    assert pm.matches0.dtype == np.int32 and pm.scores0[2] == pytest.approx(0.5)
    # A pair without raw matches still gets a matches0 row of -1s for each keypoint of image 0.
    pairs = [("A", "B"), ("A", "C")]
    raw = {("A", "B"): make([[5.0, 5.0]], [[7.0, 7.0]], [1.0]), ("A", "C"): Matches.empty()}
    result = aggregate_matches(pairs, raw, QuantizeConfig())
    np.testing.assert_array_equal(result.matches[("A", "C")].matches0, [-1])
    assert len(result.keypoints["C"]) == 0


def test_reference_keypoints_are_kept_and_matches_snap_within_max_error():
    reference = {
        "R": ImageKeypoints(
            np.array([[10.0, 10.0], [30.0, 10.0], [50.0, 10.0]], np.float32), np.array([1.0, 1.0, 1.0], np.float32)
        )
    }
    q = [[100.0, 100.0], [120.0, 100.0], [140.0, 100.0]]
    r = [[11.9, 10.0], [30.0, 12.1], [50.5, 10.5]]  # 1.9 px (kept), 2.1 px (dropped), 0.7 px (kept)
    raw = {("Q", "R"): make(q, r, [0.9, 0.8, 0.7])}
    result = aggregate_matches([("Q", "R")], raw, QuantizeConfig(cell_size=8, max_error=2), reference)
    np.testing.assert_array_equal(result.keypoints["R"].keypoints, reference["R"].keypoints)
    query = result.keypoints["Q"].keypoints
    assert len(query) == 3  # new image: fresh keypoints for every raw point
    matches = {tuple(query[i]): j for i, j in result.matches[("Q", "R")].index_pairs()}
    assert matches == {(100.0, 100.0): 0, (140.0, 100.0): 2}
    # Raw points of the reference image never create keypoints, even with max_kps.
    np.testing.assert_array_equal(assign_to_keypoints(np.array(r), reference["R"].keypoints, 2.0), [0, -1, 2])


def test_result_does_not_depend_on_pair_order():
    pairs, raw, _ = triplet_raw(seed=7)
    config = QuantizeConfig(cell_size=8, max_error=2)
    first = aggregate_matches(pairs, raw, config)
    second = aggregate_matches(pairs[::-1], dict(reversed(list(raw.items()))), config)
    for name in "ABC":
        np.testing.assert_array_equal(first.keypoints[name].keypoints, second.keypoints[name].keypoints)
    for pair in pairs:
        np.testing.assert_array_equal(first.matches[pair].matches0, second.matches[pair].matches0)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        QuantizeConfig(max_kps=0)
    with pytest.raises(ValueError):
        QuantizeConfig(position="median")
    assert QuantizeConfig(cell_size=1, max_error=2).cell == 2  # hloc: a cell is never below max_error
