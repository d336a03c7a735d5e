"""SIFT, one implementation for every step: detection (OpenCV or pycolmap), RootSIFT, matching, verification.

* :class:`SIFTExtractor` detects and describes keypoints with OpenCV's ``cv2.SIFT`` or COLMAP's SIFT (pycolmap),
  keeping each keypoint's orientation; :class:`SIFTMatcher` (the weight-free matcher), the quarter-turn votes of
  :mod:`pipeline.orientation` and the retrieval descriptors of :mod:`pipeline.retrieval` all use it.
* :func:`rootsift` / :func:`normalize_descriptors`: RootSIFT (Arandjelovic & Zisserman 2012) and unit L2 norm.
* :func:`match_descriptors`: mutual nearest neighbours with Lowe's ratio test (the matcher);
  :func:`verify_pair`: ratio-test matches checked by a MAGSAC++ fundamental matrix (re-ranking, orientation votes).

:class:`SIFTMatcher` needs no network and no checkpoint, so every downstream step (pairs, dense matching,
reconstruction, localization) can run offline with it. Keypoints are in hloc's convention ((0, 0) is the centre of
the top-left pixel):

* OpenCV's SIFT puts pixel centres at integers already. Its default pyramid upscaling shifts keypoints by
  about +0.25 px; ``enable_precise_upscale`` removes that bias (on, except where stored results predate it).
* COLMAP's SIFT puts the top-left pixel corner at (0, 0), i.e. +0.5 of hloc's convention; we subtract it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import cv2
import numpy as np

from core.errors import UserError
from core.geometry import fundamental_magsac
from core.image_io import to_uint8

from .base import Matcher, Matches, ResizedImage, resize_image

SIFTBackend = Literal["pycolmap", "opencv"]
BACKENDS: tuple[str, ...] = get_args(SIFTBackend)


@dataclass(frozen=True)
class SIFTOptions:
    """Options of :class:`SIFTMatcher`."""

    max_keypoints: int = 8192  # strongest keypoints kept per image
    ratio: float = 0.8  # Lowe's ratio test on descriptor distances (1.0 disables it)
    mutual: bool = True  # keep only mutual nearest neighbours
    root_sift: bool = True  # RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square root
    resize: int | None = 1600  # longest side used for detection; never upscales; None = original size
    backend: SIFTBackend = "pycolmap"  # COLMAP's SIFT (as COLMAP reconstructs) or OpenCV's (cv2.SIFT_create)

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.max_keypoints < 1:
            raise UserError(f"SIFT max_keypoints must be >= 1, got {self.max_keypoints}")
        if not 0.0 < self.ratio <= 1.0:
            raise UserError(f"SIFT ratio must be in (0, 1], got {self.ratio}")
        if self.resize is not None and self.resize < 16:
            raise UserError(f"SIFT resize must be >= 16 px or None (original size), got {self.resize}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown SIFT backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class SIFTKeypoints:
    """What :class:`SIFTExtractor` detects, in pixels of the image it was given (hloc convention)."""

    points: np.ndarray  # (N, 2) float32
    descriptors: np.ndarray  # (N, 128) float32, raw histograms (non-negative, not normalised)
    scores: np.ndarray  # (N,) float32 detector response (1 for the pycolmap backend, 0 on the dense grid)
    angles: (
        np.ndarray
    )  # (N,) float32 orientation in degrees [0, 360), OpenCV's convention (COLMAP's agrees); -1 on the dense grid

    @staticmethod
    def empty() -> "SIFTKeypoints":
        return SIFTKeypoints(
            np.zeros((0, 2), np.float32),
            np.zeros((0, 128), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
        )

    def concatenate(self, other: "SIFTKeypoints") -> "SIFTKeypoints":
        return SIFTKeypoints(
            *(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(SIFTKeypoints))
        )

    def subset(self, keep: np.ndarray) -> "SIFTKeypoints":
        return SIFTKeypoints(self.points[keep], self.descriptors[keep], self.scores[keep], self.angles[keep])


class SIFTExtractor:
    """SIFT keypoints and descriptors of 8-bit gray images, by OpenCV or pycolmap (created on first use).

    ``root_sift`` only sets how COLMAP quantises its descriptors (RootSIFT or L2 before the 8-bit rounding); the
    descriptors returned are raw either way, for :func:`normalize_descriptors`. Two OpenCV settings exist for the
    callers whose stored results were made without them (retrieval vocabularies, orientation votes):
    ``precise_upscale`` (without it keypoints sit about +0.25 px off) and ``strongest_only`` (OpenCV can return a
    few more than ``max_keypoints``, for ties and points with several orientations; keep the strongest).
    """

    def __init__(
        self,
        backend: str = SIFTOptions.backend,
        max_keypoints: int = SIFTOptions.max_keypoints,
        root_sift: bool = SIFTOptions.root_sift,
        precise_upscale: bool = True,
        strongest_only: bool = True,
    ) -> None:
        check_backend(backend)
        self.backend, self.max_keypoints, self.root_sift = backend, max_keypoints, root_sift
        self.precise_upscale, self.strongest_only = precise_upscale, strongest_only
        self._sift: Any = None  # a cv2.SIFT or a pycolmap.FeatureExtractor

    def detect_resized(
        self, image: np.ndarray, max_size: int | None, dense_step: int = 0
    ) -> tuple[SIFTKeypoints, ResizedImage]:
        """Keypoints of a float gray image (H, W) in [0, 1] resized so its longest side is at most ``max_size``
        (never upscaled; None or 0: the original size), in the resized image's pixels, and the resized image
        (whose :meth:`~matchers.base.ResizedImage.to_original` maps them back)."""
        if image.ndim != 2:
            raise ValueError(f"expected a grayscale image (H, W), got shape {image.shape}")
        if max_size is not None and (max_size <= 0 or max_size >= max(image.shape)):
            max_size = None
        resized = resize_image(image, max_size)
        return self.detect(to_uint8(resized.image), dense_step), resized

    def detect(self, gray8: np.ndarray, dense_step: int = 0) -> SIFTKeypoints:
        """Keypoints of an 8-bit gray image; ``dense_step`` > 0 (OpenCV) adds descriptors on a grid of that step."""
        if self.backend == "opencv":
            return self._detect_opencv(gray8, dense_step)
        if dense_step > 0:
            raise ValueError("dense SIFT descriptors need the opencv backend")
        return self._detect_pycolmap(gray8)

    def _detect_opencv(self, gray8: np.ndarray, dense_step: int) -> SIFTKeypoints:
        if self._sift is None:
            precise = {"enable_precise_upscale": True} if self.precise_upscale else {}
            self._sift = cv2.SIFT_create(nfeatures=self.max_keypoints, **precise)
        cv_keypoints, descriptors = self._sift.detectAndCompute(gray8, None)
        found = _from_opencv(cv_keypoints, descriptors)
        if self.strongest_only and len(found.points) > self.max_keypoints:
            found = found.subset(np.argsort(-found.scores, kind="stable")[: self.max_keypoints])
        if dense_step > 0:
            height, width = gray8.shape
            grid = [
                cv2.KeyPoint(float(x), float(y), float(dense_step))
                for y in range(dense_step // 2, height, dense_step)
                for x in range(dense_step // 2, width, dense_step)
            ]
            grid, grid_descriptors = self._sift.compute(gray8, grid)
            if grid_descriptors is not None:
                found = found.concatenate(_from_opencv(grid, grid_descriptors))
        return found

    def _detect_pycolmap(self, gray8: np.ndarray) -> SIFTKeypoints:
        import pycolmap  # imported here: only this backend needs it

        if self._sift is None:
            if not hasattr(pycolmap, "FeatureExtractor"):
                raise UserError(
                    "the pycolmap SIFT backend needs pycolmap >= 3.13 (pycolmap.FeatureExtractor); "
                    "upgrade pycolmap or use backend 'opencv'"
                )
            options = pycolmap.FeatureExtractionOptions()
            options.use_gpu = False
            options.sift.max_num_features = self.max_keypoints
            if not self.root_sift:
                options.sift.normalization = type(options.sift.normalization).L2
            self._sift = pycolmap.FeatureExtractor.create(options, pycolmap.Device.cpu)
        colmap_keypoints, colmap_descriptors = self._sift.extract_from_uint8_array(gray8)
        # COLMAP: (0, 0) is the top-left pixel *corner*; hloc: the top-left pixel *centre*.
        points = np.array([[kp.x, kp.y] for kp in colmap_keypoints], dtype=np.float32).reshape(-1, 2) - 0.5
        angles = np.degrees([kp.compute_orientation() for kp in colmap_keypoints]) % 360.0
        descriptors = np.asarray(colmap_descriptors.data, dtype=np.float32).reshape(-1, 128)
        if self.root_sift:
            # COLMAP applied the L1-root normalisation (then quantised): squaring gives raw-like histograms back.
            descriptors = descriptors**2
        return SIFTKeypoints(points, descriptors, np.ones(len(points), np.float32), angles.astype(np.float32))


def _from_opencv(cv_keypoints: Any, descriptors: np.ndarray | None) -> SIFTKeypoints:
    if not cv_keypoints or descriptors is None:
        return SIFTKeypoints.empty()
    return SIFTKeypoints(
        np.array([kp.pt for kp in cv_keypoints], np.float32),
        np.asarray(descriptors, np.float32),
        np.array([kp.response for kp in cv_keypoints], np.float32),
        np.array([kp.angle for kp in cv_keypoints], np.float32),
    )


@dataclass(frozen=True)
class SIFTFeatures:
    """Per-image SIFT output (what :meth:`SIFTMatcher.prepare` returns and caches)."""

    keypoints: np.ndarray  # (N, 2) float32, original pixel coordinates, hloc convention
    descriptors: np.ndarray  # (N, 128) float32, unit L2 norm (RootSIFT when enabled)
    scores: np.ndarray  # (N,) float32 detector response (1 for the pycolmap backend)
    image_size: tuple[int, int]  # (W, H) of the original image


class SIFTMatcher(Matcher):
    """SIFT keypoints matched by mutual nearest neighbour and Lowe's ratio test.

    Match scores are ``1 - d1 / d2`` (one minus the distance ratio of the best and second-best
    neighbour): 1 for an unambiguous match, ``1 - ratio`` at the ratio-test limit.
    """

    name = "sift"

    def __init__(self, options: SIFTOptions | None = None) -> None:
        self.options = options if options is not None else SIFTOptions()
        self.extractor = SIFTExtractor(self.options.backend, self.options.max_keypoints, self.options.root_sift)

    # ----------------------------------------------------------------------------------- detection
    def prepare(self, image: np.ndarray) -> SIFTFeatures:
        """Detect and describe keypoints of a grayscale float32 image (H, W) in [0, 1]."""
        found, resized = self.extractor.detect_resized(image, self.options.resize)
        height, width = image.shape
        return SIFTFeatures(
            keypoints=_to_original(resized, found.points),
            descriptors=normalize_descriptors(found.descriptors, self.options.root_sift),
            scores=found.scores,
            image_size=(width, height),
        )

    # ------------------------------------------------------------------------------------ matching
    def match_prepared(self, prepared0: SIFTFeatures, prepared1: SIFTFeatures) -> Matches:
        """Mutual nearest neighbours that pass the ratio test, with scores ``1 - d1/d2``."""
        index0, index1, scores = match_descriptors(
            prepared0.descriptors, prepared1.descriptors, ratio=self.options.ratio, mutual=self.options.mutual
        )
        return Matches(
            prepared0.keypoints[index0].astype(np.float32),
            prepared1.keypoints[index1].astype(np.float32),
            scores.astype(np.float32),
        )

    def describe(self) -> dict[str, Any]:
        return {"matcher": self.name, "weights": None, **asdict(self.options)}


def _to_original(resized: ResizedImage, keypoints: np.ndarray) -> np.ndarray:
    if len(keypoints) == 0:
        return np.zeros((0, 2), np.float32)
    return resized.to_original(keypoints.astype(np.float32))


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then element-wise square root (unit L2 norm)."""
    descriptors = np.asarray(descriptors, np.float32)
    descriptors = descriptors / np.maximum(np.abs(descriptors).sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(np.maximum(descriptors, 0.0))


def normalize_descriptors(descriptors: np.ndarray, root_sift: bool) -> np.ndarray:
    """Unit-L2 descriptors (N, 128), RootSIFT first when ``root_sift``."""
    descriptors = np.asarray(descriptors, dtype=np.float32).reshape(-1, 128)
    if root_sift:
        descriptors = rootsift(descriptors)
    norm = np.linalg.norm(descriptors, axis=1, keepdims=True)
    return np.ascontiguousarray(descriptors / np.maximum(norm, 1e-12), dtype=np.float32)


def match_descriptors(
    descriptors0: np.ndarray, descriptors1: np.ndarray, ratio: float = 0.8, mutual: bool = True, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-neighbour matching of unit-L2 descriptors: (index0, index1, scores = 1 - d1/d2).

    Processed in row chunks so memory stays at ``chunk x N1`` floats even for 8k x 8k descriptors.
    """
    n0, n1 = len(descriptors0), len(descriptors1)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n0 == 0 or n1 == 0:
        return empty
    best = np.empty(n0, np.int64)
    best_sim = np.empty(n0, np.float32)
    second_sim = np.full(n0, -np.inf, np.float32)
    column_best = np.zeros(n1, np.int64)
    column_best_sim = np.full(n1, -np.inf, np.float32)
    for start in range(0, n0, chunk):
        sim = descriptors0[start : start + chunk] @ descriptors1.T  # cosine similarity, (c, n1)
        rows = np.arange(len(sim))
        index = sim.argmax(axis=1)
        best[start : start + len(sim)] = index
        best_sim[start : start + len(sim)] = sim[rows, index]
        if n1 > 1:
            masked = sim.copy()
            masked[rows, index] = -np.inf
            second_sim[start : start + len(sim)] = masked.max(axis=1)
        column_index = sim.argmax(axis=0)
        column_sim = sim[column_index, np.arange(n1)]
        better = column_sim > column_best_sim
        column_best[better] = column_index[better] + start
        column_best_sim[better] = column_sim[better]

    # For unit vectors the Euclidean distance is sqrt(2 - 2 cos).
    distance1 = np.sqrt(np.maximum(2.0 - 2.0 * best_sim, 0.0))
    distance2 = np.sqrt(np.maximum(2.0 - 2.0 * second_sim, 0.0))  # inf when there is no second neighbour
    with np.errstate(divide="ignore", invalid="ignore"):
        distance_ratio = np.where(distance2 > 0, distance1 / distance2, 1.0)
    distance_ratio = np.where(np.isfinite(second_sim), distance_ratio, 0.0)
    keep = distance_ratio < ratio if ratio < 1.0 else np.ones(n0, bool)
    if mutual:
        keep &= column_best[best] == np.arange(n0)
    index0 = np.nonzero(keep)[0]
    return index0, best[index0], (1.0 - distance_ratio[index0]).astype(np.float32)


def ratio_matches(descriptors0: np.ndarray, descriptors1: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(index0, index1) of the nearest neighbours (OpenCV's brute force, L2) that pass Lowe's ratio test."""
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(descriptors0, descriptors1, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    return np.array([m.queryIdx for m in good], np.int64), np.array([m.trainIdx for m in good], np.int64)


def verify_pair(
    points0: np.ndarray,
    descriptors0: np.ndarray,
    points1: np.ndarray,
    descriptors1: np.ndarray,
    ratio: float,
    threshold: float,
    min_matches: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ratio-test matches of two images' keypoints and which of them a MAGSAC++ fundamental matrix at
    ``threshold`` px keeps: (index0, index1, inlier mask). All empty with fewer than 8 keypoints on a side or fewer
    than ``min_matches`` (at least 8) matches: too few to fit F, so unverifiable."""
    none = np.zeros(0, np.int64)
    if len(descriptors0) < 8 or len(descriptors1) < 8:
        return none, none, np.zeros(0, bool)
    index0, index1 = ratio_matches(descriptors0, descriptors1, ratio)
    if len(index0) < max(8, min_matches):
        return none, none, np.zeros(0, bool)
    _, inliers = fundamental_magsac(points0[index0], points1[index1], threshold)
    return index0, index1, inliers
