"""Sub-pixel refinement of raw matches with Lucas-Kanade (OpenCV's KLT tracker).

LoFTR places its image-0 points on the coarse grid and refines only the image-1 points, by the expectation
of a 5x5 heatmap at half resolution. On temple_ring that leaves a median epipolar error of 0.33 px for
adjacent views where SIFT has 0.10 px, and the structure-from-motion rotation error follows (2.1 vs 0.9 deg).
A translation-only Lucas-Kanade step on the original pixels, started at LoFTR's estimate, brings the
adjacent-view error to 0.05-0.13 px for the points it accepts (scratch measurement on templeR0001-0003,
0011-0012, 0021-0023, 0036-0038). Image-0 points never move, so the keypoints shared by all pairs of an
image stay the same and tracks still form.

A refinement is accepted only when it is trustworthy, otherwise the matcher's point is kept:

* both directions of the tracker converge (OpenCV status 1);
* tracking the refined point back lands within ``max_round_trip`` px of the image-0 point (forward-
  backward check: it fails where the patch deforms too much for a pure translation, e.g. wide baselines);
* the point moved at most ``max_shift`` px (otherwise the window slid onto another structure).

Coordinates follow hloc and OpenCV alike: (0, 0) is the centre of the top-left pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np

from core.cache import LRUCache
from core.image_io import to_uint8
from matchers.base import Matches, rotate_points_back
from pipeline.quantize import ImageKeypoints, QuantizedMatches

REFINE_MODES = ("none", "klt")
#: refinements of a dense matching step: per pair (klt) or exact tracks refined across views (pipeline.tracks)
MatchRefineMode = Literal["none", "klt", "tracks"]
MATCH_REFINE_MODES: tuple[str, ...] = get_args(MatchRefineMode)
#: quantization cell (px) for KLT-refined dense matches (radii differ per use: see
#: pipeline.match_dense.dense_defaults); hloc's 8 px cell would merge refined points with others several pixels away
KLT_CELL_SIZE = 4


def default_refine(matcher: str, fixed_reference: bool = False) -> str:
    """``none`` for SIFT, whose keypoints are detections already; for detector-free (dense) matchers ``tracks``
    (exact tracks on coarse cells, :mod:`pipeline.tracks`), or ``klt`` when some images keep fixed reference
    keypoints (localization: query points must snap to the database's keypoints, so tracks cannot be rebuilt)."""
    if matcher == "sift":
        return "none"
    return "klt" if fixed_reference else "tracks"


@dataclass(frozen=True)
class RefineConfig:
    """How image-1 points are refined (``mode="none"``: not at all). Distances in original-image pixels."""

    mode: str = "klt"
    window: int = 15  # edge of the tracked patch (odd)
    max_shift: float = 2.0  # a point moving further keeps the matcher's position
    max_round_trip: float = 0.2  # forward-backward disagreement allowed
    iterations: int = 30

    def __post_init__(self) -> None:
        if self.mode not in REFINE_MODES:
            raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {self.mode!r}")
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"refine window must be an odd number >= 3, got {self.window}")
        if self.max_shift <= 0 or self.max_round_trip <= 0 or self.iterations < 1:
            raise ValueError("refine max_shift, max_round_trip and iterations must be positive")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def _common_size(image0: np.ndarray, image1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad both images on the bottom and right to one size (OpenCV's tracker needs equal sizes;
    padding there leaves pixel coordinates unchanged)."""
    height = max(image0.shape[0], image1.shape[0])
    width = max(image0.shape[1], image1.shape[1])

    def pad(image: np.ndarray) -> np.ndarray:
        if image.shape == (height, width):
            return image
        return cv2.copyMakeBorder(image, 0, height - image.shape[0], 0, width - image.shape[1], cv2.BORDER_CONSTANT, 0)

    return pad(image0), pad(image1)


def _track(
    source: np.ndarray, target: np.ndarray, points: np.ndarray, start: np.ndarray, config: RefineConfig
) -> tuple[np.ndarray, np.ndarray]:
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, config.iterations, 0.01)
    tracked, status, _ = cv2.calcOpticalFlowPyrLK(
        source,
        target,
        points,
        start.copy(),
        winSize=(config.window, config.window),
        maxLevel=0,
        criteria=criteria,
        flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
    )
    return tracked, status.reshape(-1) == 1


def refine_matches(
    image0: np.ndarray, image1: np.ndarray, matches: Matches, config: RefineConfig | None = None, turn: int = 0
) -> tuple[Matches, np.ndarray]:
    """Refine ``matches.keypoints1`` by tracking each image-0 point into image 1 from its current match.

    ``turn``: image 1 is tracked as ``np.rot90(image1, turn)`` (the quarter turn it was matched at, so
    that the two patches are upright alike); points stay in the unturned image's coordinates.
    Returns the refined matches (same order, scores and image-0 points) and a boolean mask of the points
    whose refinement was accepted; rejected points keep the matcher's position.
    """
    config = config if config is not None else RefineConfig()
    accepted = np.zeros(len(matches), bool)
    if not config.enabled or len(matches) == 0:
        return matches, accepted
    turn %= 4
    gray0, gray1 = to_uint8(image0), to_uint8(image1)
    original_size = (gray1.shape[1], gray1.shape[0])
    keypoints1 = matches.keypoints1
    if turn:
        # Mapping into np.rot90(x, turn) is mapping back from an image turned by -turn.
        gray1 = np.ascontiguousarray(np.rot90(gray1, turn))
        keypoints1 = rotate_points_back(keypoints1, -turn, original_size)
    turned_size = (gray1.shape[1], gray1.shape[0])
    gray0, gray1 = _common_size(gray0, gray1)
    points0 = np.ascontiguousarray(matches.keypoints0, np.float32).reshape(-1, 1, 2)
    points1 = np.ascontiguousarray(keypoints1, np.float32).reshape(-1, 1, 2)
    forward, ok_forward = _track(gray0, gray1, points0, points1, config)
    back, ok_back = _track(gray1, gray0, forward, points0, config)
    forward, back = forward.reshape(-1, 2), back.reshape(-1, 2)
    accepted = (
        ok_forward
        & ok_back
        & np.all(np.isfinite(forward), axis=1)
        & (np.linalg.norm(back - matches.keypoints0, axis=1) <= config.max_round_trip)
        & (np.linalg.norm(forward - keypoints1, axis=1) <= config.max_shift)
    )
    if turn:
        forward = rotate_points_back(forward, turn, turned_size)
    refined = np.where(accepted[:, None], forward, matches.keypoints1).astype(np.float32)
    return Matches(matches.keypoints0, refined, matches.scores), accepted


# ------------------------------------------------------------------------------------ along tracks
class DecodedImages:
    """8-bit grayscale images by index, decoded by ``load(names[index])`` on first use and kept up to
    ``cache_bytes`` (least recently used out first, the two of a pair always kept): refining tracks visits most
    image pairs, so the bound is memory, not a count of images."""

    def __init__(self, load: Callable[[str], np.ndarray], names: Sequence[str], cache_bytes: int) -> None:
        self._load, self._names = load, names
        self._images: LRUCache[np.ndarray] = LRUCache(max_bytes=cache_bytes, keep_at_least=2)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._images.get_or_create(index, lambda: to_uint8(self._load(self._names[index])))


@dataclass(frozen=True)
class TrackRefineStats:
    """What :func:`refine_tracks` did: keypoints that were candidates (in a track, not its reference) and moved."""

    tracks: int
    candidates: int
    moved: int


@dataclass(frozen=True)
class _TrackForest:
    """Every keypoint of every image as one node (images in ``names`` order), each track as a tree grown
    breadth-first from its reference keypoint: ``parent`` and ``depth`` per node (depth 1: a reference)."""

    names: list[str]
    offsets: np.ndarray  # first node of each image, and the total at the end
    image_of: np.ndarray  # node -> image index
    is_fixed: np.ndarray  # node of a fixed image
    references: np.ndarray  # one node per track (of two or more keypoints)
    parent: np.ndarray
    depth: np.ndarray
    visit: np.ndarray  # breadth-first order, the virtual root first


def _match_edges(quantized: QuantizedMatches, position_of: Mapping[str, int], offsets: np.ndarray) -> np.ndarray:
    """(E, 2) node pairs of every match."""
    ends = [np.zeros((0, 2), np.int64)]
    for (name0, name1), pair in quantized.matches.items():
        index = pair.index_pairs()
        ends.append(np.stack([index[:, 0] + offsets[position_of[name0]], index[:, 1] + offsets[position_of[name1]]], 1))
    return np.concatenate(ends)


def _track_forest(quantized: QuantizedMatches, fixed: Collection[str]) -> _TrackForest | None:
    """The tracks as trees from their references (None without keypoints or matches)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components

    names = sorted(quantized.keypoints)
    position_of = {name: i for i, name in enumerate(names)}
    offsets = np.cumsum([0] + [len(quantized.keypoints[name]) for name in names])
    total = int(offsets[-1])
    image_of = np.repeat(np.arange(len(names)), np.diff(offsets))
    edges = _match_edges(quantized, position_of, offsets)
    if total == 0 or len(edges) == 0:
        return None
    # One breadth-first search from a virtual root joined to each track's reference keypoint.
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(total, total)).tocsr()
    count, label = connected_components(graph, directed=False)
    scores = np.concatenate([quantized.keypoints[name].scores for name in names]).astype(np.float64)
    in_track = np.bincount(label, minlength=count)[label] > 1
    is_fixed = np.isin(image_of, [position_of[name] for name in fixed if name in position_of])
    order = np.lexsort((-scores, ~is_fixed, label))  # per component: a fixed keypoint, else the strongest
    first = order[np.r_[True, label[order][1:] != label[order][:-1]]]
    references = first[in_track[first]]
    root = total
    rows = np.concatenate([edges[:, 0], edges[:, 1], np.full(len(references), root)])
    cols = np.concatenate([edges[:, 1], edges[:, 0], references])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(total + 1, total + 1)).tocsr()
    visit, parent = breadth_first_order(graph, root, directed=True, return_predecessors=True)
    depth = np.zeros(total + 1, np.int64)
    for node in visit[1:]:
        depth[node] = depth[parent[node]] + 1
    return _TrackForest(names, offsets, image_of, is_fixed, references, parent, depth, visit)


