"""Test-time augmentation: rotations of image 1 mapped back, several sizes merged, MAGSAC++ counting."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from matchers.base import Matcher, Matches
from pipeline.tta import (
    TTAConfig,
    View,
    count_verified,
    first_views,
    match_pair,
    prepare_view,
    second_views,
)


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 2.0)
    return (image - image.min()) / (image.max() - image.min())


class UprightMatcher(Matcher):
    """Finds correspondences only between identical images (like a matcher without rotation invariance).

    For identical images it returns a grid with a known horizontal parallax (a rectified stereo pair,
    so a fundamental matrix explains it); otherwise incoherent random matches.
    """

    name = "upright"

    def __init__(self) -> None:
        self.grid = np.stack(np.meshgrid(np.arange(10, 70, 6.0), np.arange(10, 50, 4.0)), -1).reshape(-1, 2)
        self.parallax = np.random.default_rng(1).uniform(0, 6, len(self.grid))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    def match_prepared(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        if image0.shape == image1.shape and np.array_equal(image0, image1):
            k1 = self.grid + np.stack([self.parallax, np.zeros_like(self.parallax)], 1)
            return Matches(self.grid.astype(np.float32), k1.astype(np.float32), np.ones(len(k1), np.float32))
        rng = np.random.default_rng(image1.shape[0])
        h0, w0 = image0.shape
        h1, w1 = image1.shape
        k0 = rng.uniform(0, 1, (40, 2)) * [w0 - 1, h0 - 1]
        k1 = rng.uniform(0, 1, (40, 2)) * [w1 - 1, h1 - 1]
        return Matches(k0.astype(np.float32), k1.astype(np.float32), np.full(40, 0.5, np.float32))


def to_rot90_coordinates(points: np.ndarray, width: int) -> np.ndarray:
    """Where a point (u, v) of an image of width W appears in np.rot90(image, 1): (v, W - 1 - u)."""
    return np.stack([points[:, 1], width - 1 - points[:, 0]], axis=1)


def prepare_all(matcher, image, views):
    return {view: prepare_view(matcher, image, view) for view in views}


@pytest.mark.parametrize("mode", ["best", "union"])
def test_rotated_second_image_is_matched_and_mapped_back(mode):
    image0 = textured(60, 80)
    image1 = np.ascontiguousarray(np.rot90(image0, 1))  # the second camera was turned by 90 degrees
    matcher, config = UprightMatcher(), TTAConfig(rotation=mode)
    result = match_pair(
        matcher,
        prepare_all(matcher, image0, first_views(config)),
        prepare_all(matcher, image1, second_views(config)),
        config,
    )
    grid_shifted = matcher.grid + np.stack([matcher.parallax, 0 * matcher.parallax], 1)
    if mode == "best":
        assert result.rotation == 3  # rot90(image1, 3) is upright again
        assert result.verified[3] == len(matcher.grid)
        assert max(result.verified[k] for k in (0, 1, 2)) < len(matcher.grid) // 2
        assert len(result.matches) == len(matcher.grid)
        good = result.matches
    else:
        assert len(result.matches) == len(matcher.grid) + 3 * 40
        is_grid = np.isin(result.matches.keypoints0[:, 0], matcher.grid[:, 0]) & (result.matches.scores == 1)
        good = result.matches.subset(is_grid)
    np.testing.assert_allclose(good.keypoints0, matcher.grid, atol=1e-4)
    # Independent expectation: the upright point (u, v) sits at (v, W - 1 - u) in the turned image 1.
    np.testing.assert_allclose(good.keypoints1, to_rot90_coordinates(grid_shifted, image0.shape[1]), atol=1e-4)


def test_no_rotation_prepares_and_matches_only_the_upright_view():
    config = TTAConfig()
    assert first_views(config) == second_views(config) == (View(None, 0),)
    assert len(second_views(TTAConfig(rotation="best", resize=(64, 96)))) == 8


def blob_image(height: int, width: int, centre: tuple[float, float], sigma: float = 3.0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


class BlobMatcher(Matcher):
    """Matches the intensity centroid of image 0 to that of image 1 (pixel-centre coordinates)."""

    name = "blob"

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def prepare(self, image: np.ndarray) -> np.ndarray:
        self.sizes.append(image.shape)
        y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
        weights = np.maximum(image - 0.05, 0)
        return np.array([(x * weights).sum(), (y * weights).sum()]) / weights.sum()

    def match_prepared(self, c0: np.ndarray, c1: np.ndarray) -> Matches:
        return Matches(c0[None].astype(np.float32), c1[None].astype(np.float32), np.ones(1, np.float32))


def test_several_sizes_and_both_directions_are_merged_in_original_coordinates():
    centre0, centre1 = (100.3, 40.6), (30.2, 80.9)
    image0, image1 = blob_image(120, 160, centre0, 6.0), blob_image(120, 160, centre1, 6.0)
    matcher = BlobMatcher()
    config = TTAConfig(resize=(64, 100), both_directions=True)
    views0 = prepare_all(matcher, image0, first_views(config))
    views1 = prepare_all(matcher, image1, second_views(config))
    assert sorted(matcher.sizes) == [(48, 64), (48, 64), (75, 100), (75, 100)]
    result = match_pair(matcher, views0, views1, config)
    assert len(result.matches) == 4  # 2 sizes x 2 directions
    np.testing.assert_allclose(result.matches.keypoints0, np.tile(centre0, (4, 1)), atol=0.3)
    np.testing.assert_allclose(result.matches.keypoints1, np.tile(centre1, (4, 1)), atol=0.3)


def test_count_verified_counts_the_inliers_of_a_two_view_geometry():
    rng = np.random.default_rng(0)
    K = np.array([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]])
    points = rng.uniform([-1, -1, 4], [1, 1, 8], (80, 3))
    angle = np.deg2rad(10)
    R = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    t = np.array([-0.8, 0.1, 0.2])

    def project(X):
        x = X @ K.T
        return x[:, :2] / x[:, 2:]

    k0, k1 = project(points), project(points @ R.T + t)
    outliers0, outliers1 = rng.uniform(0, 320, (40, 2)), rng.uniform(0, 240, (40, 2))
    matches = Matches(
        np.r_[k0, outliers0].astype(np.float32), np.r_[k1, outliers1].astype(np.float32), np.ones(120, np.float32)
    )
    assert 78 <= count_verified(matches, 1.0) <= 86
    assert count_verified(matches.subset(np.arange(7)), 1.0) == 0  # too few for a fundamental matrix


def test_sift_on_a_real_image_and_its_turned_copy(temple_ring):
    from core.image_io import read_gray
    from matchers.sift import SIFTMatcher

    image0 = cv2.resize(read_gray(temple_ring / "images" / "templeR0010.png"), (320, 240), interpolation=cv2.INTER_AREA)
    image1 = np.ascontiguousarray(np.rot90(image0, 1))
    matcher, config = SIFTMatcher(), TTAConfig(rotation="best")
    result = match_pair(
        matcher,
        prepare_all(matcher, image0, first_views(config)),
        prepare_all(matcher, image1, second_views(config)),
        config,
    )
    assert len(result.matches) > 50
    error = np.linalg.norm(result.matches.keypoints1 - to_rot90_coordinates(result.matches.keypoints0, 320), axis=1)
    assert np.mean(error < 1.0) > 0.9


def test_auto_rotation_matches_once_at_the_given_turn():
    image0 = textured(60, 80)
    image1 = np.ascontiguousarray(np.rot90(image0, 1))
    matcher, config = UprightMatcher(), TTAConfig(rotation="auto")
    assert config.single_pass  # one match per pair: batchable like "none"
    assert second_views(config, turn=3) == (View(None, 3),)
    assert second_views(config, turn=-1) == (View(None, 3),)
    result = match_pair(
        matcher,
        prepare_all(matcher, image0, first_views(config)),
        prepare_all(matcher, image1, second_views(config, turn=3)),
        config,
        turn=3,
    )
    assert result.rotation == 3 and result.verified == {}
    grid_shifted = matcher.grid + np.stack([matcher.parallax, 0 * matcher.parallax], 1)
    np.testing.assert_allclose(
        result.matches.keypoints1, to_rot90_coordinates(grid_shifted, image0.shape[1]), atol=1e-4
    )
