"""Exact tracks on coarse cells (pipeline.tracks): union across pairs whichever side was refined, conflicts
dropped by confidence, and multi-view refinement against a reference view on a rendered scene."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from datasets.synthetic import SceneConfig, render_scene, warp
from matchers.base import CoarseGrid, Matches
from pipeline.tracks import TrackConfig, build_tracks, image_turns

GRID = CoarseGrid((8.0, 8.0), (0.0, 0.0))


def one(point0, point1, coarse0, coarse1, score: float = 0.9) -> Matches:
    array = lambda value: np.array([value], np.float32)  # noqa: E731
    return Matches(array(point0), array(point1), np.array([score], np.float32), array(coarse0), array(coarse1))


def track_of(result, name: str) -> np.ndarray:
    return result.keypoints[name].keypoints


@pytest.mark.parametrize("refined_sides", list(itertools.product((0, 1), repeat=2)))
def test_two_pairs_sharing_an_image_make_one_track_of_three_whichever_side_was_refined(refined_sides):
    """A point at cells A(2, 3), B(5, 3), C(7, 1); pairs (A, B) and (B, C); in each pair either image may be
    the refined one (LoFTR refines its second image; a swapped pair is stored the other way round)."""
    cells = {"A": (16.0, 24.0), "B": (40.0, 24.0), "C": (56.0, 8.0)}
    fine = {"A": (17.2, 23.1), "B": (41.5, 23.0), "C": (55.0, 9.5)}
    raw = {}
    for (name0, name1), side in zip((("A", "B"), ("B", "C")), refined_sides):
        point0 = fine[name0] if side == 0 else cells[name0]
        point1 = fine[name1] if side == 1 else cells[name1]
        raw[(name0, name1)] = one(point0, point1, cells[name0], cells[name1])
    result, stats = build_tracks(raw, {n: GRID for n in "ABC"}, config=TrackConfig(refine="none"))
    assert stats.tracks == 1 and stats.length_histogram == {3: 1} and stats.in_tracks == 2
    assert all(len(result.keypoints[n]) == 1 for n in "ABC")
    assert result.matches[("A", "B")].matches0.tolist() == [0]
    assert result.matches[("B", "C")].matches0.tolist() == [0]
    # B takes part in both pairs, so it is the reference and sits on its cell centre; each neighbour is placed
    # at its own matched point moved by B's offset from B's matched point in that pair.
    np.testing.assert_allclose(track_of(result, "B")[0], cells["B"])
    for other, pair in (("A", ("A", "B")), ("C", ("B", "C"))):
        matched = raw[pair]
        mine, theirs = (
            (matched.keypoints0, matched.keypoints1) if pair[0] == other else (matched.keypoints1, matched.keypoints0)
        )
        np.testing.assert_allclose(track_of(result, other)[0], mine[0] + (np.array(cells["B"]) - theirs[0]), atol=1e-5)


def test_a_match_joining_two_distant_cells_of_one_image_is_dropped_by_confidence():
    raw = {
        ("A", "B"): one((16, 24), (40, 24), (16, 24), (40, 24), 0.9),  # A(2,3) - B(5,3)
        ("A", "C"): one((40, 24), (56, 8), (40, 24), (56, 8), 0.8),  # A(5,3) - C(7,1)
        ("B", "C"): one((40, 24), (56, 8), (40, 24), (56, 8), 0.5),  # would join A(2,3) and A(5,3)
    }
    result, stats = build_tracks(raw, {n: GRID for n in "ABC"}, config=TrackConfig(refine="none"))
    assert stats.conflicts == 1 and stats.tracks == 2 and stats.in_tracks == 2
    assert result.matches[("B", "C")].matches0.tolist() == [-1]
    assert len(result.keypoints["A"]) == 2


def test_neighbouring_cells_of_one_image_in_a_track_become_one_keypoint():
    """LoFTR matched one scene point into A(2,3) from B and into A(3,3) from C (it lies near their border):
    one track of length 3, A's two cells one keypoint where they agree."""
    raw = {
        ("A", "B"): one((16, 24), (40.0, 24.0), (16, 24), (40, 24), 0.9),  # A(2,3) - B(5,3)
        ("C", "A"): one((56, 8), (19.0, 24.0), (56, 8), (24, 24), 0.8),  # C(7,1) - A(3,3), A refined to 19
        ("B", "C"): one((40, 24), (56.0, 8.0), (40, 24), (56, 8), 0.7),
    }
    config = TrackConfig(refine="none", max_cell_spread=1, merge_radius=4)
    result, stats = build_tracks(raw, {n: GRID for n in "ABC"}, config=config)
    assert stats.conflicts == 0 and stats.tracks == 1 and stats.merged_cells == 1
    assert [len(result.keypoints[n]) for n in "ABC"] == [1, 1, 1]
    assert all(pair.matches0.tolist() == [0] for pair in result.matches.values())
    # too far apart to be one point: the weaker cell loses its keypoint and its match
    result, stats = build_tracks(raw, {n: GRID for n in "ABC"}, config=replace(config, merge_radius=1))
    assert stats.merged_cells == 0 and len(result.keypoints["A"]) == 1
    assert result.matches[("C", "A")].matches0.tolist() == [-1]


