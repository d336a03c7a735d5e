"""Quarter turns between images from SIFT orientations, made consistent over the pair graph."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.image_io import read_gray
from pipeline.orientation import (
    OrientationConfig,
    consistent_turns,
    estimate_quarter_turns,
    oriented_sift,
    quarter_turns,
)


def scene(height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A structured image SIFT finds stable keypoints in: random ellipses and bars on a blurred noise floor."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 3.0) * 0.3
    for _ in range(60):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(3, 18)), int(rng.integers(3, 18)))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.2, 1.0)), -1)
    for _ in range(20):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (p0[0] + int(rng.integers(-40, 40)), p0[1] + int(rng.integers(-40, 40)))
        cv2.line(image, p0, p1, float(rng.uniform(0.2, 1.0)), int(rng.integers(1, 4)))
    return np.clip(cv2.GaussianBlur(image, (0, 0), 0.8), 0, 1)


def warped(image: np.ndarray, seed: int) -> np.ndarray:
    """A second view: a mild random homography (a few degrees of roll, perspective, 5 % zoom)."""
    rng = np.random.default_rng(seed)
    height, width = image.shape
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    moved = corners + rng.uniform(-12, 12, corners.shape).astype(np.float32)
    return cv2.warpPerspective(
        image, cv2.getPerspectiveTransform(corners, moved), (width, height), borderMode=cv2.BORDER_REFLECT
    )


@pytest.mark.parametrize("applied", [0, 1, 2, 3])
def test_the_estimated_turn_undoes_the_applied_one(applied):
    config = OrientationConfig()
    image0 = scene()
    image1 = np.ascontiguousarray(np.rot90(warped(image0, seed=applied), applied))
    k, support = quarter_turns(oriented_sift(image0, config), oriented_sift(image1, config), config)
    assert support >= config.min_inliers
    assert k == (-applied) % 4  # np.rot90(image1, k) is upright again


def test_unrelated_images_give_no_evidence():
    config = OrientationConfig()
    assert quarter_turns(oriented_sift(scene(seed=1), config), oriented_sift(scene(seed=2), config), config) == (0, 0)


def test_votes_are_propagated_through_the_strongest_links():
    # B is A turned (np.rot90(B, 2) upright w.r.t. A); C is upright w.r.t. B; D is linked to nothing.
    votes = {
        ("A", "B"): (2, 300),
        ("B", "C"): (0, 150),
        ("A", "C"): (0, 0),  # no direct evidence: follows A -> B -> C
        ("C", "A"): (1, 25),  # a weak vote contradicting the chain loses to it
        ("A", "D"): (0, 0),
    }
    pairs = list(votes)
    turns = consistent_turns(votes, pairs)
    assert turns[("A", "B")] == 2 and turns[("B", "C")] == 0
    assert turns[("A", "C")] == 2  # u[C] = u[B] = u[A] + 2
    assert turns[("C", "A")] == 2  # the reverse pair: np.rot90(A, 2) is upright w.r.t. C
    assert turns[("A", "D")] == 0  # D is in no component with A: matched upright


def test_folder_estimate_turns_pairs_without_direct_evidence(tmp_path):
    base = scene(seed=4)
    views = {
        "a.png": base,
        "b.png": np.ascontiguousarray(np.rot90(warped(base, 10), 2)),
        "c.png": np.ascontiguousarray(np.rot90(warped(base, 11), 2)),
        "d.png": scene(seed=9),
    }
    for name, image in views.items():
        cv2.imwrite(str(tmp_path / name), np.rint(image * 255).astype(np.uint8))
    pairs = [("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png"), ("c.png", "d.png")]
    turns = estimate_quarter_turns(tmp_path, pairs)
    assert turns == {("a.png", "b.png"): 2, ("b.png", "c.png"): 0, ("a.png", "c.png"): 2, ("c.png", "d.png"): 0}
    assert read_gray(tmp_path / "a.png").shape == base.shape


def test_dense_matching_votes_in_cache_order_with_a_small_cache_and_gets_the_same_turns(tmp_path, monkeypatch):
    """pipeline.match_dense visits the pairs in its cache-friendly order with a small SIFT cache; the turns are
    those of the pairs in the given order with every image cached (consistent_turns does not depend on order)."""
    from pipeline import match_dense

    base = scene(seed=5)
    views = {f"{i}.png": np.ascontiguousarray(np.rot90(warped(base, 20 + i), i % 4)) for i in range(6)}
    for name, image in views.items():
        cv2.imwrite(str(tmp_path / name), np.rint(image * 255).astype(np.uint8))
    names = sorted(views)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]][::-1]
    expected = estimate_quarter_turns(tmp_path, pairs, cache_size=len(names))
    assert expected[("0.png", "1.png")] == 3 and expected[("1.png", "3.png")] == 2  # np.rot90(b, k) upright vs a
    monkeypatch.setattr(match_dense, "ORIENTATION_CACHE", 2)
    assert match_dense._quarter_turns(tmp_path, pairs) == expected
