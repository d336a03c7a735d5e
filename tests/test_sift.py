"""SIFT matcher: geometry against the temple_ring ground truth, coordinates under resizing."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import UserError
from core.image_io import read_gray
from matchers import make_matcher
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
    from core.par_files import read_par_file

    cameras = read_par_file(temple_ring / "templeR_par.txt")
    name0, name1 = "templeR0010.png", "templeR0012.png"
    matches = SIFTMatcher().match(read_gray(temple_ring / "images" / name0), read_gray(temple_ring / "images" / name1))
    assert len(matches) > 100
    errors = epipolar_distance(
        fundamental_from_gt(cameras[name0], cameras[name1]), matches.keypoints0, matches.keypoints1
    )
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
    with pytest.raises(UserError, match="--amp applies to the loftr matcher only"):
        make_matcher("sift", amp="bf16")
    assert make_matcher("sift", amp=None).name == "sift"  # callers may pass amp=None to any matcher
    with pytest.raises(UserError, match="unknown matcher"):
        make_matcher("superglue")


# ----------------------------------------------------------------------------------------------------------
def _blob_image(width: int, height: int, centres: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width), 0.2, np.float32)
    for cx, cy in centres:
        image += 0.7 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return image


@pytest.mark.parametrize("backend", ["opencv", "pycolmap"])
@pytest.mark.parametrize(
    "size, resize, sigma, tolerance", [(320, None, 5.0, 0.15), (320, 200, 5.0, 0.15), (2000, 500, 8.0, 0.3)]
)
def test_keypoints_follow_the_hloc_pixel_centre_convention(backend, size, resize, sigma, tolerance):
    """A Gaussian blob centred on pixel (x, y) must give a keypoint at (x, y) in original coordinates.

    This pins the convention independently of SIFT's internals: OpenCV's default upscaling would be
    +0.23 px off, COLMAP's corner-origin +0.5 px, and mapping back without the half-pixel shift
    (x * s instead of (x + 0.5) * s - 0.5) 0.3 px at 320 -> 200 and 1.5 px at 2000 -> 500. The tolerance
    is in original pixels (SIFT's own sub-pixel fit is good to about 0.1 px of the detection scale).
    """
    scale = size / 320
    centres = np.array([(60, 60), (200.5, 80.25), (120.3, 180.7), (260, 170)]) * scale
    image = _blob_image(size, size * 3 // 4, centres, sigma)
    features = SIFTMatcher(SIFTOptions(resize=resize, backend=backend)).prepare(image)
    assert features.image_size == (size, size * 3 // 4)
    distance = np.linalg.norm(features.keypoints[:, None] - centres[None], axis=2).min(axis=0)
    assert np.all(distance < tolerance), distance
    assert np.allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)


def test_scannet_image_under_a_known_homography(scannet_sample):
    """Real indoor texture, rotated 30 degrees, scaled and tilted: matches must follow the homography."""
    import cv2

    image = read_gray(scannet_sample / "images" / "scene0758_00_frame-000165.jpg")
    height, width = image.shape
    angle, scale, centre = np.radians(30), 0.8, np.array([width / 2, height / 2])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    homography = np.eye(3)
    homography[:2, :2], homography[:2, 2], homography[2, :2] = linear, centre - linear @ centre, [2e-5, -1e-5]
    # warpPerspective samples with pixel centres at integers, the convention the keypoints use.
    warped = cv2.warpPerspective(image, homography, (width, height), flags=cv2.INTER_LINEAR)
    matches = SIFTMatcher(SIFTOptions(resize=640)).match(image, warped)
    expected = cv2.perspectiveTransform(matches.keypoints0[None].astype(np.float64), homography)[0]
    error = np.linalg.norm(expected - matches.keypoints1, axis=1)
    assert len(matches) > 200
    assert np.mean(error < 3.0) > 0.9 and np.median(error) < 0.5
    assert np.all((matches.scores > 1 - 0.8) & (matches.scores <= 1.0))


def _reference_matches(descriptors0, descriptors1, ratio, mutual):
    """Plain double loop over Euclidean distances: Lowe's ratio test and mutual nearest neighbours."""
    distance = np.array([[np.linalg.norm(a - b) for b in descriptors1] for a in descriptors0])
    found = []
    for i, row in enumerate(distance):
        order = np.argsort(row)
        nearest, second = row[order[0]], row[order[1]]
        if nearest >= ratio * second:
            continue
        if mutual and np.argmin(distance[:, order[0]]) != i:
            continue
        found.append((i, order[0], 1 - nearest / second))
    return found


@pytest.mark.parametrize("mutual", [True, False])
def test_descriptor_matching_equals_a_brute_force_reference(mutual):
    from matchers.sift import match_descriptors

    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 128))
    descriptors1 = base / np.linalg.norm(base, axis=1, keepdims=True)
    # Noisy copies of half the database plus unrelated vectors: some pass, some fail the ratio test.
    noisy = np.concatenate([base[:20] + rng.normal(scale=0.9, size=(20, 128)), rng.normal(size=(17, 128))])
    descriptors0 = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    index0, index1, scores = match_descriptors(
        descriptors0.astype(np.float32), descriptors1.astype(np.float32), ratio=0.8, mutual=mutual, chunk=6
    )
    expected = _reference_matches(descriptors0, descriptors1, 0.8, mutual)
    assert 5 < len(expected) < 37  # the test data exercises both outcomes of the ratio test
    assert list(zip(index0.tolist(), index1.tolist())) == [(i, j) for i, j, _ in expected]
    assert np.allclose(scores, [s for _, _, s in expected], atol=1e-4)


