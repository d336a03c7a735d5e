"""Weight-free fallback matcher: SIFT (OpenCV or pycolmap) + RootSIFT + mutual nearest neighbour + ratio test.

It needs no network and no checkpoint, so every downstream step (pairs, dense matching, reconstruction,
localization) can run offline with it. Keypoints are returned in ORIGINAL pixel coordinates with hloc's
convention ((0, 0) is the centre of the top-left pixel):

* OpenCV's SIFT puts pixel centres at integers already. Its default pyramid upscaling shifts keypoints by
  about +0.25 px; ``enable_precise_upscale`` removes that bias, so it is always on here.
* COLMAP's SIFT puts the top-left pixel corner at (0, 0), i.e. +0.5 of hloc's convention; we subtract it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from core.errors import UserError
from core.image_io import to_uint8

from .base import Matcher, Matches, ResizedImage, resize_image

BACKENDS = ("opencv", "pycolmap")


@dataclass(frozen=True)
class SIFTOptions:
    """Options of :class:`SIFTMatcher`."""

    max_keypoints: int = 8192  # strongest keypoints kept per image
    ratio: float = 0.8  # Lowe's ratio test on descriptor distances (1.0 disables it)
    mutual: bool = True  # keep only mutual nearest neighbours
    root_sift: bool = True  # RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square root
    resize: int | None = 1600  # longest side used for detection; never upscales; None = original size
    backend: str = "opencv"  # "opencv" (cv2.SIFT_create) or "pycolmap" (COLMAP's SIFT)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown SIFT backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.max_keypoints < 1:
            raise UserError(f"SIFT max_keypoints must be >= 1, got {self.max_keypoints}")
        if not 0.0 < self.ratio <= 1.0:
            raise UserError(f"SIFT ratio must be in (0, 1], got {self.ratio}")
        if self.resize is not None and self.resize < 16:
            raise UserError(f"SIFT resize must be >= 16 px or None (original size), got {self.resize}")


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
        self._extractor: Any = None  # created lazily: a cv2.SIFT or a pycolmap extractor

    # ----------------------------------------------------------------------------------- detection
    def prepare(self, image: np.ndarray) -> SIFTFeatures:
        """Detect and describe keypoints of a grayscale float32 image (H, W) in [0, 1]."""
        if image.ndim != 2:
            raise ValueError(f"expected a grayscale image (H, W), got shape {image.shape}")
        height, width = image.shape
        max_size = self.options.resize
        if max_size is not None and max_size >= max(height, width):
            max_size = None  # never upscale
        resized = resize_image(image, max_size)
        gray8 = to_uint8(resized.image)
        if self.options.backend == "opencv":
            keypoints, descriptors, scores = self._detect_opencv(gray8)
        else:
            keypoints, descriptors, scores = self._detect_pycolmap(gray8)
        descriptors = _normalize_descriptors(descriptors, self.options.root_sift)
        return SIFTFeatures(
            keypoints=_to_original(resized, keypoints),
            descriptors=descriptors,
            scores=scores.astype(np.float32),
            image_size=(width, height),
        )

    def _detect_opencv(self, gray8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._extractor is None:
            self._extractor = cv2.SIFT_create(nfeatures=self.options.max_keypoints, enable_precise_upscale=True)
        cv_keypoints, descriptors = self._extractor.detectAndCompute(gray8, None)
        if not cv_keypoints:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros((0,), np.float32)
        keypoints = np.array([kp.pt for kp in cv_keypoints], dtype=np.float32)
        scores = np.array([kp.response for kp in cv_keypoints], dtype=np.float32)
        # OpenCV can return a few more than nfeatures (ties, several orientations); keep the strongest.
        if len(keypoints) > self.options.max_keypoints:
            keep = np.argsort(-scores, kind="stable")[: self.options.max_keypoints]
            keypoints, descriptors, scores = keypoints[keep], descriptors[keep], scores[keep]
        return keypoints, descriptors.astype(np.float32), scores

    def _detect_pycolmap(self, gray8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import pycolmap  # imported here: only this backend needs it

        if self._extractor is None:
            if not hasattr(pycolmap, "FeatureExtractor"):
                raise UserError(
                    "the pycolmap SIFT backend needs pycolmap >= 3.13 (pycolmap.FeatureExtractor); "
                    "upgrade pycolmap or use backend 'opencv'"
                )
            options = pycolmap.FeatureExtractionOptions()
            options.use_gpu = False
            options.sift.max_num_features = self.options.max_keypoints
            if not self.options.root_sift:
                options.sift.normalization = type(options.sift.normalization).L2
            self._extractor = pycolmap.FeatureExtractor.create(options, pycolmap.Device.cpu)
        colmap_keypoints, colmap_descriptors = self._extractor.extract_from_uint8_array(gray8)
        # COLMAP: (0, 0) is the top-left pixel *corner*; hloc: the top-left pixel *centre*.
        keypoints = np.array([[kp.x, kp.y] for kp in colmap_keypoints], dtype=np.float32).reshape(-1, 2) - 0.5
        descriptors = np.asarray(colmap_descriptors.data, dtype=np.float32).reshape(-1, 128)
        if self.options.root_sift:
            # COLMAP already applied L1-root normalisation (then quantised); only the L2 norm is restored.
            descriptors = descriptors**2
        return keypoints, descriptors, np.ones(len(keypoints), np.float32)

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


def _normalize_descriptors(descriptors: np.ndarray, root_sift: bool) -> np.ndarray:
    """Unit-L2 descriptors (RootSIFT: L1-normalise, square root — which has unit L2 norm)."""
    descriptors = np.asarray(descriptors, dtype=np.float32).reshape(-1, 128)
    if root_sift:
        descriptors = np.maximum(descriptors, 0.0)
        l1 = descriptors.sum(axis=1, keepdims=True)
        descriptors = np.sqrt(descriptors / np.maximum(l1, 1e-12))
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
