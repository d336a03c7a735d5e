"""Exact tracks from the coarse cells of detector-free matches, refined against one reference view per track.

hloc's quantization (:mod:`pipeline.quantize`) snaps every raw point of an image to a shared keypoint
within a radius; a detector-free matcher's image-1 points lie anywhere, so on adjacent temple_ring views
only 52 % of LoFTR's raw matches survive it (4 px cells, 0.5 px radius) and the ones that do are averaged
with their neighbours. Detector-Free SfM (He et al., CVPR 2024) builds tracks from the *coarse* matches
instead: LoFTR finds each match between two cells of its 1/8 grids, and a cell of an image is the same
cell in every pair, so the union over all pairs is exact. This module does that, then gives every
observation a sub-pixel position relative to one reference view per track:

1. **Nodes and edges.** A node is (image, coarse cell) — the cell of ``Matches.coarse0/1`` on the image's
   grid (:meth:`matchers.base.Matcher.coarse_grid`; a view turned for matching lands within a pixel of the
   upright grid and snaps to it). Every raw match is an edge between two nodes.
2. **Tracks without conflicts.** Edges are joined by union-find in descending confidence; an edge that
   would put two cells of one image into a track is dropped (a track is one scene point, seen at most
   once per image). Components that hold no such conflict are taken whole. At most ``max_kps`` nodes per
   image are kept (highest summed confidence), like hloc's dense quantization.
3. **Positions.** Each track's reference is its most confident node, placed at its cell centre (exactly
   LoFTR's image-0 point). The others get positions along a breadth-first tree from it: an edge says that
   its two matched points (one on the grid, the other refined by LoFTR's fine stage) show the same point,
   so a child is placed at its own matched point plus its parent's offset from the parent's matched point
   (turned by the quarter turn between the images). Children of the reference thus get LoFTR's own
   refinement against the reference's point.
4. **Multi-view refinement** (``align``): every observation is then aligned to the reference view itself
   (:mod:`pipeline.align`: the target patch warped by the local affine map that the tracks seen in both
   images give, only the translation solved for), so all views of a track measure the same point and not
   a chain of neighbours' points. Observations the alignment rejects lose their matches (``keep_unaligned``):
   a position only LoFTR vouches for costs more accuracy than its track adds.

The result is a :class:`pipeline.quantize.QuantizedMatches` (keypoints per image, one-to-one matches per
pair): the raw matches whose two cells ended in one track.

**Memory.** The raw matches are read from the store one pair at a time and only their edges are kept (int32 node
ids, points, score); Python-level work runs on the conflicted components only, in compact arrays; tree depths are
vectorised; the output matches are held sparse. On 936,520 raw matches (temple_ring's 16-view exhaustive job under
40 names, loftr-compact, 640 px) the traced peak is 154 MB, 164 bytes a raw match (275 MB, 294 bytes, before), for
the same tracks and matches. It stays linear in the job's raw matches, like COLMAP's correspondence graph.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from core.distributed import DistributedConfig, run_shards, shard_size
from matchers.base import CoarseGrid, Matches, rotate_points_back
from pipeline.align import AlignConfig, align_points, local_affines
from pipeline.quantize import ImageKeypoints, PairMatches, QuantizedMatches, sparse_pair_matches
from pipeline.refine import DecodedImages

Pair = tuple[str, str]
TRACK_REFINE_MODES = ("none", "align")


@dataclass(frozen=True)
class TrackConfig:
    """How exact tracks are built and refined (see the module docstring)."""

    max_kps: int | None = 8192  # nodes kept per image (best summed confidence); None = all
    #: cells of one image a track may hold: within a block of (1 + max_cell_spread)^2 cells. 0 (one cell per image
    #: and track) keeps more matches: on temple_ring's adjacent views 86.8 % of the raw matches consistent with
    #: the GT cameras (<= 1 px) end in tracks with 0, 68.7 % with 1 (neighbour cells chain into tracks of up to 111
    #: cells, then disagree)
    max_cell_spread: int = 0
    #: neighbouring cells of one image in one track become one keypoint when their refined positions agree
    #: within this radius (px); a cell further off keeps no keypoint (its matches are dropped)
    merge_radius: float = 1.5
    refine: str = "align"  # none | align: every observation aligned to its track's reference view (pipeline.align)
    align: AlignConfig = field(default_factory=AlignConfig)  # photometric alignment against the reference view
    #: observations the alignment rejects: "none" lose their matches, "direct" keep them where LoFTR's fine stage
    #: placed them against the reference's own point, "all" keep their tree estimates. temple_ring, exhaustive,
    #: loftr-compact: "none" gives 0.943 deg median relative-rotation error with LoFTR alone (1.443 with "all") and
    #: 0.856 deg in the loftr+sift ensemble (1.009; SIFT alone 0.854). Adjacent views: the GT-consistent raw matches
    #: that keep a match fall from 86.8 % ("all") to 54.8 % ("direct") and 43.1 % ("none"), while the median
    #: epipolar error of the final matches falls from 0.251 to 0.149 and 0.100 px: accuracy, not coverage, limited
    #: these scenes.
    keep_unaligned: str = "none"

    def __post_init__(self) -> None:
        if self.refine not in TRACK_REFINE_MODES:
            raise ValueError(f"track refinement must be one of {TRACK_REFINE_MODES}, got {self.refine!r}")
        if self.keep_unaligned not in ("none", "direct", "all"):
            raise ValueError(f"keep_unaligned must be none, direct or all, got {self.keep_unaligned!r}")
        if self.max_kps is not None and self.max_kps < 1:
            raise ValueError(f"max_kps must be >= 1 or None, got {self.max_kps}")


@dataclass(frozen=True)
class TrackStats:
    """What :func:`build_tracks` did, for summaries."""

    raw_matches: int  # raw matches of all pairs
    in_tracks: int  # raw matches whose two cells ended in one track (they become the output matches)
    conflicts: int  # raw matches dropped: they would join two cells of one image
    dropped_max_kps: int  # raw matches dropped with nodes beyond max_kps
    tracks: int
    observations: int
    length_histogram: dict[int, int]  # track length -> tracks
    refined: int  # observations the multi-view refinement moved (accepted by its checks)
    candidates: int  # observations it tried (all but the references)
    median_shift: float  # px, median displacement of the refined observations from their tree estimate
    median_cell_offset: float  # px, median distance of final positions from their cell centres
    merged_cells: int = 0  # cells joined with a neighbouring cell of the same image and track into one keypoint


@dataclass
class _Graph:
    names: list[str]
    node_image: np.ndarray  # (N,) image index
    node_cell: np.ndarray  # (N, 2) cell
    edges: np.ndarray  # (E, 2) node ids
    points: np.ndarray  # (E, 2, 2) the matched points of each edge, per end
    scores: np.ndarray  # (E,)
    raw_matches: int  # raw matches read


#: node keys: image index, then cell x and y in _CELL_BITS each, offset so that cells just outside a grid (a view
#: turned for matching snaps within a pixel of it) stay non-negative; sorted keys order nodes by (image, x, y)
_CELL_BITS = 20
_CELL_OFFSET = 1 << (_CELL_BITS - 1)


def _node_keys(image: int, cells: np.ndarray) -> np.ndarray:
    """(M,) int64 key of the nodes (image, cell) of ``cells`` (M, 2)."""
    xy = np.clip(cells + _CELL_OFFSET, 0, (1 << _CELL_BITS) - 1).astype(np.int64)
    return (np.int64(image) << (2 * _CELL_BITS)) | (xy[:, 0] << _CELL_BITS) | xy[:, 1]


def _pair_edges(keys0: np.ndarray, keys1: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of one pair's raw matches kept as edges: one per two nodes, the most confident (first on ties)."""
    order = np.lexsort((np.arange(len(scores)), -scores, keys1, keys0))
    first = np.r_[True, (keys0[order][1:] != keys0[order][:-1]) | (keys1[order][1:] != keys1[order][:-1])]
    return np.sort(order[first])