def test_descriptor_matching_keeps_only_mutual_nearest_neighbours():
    from matchers.sift import match_descriptors

    # Rows 0 and 1 of image 0 both prefer column 0 of image 1, which prefers row 1.
    descriptors0 = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]], np.float32)
    descriptors1 = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], np.float32)
    index0, index1, _ = match_descriptors(descriptors0, descriptors1, ratio=1.0, mutual=True)
    assert index0.tolist() == [1] and index1.tolist() == [0]
    index0, index1, _ = match_descriptors(descriptors0, descriptors1, ratio=1.0, mutual=False)
    assert index0.tolist() == [0, 1] and index1.tolist() == [0, 0]
    empty = match_descriptors(np.zeros((0, 3), np.float32), descriptors1)
    assert all(len(part) == 0 for part in empty)


# ---------------------------------------------------------------------------------- the one SIFT module
def test_colmap_sift_is_the_one_default_backend():
    from matchers.sift import SIFTExtractor
    from pipeline.reconstruct import ReconstructConfig

    assert SIFTOptions().backend == "pycolmap" == SIFTExtractor().backend == ReconstructConfig().matcher.sift_backend
    assert make_matcher("sift").options.backend == "pycolmap"
    assert make_matcher("sift", sift_backend="opencv").options.backend == "opencv"
    with pytest.raises(UserError, match="unknown SIFT backend 'vlfeat'; choose one of pycolmap, opencv"):
        make_matcher("sift", sift_backend="vlfeat")


@pytest.mark.parametrize("backend", ["opencv", "pycolmap"])
def test_keypoint_orientations_vote_for_the_applied_quarter_turn(temple_ring, backend):
    """Both backends keep each keypoint's orientation, in one convention: turning an image by k quarter turns
    (np.rot90) takes 90 k degrees from the orientations of the verified matches (what pipeline.orientation uses)."""
    from matchers.sift import SIFTExtractor, rootsift, verify_pair

    image = read_gray(temple_ring / "images" / "templeR0005.png")
    extractor = SIFTExtractor(backend, max_keypoints=1500)
    upright, _ = extractor.detect_resized(image, 480)
    for k in (1, 2, 3):
        turned, _ = extractor.detect_resized(np.ascontiguousarray(np.rot90(image, k)), 480)
        index0, index1, inliers = verify_pair(
            upright.points, rootsift(upright.descriptors), turned.points, rootsift(turned.descriptors), 0.8, 2.0
        )
        assert inliers.sum() > 200
        difference = (turned.angles[index1[inliers]] - upright.angles[index0[inliers]]) % 360.0
        votes = np.bincount(np.rint(difference / 90.0).astype(int) % 4, minlength=4)
        assert votes[-k % 4] > 0.95 * inliers.sum(), votes


