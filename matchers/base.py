"""The one interface every matcher implements.

A matcher takes two grayscale images (float32 (H, W) in [0, 1]) and returns corresponding keypoints
in *original* pixel coordinates with hloc's convention: (0, 0) is the centre of the top-left pixel.

Matching is split in two so that per-image work (resizing, LoFTR's backbone, SIFT detection) is done
once per image and reused for every pair that image takes part in::

    prepared0 = matcher.prepare(image0)     # cacheable, per image
    prepared1 = matcher.prepare(image1)
    result = matcher.match_prepared(prepared0, prepared1)

``matcher.match(image0, image1)`` does both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Matches:
    """Correspondences between two images, in original pixel coordinates (hloc convention).

    Detector-free matchers also report where each match was found before sub-pixel refinement:
    ``coarse0`` / ``coarse1`` are the centres of the matched coarse cells (LoFTR: the 1/8 grid), so
    matches of different pairs that share a cell of an image can be joined into tracks exactly
    (:mod:`pipeline.tracks`). Both are None for detectors (SIFT), whose keypoints are shared already.
    """

    keypoints0: np.ndarray  # (M, 2) float32, [x, y]
    keypoints1: np.ndarray  # (M, 2) float32, [x, y]
    scores: np.ndarray  # (M,) float32, higher is more confident
    coarse0: np.ndarray | None = None  # (M, 2) float32, centre of the coarse cell of each match in image 0
    coarse1: np.ndarray | None = None  # (M, 2) float32, same in image 1

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.keypoints0.shape != (n, 2) or self.keypoints1.shape != (n, 2):
            raise ValueError(
                f"inconsistent match arrays: {self.keypoints0.shape}, {self.keypoints1.shape}, {self.scores.shape}"
            )
        if (self.coarse0 is None) != (self.coarse1 is None):
            raise ValueError("coarse0 and coarse1 come together")
        if self.coarse0 is not None and (self.coarse0.shape != (n, 2) or self.coarse1.shape != (n, 2)):
            raise ValueError(f"inconsistent coarse arrays: {self.coarse0.shape}, {self.coarse1.shape}, {n} matches")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def has_coarse(self) -> bool:
        return self.coarse0 is not None

    @staticmethod
    def empty(coarse: bool = False) -> "Matches":
        points = np.zeros((0, 2), np.float32)
        return Matches(
            points, points, np.zeros((0,), np.float32), points if coarse else None, points if coarse else None
        )

    def swapped(self) -> "Matches":
        """The same correspondences seen from image 1 to image 0."""
        return Matches(self.keypoints1, self.keypoints0, self.scores, self.coarse1, self.coarse0)

    def subset(self, keep: np.ndarray) -> "Matches":
        if self.coarse0 is None:
            return Matches(self.keypoints0[keep], self.keypoints1[keep], self.scores[keep])
        return Matches(
            self.keypoints0[keep], self.keypoints1[keep], self.scores[keep], self.coarse0[keep], self.coarse1[keep]
        )

    @staticmethod
    def concatenate(parts: "list[Matches]") -> "Matches":
        """All matches of ``parts``; coarse cells are kept only when every part has them."""
        if not parts:
            return Matches.empty()
        coarse = all(p.has_coarse for p in parts)

        def stack(field: str) -> np.ndarray:
            return np.concatenate([getattr(p, field) for p in parts]).astype(np.float32)

        return Matches(
            stack("keypoints0"),
            stack("keypoints1"),
            stack("scores"),
            stack("coarse0") if coarse else None,
            stack("coarse1") if coarse else None,
        )


@dataclass(frozen=True)
class CoarseGrid:
    """The lattice the coarse cells of one image lie on, in original pixels: ``origin + step * (i, j)``."""

    step: tuple[float, float]  # (x, y) spacing of cells
    origin: tuple[float, float]  # (x, y) of cell (0, 0)

    def cells(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) int64 cell indices of the nearest lattice points of ``points`` (N, 2)."""
        return np.rint((np.asarray(points, np.float64) - self.origin) / self.step).astype(np.int64)

    def centres(self, cells: np.ndarray) -> np.ndarray:
        """(N, 2) float32 positions of ``cells`` (N, 2)."""
        return (np.asarray(cells, np.float64) * self.step + self.origin).astype(np.float32)

    @staticmethod
    def of_resized(size: tuple[int, int], max_size: int | None, stride: int) -> "CoarseGrid":
        """The grid of ``stride`` px cells of an image of ``size`` (W, H) resized as :func:`resize_image` does
        (longer side ``max_size``, sides multiples of ``stride``), in the original image's pixels."""
        width, height = size
        new_w, new_h = resized_size(size, max_size, stride) if max_size else (width, height)
        sx, sy = width / new_w, height / new_h
        return CoarseGrid((stride * sx, stride * sy), (0.5 * sx - 0.5, 0.5 * sy - 0.5))