def _graph(raw: Mapping[Pair, Matches], grids: Mapping[str, CoarseGrid]) -> _Graph:
    """Nodes (image, cell) and one edge per two matched nodes (the most confident raw match), pair by pair.

    The raw matches are read one pair at a time and only their edges are kept (36 bytes each: node keys, points,
    score); nodes get dense ids once all pairs are read. Edges are ordered by (larger node, smaller node).
    """
    names = sorted({name for pair in raw for name in pair})
    index = {name: i for i, name in enumerate(names)}
    keys, points, scores = [], [], []
    raw_matches = 0
    for (name0, name1), matches in raw.items():
        raw_matches += len(matches)
        if len(matches) == 0:
            continue
        if not matches.has_coarse:
            raise ValueError(f"matches of {name0} / {name1} have no coarse cells; exact tracks need a dense matcher")
        keys0 = _node_keys(index[name0], grids[name0].cells(matches.coarse0))
        keys1 = _node_keys(index[name1], grids[name1].cells(matches.coarse1))
        pair_scores = np.asarray(matches.scores, np.float32)
        kept = _pair_edges(keys0, keys1, pair_scores)
        keys.append(np.stack([keys0[kept], keys1[kept]], axis=1))
        points.append(np.stack([matches.keypoints0[kept], matches.keypoints1[kept]], axis=1).astype(np.float32))
        scores.append(pair_scores[kept])
    if not keys:
        empty = np.zeros((0, 2), np.int64)
        return _Graph(names, empty[:, 0], empty, empty, np.zeros((0, 2, 2), np.float32), np.zeros(0, np.float32), 0)
    all_keys = np.concatenate(keys)
    del keys
    node_keys, inverse = np.unique(all_keys, return_inverse=True)
    del all_keys
    edges = inverse.reshape(-1, 2).astype(np.int32 if len(node_keys) < 2**31 else np.int64)
    del inverse
    order = np.lexsort((edges.min(axis=1), edges.max(axis=1)))
    mask = (1 << _CELL_BITS) - 1
    cells = np.stack([(node_keys >> _CELL_BITS) & mask, node_keys & mask], axis=1) - _CELL_OFFSET
    return _Graph(
        names,
        (node_keys >> (2 * _CELL_BITS)).astype(np.int32),
        cells.astype(np.int32),
        edges[order],
        np.concatenate(points)[order],
        np.concatenate(scores)[order],
        raw_matches,
    )