def test_pair_verification_keeps_the_geometry_and_refuses_too_little(temple_ring):
    from matchers.sift import SIFTExtractor, rootsift, verify_pair

    extractor = SIFTExtractor("opencv", max_keypoints=1000)
    features = [
        extractor.detect_resized(read_gray(temple_ring / "images" / n), None)[0]
        for n in ("templeR0010.png", "templeR0012.png")
    ]
    (points0, descriptors0), (points1, descriptors1) = [(f.points, rootsift(f.descriptors)) for f in features]
    index0, index1, inliers = verify_pair(points0, descriptors0, points1, descriptors1, 0.8, 1.0)
    assert len(index0) == len(index1) == len(inliers) and inliers.sum() > 100
    # the inliers agree with the ground-truth epipolar geometry
    from core.par_files import read_par_file

    cameras = read_par_file(temple_ring / "templeR_par.txt")
    F = fundamental_from_gt(cameras["templeR0010.png"], cameras["templeR0012.png"])
    errors = epipolar_distance(F, points0[index0[inliers]], points1[index1[inliers]])
    assert np.median(errors) < 1.0
    # fewer than 8 keypoints, or fewer ratio-test matches than asked for: unverifiable, all empty
    assert all(len(a) == 0 for a in verify_pair(points0[:7], descriptors0[:7], points1, descriptors1, 0.8, 1.0))
    too_many = len(index0) + 1
    assert all(len(a) == 0 for a in verify_pair(points0, descriptors0, points1, descriptors1, 0.8, 1.0, too_many))


def test_extractor_options(temple_ring):
    from matchers.sift import SIFTExtractor

    image = read_gray(temple_ring / "images" / "templeR0001.png")
    everything, _ = SIFTExtractor("opencv", 300, strongest_only=False).detect_resized(image, 320)
    strongest, resized = SIFTExtractor("opencv", 300).detect_resized(image, 320)
    assert resized.image.shape == (240, 320) and len(strongest.points) == 300 <= len(everything.points)
    assert np.array_equal(np.sort(strongest.scores), np.sort(everything.scores)[-300:])
    # a dense grid adds descriptors at every step (OpenCV only)
    dense, _ = SIFTExtractor("opencv", 300, strongest_only=False).detect_resized(image, 320, dense_step=40)
    assert len(dense.points) == len(everything.points) + (320 // 40) * (240 // 40)
    assert np.array_equal(dense.points[len(everything.points)][None], [[20.0, 20.0]])
    with pytest.raises(ValueError, match="dense SIFT descriptors need the opencv backend"):
        SIFTExtractor("pycolmap", 300).detect_resized(image, 320, dense_step=40)
    # OpenCV's precise upscaling moves keypoints (about +0.25 px of bias without it)
    plain, _ = SIFTExtractor("opencv", 300, precise_upscale=False).detect_resized(image, 320)
    assert not np.array_equal(plain.points, strongest.points)


def test_sift_lives_in_one_module():
    """Detection, the ratio test and RootSIFT are written once (matchers/sift.py); every other step calls it."""
    from tests.conftest import PROJECT_ROOT
    from tests.test_cli_polish import PACKAGES

    for path in sorted(p for package in ("core", *PACKAGES) for p in (PROJECT_ROOT / package).rglob("*.py")):
        if path == PROJECT_ROOT / "matchers" / "sift.py":
            continue
        text = path.read_text()
        for written_once in ("SIFT_create", "BFMatcher", "def rootsift", "extract_from_uint8_array"):
            assert written_once not in text, f"{path.relative_to(PROJECT_ROOT)} has its own {written_once}"
