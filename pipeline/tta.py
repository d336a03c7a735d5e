"""Test-time augmentation for matching: rotate the second image, match at several sizes, both directions.

LoFTR (like most learned matchers) is not rotation invariant and its matches depend on image size and
order. The Image Matching Challenge winners wired three tricks by hand; here they are options:

* ``rotation``: image 1 is also matched rotated by 90, 180 and 270 degrees (``np.rot90``), and its
  keypoints are mapped back to the unrotated image. ``best`` keeps the rotation with the most
  geometrically verified matches (fundamental matrix, OpenCV's MAGSAC++), ``union`` keeps all.
  ``auto`` matches once, with image 1 turned by the quarter turn that rotation-invariant SIFT finds
  for the pair (:mod:`pipeline.orientation`; the caller passes it as ``turn``).
* ``resize``: the pair is matched at several sizes (longest side) and the matches are merged.
* ``both_directions``: (0, 1) and (1, 0) matches are merged.

Every image is *prepared* once per view (size x rotation) — for LoFTR that is the backbone pass — and
the prepared views are reused for every pair of the image; merged duplicates are resolved later by the
quantization's one-to-one step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from core.errors import UserError
from core.geometry import fundamental_magsac
from matchers.base import Matcher, Matches, ResizedImage, resize_image, rotate_points_back

RotationMode = Literal["none", "auto", "best", "union"]
ROTATION_MODES: tuple[str, ...] = get_args(RotationMode)


def split_resize(sizes: Sequence[int] | None) -> tuple[int | None, tuple[int | None, ...]]:
    """``(the matcher's own resize, the view sizes)`` for the longest side(s) a user asked for.

    One size (or none): the matcher resizes, its own way (e.g. LoFTR's multiple of 8), and every view is
    the image as given. Several sizes: each view is resized here and the matcher takes it as given (0).
    A size 0 means the original size; None (no sizes) the matcher's default.
    """
    sizes = tuple(sizes) if sizes else (None,)
    if any(size is not None and size < 0 for size in sizes):
        raise UserError(f"--resize sizes must be >= 0 (0 = original size), got {list(sizes)}")
    if len(sizes) == 1:
        return sizes[0], (None,)
    return 0, tuple(size or None for size in sizes)


@dataclass(frozen=True)
class TTAConfig:
    """Which augmented versions of a pair are matched and how they are combined."""

    rotation: RotationMode = (
        "none"  # none | auto (SIFT's quarter turn) | best | union (image 1 at 0/90/180/270 degrees)
    )
    resize: tuple[int | None, ...] = (None,)  # longest side per pass; None = the matcher's own resize
    both_directions: bool = False  # also match (1, 0) and merge
    verify_threshold: float = 1.0  # px, MAGSAC++ threshold when choosing the best rotation

    def __post_init__(self) -> None:
        if self.rotation not in ROTATION_MODES:
            raise ValueError(f"rotation must be one of {ROTATION_MODES}, got {self.rotation!r}")
        if not self.resize:
            raise ValueError("resize needs at least one size (None = the matcher's own resize)")
        for size in self.resize:
            if size is not None and size < 8:
                raise ValueError(f"resize sizes must be >= 8 px or None, got {size}")
        if len(set(self.resize)) != len(self.resize):
            raise ValueError(f"resize sizes must be distinct, got {self.resize}")

    @property
    def single_pass(self) -> bool:
        """One match per pair (no rotations, one size, one direction): pairs can be batched."""
        return self.rotation in ("none", "auto") and len(self.resize) == 1 and not self.both_directions

    @property
    def rotations(self) -> tuple[int, ...]:
        """Quarter turns (``np.rot90``'s k) image 1 may be matched at."""
        return (0,) if self.rotation == "none" else (0, 1, 2, 3)

    def turns(self, turn: int = 0) -> tuple[int, ...]:
        """Quarter turns image 1 of one pair is matched at: ``auto`` only the pair's ``turn``, otherwise
        :attr:`rotations`."""
        return (turn % 4,) if self.rotation == "auto" else self.rotations


@dataclass(frozen=True)
class View:
    """One augmented version of an image: resized to ``size`` (None = as given), then rotated k x 90."""

    size: int | None
    rotation: int = 0


def first_views(config: TTAConfig) -> tuple[View, ...]:
    """Views needed of an image matched in first position."""
    return tuple(View(size, 0) for size in config.resize)


def second_views(config: TTAConfig, turn: int = 0) -> tuple[View, ...]:
    """Views needed of an image matched in second position (the rotated one); ``turn``: the pair's
    quarter turn for ``rotation="auto"``."""
    return tuple(View(size, k) for size in config.resize for k in config.turns(turn))


@dataclass(frozen=True)
class PreparedView:
    """A matcher-prepared view of an image and what maps its points back to the original image."""

    view: View
    prepared: Any
    resized: ResizedImage | None  # None when the image was given to the matcher at its own size
    matcher_size: tuple[int, int]  # (W, H) of the (resized, rotated) image given to the matcher

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) points of the view back to the original image (hloc pixel convention)."""
        points = rotate_points_back(
            np.asarray(points, np.float32).reshape(-1, 2), self.view.rotation, self.matcher_size
        )
        return self.resized.to_original(points) if self.resized is not None else points


def prepare_view(matcher: Matcher, image: np.ndarray, view: View) -> PreparedView:
    """Resize and rotate ``image`` as ``view`` says, then let the matcher prepare it."""
    resized = None if view.size is None else resize_image(image, view.size)
    pixels = image if resized is None else resized.image
    if view.rotation % 4:
        pixels = np.ascontiguousarray(np.rot90(pixels, view.rotation % 4))
    height, width = pixels.shape[:2]
    return PreparedView(view, matcher.prepare(pixels), resized, (width, height))


def match_views(matcher: Matcher, first: PreparedView, second: PreparedView) -> Matches:
    """Match two prepared views; keypoints in each image's original coordinates."""
    return _to_original(matcher.match_prepared(first.prepared, second.prepared), first, second)


def match_views_batch(matcher: Matcher, pairs: Sequence[tuple[PreparedView, PreparedView]]) -> list[Matches]:
    """:func:`match_views` for several pairs in one matcher call (LoFTR batches equal-size pairs)."""
    results = matcher.match_prepared_batch([(first.prepared, second.prepared) for first, second in pairs])
    return [_to_original(result, first, second) for result, (first, second) in zip(results, pairs)]


def _to_original(result: Matches, first: PreparedView, second: PreparedView) -> Matches:
    if len(result) == 0:
        return Matches.empty(result.has_coarse)
    return Matches(
        first.to_original(result.keypoints0),
        second.to_original(result.keypoints1),
        np.asarray(result.scores, np.float32),
        first.to_original(result.coarse0) if result.has_coarse else None,
        second.to_original(result.coarse1) if result.has_coarse else None,
    )


def count_verified(matches: Matches, threshold: float = 1.0) -> int:
    """Matches consistent with one fundamental matrix (MAGSAC++); 0 with fewer than 8 matches."""
    return int(fundamental_magsac(matches.keypoints0, matches.keypoints1, threshold)[1].sum())


@dataclass(frozen=True)
class PairResult:
    """The merged matches of one pair and the quarter turn image 1 was matched at (``best`` / ``auto``)."""

    matches: Matches
    rotation: int | None  # k chosen by 'best' or given to 'auto'; None for 'none' and 'union'
    verified: dict[int, int]  # k -> verified matches (only computed for 'best')


def match_pair(
    matcher: Matcher,
    views0: Mapping[View, PreparedView],
    views1: Mapping[View, PreparedView],
    config: TTAConfig,
    turn: int = 0,
) -> PairResult:
    """Match image 0 (``first_views``) against image 1 (``second_views``) and merge per ``config``;
    ``turn``: the pair's quarter turn for ``rotation="auto"``."""
    per_rotation: dict[int, Matches] = {}
    for k in config.turns(turn):
        parts: list[Matches] = []
        for size in config.resize:
            first, second = views0[View(size, 0)], views1[View(size, k)]
            parts.append(match_views(matcher, first, second))
            if config.both_directions:
                parts.append(match_views(matcher, second, first).swapped())
        per_rotation[k] = Matches.concatenate(parts)

    if config.rotation == "none":
        return PairResult(per_rotation[0], None, {})
    if config.rotation == "auto":
        return PairResult(per_rotation[turn % 4], turn % 4, {})
    if config.rotation == "union":
        return PairResult(Matches.concatenate([per_rotation[k] for k in config.rotations]), None, {})
    verified = {k: count_verified(m, config.verify_threshold) for k, m in per_rotation.items()}
    best = max(config.rotations, key=lambda k: (verified[k], -k))  # ties: the smaller turn (0 first)
    return PairResult(per_rotation[best], best, verified)


__all__ = [
    "ROTATION_MODES",
    "TTAConfig",
    "View",
    "PreparedView",
    "first_views",
    "second_views",
    "prepare_view",
    "match_views",
    "match_views_batch",
    "count_verified",
    "PairResult",
    "match_pair",
]