def _unique_image_union(graph: _Graph, max_cell_spread: int = 1) -> np.ndarray:
    """Accepted edges (bool (E,)): union-find in descending confidence, refusing unions that would put two
    cells of one image more than ``max_cell_spread`` cells apart in a component. Components without a
    repeated image are accepted without the loop."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    num_nodes, edges = len(graph.node_image), graph.edges
    accepted = np.ones(len(edges), bool)
    if len(edges) == 0:
        return accepted
    matrix = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(num_nodes, num_nodes))
    _, label = connected_components(matrix, directed=False)
    image_in_label = label.astype(np.int64) * (int(graph.node_image.max()) + 1) + graph.node_image
    _, counts = np.unique(image_in_label, return_counts=True)
    repeated = np.unique(image_in_label)[counts > 1] // (int(graph.node_image.max()) + 1)
    conflicted = np.isin(label[edges[:, 0]], repeated)
    if not conflicted.any():
        return accepted
    # The loop runs over the conflicted components only, on local node ids: Python lists of all nodes would cost
    # ~100 bytes a node (the largest memory peak of track building before).
    candidates = np.nonzero(conflicted)[0]
    candidates = candidates[np.argsort(-graph.scores[candidates], kind="stable")]
    del matrix, image_in_label
    local_nodes, local_edges = np.unique(edges[candidates], return_inverse=True)
    local_edges = local_edges.reshape(-1, 2).astype(edges.dtype)
    # array.array: 8 bytes an entry where a list holds a pointer and an int object
    parent = _int_array(np.arange(len(local_nodes)))
    image_of = _int_array(graph.node_image[local_nodes])

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    rows = _chunked_rows(candidates, local_edges[:, 0], local_edges[:, 1])
    if max_cell_spread == 0:  # one cell per image and track: a union is refused when the two share an image
        images: dict[int, set[int]] = {}  # root -> its images (a Python set: ~60 bytes a node, lists of nodes ~200)
        for edge, a, b in rows:
            ra, rb = find(a), find(b)
            if ra == rb:
                continue
            in_a = images.pop(ra, None) or {image_of[ra]}
            in_b = images.pop(rb, None) or {image_of[rb]}
            if len(in_a) < len(in_b):
                ra, rb, in_a, in_b = rb, ra, in_b, in_a
            if not in_a.isdisjoint(in_b):
                accepted[edge] = False
                images[ra], images[rb] = in_a, in_b
                continue
            in_a |= in_b
            parent[rb] = ra
            images[ra] = in_a
        return accepted
    members: dict[int, dict[int, list[int]]] = {}  # root -> image -> nodes
    cell_x = _int_array(graph.node_cell[local_nodes, 0])
    cell_y = _int_array(graph.node_cell[local_nodes, 1])

    def compatible(nodes: list[int]) -> bool:
        # Cells of one image within a 2 x 2 block: one scene point near their common corner, which LoFTR matched
        # from different pairs into neighbouring cells; further apart, they are different points.
        xs, ys = [cell_x[n] for n in nodes], [cell_y[n] for n in nodes]
        return max(xs) - min(xs) <= max_cell_spread and max(ys) - min(ys) <= max_cell_spread

    for edge, a, b in rows:
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        set_a = members.get(ra) or {image_of[ra]: [ra]}
        set_b = members.get(rb) or {image_of[rb]: [rb]}
        if len(set_a) < len(set_b):
            ra, rb, set_a, set_b = rb, ra, set_b, set_a
        shared = [image for image in set_b if image in set_a]
        if any(not compatible(set_a[image] + set_b[image]) for image in shared):
            accepted[edge] = False
            continue
        for image, nodes in set_b.items():
            set_a.setdefault(image, []).extend(nodes)
        parent[rb] = ra
        members[ra] = set_a
        members.pop(rb, None)
    # An edge skipped as "same component" joins two nodes of one component: consistent by construction.
    return accepted


def _int_array(values: np.ndarray) -> array:
    """A numpy integer array as an ``array.array`` of int64, without a Python list in between."""
    out = array("q")
    out.frombytes(np.ascontiguousarray(values, np.int64).tobytes())
    return out


def _chunked_rows(*columns: np.ndarray, chunk: int = 1 << 16) -> Iterator[tuple[int, ...]]:
    """The rows of equally long 1-D arrays as tuples of Python ints, converted ``chunk`` rows at a time."""
    for start in range(0, len(columns[0]), chunk):
        yield from zip(*(column[start : start + chunk].tolist() for column in columns))


def _components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    matrix = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(num_nodes, num_nodes))
    return connected_components(matrix, directed=False)[1]


def _turn_offsets(k: int) -> np.ndarray:
    """(2, 2) linear part of :func:`rotate_points_back` for ``k`` quarter turns (offsets, not points)."""
    basis = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    mapped = rotate_points_back(basis, k, (1, 1))
    return np.stack([mapped[1] - mapped[0], mapped[2] - mapped[0]], axis=1)  # columns: images of e_x, e_y


def image_turns(turns: Mapping[Pair, int], names: Sequence[str]) -> dict[str, int]:
    """Per-image quarter turns ``u`` with ``turns[(a, b)] = u[b] - u[a]`` (mod 4), by breadth-first search."""
    adjacency: dict[str, list[tuple[str, int]]] = {}
    for (a, b), k in turns.items():
        adjacency.setdefault(a, []).append((b, k))
        adjacency.setdefault(b, []).append((a, -k))
    turn: dict[str, int] = {}
    for start in names:
        if start in turn:
            continue
        turn[start] = 0
        queue = deque([start])
        while queue:
            a = queue.popleft()
            for b, k in adjacency.get(a, ()):
                if b not in turn:
                    turn[b] = (turn[a] + k) % 4
                    queue.append(b)
    return turn


def build_tracks(
    raw: Mapping[Pair, Matches],
    grids: Mapping[str, CoarseGrid],
    load: Callable[[str], np.ndarray] | None = None,
    turns: Mapping[Pair, int] | None = None,
    config: TrackConfig | None = None,
    cache_bytes: int = 2 << 30,
    distributed: DistributedConfig = DistributedConfig(),
) -> tuple[QuantizedMatches, TrackStats]:
    """Exact tracks from ``raw`` matches with coarse cells (see the module docstring).

    ``grids[name]``: the coarse lattice of each image; ``load(name)``: a grayscale image (needed for
    ``refine="align"``); ``turns[(a, b)]``: the quarter turn b was matched at against a (``rotation="auto"``).
    """
    config = config if config is not None else TrackConfig()
    graph = _graph(raw, grids)
    num_nodes, names = len(graph.node_image), graph.names
    accepted = _unique_image_union(graph, config.max_cell_spread)
    edge_ids = _keep_best_nodes(graph, np.nonzero(accepted)[0], config.max_kps)
    edges, scores = graph.edges[edge_ids], graph.scores[edge_ids]
    node_score = np.bincount(edges.reshape(-1), np.repeat(scores, 2), minlength=num_nodes)

    label = _components(num_nodes, edges)
    in_track = np.zeros(num_nodes, bool)
    in_track[edges.reshape(-1)] = True
    # Reference: the most confident node of each track.
    order = np.lexsort((-node_score, label))
    first = order[np.r_[True, label[order][1:] != label[order][:-1]]] if num_nodes else order
    references = first[in_track[first]]
    centres = _cell_centres(graph, grids)
    image_turn = image_turns(turns or {}, names)
    turn_of = np.array([image_turn.get(name, 0) for name in names], np.int64)
    positions, reference_of, depth = _place_along_trees(graph, edges, edge_ids, centres, references, turn_of)
    estimates = positions.copy()

    aligned = np.zeros(num_nodes, bool)
    candidates = 0
    if config.refine == "align" and load is not None:
        aligned, candidates = _align_to_references(
            positions,
            reference_of,
            label,
            in_track,
            graph.node_image,
            names,
            turn_of,
            load,
            config.align,
            cache_bytes,
            distributed,
        )
    keypoint_of, image_keypoints, merged = _one_keypoint_per_view(
        label, in_track, graph.node_image, positions, node_score, aligned, references, config.merge_radius
    )
    if config.refine == "align" and config.keep_unaligned != "all":
        # Unaligned observations lose their matches (the keypoints stay, unmatched), except, with "direct", those
        # placed by LoFTR's own fine stage against the reference's point (depth 2: children of the reference).
        keep = depth[:num_nodes] <= (2 if config.keep_unaligned == "direct" else 1)
        keypoint_of[~aligned & ~keep] = -1
    kept = (keypoint_of[edges[:, 0]] >= 0) & (keypoint_of[edges[:, 1]] >= 0)
    result = _to_quantized(raw, graph, keypoint_of, image_keypoints, edges[kept], scores[kept])
    stats = _track_stats(
        graph.raw_matches,
        label,
        in_track,
        kept,
        accepted,
        edge_ids,
        aligned,
        candidates,
        merged,
        positions,
        estimates,
        centres,
    )
    return result, stats


def _track_stats(
    raw_matches: int,
    label: np.ndarray,
    in_track: np.ndarray,
    kept: np.ndarray,
    accepted: np.ndarray,
    edge_ids: np.ndarray,
    aligned: np.ndarray,
    candidates: int,
    merged: int,
    positions: np.ndarray,
    estimates: np.ndarray,
    centres: np.ndarray,
) -> TrackStats:
    """The figures of :func:`build_tracks` (summary.json's matching.tracks)."""
    lengths = np.bincount(label[in_track])
    lengths = lengths[lengths > 0]
    moved = np.linalg.norm(positions - estimates, axis=1)
    return TrackStats(
        raw_matches=raw_matches,
        in_tracks=int(kept.sum()),
        conflicts=int((~accepted).sum()),
        dropped_max_kps=int(accepted.sum()) - len(edge_ids),
        tracks=int(len(lengths)),
        observations=int(in_track.sum()),
        length_histogram={int(k): int(v) for k, v in zip(*np.unique(lengths, return_counts=True))},
        refined=int(aligned.sum()),
        candidates=candidates,
        merged_cells=merged,
        median_shift=float(np.median(moved[moved > 0])) if (moved > 0).any() else 0.0,
        median_cell_offset=float(np.median(np.linalg.norm(positions - centres, axis=1)[in_track]))
        if in_track.any()
        else 0.0,
    )


def _keep_best_nodes(graph: _Graph, edge_ids: np.ndarray, max_kps: int | None) -> np.ndarray:
    """The edges of ``edge_ids`` whose two nodes are among the ``max_kps`` best-supported of their image."""
    num_nodes = len(graph.node_image)
    edges = graph.edges[edge_ids]
    node_score = np.bincount(edges.reshape(-1), np.repeat(graph.scores[edge_ids], 2), minlength=num_nodes)
    keep_node = node_score > 0
    if max_kps is not None:
        order = np.lexsort((-node_score, graph.node_image))
        rank = np.empty(num_nodes, np.int64)
        starts = np.searchsorted(graph.node_image[order], graph.node_image[order], side="left")
        rank[order] = np.arange(num_nodes) - starts
        keep_node &= rank < max_kps
    return edge_ids[keep_node[edges[:, 0]] & keep_node[edges[:, 1]]]


def _cell_centres(graph: _Graph, grids: Mapping[str, CoarseGrid]) -> np.ndarray:
    """(N, 2) float32 centre of every node's cell, in its image's pixels."""
    centres = np.zeros((len(graph.node_image), 2), np.float32)
    for index, name in enumerate(graph.names):
        nodes = np.nonzero(graph.node_image == index)[0]
        centres[nodes] = grids[name].centres(graph.node_cell[nodes])
    return centres


def _place_along_trees(
    graph: _Graph,
    edges: np.ndarray,
    edge_ids: np.ndarray,
    centres: np.ndarray,
    references: np.ndarray,
    turn_of: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of every node along a breadth-first tree from its track's reference (which stays on its cell
    centre): a child sits at its own matched point plus its parent's offset from the parent's matched point,
    turned by the images' quarter turns. Returns the positions, each node's reference (-1: in no track) and its
    depth in the tree (1: a reference, 2: matched to it directly, 0: in no track). ``edges`` are
    ``graph.edges[edge_ids]``, in the graph's order (by larger node, then smaller node)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order

    num_nodes = len(graph.node_image)
    positions = centres.copy()
    root = num_nodes  # a virtual root joined to every reference: one search places all tracks
    index_type = np.int32 if num_nodes < 2**31 - 1 else np.int64
    rows = np.concatenate([edges[:, 0], edges[:, 1], np.full(len(references), root)]).astype(index_type)
    cols = np.concatenate([edges[:, 1], edges[:, 0], references]).astype(index_type)
    tree = coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(num_nodes + 1, num_nodes + 1)).tocsr()
    del rows, cols
    visit, parent = breadth_first_order(tree, root, directed=True, return_predecessors=True)
    del tree
    offset_maps = np.stack([_turn_offsets(k) for k in range(4)])
    reference_of = np.full(num_nodes, -1, np.int64)
    reference_of[references] = references
    depth = _tree_depths(parent, visit, root)
    # Sorted already: the graph orders its edges by (larger node, smaller node), and edge_ids keep that order.
    edge_key = edges.max(axis=1).astype(np.int64) * num_nodes + edges.min(axis=1)
    for level in range(2, int(depth.max(initial=1)) + 1):  # level 1: the references
        nodes = np.nonzero(depth[:num_nodes] == level)[0]
        ups = parent[nodes]
        reference_of[nodes] = reference_of[ups]
        keys = np.maximum(nodes, ups) * num_nodes + np.minimum(nodes, ups)
        edge = np.searchsorted(edge_key, keys)
        side = (edges[edge, 0] != nodes).astype(np.int64)  # which end of its edge each node is
        k = (turn_of[graph.node_image[nodes]] - turn_of[graph.node_image[ups]]) % 4
        points = graph.points[edge_ids[edge]]
        rows = np.arange(len(edge))
        offsets = np.einsum("nij,nj->ni", offset_maps[k], positions[ups] - points[rows, 1 - side])
        positions[nodes] = points[rows, side] + offsets
    return positions, reference_of, depth


