"""The compact forms that keep track building and quantization bounded: sparse per-pair matches, merged
per-image bins, the streamed graph and its vectorised tree depths (pipeline.quantize, pipeline.tracks)."""

from __future__ import annotations

import numpy as np
import pytest

from matchers.base import CoarseGrid, Matches
from pipeline import quantize, tracks
from pipeline.quantize import PairMatches, QuantizeConfig, QuantizedMatches, sparse_pair_matches


def test_sparse_pair_matches_give_hlocs_padded_arrays():
    pm = PairMatches.from_matches0(np.array([-1, 2, -1, 0], np.int32), np.array([0, 0.5, 0, 0.25], np.float32))
    assert pm.num_matches == 2 and pm.num_keypoints0 == 4
    np.testing.assert_array_equal(pm.index_pairs(), [[1, 2], [3, 0]])
    np.testing.assert_array_equal(pm.matches0, [-1, 2, -1, 0])
    np.testing.assert_allclose(pm.scores0, [0, 0.5, 0, 0.25])
    assert QuantizedMatches({}, {("a", "b"): pm}).padded_bytes() == 8 * 4  # int32 + float32 per keypoint of image 0
    padded = QuantizedMatches({}, {("a", "b"): pm}).padded_matches()
    assert list(padded) == [("a", "b")] and len(padded) == 1
    np.testing.assert_array_equal(padded[("a", "b")][0], [-1, 2, -1, 0])


def test_sparse_pair_matches_sort_by_image0_and_keep_the_last_of_repeated_keypoints():
    """Two cells of one image merged into one keypoint give two identical matches: written into padded arrays
    the later one's score stays, so it does here."""
    pm = sparse_pair_matches(np.array([3, 1, 3]), np.array([0, 2, 0]), np.array([0.9, 0.5, 0.7]), 5)
    np.testing.assert_array_equal(pm.indices, [[1, 2], [3, 0]])
    np.testing.assert_allclose(pm.scores, [0.5, 0.7])
    np.testing.assert_array_equal(pm.matches0, [-1, 2, -1, 0, -1])


def test_merging_the_bins_of_many_pairs_keeps_the_keypoints(monkeypatch):
    """The accumulator merges its per-pair bins as they grow; the keypoints are those of one reduction at the end."""
    rng = np.random.default_rng(0)
    parts = [(rng.uniform(0, 40, (300, 2)), rng.uniform(0.1, 1, 300)) for _ in range(40)]  # <= 21 x 21 sub-bins
    config = QuantizeConfig(cell_size=8, max_error=2, max_kps=None)
    monkeypatch.setattr(quantize, "MERGE_MIN_ROWS", 10**9)
    once = quantize.quantize_keypoints([p for p, _ in parts], [s for _, s in parts], config)
    monkeypatch.setattr(quantize, "MERGE_MIN_ROWS", 500)
    accumulator = quantize.KeypointAccumulator(config)
    held = []
    for points, scores in parts:
        accumulator.add(points, scores)
        held.append(sum(len(part[0]) for part in accumulator._parts))
    merged = accumulator.finalize()
    # merged as it grew: at most twice the distinct sub-bins plus the last part, not the 12,000 rows added
    assert max(held) <= max(500, 2 * 21 * 21) + 300
    np.testing.assert_allclose(merged.keypoints, once.keypoints, atol=1e-4)
    np.testing.assert_allclose(merged.scores, once.scores, rtol=1e-5)


def test_tree_depths_by_pointer_jumping_match_the_tree():
    """root 5 -> 0 -> 1 -> 2 -> 3, root -> 4; node 6 unreached."""
    parent = np.array([5, 0, 1, 2, 5, -9999, -9999])
    visit = np.array([5, 0, 4, 1, 2, 3])
    np.testing.assert_array_equal(tracks._tree_depths(parent, visit, 5), [1, 2, 3, 4, 1, 0, 0])


def test_graph_keeps_the_best_raw_match_between_two_cells_and_cells_left_of_the_grid():
    """Two raw matches join the same two cells (a turned view snapping): one edge, the more confident; a cell at
    x = -1 (just outside the grid) is a node of its own."""
    grid = CoarseGrid((8.0, 8.0), (0.0, 0.0))
    coarse0 = np.array([[8, 8], [8, 8], [-8, 16]], np.float32)
    coarse1 = np.array([[16, 8], [16, 8], [24, 16]], np.float32)
    points1 = coarse1 + np.array([[0.5, 0], [1.5, 0], [0, 0]], np.float32)
    raw = {("A", "B"): Matches(coarse0, points1, np.array([0.4, 0.8, 0.6], np.float32), coarse0, coarse1)}
    graph = tracks._graph(raw, {"A": grid, "B": grid})
    assert graph.raw_matches == 3 and len(graph.edges) == 2
    np.testing.assert_array_equal(graph.node_cell.tolist(), [[-1, 2], [1, 1], [2, 1], [3, 2]])
    np.testing.assert_array_equal(graph.node_image, [0, 0, 1, 1])
    best = graph.scores.argmax()
    assert graph.scores[best] == pytest.approx(0.8) and graph.points[best, 1, 0] == pytest.approx(17.5)


def test_peak_rss_grows_with_touched_memory():
    """In a fresh process (this one's high-water mark is already set by earlier tests): 256 MB written raise it."""
    import subprocess
    import sys

    code = (
        "import numpy as np; from core.resources import peak_rss_mb; before = peak_rss_mb(); "
        "block = np.ones(256 << 20, np.uint8); print(before, peak_rss_mb())"
    )
    before, after = map(float, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    assert 200 <= after - before <= 320, (before, after)
