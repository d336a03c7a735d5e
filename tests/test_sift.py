"""SIFT matcher: geometry against the temple_ring ground truth, coordinates under resizing."""
from __future__ import annotations

import numpy as np
import pytest

from matchers import make_matcher
from matchers.errors import UserError
from matchers.image_io import read_gray
from matchers.sift import SIFTMatcher, SIFTOptions


def fundamental_from_gt(camera0, camera1) -> np.ndarray:
    """F mapping image-0 points to epipolar lines in image 1, from world-to-camera K, R, t."""
    R = camera1.R @ camera0.R.T
    t = camera1.t - R @ camera0.t
    t_cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    return np.linalg.inv(camera1.K).T @ t_cross @ R @ np.linalg.inv(camera0.K)


def epipolar_distance(F: np.ndarray, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    """Distance (px) of each point of image 1 to the epipolar line of its match."""
    lines = np.concatenate([points0, np.ones((len(points0), 1))], axis=1) @ F.T
    homogeneous1 = np.concatenate([points1, np.ones((len(points1), 1))], axis=1)
    return np.abs((lines * homogeneous1).sum(1)) / np.linalg.norm(lines[:, :2], axis=1)


def test_sift_matches_agree_with_ground_truth_epipolar_geometry(temple_ring):
    from datasets.middlebury import read_par_file

    cameras = read_par_file(temple_ring / "templeR_par.txt")
    name0, name1 = "templeR0010.png", "templeR0012.png"
    matches = SIFTMatcher().match(read_gray(temple_ring / "images" / name0), read_gray(temple_ring / "images" / name1))
    assert len(matches) > 100
    errors = epipolar_distance(fundamental_from_gt(cameras[name0], cameras[name1]), matches.keypoints0, matches.keypoints1)
    assert np.median(errors) < 0.5
    assert np.mean(errors < 2.0) > 0.85


def test_keypoints_are_in_original_coordinates_when_resizing(temple_ring):
    import cv2

    image = read_gray(temple_ring / "images" / "templeR0020.png")  # 640 x 480
    half = cv2.resize(image, (320, 240), interpolation=cv2.INTER_AREA)
    matcher = SIFTMatcher(SIFTOptions(resize=None))
    matches = matcher.match(image, half)
    assert len(matches) > 50
    # hloc convention: pixel centres at integers, so x_half = (x + 0.5) / 2 - 0.5.
    expected = (matches.keypoints0 + 0.5) / 2 - 0.5
    assert np.median(np.linalg.norm(matches.keypoints1 - expected, axis=1)) < 0.3
    # Matching at a reduced size must still report keypoints in the original frame.
    resized = SIFTMatcher(SIFTOptions(resize=320)).match(image, image)
    assert resized.keypoints0[:, 0].max() > 400 and np.allclose(resized.keypoints0, resized.keypoints1, atol=0.5)


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="ratio"):
        SIFTOptions(ratio=1.5)
    with pytest.raises(UserError, match="no weights"):
        make_matcher("sift", weights="outdoor")
    with pytest.raises(UserError, match="unknown matcher"):
        make_matcher("superglue")