def _tree_depths(parent: np.ndarray, visit: np.ndarray, root: int) -> np.ndarray:
    """(N + 1,) depth of every node of a breadth-first tree from ``root`` (the root 0, its children 1, nodes not
    reached 0), by pointer jumping: log2(depth) vectorised steps instead of a Python loop over the nodes."""
    reached = np.zeros(len(parent), bool)
    reached[visit] = True
    reached[root] = False
    depth = reached.astype(np.int64)  # one step to the parent
    ancestor = np.where(reached, parent, root)
    ancestor[root] = root
    while True:
        jump = ancestor != root
        if not jump.any():
            return depth
        depth[jump] += depth[ancestor[jump]]
        ancestor[jump] = ancestor[ancestor[jump]]


def _align_to_references(
    positions: np.ndarray,
    reference_of: np.ndarray,
    label: np.ndarray,
    in_track: np.ndarray,
    node_image: np.ndarray,
    names: Sequence[str],
    turn_of: np.ndarray,
    load: Callable[[str], np.ndarray],
    config: AlignConfig,
    cache_bytes: int,
    distributed: DistributedConfig = DistributedConfig(),
) -> tuple[np.ndarray, int]:
    """Align every non-reference observation to its track's reference view (:func:`pipeline.align.align_points`),
    grouped by image pair; the local affine maps come from all tracks seen in both images. ``positions`` is
    updated in place. Returns the accepted nodes (bool) and how many were tried.

    Each pass fits its affine maps on the positions the previous pass left (the second pass on refined ones), so
    the image pairs of a pass are independent: they run in shards, here or over Ray workers (``distributed``),
    with the same result. Fitting on positions refined earlier in the same pass instead (a loop's order, as before)
    is no better: 16 temple_ring views, 120 pairs, loftr-compact: 7,460 (loop: 7,458) of 12,938 observations
    aligned, 11,057 (11,074) final matches, median Sampson error against the GT cameras 0.0793 (0.0797) px."""
    nodes = np.nonzero((reference_of >= 0) & (reference_of != np.arange(len(reference_of))))[0]
    if len(nodes) == 0:
        return np.zeros(len(positions), bool), 0
    source_image, target_image = node_image[reference_of[nodes]], node_image[nodes]
    order = np.lexsort((target_image, source_image))
    nodes, source_image, target_image = nodes[order], source_image[order], target_image[order]
    key = source_image * len(names) + target_image
    # Per image: its track nodes sorted by track label (a track has at most one node per image).
    by_image = {}
    for index in range(len(names)):
        members = np.nonzero((node_image == index) & in_track)[0]
        members = members[np.argsort(label[members], kind="stable")]
        labels, first = np.unique(label[members], return_index=True)  # one node per track (neighbour cells)
        by_image[index] = (labels, members[first])
    offset_maps = np.stack([_turn_offsets(k) for k in range(4)])
    task = AlignTask(load, list(names), config, cache_bytes)
    start = positions.copy()
    accepted = np.zeros(len(positions), bool)
    chunks = np.split(np.arange(len(nodes)), np.nonzero(np.diff(key))[0] + 1)
    for _ in range(config.passes):
        jobs = []
        for chunk in chunks:
            source, target = int(source_image[chunk[0]]), int(target_image[chunk[0]])
            group = nodes[chunk]
            _, in_source, in_target = np.intersect1d(
                by_image[source][0], by_image[target][0], assume_unique=True, return_indices=True
            )
            jobs.append(
                AlignJob(
                    source,
                    target,
                    positions[by_image[source][1][in_source]].astype(np.float64),
                    positions[by_image[target][1][in_target]].astype(np.float64),
                    positions[reference_of[group]].astype(np.float64),
                    start[group].astype(np.float64),
                    offset_maps[int((turn_of[target] - turn_of[source]) % 4)],
                )
            )
        per_shard = shard_size(len(jobs), distributed, ALIGN_SHARD_JOBS)
        shards = [jobs[i : i + per_shard] for i in range(0, len(jobs), per_shard)]
        refined_by_chunk: list[tuple[np.ndarray, np.ndarray]] = [None] * len(jobs)  # type: ignore[list-item]
        with tqdm(
            total=len(jobs), desc="track refinement", unit="image pair", leave=False, disable=len(nodes) < 20000
        ) as bar:
            for outcome in run_shards(task, shards, distributed):
                first = outcome.index * per_shard
                refined_by_chunk[first : first + len(outcome.result)] = outcome.result
                bar.update(len(outcome.result))
        for chunk, (refined, ok) in zip(chunks, refined_by_chunk):
            group = nodes[chunk]
            positions[group] = np.where(ok[:, None], refined, start[group])
            accepted[group] = ok
    return accepted, int(len(nodes))


