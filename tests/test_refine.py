"""Lucas-Kanade refinement of matches: sub-pixel accuracy on a known shift, turned images, safe rejection."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.image_io import to_uint8
from matchers.base import Matches, rotate_points_back
from pipeline.refine import RefineConfig, refine_matches


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 1.5)
    return (image - image.min()) / (image.max() - image.min())


def shifted(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """image1(x + shift) = image0(x): a point (u, v) of image 0 sits at (u + dx, v + dy) in image 1."""
    matrix = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    return cv2.warpAffine(image, matrix, image.shape[::-1], flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


SHIFT = (3.37, -1.71)


def grid_matches(noise: float, seed: int = 1) -> tuple[Matches, np.ndarray]:
    points0 = np.stack(np.meshgrid(np.arange(24, 136, 8.0), np.arange(24, 96, 8.0)), -1).reshape(-1, 2)
    truth = points0 + SHIFT
    rng = np.random.default_rng(seed)
    guess = truth + rng.uniform(-noise, noise, truth.shape)
    return Matches(points0.astype(np.float32), guess.astype(np.float32), np.ones(len(points0), np.float32)), truth


def test_refinement_recovers_a_sub_pixel_shift_and_keeps_image0_points():
    image0 = textured(120, 160)
    image1 = shifted(image0, SHIFT)
    matches, truth = grid_matches(noise=1.0)
    refined, accepted = refine_matches(image0, image1, matches)
    assert accepted.mean() > 0.9
    before = np.linalg.norm(matches.keypoints1 - truth, axis=1)
    after = np.linalg.norm(refined.keypoints1[accepted] - truth[accepted], axis=1)
    assert np.median(before) > 0.5 and np.median(after) < 0.05  # 1 px guesses -> hundredths of a pixel
    np.testing.assert_array_equal(refined.keypoints0, matches.keypoints0)
    np.testing.assert_array_equal(refined.scores, matches.scores)


@pytest.mark.parametrize("turn", [1, 2, 3])
def test_turned_second_image_is_refined_in_its_matching_orientation(turn):
    image0 = textured(120, 160, seed=3)
    upright1 = shifted(image0, SHIFT)
    image1 = np.ascontiguousarray(np.rot90(upright1, -turn))  # np.rot90(image1, turn) is upright again
    matches, truth = grid_matches(noise=0.8)
    height, width = image1.shape
    # Points of the upright image 1, expressed in the turned image 1 that is stored.
    turned = Matches(
        matches.keypoints0,
        rotate_points_back(matches.keypoints1, turn, (upright1.shape[1], upright1.shape[0])),
        matches.scores,
    )
    truth_turned = rotate_points_back(truth.astype(np.float32), turn, (upright1.shape[1], upright1.shape[0]))
    refined, accepted = refine_matches(image0, image1, turned, turn=turn)
    assert accepted.mean() > 0.9
    assert np.median(np.linalg.norm(refined.keypoints1[accepted] - truth_turned[accepted], axis=1)) < 0.05
    assert refined.keypoints1[:, 0].max() < width and refined.keypoints1[:, 1].max() < height
    # Without the turn the patches do not correspond: nearly everything is rejected and left unchanged.
    _, accepted_unturned = refine_matches(image0, image1, turned, turn=0)
    assert accepted_unturned.mean() < 0.2


def test_wrong_matches_are_left_where_the_matcher_put_them():
    image0 = textured(120, 160, seed=5)
    image1 = textured(120, 160, seed=6)  # unrelated content
    matches, _ = grid_matches(noise=0.5)
    refined, accepted = refine_matches(image0, image1, matches)
    assert accepted.mean() < 0.2
    np.testing.assert_array_equal(refined.keypoints1[~accepted], matches.keypoints1[~accepted])
    assert np.all(np.linalg.norm(refined.keypoints1 - matches.keypoints1, axis=1) <= RefineConfig().max_shift + 1e-6)


def test_disabled_and_empty_inputs_return_the_matches_unchanged():
    image = textured(40, 50)
    matches, _ = grid_matches(noise=0.5)
    same, accepted = refine_matches(image, image, matches, RefineConfig(mode="none"))
    assert same is matches and not accepted.any()
    empty, accepted = refine_matches(image, image, Matches.empty())
    assert len(empty) == 0 and len(accepted) == 0


def test_config_is_validated_and_images_are_converted_to_uint8():
    with pytest.raises(ValueError, match="refine mode"):
        RefineConfig(mode="sharpen")
    with pytest.raises(ValueError, match="odd"):
        RefineConfig(window=8)
    converted = to_uint8(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32))
    assert converted.dtype == np.uint8 and converted.tolist() == [[0, 128, 255, 255]]


def test_images_of_different_sizes_are_refined():
    image0 = textured(120, 160, seed=7)
    image1 = shifted(image0, SHIFT)[:100, :150]  # a smaller second image (another camera)
    matches, truth = grid_matches(noise=0.8)
    inside = (truth[:, 0] < 140) & (truth[:, 1] < 90)
    refined, accepted = refine_matches(image0, image1, matches.subset(inside))
    assert accepted.mean() > 0.9
    assert np.median(np.linalg.norm(refined.keypoints1[accepted] - truth[inside][accepted], axis=1)) < 0.05


def test_tracks_are_aligned_to_their_strongest_keypoint_through_chains():
    from pipeline.quantize import ImageKeypoints, PairMatches, QuantizedMatches
    from pipeline.refine import refine_tracks

    texture = textured(140, 180, seed=11)
    shifts = {"a.png": (0.0, 0.0), "b.png": (2.3, -1.6), "c.png": (4.7, 0.9)}
    images = {name: shifted(texture, shift)[10:130, 10:170] for name, shift in shifts.items()}
    grid = np.stack(np.meshgrid(np.arange(20, 130, 10.0), np.arange(20, 90, 10.0)), -1).reshape(-1, 2)
    rng = np.random.default_rng(0)
    truth = {name: grid + shift for name, shift in shifts.items()}
    keypoints = {
        "a.png": ImageKeypoints(grid.astype(np.float32), np.full(len(grid), 5.0, np.float32)),  # the references
        "b.png": ImageKeypoints(
            (truth["b.png"] + rng.uniform(-0.4, 0.4, grid.shape)).astype(np.float32), np.ones(len(grid), np.float32)
        ),
        "c.png": ImageKeypoints(
            (truth["c.png"] + rng.uniform(-0.4, 0.4, grid.shape)).astype(np.float32), np.ones(len(grid), np.float32)
        ),
    }
    identity = np.arange(len(grid), dtype=np.int32)
    ones = np.ones(len(grid), np.float32)
    # a-b and b-c only: c's keypoints are two links from their reference.
    matches = {
        ("a.png", "b.png"): PairMatches.from_matches0(identity, ones),
        ("b.png", "c.png"): PairMatches.from_matches0(identity, ones),
    }
    refined, stats = refine_tracks(QuantizedMatches(keypoints, matches), images.__getitem__)
    assert stats.tracks == len(grid) and stats.candidates == 2 * len(grid)
    assert stats.moved >= 0.9 * stats.candidates
    np.testing.assert_array_equal(refined.keypoints["a.png"].keypoints, keypoints["a.png"].keypoints)
    for name in ("b.png", "c.png"):
        error = np.linalg.norm(refined.keypoints[name].keypoints - truth[name], axis=1)
        before = np.linalg.norm(keypoints[name].keypoints - truth[name], axis=1)
        assert np.median(before) > 0.2 and np.median(error) < 0.08, name  # c: two links, errors add
    assert refined.matches is matches

    # Keypoints of fixed images (localization: the reference model's) never move.
    kept, _ = refine_tracks(QuantizedMatches(keypoints, matches), images.__getitem__, fixed={"c.png"})
    np.testing.assert_array_equal(kept.keypoints["c.png"].keypoints, keypoints["c.png"].keypoints)
    # Two fixed images in a chain a - c - b: a (strongest) is the reference, c is fixed at depth 2 (a level
    # of the search with nothing to refine), and b is aligned to its fixed neighbour c.
    exact_c = dict(keypoints, **{"c.png": ImageKeypoints(truth["c.png"].astype(np.float32), ones)})
    chain = {
        ("a.png", "c.png"): PairMatches.from_matches0(identity, ones),
        ("c.png", "b.png"): PairMatches.from_matches0(identity, ones),
    }
    located, stats = refine_tracks(QuantizedMatches(exact_c, chain), images.__getitem__, fixed={"a.png", "c.png"})
    assert stats.candidates == len(grid)  # only b's keypoints may move
    np.testing.assert_array_equal(located.keypoints["c.png"].keypoints, exact_c["c.png"].keypoints)
    # (~0.1 px: the cubic resampling of the two synthetic views disagrees that much at these fractional shifts)
    assert np.median(np.linalg.norm(located.keypoints["b.png"].keypoints - truth["b.png"], axis=1)) < 0.12