def test_max_kps_keeps_the_best_supported_cells():
    points = np.array([[8.0 * i, 16.0] for i in range(1, 6)], np.float32)
    scores = np.linspace(0.5, 0.9, 5).astype(np.float32)
    raw = {("A", "B"): Matches(points, points, scores, points, points)}
    result, stats = build_tracks(raw, {"A": GRID, "B": GRID}, config=TrackConfig(max_kps=3, refine="none"))
    assert len(result.keypoints["A"]) == 3 and stats.dropped_max_kps == 2
    np.testing.assert_allclose(np.sort(result.keypoints["A"].scores), np.sort(scores[-3:]))


def test_image_turns_follow_the_pair_turns():
    turns = {("a", "b"): 1, ("b", "c"): 2, ("a", "d"): 0}
    u = image_turns(turns, ["a", "b", "c", "d"])
    for (a, b), k in turns.items():
        assert (u[b] - u[a]) % 4 == k


def test_refinement_against_the_reference_recovers_points_perturbed_by_two_pixels():
    """Rendered scene with exact depth: image-0 grid points matched into views 1 and 2 at their true positions
    plus a 2 px error; the multi-view refinement puts them back within 0.3 px of the truth."""
    scene = render_scene(SceneConfig(width=320, height=240, num_views=3, seed=2, arc_degrees=16))
    names = scene.names
    grid_points = np.stack(np.meshgrid(np.arange(24, 296, 8.0), np.arange(24, 216, 8.0)), -1).reshape(-1, 2)
    rng = np.random.default_rng(0)
    raw = {}
    for other in (1, 2):
        target, valid = warp(scene, 0, other, grid_points.astype(np.float32))
        inside = valid & np.all((target > 12) & (target < np.array([308, 228])), axis=1)
        angle = rng.uniform(0, 2 * np.pi, inside.sum())
        guess = target[inside] + 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
        raw[(names[0], names[other])] = Matches(
            grid_points[inside].astype(np.float32),
            guess.astype(np.float32),
            np.full(inside.sum(), 0.9, np.float32),
            grid_points[inside].astype(np.float32),
            GRID.centres(GRID.cells(target[inside])),
        )
    images = {name: scene.images[i].mean(axis=2).astype(np.float32) / 255 for i, name in enumerate(names)}
    result, stats = build_tracks(raw, {n: GRID for n in names}, load=images.__getitem__, config=TrackConfig())
    assert stats.candidates > 300 and stats.refined >= 0.4 * stats.candidates
    errors, accepted = [], []
    for other in (1, 2):
        pair = result.matches[(names[0], names[other])]
        ids = pair.index_pairs()
        reference_points = result.keypoints[names[0]].keypoints[ids[:, 0]]
        refined = result.keypoints[names[other]].keypoints[ids[:, 1]]
        truth, valid = warp(scene, 0, other, reference_points)  # where image 0's point truly is
        assert valid.mean() > 0.95
        refined, truth = refined[valid], truth[valid]
        errors.append(np.linalg.norm(refined - truth, axis=1))
        accepted.append(np.linalg.norm(refined - truth, axis=1) < 1.9)  # still 2 px off: kept the matcher's point
    errors, accepted = np.concatenate(errors), np.concatenate(accepted)
    assert accepted.mean() >= 0.4
    refined_errors = errors[accepted]
    assert np.median(refined_errors) < 0.15 and np.mean(refined_errors < 0.3) > 0.8, (
        np.median(refined_errors),
        np.mean(refined_errors < 0.3),
    )


@pytest.mark.parametrize("resize", [None, 160])
def test_loftr_coarse_cells_lie_on_the_matchers_grid(resize):
    """The coarse cells LoFTR reports (original pixels of an odd-sized image, resized or not) are exactly the
    lattice points of ``coarse_grid``, so the same cell of an image is the same node in every pair."""
    torch = pytest.importorskip("torch")
    from matchers.loftr import LoFTR, LoFTRConfig
    from matchers.loftr.matcher import LoFTRMatcher

    torch.manual_seed(0)
    matcher = LoFTRMatcher(
        LoFTR(LoFTRConfig.preset("outdoor_ds")).eval(), resize=resize, device="cpu", match_threshold=0.0
    )
    rng = np.random.default_rng(0)
    image0 = rng.random((125, 171)).astype(np.float32)
    image1 = rng.random((131, 167)).astype(np.float32)
    matches = matcher.match(image0, image1)
    assert len(matches) > 0 and matches.has_coarse
    for points, image in ((matches.coarse0, image0), (matches.coarse1, image1)):
        grid = matcher.coarse_grid((image.shape[1], image.shape[0]))
        np.testing.assert_allclose(grid.centres(grid.cells(points)), points, atol=1e-3)
    np.testing.assert_allclose(matches.coarse0, matches.keypoints0, atol=1e-4)  # image 0 is not refined