#: most image pairs per shard of the track refinement (about four shards per worker; a shard's images are decoded
#: and cached by the worker that aligns it)
ALIGN_SHARD_JOBS = 64


@dataclass(frozen=True)
class AlignJob:
    """One image pair of a refinement pass: the tracks both images see (for the local affine maps), and the
    observations of ``target`` to align to their references in ``source``."""

    source: int
    target: int
    common_source: np.ndarray  # (C, 2) positions in source of tracks seen in both images
    common_target: np.ndarray  # (C, 2) the same tracks in target
    reference_points: np.ndarray  # (G, 2) the references of the observations to align
    start: np.ndarray  # (G, 2) the observations' placed positions (before refinement)
    fallback: np.ndarray  # (2, 3) affine map when too few common tracks: the quarter turn between the views


@dataclass
class AlignTask:
    """The alignment of image pairs, in this process or a Ray worker (:mod:`core.distributed`)."""

    load: Callable[[str], np.ndarray]
    names: list[str]
    config: AlignConfig
    cache_bytes: int

    def setup(self) -> None:
        self.images = DecodedImages(self.load, self.names, self.cache_bytes)

    def run(self, jobs: list[AlignJob]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for job in jobs:
            affines = local_affines(
                job.common_source, job.common_target, job.reference_points, job.fallback, self.config
            )
            out.append(
                align_points(
                    self.images[job.source],
                    self.images[job.target],
                    job.reference_points,
                    job.start,
                    affines,
                    self.config,
                )
            )
        return out


def _one_keypoint_per_view(
    label: np.ndarray,
    in_track: np.ndarray,
    node_image: np.ndarray,
    positions: np.ndarray,
    node_score: np.ndarray,
    aligned: np.ndarray,
    references: np.ndarray,
    radius: float,
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Cells of one image in one track (neighbours, see :func:`_unique_image_union`) become one keypoint.

    The keypoint sits where the view's best cell is (the reference, else an aligned one, else the most
    confident); the other cells join it when their positions agree within ``radius`` px, else they lose their
    keypoint. Returns per node its keypoint index in its image (-1: none), per image the keypoints' positions
    and summed scores, and how many cells were joined.
    """
    num_images = int(node_image.max(initial=0)) + 1
    nodes = np.nonzero(in_track)[0]
    if len(nodes) == 0:
        empty = (np.zeros((0, 2), np.float32), np.zeros(0, np.float32))
        return np.full(len(positions), -1, np.int64), {image: empty for image in range(num_images)}, 0
    is_reference = np.zeros(len(positions), bool)
    is_reference[references] = True
    group_key = label[nodes].astype(np.int64) * num_images + node_image[nodes]
    order = np.lexsort((-node_score[nodes], ~aligned[nodes], ~is_reference[nodes], group_key))
    nodes, group_key = nodes[order], group_key[order]
    first = np.r_[True, group_key[1:] != group_key[:-1]]
    group = np.cumsum(first) - 1
    representative = nodes[first]
    joins = np.linalg.norm(positions[nodes] - positions[representative[group]], axis=1) <= radius
    group_score = np.bincount(group[joins], node_score[nodes[joins]], minlength=len(representative))
    keypoint_in_image = np.zeros(len(representative), np.int64)
    keypoints: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for image in range(num_images):
        members = np.nonzero(node_image[representative] == image)[0]
        keypoint_in_image[members] = np.arange(len(members))
        keypoints[image] = (
            positions[representative[members]].astype(np.float32),
            group_score[members].astype(np.float32),
        )
    keypoint_of = np.full(len(positions), -1, np.int64)
    keypoint_of[nodes[joins]] = keypoint_in_image[group[joins]]
    return keypoint_of, keypoints, int((~first & joins).sum())


def _to_quantized(
    raw: Mapping[Pair, Matches],
    graph: _Graph,
    keypoint_of: np.ndarray,
    image_keypoints: dict[int, tuple[np.ndarray, np.ndarray]],
    edges: np.ndarray,
    scores: np.ndarray,
) -> QuantizedMatches:
    """Keypoints (one per track and view) and per-pair one-to-one matches (the kept edges)."""
    names = graph.names
    local = keypoint_of
    keypoints = {
        name: ImageKeypoints(*image_keypoints.get(i, (np.zeros((0, 2), np.float32), np.zeros(0, np.float32))))
        for i, name in enumerate(names)
    }
    index = {name: i for i, name in enumerate(names)}
    image_a, image_b = graph.node_image[edges[:, 0]], graph.node_image[edges[:, 1]]
    pair_key = np.minimum(image_a, image_b) * len(names) + np.maximum(image_a, image_b)
    order = np.argsort(pair_key, kind="stable")
    unique_keys, starts = np.unique(pair_key[order], return_index=True)
    slices = dict(zip(unique_keys.tolist(), zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist())))
    matches: dict[Pair, PairMatches] = {}
    for name0, name1 in raw:
        count0 = len(keypoints[name0]) if name0 in keypoints else 0
        ids0 = ids1 = np.zeros(0, np.int64)
        chosen_scores = np.zeros(0, np.float32)
        if name0 in index and name1 in index:
            i0, i1 = index[name0], index[name1]
            key = min(i0, i1) * len(names) + max(i0, i1)
            start, stop = slices.get(key, (0, 0))
            chosen = order[start:stop]
            flip = image_a[chosen] != i0
            ids0 = local[np.where(flip, edges[chosen, 1], edges[chosen, 0])]
            ids1 = local[np.where(flip, edges[chosen, 0], edges[chosen, 1])]
            chosen_scores = scores[chosen]
        matches[(name0, name1)] = sparse_pair_matches(ids0, ids1, chosen_scores, count0)
    return QuantizedMatches(keypoints=keypoints, matches=matches)


__all__ = ["TRACK_REFINE_MODES", "TrackConfig", "TrackStats", "build_tracks", "image_turns"]