def refine_tracks(
    quantized: QuantizedMatches,
    load: Callable[[str], np.ndarray],
    config: RefineConfig | None = None,
    turns: Mapping[tuple[str, str], int] | None = None,
    fixed: Collection[str] = (),
    cache_bytes: int = 2 << 30,
) -> tuple[QuantizedMatches, TrackRefineStats]:
    """Move shared keypoints so that every track's observations show the same scene point.

    Quantization merges raw points of different pairs that fall within ``max_error`` of each other, and a
    keypoint of image B matched to A's keypoint in one pair and to C's in another is in general the image
    of neither exactly. Here each track (connected component of matched keypoints) keeps its strongest
    keypoint (highest summed confidence) as reference, and every other keypoint is tracked by Lucas-Kanade
    from its breadth-first parent — a keypoint it is directly matched to, refined before it — into its own
    image, starting where it is. Refinements failing :func:`refine_matches`' checks leave the keypoint where
    it was. Matches are unchanged.

    Keypoints of ``fixed`` images never move and are preferred as references (localization: a query keypoint
    is aligned to the database keypoint it is matched to). ``load(name)`` returns an image (decoded images
    are kept up to ``cache_bytes``); ``turns[(a, b)]`` is the quarter turn b was matched at against a.
    """
    config = config if config is not None else RefineConfig()
    turns = {} if turns is None else turns
    forest = _track_forest(quantized, fixed) if config.enabled else None
    if forest is None:
        return quantized, TrackRefineStats(0, 0, 0)
    names, image_of, parent, depth = forest.names, forest.image_of, forest.parent, forest.depth
    positions = np.concatenate([quantized.keypoints[name].keypoints for name in names]).astype(np.float32)
    candidates = forest.visit[1:][depth[forest.visit[1:]] >= 2]
    candidates = candidates[~forest.is_fixed[candidates]]
    moved = 0
    image = DecodedImages(load, names, cache_bytes)
    for level in range(2, int(depth[candidates].max(initial=1)) + 1):
        nodes = candidates[depth[candidates] == level]
        if len(nodes) == 0:  # e.g. only keypoints of fixed images at this depth
            continue
        nodes = nodes[np.lexsort((image_of[nodes], image_of[parent[nodes]]))]  # by (parent image, child image)
        key = image_of[parent[nodes]] * len(names) + image_of[nodes]
        for chunk in np.split(nodes, np.nonzero(np.diff(key))[0] + 1):
            source, target = int(image_of[parent[chunk[0]]]), int(image_of[chunk[0]])
            pair = (names[source], names[target])
            turn = turns.get(pair, -turns.get(pair[::-1], 0))
            guide = Matches(positions[parent[chunk]], positions[chunk], np.ones(len(chunk), np.float32))
            refined, accepted = refine_matches(image[source], image[target], guide, config, turn)
            positions[chunk[accepted]] = refined.keypoints1[accepted]
            moved += int(accepted.sum())
    offsets = forest.offsets
    keypoints = {
        name: ImageKeypoints(positions[offsets[i] : offsets[i + 1]].copy(), quantized.keypoints[name].scores)
        for i, name in enumerate(names)
    }
    stats = TrackRefineStats(int(len(forest.references)), int(len(candidates)), moved)
    return QuantizedMatches(keypoints, quantized.matches), stats


__all__ = [
    "REFINE_MODES",
    "MATCH_REFINE_MODES",
    "KLT_CELL_SIZE",
    "default_refine",
    "RefineConfig",
    "refine_matches",
    "TrackRefineStats",
    "refine_tracks",
    "DecodedImages",
]