@dataclass(frozen=True)
class ResizedImage:
    """An image resized for a matcher, with the factors that map its pixels back to the original."""

    image: np.ndarray  # float32 (h, w) in [0, 1]
    original_size: tuple[int, int]  # (W, H)
    scale: tuple[float, float]  # (sx, sy): original = (resized + 0.5) * scale - 0.5

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) pixel coordinates of the resized image back to the original (pixel centres kept)."""
        scale = np.asarray(self.scale, dtype=np.float32)
        return ((points + 0.5) * scale - 0.5).astype(np.float32)


def resized_size(size: tuple[int, int], max_size: int | None, multiple: int = 1) -> tuple[int, int]:
    """(W, H) after :func:`resize_image`: longer side ``max_size`` (None: unchanged), sides multiples of ``multiple``."""
    width, height = size
    factor = 1.0 if max_size is None else max_size / max(height, width)
    return (
        max(multiple, int(round(width * factor / multiple)) * multiple),
        max(multiple, int(round(height * factor / multiple)) * multiple),
    )


def resize_image(image: np.ndarray, max_size: int | None, multiple: int = 1) -> ResizedImage:
    """Resize so the longer side is ``max_size`` (never upscaled when None) and sides divide by ``multiple``.

    Aspect ratio is preserved up to rounding to ``multiple``; the exact per-axis factors are kept so
    keypoints map back to original coordinates without bias.
    """
    height, width = image.shape[:2]
    new_w, new_h = resized_size((width, height), max_size, multiple)
    if (new_w, new_h) == (width, height):
        resized = image
    else:
        interpolation = cv2.INTER_AREA if new_w < width else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return ResizedImage(
        image=np.ascontiguousarray(resized, dtype=np.float32),
        original_size=(width, height),
        scale=(width / new_w, height / new_h),
    )


class Matcher(ABC):
    """Base class: subclasses implement :meth:`prepare` and :meth:`match_prepared`."""

    #: short name used in outputs and summaries, e.g. "loftr" or "sift"
    name: str = "matcher"
    #: whether :meth:`match_prepared_batch` is cheaper than pair-by-pair calls (callers batch only then, so a
    #: crash never loses more than the pair in progress otherwise)
    batches_pairs: bool = False

    @abstractmethod
    def prepare(self, image: np.ndarray) -> Any:
        """Per-image work that can be cached and reused across pairs (resize, features...)."""

    @abstractmethod
    def match_prepared(self, prepared0: Any, prepared1: Any) -> Matches:
        """Match two prepared images; keypoints are in each image's original pixel coordinates."""

    def match(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        """Match two grayscale float32 images (H, W) in [0, 1]."""
        return self.match_prepared(self.prepare(image0), self.prepare(image1))

    def match_prepared_batch(self, pairs: Sequence[tuple[Any, Any]]) -> list[Matches]:
        """Match several prepared pairs, same results as :meth:`match_prepared` on each (in order).

        The default matches them one by one; matchers that gain from batching (LoFTR) override it.
        """
        return [self.match_prepared(prepared0, prepared1) for prepared0, prepared1 in pairs]

    def coarse_grid(self, size: tuple[int, int]) -> CoarseGrid | None:
        """The lattice of the ``coarse0`` / ``coarse1`` cells this matcher reports for an image of ``size``
        (W, H); None for matchers without coarse cells (detectors)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What was used, for summaries (matcher name, weights, options)."""
        return {"matcher": self.name}


def rotate_points_back(points: np.ndarray, k: int, rotated_size: tuple[int, int]) -> np.ndarray:
    """Map pixel coordinates in ``np.rot90(image, k)`` back to the unrotated image.

    ``rotated_size`` is (W, H) of the rotated image; hloc convention (pixel centres at integers).
    """
    k = k % 4
    width, height = rotated_size
    x, y = points[:, 0], points[:, 1]
    if k == 0:
        out = np.stack([x, y], axis=1)
    elif k == 1:  # rot90 counter-clockwise: rotated (x, y) <- original (W0-1-y, x) with W0 = height
        out = np.stack([height - 1 - y, x], axis=1)
    elif k == 2:
        out = np.stack([width - 1 - x, height - 1 - y], axis=1)
    else:
        out = np.stack([y, width - 1 - x], axis=1)
    return out.astype(np.float32)
