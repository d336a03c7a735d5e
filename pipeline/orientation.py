"""Relative in-plane rotation of image pairs, in quarter turns, from rotation-invariant SIFT.

LoFTR is not rotation invariant: a view held upside down relative to its neighbours gets ~50 confident
wrong matches instead of ~1,000 right ones (temple_ring: views 0032-0047 are rolled ~164 deg relative to
0001-0031, and an exhaustive upright run splits them into two models). Matching every pair at four
rotations (``--rotation best``) fixes that at four times the cost. ``--rotation auto`` instead asks SIFT,
whose keypoints carry an orientation: for each pair, RootSIFT matches (ratio test) verified by a MAGSAC++
fundamental matrix vote with their orientation differences for a quarter turn. That costs one SIFT pass
per image and a cheap descriptor match per pair, and on upright collections every pair stays at 0.

A pair's vote counts only on clear evidence: at least ``min_inliers`` verified SIFT matches of which at
least ``min_agreement`` vote for the same quarter turn. The votes are then made globally consistent: a
maximum spanning tree of the pair graph (weighted by verified matches) gives every image a turn relative
to its connected component's first image, and each pair is matched with the difference of its images'
turns. So a pair SIFT cannot verify directly is still turned when its images are linked through others;
pairs across components are matched upright.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core import io
from core.cache import LRUCache
from core.image_io import read_gray
from matchers.sift import SIFTExtractor, SIFTKeypoints, rootsift, verify_pair

Pair = tuple[str, str]


@dataclass(frozen=True)
class OrientationConfig:
    """SIFT settings and the evidence a pair needs before it is matched turned."""

    max_size: int = 640  # longest image side for SIFT (px)
    num_features: int = 2000  # strongest SIFT keypoints per image
    ratio: float = 0.8  # Lowe's ratio test on RootSIFT
    threshold: float = 2.0  # MAGSAC++ fundamental-matrix threshold (px at max_size)
    min_inliers: int = 20
    min_agreement: float = 0.6  # fraction of inliers voting for the winning quarter turn


def oriented_sift(image: np.ndarray, config: OrientationConfig) -> SIFTKeypoints:
    """SIFT keypoints (px of the image resized to ``config.max_size``) with their orientations and RootSIFT
    descriptors, of a float gray image."""
    # OpenCV's SIFT as the votes were tuned with (no precise upscaling, its own keypoint count)
    extractor = SIFTExtractor("opencv", config.num_features, precise_upscale=False, strongest_only=False)
    found, _ = extractor.detect_resized(image, config.max_size)
    return replace(found, descriptors=rootsift(found.descriptors))


def quarter_turns(features0: SIFTKeypoints, features1: SIFTKeypoints, config: OrientationConfig) -> tuple[int, int]:
    """(k, support): ``np.rot90(image1, k)`` is upright relative to image 0, voted by ``support`` verified
    matches; (0, 0) without clear evidence."""
    index0, index1, inliers = verify_pair(
        features0.points,
        features0.descriptors,
        features1.points,
        features1.descriptors,
        config.ratio,
        config.threshold,
        min_matches=config.min_inliers,
    )
    if int(inliers.sum()) < config.min_inliers:
        return 0, 0
    # np.rot90(., k) turns an image by k quarter turns, which takes 90 k degrees from its SIFT orientations
    # (checked in tests/test_orientation.py by turning an image and estimating the turn back).
    difference = (features1.angles[index1[inliers]] - features0.angles[index0[inliers]]) % 360.0
    votes = np.bincount(np.rint(difference / 90.0).astype(int) % 4, minlength=4)
    best = int(np.argmax(votes))
    if votes[best] < config.min_agreement * inliers.sum():
        return 0, 0
    return best, int(votes[best])


def consistent_turns(votes: dict[Pair, tuple[int, int]], pairs: Sequence[Pair]) -> dict[Pair, int]:
    """Per-pair turns from per-image turns on a maximum spanning tree of the votes (see the module docstring).

    ``votes[(a, b)] = (k, support)`` means ``np.rot90(b, k)`` is upright relative to ``a``; with image turns
    ``u`` (``np.rot90(image, u)`` is upright in its component) that is ``u[b] = u[a] + k``.
    """
    edges = sorted(
        ((support, a, b, k) for (a, b), (k, support) in votes.items() if support > 0),
        key=lambda edge: (-edge[0], edge[1], edge[2]),
    )
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    tree: dict[str, list[tuple[str, int]]] = {}
    for _, a, b, k in edges:  # Kruskal: strongest votes first
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[rb] = ra
            tree.setdefault(a, []).append((b, k))
            tree.setdefault(b, []).append((a, -k))
    turn: dict[str, int] = {}
    for start in sorted(tree):
        if start in turn:
            continue
        turn[start] = 0
        stack = [start]
        while stack:
            a = stack.pop()
            for b, k in tree[a]:
                if b not in turn:
                    turn[b] = (turn[a] + k) % 4
                    stack.append(b)
    linked = {name: root(name) for name in turn}
    return {
        (a, b): (turn[b] - turn[a]) % 4 if a in turn and b in turn and linked[a] == linked[b] else 0 for a, b in pairs
    }


def estimate_quarter_turns(
    image_dir: Path,
    pairs: Sequence[Pair],
    config: OrientationConfig | None = None,
    cache_size: int = 256,
    read: Callable[[Path], np.ndarray] = read_gray,
) -> dict[Pair, int]:
    """Quarter turns of image 1 relative to image 0 for every pair: :func:`quarter_turns` votes made
    consistent by :func:`consistent_turns`."""
    config = config if config is not None else OrientationConfig()
    cache: LRUCache[SIFTKeypoints] = LRUCache(max_items=cache_size)

    def features(name: str) -> SIFTKeypoints:
        return cache.get_or_create(name, lambda: oriented_sift(read(io.resolve_image(Path(image_dir), name)), config))

    votes = {}
    for first, second in tqdm(pairs, desc="orientation (SIFT)", unit="pair", disable=len(pairs) < 50):
        votes[(first, second)] = quarter_turns(features(first), features(second), config)
    return consistent_turns(votes, pairs)


__all__ = [
    "OrientationConfig",
    "oriented_sift",
    "quarter_turns",
    "consistent_turns",
    "estimate_quarter_turns",
]
