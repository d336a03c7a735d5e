"""Aggregate raw dense matches into shared per-image keypoints (hloc's dense quantization), pure numpy.

A detector-free matcher such as LoFTR returns, for every pair, its own points in both images; the same
scene point seen in pairs (A, B) and (A, C) gets two slightly different points in A. COLMAP needs one
keypoint per image location so that tracks form, so the raw points are quantized per image:

1. **Binning.** Every raw point of an image (from every pair it takes part in, with the pair's match
   confidence) falls in a *sub-bin* of ``int(max_error)`` px and a *cell* of ``max(cell_size,
   max_error)`` px, both on grids anchored at the image's top-left pixel corner (hloc's convention).
   Confidences are summed per sub-bin.
2. **One keypoint per cell.** Each cell's keypoint is its sub-bin with the highest summed confidence,
   and that sum is the keypoint's score. The keypoint sits at the confidence-weighted mean of the raw
   points in that sub-bin (``position="mean"``, the default) or at the sub-bin's grid node (hloc,
   ``position="bin"``). The mean removes the node's rounding of up to ``max_error/2`` px per axis: on
   temple_ring SIFT matches (cell 8, max_error 2) the median epipolar error against the ground-truth
   cameras is 0.145 px with "mean" and 0.624 px with "bin", for the same number of matches.
3. **Top-k.** The ``max_kps`` best-scoring keypoints are kept (all when None).
4. **Re-assignment.** Every raw match is re-assigned to the nearest keypoint of each image within
   ``max_error`` px; matches without a keypoint on either side are dropped.
5. **One-to-one.** Several raw matches can now link the same keypoints; they are resolved greedily by
   descending confidence, so every kept match is the best remaining one on *both* sides (hloc intends
   mutual-best, but its implementation checks one side twice; greedy keeps every mutual-best match and
   then the best of the rest).

Fixed-reference mode: images given in ``reference`` keep their keypoints; their raw points snap to the
nearest reference keypoint within ``max_error`` px (localization: the database keypoints are those of
the reference model, only the queries get new keypoints).

Differences from hloc, on purpose: a sub-bin belongs to the cell containing its node (hloc files it
under the cell of each raw point, so one sub-bin straddling a cell border can yield two identical
keypoints); matches are always re-assigned within ``max_error`` (hloc skips it when ``max_kps`` is
None, leaving matches up to a cell away from their keypoint); rounding is half-up, not half-even.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy.spatial import cKDTree

from matchers.base import Matches

KeypointPosition = Literal["bin", "mean"]
POSITIONS: tuple[str, ...] = get_args(KeypointPosition)


@dataclass(frozen=True)
class QuantizeConfig:
    """How raw matches become shared keypoints (see the module docstring)."""

    cell_size: int = 8  # quantization cell (px); at most one keypoint per cell; 0 = no cells
    max_error: float = 2.0  # sub-bin size (int part) and re-assignment radius (px)
    max_kps: int | None = 8192  # keypoints kept per image (best summed confidence); None = all
    position: KeypointPosition = "mean"  # "mean": confidence-weighted mean of the best sub-bin; "bin": its node (hloc)

    def __post_init__(self) -> None:
        if self.cell_size < 0 or self.max_error < 0:
            raise ValueError(f"cell_size and max_error must be >= 0, got {self.cell_size}, {self.max_error}")
        if self.max_kps is not None and self.max_kps < 1:
            raise ValueError(f"max_kps must be >= 1 or None, got {self.max_kps}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")

    @property
    def cell(self) -> float:
        """Edge of a quantization cell (px): a cell is never smaller than the re-assignment radius."""
        return float(max(self.cell_size, self.max_error))

    @property
    def sub_bin(self) -> int:
        """Edge of a sub-bin (px); 0 means raw points are not rounded (every distinct point is a bin)."""
        return int(self.max_error)


@dataclass(frozen=True)
class ImageKeypoints:
    """Keypoints of one image: (N, 2) float32 [x, y] (hloc convention) and (N,) float32 scores."""

    keypoints: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.keypoints)

    @staticmethod
    def empty() -> "ImageKeypoints":
        return ImageKeypoints(np.zeros((0, 2), np.float32), np.zeros((0,), np.float32))


@dataclass(frozen=True)
class PairMatches:
    """One pair's one-to-one matches, held sparse: (M, 2) keypoint indices and (M,) scores.

    hloc's files pad ``matches0`` / ``matching_scores0`` to the N0 keypoints of image 0; held that way in memory a
    pair costs 8 bytes per keypoint (64 KB at 8,192 keypoints, 8.6 GB for Aachen's ~134,000 retrieval pairs), held
    sparse 12 bytes per match. :attr:`matches0` and :attr:`scores0` give the padded arrays when written.
    """

    indices: np.ndarray  # (M, 2) int32 [keypoint in image 0, keypoint in image 1], by ascending index in image 0
    scores: np.ndarray  # (M,) float32
    num_keypoints0: int

    @staticmethod
    def from_matches0(matches0: np.ndarray, scores0: np.ndarray) -> "PairMatches":
        """From hloc's padded ``matches0`` (N0,) (-1 = unmatched) and ``scores0`` (N0,)."""
        matches0 = np.asarray(matches0).reshape(-1)
        valid = np.nonzero(matches0 > -1)[0]
        indices = np.stack([valid, matches0[valid]], axis=1).astype(np.int32)
        return PairMatches(indices, np.asarray(scores0, np.float32).reshape(-1)[valid], len(matches0))

    @property
    def matches0(self) -> np.ndarray:
        """hloc's (N0,) int32 index into image 1 of each keypoint of image 0, -1 when unmatched."""
        out = np.full(self.num_keypoints0, -1, np.int32)
        out[self.indices[:, 0]] = self.indices[:, 1]
        return out

    @property
    def scores0(self) -> np.ndarray:
        """hloc's (N0,) float32 score of each keypoint of image 0's match, 0 when unmatched."""
        out = np.zeros(self.num_keypoints0, np.float32)
        out[self.indices[:, 0]] = self.scores
        return out

    @property
    def num_matches(self) -> int:
        return len(self.indices)

    def index_pairs(self) -> np.ndarray:
        """(M, 2) int64 keypoint indices [in image 0, in image 1] of the matches."""
        return self.indices.astype(np.int64)


@dataclass(frozen=True)
class QuantizedMatches:
    """The result of :func:`aggregate_matches`: keypoints of every image and matches of every pair."""

    keypoints: dict[str, ImageKeypoints]
    matches: dict[tuple[str, str], PairMatches]

    def padded_matches(self) -> Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
        """``{pair: (matches0, scores0)}`` in hloc's padded form, built one pair at a time as it is read."""
        return _PaddedMatches(self.matches)

    def padded_bytes(self) -> int:
        """Bytes of the padded ``matches0`` and ``scores0`` arrays of every pair (4 + 4 per keypoint of image 0)."""
        return sum(8 * pm.num_keypoints0 for pm in self.matches.values())


class _PaddedMatches(Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]):
    def __init__(self, matches: Mapping[tuple[str, str], PairMatches]) -> None:
        self._matches = matches

    def __getitem__(self, pair: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        found = self._matches[pair]
        return found.matches0, found.scores0

    def __iter__(self):
        return iter(self._matches)

    def __len__(self) -> int:
        return len(self._matches)


# ------------------------------------------------------------------------------------------- binning
def _sub_bin_nodes(points: np.ndarray, sub_bin: int) -> np.ndarray:
    """Sub-bin node of each point in *edge* coordinates (pixel corner at 0), float64 (M, 2)."""
    edges = points.astype(np.float64) + 0.5
    if sub_bin <= 0:
        return edges
    return np.floor(edges / sub_bin + 0.5) * sub_bin


def _reduce_bins(nodes: np.ndarray, weights: np.ndarray, weighted_xy: np.ndarray):
    """Sum ``weights`` and ``weighted_xy`` over identical nodes; returns (unique nodes, sums, xy sums)."""
    if len(nodes) == 0:
        return np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2))
    unique, inverse = np.unique(nodes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.bincount(inverse, weights=weights, minlength=len(unique))
    xy = np.stack([np.bincount(inverse, weights=weighted_xy[:, i], minlength=len(unique)) for i in range(2)], axis=1)
    return unique, sums, xy


#: rows of per-pair bins an accumulator holds before its first merge (below it, one reduction at the end)
MERGE_MIN_ROWS = 1 << 16


class KeypointAccumulator:
    """Collects one image's raw points (over all its pairs) as summed confidences per sub-bin.

    Memory stays proportional to the number of distinct sub-bins, not to the number of raw matches: the
    per-pair sums are merged whenever they hold twice as many rows as the last merge left.
    """

    def __init__(self, config: QuantizeConfig) -> None:
        self.config = config
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._rows = 0  # rows held in _parts
        self._merged_rows = 0  # rows the last merge left

    def add(self, points: np.ndarray, scores: np.ndarray) -> None:
        """Add (M, 2) raw points with their (M,) match confidences."""
        points = np.asarray(points, np.float64).reshape(-1, 2)
        weights = np.asarray(scores, np.float64).reshape(-1)
        if len(points) == 0:
            return
        nodes = _sub_bin_nodes(points, self.config.sub_bin)
        self._parts.append(_reduce_bins(nodes, weights, points * weights[:, None]))
        self._rows += len(self._parts[-1][0])
        if self._rows > max(2 * self._merged_rows, MERGE_MIN_ROWS):
            self._merge()

    def _merge(self) -> None:
        merged = _reduce_bins(
            np.concatenate([p[0] for p in self._parts]),
            np.concatenate([p[1] for p in self._parts]),
            np.concatenate([p[2] for p in self._parts]),
        )
        self._parts = [merged]
        self._rows = self._merged_rows = len(merged[0])

    def finalize(self) -> ImageKeypoints:
        """One keypoint per cell (its best sub-bin), the ``max_kps`` best, sorted by descending score."""
        if not self._parts:
            return ImageKeypoints.empty()
        self._merge()
        nodes, sums, xy = self._parts[0]
        cell = self.config.cell
        if cell > 0:
            cells = np.floor(nodes / cell + 0.5).astype(np.int64)
            _, cell_ids = np.unique(cells, axis=0, return_inverse=True)
            cell_ids = cell_ids.reshape(-1)
        else:
            cell_ids = np.arange(len(nodes))
        # Best sub-bin per cell: sort by (cell, -sum, node) and take each cell's first entry; the node
        # keys make ties deterministic.
        order = np.lexsort((nodes[:, 1], nodes[:, 0], -sums, cell_ids))
        first = np.ones(len(order), bool)
        first[1:] = cell_ids[order][1:] != cell_ids[order][:-1]
        best = order[first]
        if self.config.position == "mean":
            # Bins with zero total confidence have no meaningful mean; fall back to the node.
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = xy[best] / sums[best, None]
            keypoints = np.where(sums[best, None] > 0, mean, nodes[best] - 0.5)
        else:
            keypoints = nodes[best] - 0.5
        scores = sums[best]
        ranked = np.lexsort((keypoints[:, 1], keypoints[:, 0], -scores))
        if self.config.max_kps is not None:
            ranked = ranked[: self.config.max_kps]
        return ImageKeypoints(keypoints[ranked].astype(np.float32), scores[ranked].astype(np.float32))


def quantize_keypoints(
    points: Iterable[np.ndarray], scores: Iterable[np.ndarray], config: QuantizeConfig
) -> ImageKeypoints:
    """Keypoints of one image from several (M_i, 2) point sets and their (M_i,) confidences."""
    accumulator = KeypointAccumulator(config)
    for p, s in zip(points, scores):
        accumulator.add(p, s)
    return accumulator.finalize()


# ------------------------------------------------------------------------------------- assignment
class KeypointIndex:
    """Nearest-keypoint look-up within a radius (KD-tree built once per image)."""

    def __init__(self, keypoints: np.ndarray) -> None:
        self.size = len(keypoints)
        self._tree = cKDTree(np.asarray(keypoints, np.float64).reshape(-1, 2)) if self.size else None

    def assign(self, points: np.ndarray, max_error: float) -> np.ndarray:
        """(M,) int64 index of the nearest keypoint within ``max_error`` px (inclusive), else -1."""
        points = np.asarray(points, np.float64).reshape(-1, 2)
        if self._tree is None or len(points) == 0:
            return np.full(len(points), -1, np.int64)
        distances, indices = self._tree.query(points, k=1)
        indices = np.asarray(indices, np.int64)
        indices[~(distances <= max_error + 1e-9)] = -1
        return indices


def assign_to_keypoints(points: np.ndarray, keypoints: np.ndarray, max_error: float) -> np.ndarray:
    """(M,) index of each point's nearest keypoint within ``max_error`` px, or -1."""
    return KeypointIndex(keypoints).assign(points, max_error)


def one_to_one(ids0: np.ndarray, ids1: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the candidate matches kept so that every keypoint is used at most once per side.

    Greedy by descending score (ties: earlier candidate first). Computed in rounds: a candidate that
    is the best remaining one for both its keypoints is accepted, then candidates touching accepted
    keypoints are removed — which yields exactly the greedy matching, vectorised.
    """
    ids0 = np.asarray(ids0, np.int64)
    ids1 = np.asarray(ids1, np.int64)
    count = len(ids0)
    if count == 0:
        return np.zeros(0, np.int64)
    rank = np.empty(count, np.int64)
    rank[np.lexsort((np.arange(count), -np.asarray(scores, np.float64)))] = np.arange(count)
    remaining = np.arange(count)
    kept: list[np.ndarray] = []
    size0, size1 = int(ids0.max()) + 1, int(ids1.max()) + 1
    while len(remaining):
        best0 = np.full(size0, count, np.int64)
        best1 = np.full(size1, count, np.int64)
        np.minimum.at(best0, ids0[remaining], rank[remaining])
        np.minimum.at(best1, ids1[remaining], rank[remaining])
        accept = (best0[ids0[remaining]] == rank[remaining]) & (best1[ids1[remaining]] == rank[remaining])
        accepted = remaining[accept]
        kept.append(accepted)
        used0 = np.zeros(size0, bool)
        used1 = np.zeros(size1, bool)
        used0[ids0[accepted]] = True
        used1[ids1[accepted]] = True
        remaining = remaining[~(used0[ids0[remaining]] | used1[ids1[remaining]])]
    return np.sort(np.concatenate(kept))


def to_pair_matches(ids0: np.ndarray, ids1: np.ndarray, scores: np.ndarray, num_keypoints0: int) -> PairMatches:
    """hloc's ``matches0`` / ``matching_scores0`` (padded to N0) from keypoint ids of raw matches.

    Raw matches with -1 on either side are dropped; the rest are made one-to-one.
    """
    ids0 = np.asarray(ids0, np.int64)
    ids1 = np.asarray(ids1, np.int64)
    scores = np.asarray(scores, np.float32)
    valid = (ids0 > -1) & (ids1 > -1)
    ids0, ids1, scores = ids0[valid], ids1[valid], scores[valid]
    keep = one_to_one(ids0, ids1, scores)
    return sparse_pair_matches(ids0[keep], ids1[keep], scores[keep], num_keypoints0)


def sparse_pair_matches(ids0: np.ndarray, ids1: np.ndarray, scores: np.ndarray, num_keypoints0: int) -> PairMatches:
    """:class:`PairMatches` from keypoint ids (M,) of both images and their (M,) scores, any order; of entries
    with the same keypoint in image 0 the last one counts (as when written into padded arrays)."""
    order = np.argsort(ids0, kind="stable")
    last = np.r_[ids0[order][1:] != ids0[order][:-1], True] if len(order) else np.zeros(0, bool)
    order = order[last]
    indices = np.stack([ids0[order], ids1[order]], axis=1).astype(np.int32).reshape(-1, 2)
    return PairMatches(indices, np.asarray(scores, np.float32)[order], int(num_keypoints0))


# ------------------------------------------------------------------------------------- aggregation
def aggregate_matches(
    pairs: Sequence[tuple[str, str]],
    raw: Mapping[tuple[str, str], Matches],
    config: QuantizeConfig,
    reference: Mapping[str, ImageKeypoints] | None = None,
) -> QuantizedMatches:
    """Shared keypoints for every image of ``pairs`` and one-to-one matches for every pair.

    ``raw[(name0, name1)]`` holds the pair's raw matches in original pixel coordinates (read twice,
    so it may be a lazy mapping over files). Images in ``reference`` keep their keypoints; the
    others get quantized keypoints. The result depends only on the matches, not on dict order.
    """
    reference = {} if reference is None else reference
    names = sorted({name for pair in pairs for name in pair})
    accumulators = {name: KeypointAccumulator(config) for name in names if name not in reference}
    for name0, name1 in pairs:  # pass 1: collect raw points per image
        matches = raw[(name0, name1)]
        if name0 in accumulators:
            accumulators[name0].add(matches.keypoints0, matches.scores)
        if name1 in accumulators:
            accumulators[name1].add(matches.keypoints1, matches.scores)

    keypoints: dict[str, ImageKeypoints] = {}
    for name in names:
        keypoints[name] = reference[name] if name in reference else accumulators.pop(name).finalize()
    indexes = {name: KeypointIndex(kp.keypoints) for name, kp in keypoints.items()}

    result: dict[tuple[str, str], PairMatches] = {}
    for name0, name1 in pairs:  # pass 2: re-assign raw matches to the keypoints
        matches = raw[(name0, name1)]
        ids0 = indexes[name0].assign(matches.keypoints0, config.max_error)
        ids1 = indexes[name1].assign(matches.keypoints1, config.max_error)
        result[(name0, name1)] = to_pair_matches(ids0, ids1, matches.scores, len(keypoints[name0]))
    return QuantizedMatches(keypoints=keypoints, matches=result)


def track_lengths(quantized: QuantizedMatches) -> np.ndarray:
    """Length of every track (connected component of matched keypoints with >= 2 observations).

    A diagnostic: shared keypoints exist precisely so that tracks longer than 2 form.
    """
    offsets: dict[str, int] = {}
    total = 0
    for name, kp in sorted(quantized.keypoints.items()):
        offsets[name] = total
        total += len(kp)
    parent = np.arange(total)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (name0, name1), pm in quantized.matches.items():
        for a, b in pm.index_pairs():
            ra, rb = find(offsets[name0] + int(a)), find(offsets[name1] + int(b))
            if ra != rb:
                parent[ra] = rb
    roots = np.array([find(i) for i in range(total)], np.int64)
    _, counts = np.unique(roots, return_counts=True)
    return counts[counts >= 2]


__all__ = [
    "POSITIONS",
    "QuantizeConfig",
    "ImageKeypoints",
    "PairMatches",
    "QuantizedMatches",
    "KeypointAccumulator",
    "KeypointIndex",
    "quantize_keypoints",
    "assign_to_keypoints",
    "one_to_one",
    "to_pair_matches",
    "sparse_pair_matches",
    "aggregate_matches",
    "track_lengths",
]
