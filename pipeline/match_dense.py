"""Dense matching over a pairs file, quantized into shared per-image keypoints, written as hloc HDF5.

    python -m pipeline.match_dense --images DIR --pairs pairs.txt --features F.h5 --matches M.h5 \\
        [--matcher loftr|sift] [--weights W] [--resize 640 [840 ...]] [--rotation none|auto|best|union] \\
        [--both-directions] [--refine none|klt|tracks] [--cell-size 8] [--max-error 2] [--max-kps 8192] \\
        [--reference-features REF.h5] [--device auto|cpu|cuda]

The matcher-dependent options (cell size, radius, rotation, refinement) default to what
:func:`dense_defaults` derives from the matcher, the same as ``pipeline.reconstruct`` uses: for LoFTR
rotation ``auto`` and exact tracks, for SIFT a 2 px grid and nothing else.

Three stages:

1. **Raw matching.** Pairs are ordered so that each image's prepared views (for LoFTR: the backbone
   pass) are computed once and reused from a bounded LRU cache for all its pairs; images are decoded
   ahead of time by loader threads. Every pair's raw matches are saved at once, atomically, as one
   small ``.npz`` under ``<matches>.raw/<matching-config digest>/``: a killed run resumes where it
   stopped, and a different matcher or matching option never reuses stale matches. With ``refine="klt"``
   the image-1 points of every pair are refined to sub-pixel accuracy first (:mod:`pipeline.refine`).
   With ``rotation="auto"`` each pair is matched once, image 1 turned by the quarter turn SIFT finds
   (:mod:`pipeline.orientation`).
2. **Quantization** (:mod:`pipeline.quantize`): shared keypoints per image (hloc semantics), matches
   re-assigned and made one-to-one; images of ``reference_features`` keep their keypoints. With
   ``refine="klt"`` the keypoints of each track are then aligned by Lucas-Kanade to its strongest one.
   With ``refine="tracks"`` exact tracks are built on the matcher's coarse cells instead (:mod:`pipeline.tracks`).
3. **Output**: hloc ``features.h5`` and ``matches.h5`` (``matches0`` padded to N0), both atomic.
   A stamp in ``<matches>.raw/done.json`` lets an identical re-run return at once.

Pairs whose first image is a reference image and second is not are matched swapped (as hloc does):
LoFTR refines the keypoints of its second image only, and refined points snap to fixed keypoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from core import io
from core.cache import LRUCache
from core.cli import add_config_arguments, config_from_options
from core.distributed import DistributedConfig, ShardStats, run_shards, shard_size, ships_images
from core.errors import UserError, run_cli
from core.image_io import image_size, read_gray, to_uint8
from core.resources import peak_rss_mb
from core.stamps import digest, file_state
from matchers.base import Matcher, Matches
from matchers.sift import BACKENDS, SIFTBackend, SIFTOptions
from pipeline.orientation import OrientationConfig, estimate_quarter_turns
from pipeline.quantize import ImageKeypoints, KeypointPosition, QuantizeConfig, QuantizedMatches, aggregate_matches
from pipeline.raw_store import RawMatchStore, StoredMatches, raw_root
from pipeline.refine import (
    KLT_CELL_SIZE,
    MATCH_REFINE_MODES,
    MatchRefineMode,
    RefineConfig,
    default_refine,
    refine_matches,
    refine_tracks,
)
from pipeline.tracks import TrackConfig, TrackStats, build_tracks
from pipeline.tta import (
    PreparedView,
    RotationMode,
    TTAConfig,
    View,
    first_views,
    match_pair,
    match_views_batch,
    prepare_view,
    second_views,
    split_resize,
)

logger = logging.getLogger(__name__)

Pair = tuple[str, str]

#: single matchers (matchers.factory.MATCHERS) and the ensembles of pipeline.ensemble (SIFT's keypoints and a
#: dense matcher's tracks in one model)
MatcherName = Literal["loftr", "sift", "loftr+sift"]
ENSEMBLES = ("loftr+sift",)
Device = Literal["auto", "cpu", "cuda"]  # matchers.factory.DEVICES
AmpMode = Literal["bf16", "fp16"]  # matchers.factory.AMP_MODES
# COLMAP's SIFT is the default for SfM: on temple_ring (47 images, exhaustive) it gives a median
# relative-rotation error of 0.88 deg against GT, OpenCV's SIFT 0.99 deg (both 47/47 registered).
SiftBackend = SIFTBackend
SIFT_BACKENDS: tuple[str, ...] = BACKENDS

#: quantization of KLT-refined dense matches: hloc's 8 px cells and 2 px radius average refined points with
#: others up to 2 px away and undo the refinement. temple_ring, 135 sequential pairs, median epipolar error
#: of the quantized matches against GT: no refinement 0.44 px; refined 0.38 (8 / 2), 0.26 (4 / 1), 0.21 (4 / 0.5).
#: Exhaustive temple_ring with loftr-compact (47/47 registered each), median relative-rotation error:
#: 1.50 deg (4 / 1), 1.49 (4 / 0.75), 1.37 (4 / 0.5); fewer matches survive a smaller radius (mean track
#: length 5.2 -> 4.0), which is why it is not smaller still.
KLT_MAX_ERROR = 0.5
#: Quantization of KLT-refined matches in localization: the query step snaps database points to the reference
#: keypoints within this radius, so it cannot be as small as reconstruct's 0.5 px. Mini-Aachen from temple_ring
#: with loftr-compact (12 queries, 10 retrieved db images each), recall at (0.25 m, 2 deg) / median error:
#: no refinement (8 px / 2 px) 58 % / 0.225 m 0.59 deg; KLT 8 px / 2 px 92 % / 0.132 m 0.36 deg; KLT 4 px / 1 px
#: 92 % / 0.101 m 0.27 deg.
LOCALIZATION_KLT_MAX_ERROR = 1.0
#: SIFT keypoints are already shared between pairs: a fine grid keeps them nearly all distinct.
SIFT_CELL_SIZE = 2


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DenseMatchConfig:
    """Options of the dense matching step (quantization follows hloc's ``loftr_aachen`` defaults; the
    matcher-dependent ones of a run come from :func:`dense_defaults`)."""

    cell_size: int = 8  # quantization grid (px): at most one keypoint per cell
    max_error: float = 2.0  # sub-bin size and re-assignment radius (px)
    max_kps: int | None = 8192  # keypoints kept per image (best summed confidence); 0 or none = all
    both_directions: bool = False  # also match (1, 0) and merge
    rotation: RotationMode = (
        "none"  # none | auto (SIFT's quarter turn per pair) | best | union (image 1 at 0/90/180/270)
    )
    resize: tuple[int | None, ...] = (None,)  # several sizes -> matches merged; None = matcher's own resize
    cache_size: int = 16  # prepared images kept (LRU); each holds all views the image needs
    #: pairs per matcher call when each pair is matched once (LoFTR batches equal-size pairs; 1 = one by one)
    batch_pairs: int = 8
    num_workers: int = 1  # prefetching loader threads (0 = read in the main thread)
    keypoint_position: KeypointPosition = "mean"  # "mean" (weighted mean of the best sub-bin) or "bin" (hloc: its node)
    verify_threshold: float = 1.0  # px, MAGSAC++ threshold used by rotation="best"
    #: none | klt: Lucas-Kanade sub-pixel refinement of each pair's image-1 points, then quantization |
    #: tracks: exact tracks on the matcher's coarse cells, each refined against a reference view (pipeline.tracks)
    refine: MatchRefineMode = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", tuple(self.resize))
        if self.max_kps == 0:  # the command line's "no limit"
            object.__setattr__(self, "max_kps", None)
        if self.cache_size < 1:
            raise UserError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.batch_pairs < 1:
            raise UserError(f"batch_pairs must be >= 1, got {self.batch_pairs}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.refine not in MATCH_REFINE_MODES:
            raise UserError(f"unknown refinement {self.refine!r}; choose one of {', '.join(MATCH_REFINE_MODES)}")
        if self.refine == "tracks" and (
            len(self.resize) != 1 or self.both_directions or self.rotation in ("best", "union")
        ):
            raise UserError(
                "--refine tracks needs one matching size, one direction and rotation none or auto "
                "(tracks are built on the coarse cells of one grid per image)"
            )
        try:
            self.quantize_config()
            self.tta_config()
            self.refine_config()
            self.track_config()
        except ValueError as error:
            raise UserError(f"bad dense matching option: {error}") from None

    def quantize_config(self) -> QuantizeConfig:
        return QuantizeConfig(self.cell_size, self.max_error, self.max_kps, self.keypoint_position)

    def tta_config(self) -> TTAConfig:
        return TTAConfig(self.rotation, self.resize, self.both_directions, self.verify_threshold)

    def refine_config(self) -> RefineConfig:
        """The per-pair refinement (none in ``tracks`` mode, which refines across views instead)."""
        return RefineConfig(self.refine if self.refine != "tracks" else "none")

    def track_config(self) -> TrackConfig:
        return TrackConfig(max_kps=self.max_kps)


#: the DenseMatchConfig fields whose default depends on the matcher (see DenseOverrides)
MATCHER_DEPENDENT = ("cell_size", "max_error", "rotation", "refine")


@dataclass(frozen=True)
class DenseOverrides:
    """The dense matching options whose default depends on the matcher, as a user gives them (None: the
    matcher's, from :func:`dense_defaults`)."""

    cell_size: int | None = None  # quantization cell in px (default 2 for sift, 4 with --refine klt, else 8)
    max_error: float | None = None  # quantization re-assignment radius in px (default 0.5 with --refine klt, else 2)
    rotation: RotationMode | None = None  # in-plane rotation handling (default: auto for loftr, none for sift)
    #: sub-pixel refinement of dense matches (default tracks for loftr, none for sift): klt refines each pair's
    #: second-image points; tracks builds exact tracks on LoFTR's coarse cells, refined against one view each
    refine: MatchRefineMode | None = None


def dense_part(matcher: str) -> str:
    """The matcher whose matches a dense matching run of ``matcher`` makes: an ensemble's dense part
    ("loftr+sift" -> "loftr"), else the matcher itself."""
    dense = [name for name in matcher.split("+") if name != "sift"]
    return dense[0] if dense else "sift"


def dense_defaults(
    matcher: str,
    resize: Sequence[int] | None = None,
    overrides: DenseOverrides = DenseOverrides(),
    *,
    for_localization: bool = False,
    base: DenseMatchConfig = DenseMatchConfig(),
) -> DenseMatchConfig:
    """The one place that derives the matcher-dependent dense matching options (what ``pipeline.match_dense``,
    ``pipeline.reconstruct`` and the localization pipelines run).

    ``matcher``: a single matcher or an ensemble (its dense part counts); ``resize``: the user's longest
    side(s) (:func:`pipeline.tta.split_resize`); ``overrides``: what the user chose; ``base``: the other options.

    * reconstruction: SIFT rotation none, no refinement, a 2 px grid; a dense matcher (LoFTR) rotation auto and
      exact tracks; ``--refine klt`` quantizes on a 4 px / 0.5 px grid, otherwise hloc's 8 px / 2 px.
    * ``for_localization``: rotation none; a dense matcher is refined by KLT on a 4 px / 1 px grid (query points
      must snap to the fixed reference keypoints, so tracks cannot be rebuilt); otherwise 8 px / 2 px.
    """
    part = dense_part(matcher)
    refine = overrides.refine or default_refine(part, fixed_reference=for_localization)
    if part == "sift" and not for_localization:
        cell_size, max_error = SIFT_CELL_SIZE, DenseMatchConfig.max_error
    elif refine == "klt":
        cell_size, max_error = KLT_CELL_SIZE, LOCALIZATION_KLT_MAX_ERROR if for_localization else KLT_MAX_ERROR
    else:
        cell_size, max_error = DenseMatchConfig.cell_size, DenseMatchConfig.max_error
    # SIFT is rotation invariant; LoFTR is not, and SIFT's orientations tell cheaply which pairs need a turn.
    rotation = overrides.rotation or ("none" if part == "sift" or for_localization else "auto")
    _, view_sizes = split_resize(resize)
    return dataclasses.replace(
        base,
        cell_size=overrides.cell_size if overrides.cell_size is not None else cell_size,
        max_error=overrides.max_error if overrides.max_error is not None else max_error,
        rotation=rotation,
        refine=refine,
        resize=view_sizes,
    )


@dataclass(frozen=True)
class MatcherSpec:
    """Which matcher a run builds, and how (matchers.factory.make_matcher)."""

    #: loftr+sift: SIFT's keypoints and LoFTR's exact tracks in one model (pipeline.ensemble); sacre_coeur with the
    #: offline loftr-compact: 10/10 registered (loftr alone: 2/10)
    matcher: MatcherName = "loftr+sift"
    weights: str | None = None  # LoFTR checkpoint name or path; None = outdoor
    device: Device = "auto"
    #: longest side(s) for matching (0 = original); several sizes are matched and merged; none = the matcher's own
    resize: tuple[int, ...] | None = None
    #: LoFTR autocast precision; bf16 is 2-3x faster on CPUs with AMX and on GPUs (keypoints move ~0.05 px);
    #: none = float32
    amp: AmpMode | None = None
    sift_backend: SiftBackend = SIFTOptions.backend  # SIFT implementation: COLMAP's (pycolmap) or OpenCV's

    def __post_init__(self) -> None:
        from matchers.factory import AMP_MODES, MATCHERS

        if self.matcher not in MATCHERS + ENSEMBLES:
            raise UserError(f"unknown matcher {self.matcher!r}; choose one of {', '.join(MATCHERS + ENSEMBLES)}")
        if self.amp is not None and (self.amp not in AMP_MODES or "loftr" not in self.matcher):
            raise UserError(f"--amp {self.amp} applies to the loftr matcher only, with one of {', '.join(AMP_MODES)}")
        if self.sift_backend not in SIFT_BACKENDS:
            raise UserError(f"unknown SIFT backend {self.sift_backend!r}; choose one of {', '.join(SIFT_BACKENDS)}")
        if self.resize is not None:
            object.__setattr__(self, "resize", tuple(int(size) for size in self.resize))
            if not self.resize:
                raise UserError("--resize needs at least one size (0 = original size)")
            split_resize(self.resize)  # negative sizes: a UserError now

    @property
    def parts(self) -> tuple[str, ...]:
        """The single matchers of the run ("loftr+sift" -> ("sift", "loftr"): the detector first, it gates)."""
        return tuple(sorted(self.matcher.split("+"), key=lambda name: name != "sift"))

    @property
    def primary(self) -> str:
        """The matcher whose options and figures a run reports (an ensemble's dense part)."""
        return dense_part(self.matcher)

    def make(self, part: str | None = None) -> Matcher:
        """The matcher ``part`` of this spec (default: the spec's own single matcher), weights loaded."""
        from matchers.factory import make_matcher

        name = part or self.matcher
        own = name != "sift" or name == self.matcher  # an ensemble's SIFT part takes no LoFTR options
        matcher_size, _ = split_resize(self.resize)
        return make_matcher(
            name,
            weights=self.weights if own else None,
            resize=matcher_size,
            device=self.device,
            amp=self.amp if own else None,
            **({"backend": self.sift_backend} if name == "sift" else {}),
        )


@dataclass(frozen=True)
class DenseMatchResult:
    """What :func:`run` did: output paths and figures for summaries and tests."""

    features: Path
    matches: Path
    num_pairs: int
    pairs_matched: int  # matched in this run
    pairs_reused: int  # raw matches found from an earlier (possibly interrupted) run
    prepare_calls: int  # matcher.prepare calls (one per image view on a cache miss)
    cache_hits: int
    cache_misses: int
    seconds_matching: float
    seconds_total: float
    up_to_date: bool  # outputs were already complete for this exact input; nothing was done
    keypoints_per_image: dict[str, int] = field(default_factory=dict)
    matches_per_pair: dict[Pair, int] = field(default_factory=dict)
    pairs_turned: int = 0  # rotation="auto": pairs matched in this run with image 1 turned
    turns: dict[Pair, int] = field(default_factory=dict)  # rotation="auto": (first, second) -> k, nonzero only
    tracks: TrackStats | None = None  # refine="tracks": how the tracks were built (None when up to date)
    seconds_shared_keypoints: float = 0.0  # exact tracks, or quantization (+ KLT along tracks)
    distributed: ShardStats | None = None  # --distributed ray: workers and shards retried
    #: this process's peak resident memory (MB, VmHWM) after raw matching and after the shared keypoints
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- pairs
def load_pairs(pairs_path: Path, image_dir: Path) -> list[Pair]:
    """Pairs of the file, validated against the image folder; self-pairs and duplicates dropped.

    An image that is not in ``image_dir`` is a :class:`UserError` naming the pairs file line.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: image folder not found; pass the folder the pairs file names refer to")
    listed = io.read_pairs(pairs_path)
    names = {name for pair in listed for name in pair}
    existing = {name for name in names if io.resolve_image(image_dir, name).is_file()}
    if existing != names:
        io.read_pairs(pairs_path, known_names=existing)  # raises, naming the first offending line
    pairs: list[Pair] = []
    seen: set[frozenset[str]] = set()
    for name0, name1 in listed:
        key = frozenset((name0, name1))
        if name0 == name1:
            logger.warning("%s: skipping the pair of %s with itself", pairs_path, name0)
        elif key not in seen:
            seen.add(key)
            pairs.append((name0, name1))
    if not pairs:
        raise UserError(f"{pairs_path}: no pairs to match; create them with `python -m pipeline.pairs`")
    return pairs


def plan_order(pairs: Sequence[Pair], capacity: int) -> list[int]:
    """An order of ``pairs`` (indices) that keeps an LRU cache of ``capacity`` images warm.

    Greedy, on a dry run of the same LRU cache the matching loop uses: take a pair whose two images
    are cached; else bring in the uncached image with the most remaining pairs to cached images; else
    start from the first remaining pair. Sequential pairs then read each image once; exhaustive pairs
    sweep a window of ``capacity`` images. Book-keeping is incremental (cost ~ pairs x cache size).
    """
    remaining: dict[str, dict[str, int]] = defaultdict(dict)  # image -> partner -> pair index
    rank: dict[str, int] = {}  # first appearance, for deterministic ties
    for index, (a, b) in enumerate(pairs):
        remaining[a][b] = index
        remaining[b][a] = index
        rank.setdefault(a, len(rank))
        rank.setdefault(b, len(rank))
    capacity = max(1, capacity)
    cached: LRUCache[None] = LRUCache(max_items=capacity)
    ready: dict[int, None] = {}  # pairs with both images cached (insertion-ordered set)
    votes: dict[str, int] = defaultdict(int)  # image -> cached images it still has a pair with

    def unvote(name: str) -> None:
        votes[name] -= 1
        if not votes[name]:
            del votes[name]  # keeps the candidate scan short

    def touch(name: str) -> None:
        if name in cached:
            cached.get(name)  # now the most recently used
            return
        evicted = cached.keys()[0] if len(cached) == capacity else None  # what put() drops
        cached.put(name, None)
        for partner, index in remaining[name].items():
            votes[partner] += 1
            if partner in cached:
                ready[index] = None
        if evicted is not None:
            for partner, index in remaining[evicted].items():
                unvote(partner)
                ready.pop(index, None)

    order: list[int] = []
    done = np.zeros(len(pairs), bool)
    next_unvisited = 0
    while len(order) < len(pairs):
        if ready:
            index = next(iter(ready))  # the oldest ready pair: its images are closest to eviction
        else:
            candidates = [p for p in votes if p not in cached]
            if candidates:
                best = max(candidates, key=lambda p: (votes[p], -rank[p]))
                index = min(i for partner, i in remaining[best].items() if partner in cached)
            else:
                while done[next_unvisited]:
                    next_unvisited += 1
                index = next_unvisited
        a, b = pairs[index]
        touch(a)
        touch(b)
        done[index] = True
        order.append(index)
        ready.pop(index, None)
        del remaining[a][b], remaining[b][a]
        if a in cached:
            unvote(b)
        if b in cached:
            unvote(a)
    return order


# -------------------------------------------------------------------------------------------- cache
def planned_loads(order: Sequence[Pair], capacity: int) -> list[str]:
    """The images the matching loop will have to read, in order (a dry run of its cache)."""
    cache: LRUCache[bool] = LRUCache(max_items=capacity)
    loads: list[str] = []
    for pair in order:
        for name in pair:
            if cache.get(name) is None:
                loads.append(name)
                cache.put(name, True)
    return loads


class ImagePrefetcher:
    """Decodes the images the loop will need, in order, a few ahead, on background threads."""

    def __init__(self, image_dir: Path, plan: Sequence[str], num_workers: int, lookahead: int | None = None) -> None:
        self.image_dir = Path(image_dir)
        self._plan = deque(plan)
        self._pending: deque[tuple[str, Future]] = deque()
        self._executor = (
            ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="image-loader") if num_workers else None
        )
        self._lookahead = lookahead if lookahead is not None else 2 * num_workers + 2
        self._fill()

    def _read(self, name: str) -> np.ndarray:
        return read_gray(io.resolve_image(self.image_dir, name))

    def _fill(self) -> None:
        while self._executor is not None and self._plan and len(self._pending) < self._lookahead:
            name = self._plan.popleft()
            self._pending.append((name, self._executor.submit(self._read, name)))

    def take(self, name: str) -> np.ndarray:
        """The decoded image ``name`` (a read error is raised here, naming the file)."""
        if self._pending and self._pending[0][0] == name:
            _, future = self._pending.popleft()
            self._fill()
            return future.result()
        if self._executor is not None:  # the loop diverged from the plan; should not happen
            logger.debug("image %s was not prefetched", name)
        elif self._plan and self._plan[0] == name:
            self._plan.popleft()
        return self._read(name)

    def close(self) -> None:
        if self._executor is not None:
            for _, future in self._pending:
                future.cancel()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "ImagePrefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- raw store
# ------------------------------------------------------------------------------------------ helpers
def describe_matching(matcher: Matcher, config: DenseMatchConfig) -> dict[str, Any]:
    """Everything that changes raw matches: the matcher and the augmentations (not the quantization)."""
    tta = config.tta_config()
    return {
        "matcher": matcher.describe(),
        "class": f"{type(matcher).__module__}.{type(matcher).__qualname__}",
        "rotation": tta.rotation,
        "resize": list(tta.resize),
        "both_directions": tta.both_directions,
        "verify_threshold": tta.verify_threshold if tta.rotation == "best" else None,
        # Absent when off, so raw matches of earlier runs stay valid.
        **({"refine": asdict(config.refine_config())} if config.refine_config().enabled else {}),
        **({"orientation": asdict(OrientationConfig())} if tta.rotation == "auto" else {}),
    }


def _load_reference(path: Path | None, names: set[str]) -> dict[str, tuple[ImageKeypoints, tuple[int, int]]]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: reference features file not found")
    reference = {}
    for name, (keypoints, scores, size) in io.read_features(path).items():
        if name in names:
            reference[name] = (ImageKeypoints(keypoints.reshape(-1, 2), scores.reshape(-1)), size)
    return reference


def _count_outputs(features: Path, matches: Path, pairs: Sequence[Pair]) -> tuple[dict[str, int], dict[Pair, int]]:
    with io.open_h5(features) as file:
        names = sorted({n for p in pairs for n in p})
        keypoints = {name: int(file[name]["keypoints"].shape[0]) for name in names}
    with io.open_h5(matches) as file:
        counts = {pair: int((file[io.names_to_pair(*pair)]["matches0"][()] > -1).sum()) for pair in pairs}
    return keypoints, counts


# --------------------------------------------------------------------------------------------- main
@dataclass(frozen=True)
class _RunInputs:
    """A run's validated inputs: its pairs and images, the fixed reference keypoints, where its raw matches
    live, and the stamp of everything its outputs depend on."""

    pairs: list[Pair]
    names: list[str]
    reference: dict[str, tuple[ImageKeypoints, tuple[int, int]]]
    store: RawMatchStore
    stamp: str
    stamp_path: Path


def _read_inputs(
    pairs: Path,
    image_dir: Path,
    matches: Path,
    matcher: Matcher,
    config: DenseMatchConfig,
    reference_features: Path | None,
) -> _RunInputs:
    pair_list = load_pairs(Path(pairs), image_dir)
    names = sorted({name for pair in pair_list for name in pair})
    reference = _load_reference(reference_features, set(names))
    store = RawMatchStore(matches, describe_matching(matcher, config), image_dir)
    stamp = digest(
        {
            "matching": store.digest,
            "quantize": asdict(config.quantize_config()) if config.refine != "tracks" else None,
            **({"tracks": asdict(config.track_config())} if config.refine == "tracks" else {}),
            "pairs": pair_list,
            "images": [file_state(io.resolve_image(image_dir, name)) for name in names],
            "reference": None
            if reference_features is None
            else [str(reference_features), file_state(Path(reference_features))],
        }
    )
    return _RunInputs(pair_list, names, reference, store, stamp, raw_root(matches) / "done.json")


def _up_to_date_result(inputs: _RunInputs, features: Path, matches: Path, start: float) -> DenseMatchResult | None:
    """The result of an identical earlier run whose outputs are intact; None when there is work to do."""
    if not _up_to_date(inputs.stamp_path, inputs.stamp, features, matches):
        return None
    try:
        keypoints_count, match_count = _count_outputs(features, matches, inputs.pairs)
    except (UserError, KeyError, OSError):
        return None  # unreadable despite the stamp: recompute
    logger.info("%s and %s are up to date", features, matches)
    num_pairs = len(inputs.pairs)
    return DenseMatchResult(
        features,
        matches,
        num_pairs,
        pairs_matched=0,
        pairs_reused=num_pairs,
        prepare_calls=0,
        cache_hits=0,
        cache_misses=0,
        seconds_matching=0.0,
        seconds_total=time.perf_counter() - start,
        up_to_date=True,
        keypoints_per_image=keypoints_count,
        matches_per_pair=match_count,
        turns=_recorded_turns(inputs.stamp_path),
    )


def _image_sizes(inputs: _RunInputs, image_dir: Path) -> dict[str, tuple[int, int]]:
    """(W, H) of every image; a file that is not an image fails now, naming it, not after an hour of matching."""
    reference = inputs.reference
    return {
        name: reference[name][1]
        if name in reference and all(reference[name][1])
        else image_size(io.resolve_image(image_dir, name))
        for name in inputs.names
    }


def _coarse_grids(matcher: Matcher, inputs: _RunInputs, sizes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """The matcher's coarse cells of every image, which exact tracks are built on."""
    if inputs.reference:
        raise UserError("--refine tracks rebuilds every keypoint; with --reference-features use --refine klt")
    grids = {name: matcher.coarse_grid(sizes[name]) for name in inputs.names}
    if any(grid is None for grid in grids.values()):
        raise UserError(
            f"--refine tracks needs a detector-free matcher with coarse cells (e.g. loftr), "
            f"not {matcher.name}; use --refine none"
        )
    return grids


@dataclass(frozen=True)
class _MatchingPlan:
    """Which pairs still need raw matches, which are matched swapped, and every pair's quarter turn."""

    todo: list[Pair]
    swapped: dict[Pair, bool]  # (a, b) is matched as (b, a): b keeps reference keypoints, a does not
    turns: dict[Pair, int]  # rotation="auto": (first, second) as matched -> quarter turns of the second

    @property
    def reused(self) -> int:
        return len(self.swapped) - len(self.todo)


def _plan_matching(inputs: _RunInputs, image_dir: Path, config: DenseMatchConfig) -> _MatchingPlan:
    # The image with fixed keypoints goes second: the matcher refines its second image's points.
    swapped = {(a, b): a in inputs.reference and b not in inputs.reference for a, b in inputs.pairs}

    def stored(pair: Pair) -> bool:
        found = inputs.store.load(pair, swapped[pair])
        # Exact tracks need the coarse cells, which raw matches of older runs do not carry.
        return found is not None and (config.refine != "tracks" or found.has_coarse)

    todo = [pair for pair in inputs.pairs if not stored(pair)]
    if len(todo) < len(inputs.pairs):
        logger.info(
            "reusing raw matches of %d/%d pairs from %s",
            len(inputs.pairs) - len(todo),
            len(inputs.pairs),
            inputs.store.root,
        )
    oriented = [(b, a) if swapped[(a, b)] else (a, b) for a, b in inputs.pairs]
    # Quarter turns of every pair: for matching the new ones, refining tracks through all, and the record.
    turns = _quarter_turns(image_dir, oriented) if config.rotation == "auto" else {}
    return _MatchingPlan(todo, swapped, turns)


#: images whose SIFT features the rotation vote keeps (about 1 MB each at its 640 px / 2,000 features), visited in
#: the cache-friendly order (the votes do not depend on it; temple_ring's 1,081 pairs: the same 496 turned). 400
#: rendered views: peak RSS of the vote 248 -> 149 MB on 1,985 sequential pairs and 259 -> 145 MB (57.9 -> 42.9 s)
#: on 1,996 shuffled retrieval-like pairs, against 256 images in the given order
ORIENTATION_CACHE = 32


def _quarter_turns(image_dir: Path, oriented: Sequence[Pair]) -> dict[Pair, int]:
    order = plan_order(oriented, ORIENTATION_CACHE)
    return estimate_quarter_turns(image_dir, [oriented[i] for i in order], cache_size=ORIENTATION_CACHE)


def _shared_keypoints(
    inputs: _RunInputs,
    plan: _MatchingPlan,
    grids: Mapping[str, Any] | None,
    image_dir: Path,
    config: DenseMatchConfig,
    distributed: DistributedConfig = DistributedConfig(),
) -> tuple[QuantizedMatches, TrackStats | None]:
    """The raw matches of every pair as shared keypoints per image: exact tracks, or quantized (then refined
    along tracks with ``refine="klt"``)."""
    raw = StoredMatches(inputs.store, plan.swapped)
    load = lambda name: read_gray(io.resolve_image(image_dir, name))  # noqa: E731
    if grids is not None:
        # The refinement's workers read the images from image_dir: not where they were shipped to instead.
        spread = distributed if not ships_images(distributed) else DistributedConfig()
        quantized, track_stats = build_tracks(raw, grids, load, plan.turns, config.track_config(), distributed=spread)
        logger.info(
            "exact tracks: %d tracks over %d observations; %d of %d raw matches in tracks (%d conflicts); "
            "%d of %d observations refined against their reference",
            track_stats.tracks,
            track_stats.observations,
            track_stats.in_tracks,
            track_stats.raw_matches,
            track_stats.conflicts,
            track_stats.refined,
            track_stats.candidates,
        )
        return quantized, track_stats
    reference = {name: keypoints for name, (keypoints, _) in inputs.reference.items()}
    quantized = aggregate_matches(inputs.pairs, raw, config.quantize_config(), reference)
    refine = config.refine_config()
    if refine.enabled:
        quantized, klt = refine_tracks(quantized, load, refine, plan.turns, fixed=set(inputs.reference))
        logger.info("track refinement: %d tracks, %d of %d keypoints moved", klt.tracks, klt.moved, klt.candidates)
    return quantized, None


def _write_outputs(
    quantized: QuantizedMatches,
    sizes: Mapping[str, tuple[int, int]],
    features: Path,
    matches: Path,
    inputs: _RunInputs,
    turned: Mapping[Pair, int],
) -> None:
    """features.h5, matches.h5, then the stamp that lets an identical re-run return at once."""
    io.write_features(
        features, {name: (kp.keypoints, kp.scores, sizes[name]) for name, kp in quantized.keypoints.items()}
    )
    io.write_matches(matches, quantized.padded_matches(), quantized.padded_bytes())
    io.write_text_atomic(
        inputs.stamp_path,
        json.dumps(
            {
                "stamp": inputs.stamp,
                "features": file_state(features),
                "matches": file_state(matches),
                "turns": [[first, second, k] for (first, second), k in sorted(turned.items())],
            }
        ),
    )


def run(
    pairs: Path,
    image_dir: Path,
    features: Path,
    matches: Path,
    matcher: Matcher,
    config: DenseMatchConfig | None = None,
    reference_features: Path | None = None,
    distributed: DistributedConfig = DistributedConfig(),
    worker_matcher: Callable[[], Matcher] | None = None,
) -> DenseMatchResult:
    """Match every pair of ``pairs``, quantize into shared keypoints, write ``features`` and ``matches``.

    ``distributed``: raw matching in shards over Ray workers, each building its matcher once with
    ``worker_matcher`` (default: a copy of ``matcher``); the same matches as in this process.

    ``config`` None: :class:`DenseMatchConfig`'s plain (hloc) options; :func:`dense_defaults` gives a matcher's own.
    Resumable: raw matches of finished pairs are reused (same matcher and matching options), and an
    identical re-run returns at once. Returns the paths and figures (prepare calls, cache hits...).
    """
    start = time.perf_counter()
    config = config if config is not None else DenseMatchConfig()
    image_dir, features, matches = Path(image_dir), Path(features), Path(matches)
    inputs = _read_inputs(pairs, image_dir, matches, matcher, config, reference_features)
    finished = _up_to_date_result(inputs, features, matches, start)
    if finished is not None:
        return finished
    sizes = _image_sizes(inputs, image_dir)
    grids = _coarse_grids(matcher, inputs, sizes) if config.refine == "tracks" else None
    plan = _plan_matching(inputs, image_dir, config)
    match_start = time.perf_counter()
    stats = _match_pairs(plan, image_dir, matcher, config, inputs.store, distributed, worker_matcher)
    seconds_matching = time.perf_counter() - match_start
    peak_after_matching = peak_rss_mb()
    quantized, track_stats = _shared_keypoints(inputs, plan, grids, image_dir, config, distributed)
    seconds_shared = time.perf_counter() - match_start - seconds_matching
    turned = {pair: k for pair, k in plan.turns.items() if k}
    _write_outputs(quantized, sizes, features, matches, inputs, turned)
    keypoints_count = {name: len(kp) for name, kp in quantized.keypoints.items()}
    match_count = {pair: pm.num_matches for pair, pm in quantized.matches.items()}
    logger.info(
        "%d pairs (%d matched, %d reused) in %.1f s, %d prepare calls; mean %.0f keypoints/image, %.0f matches/pair",
        len(inputs.pairs),
        len(plan.todo),
        plan.reused,
        time.perf_counter() - start,
        stats.prepare_calls,
        np.mean(list(keypoints_count.values()) or [0]),
        np.mean(list(match_count.values()) or [0]),
    )
    return DenseMatchResult(
        features,
        matches,
        len(inputs.pairs),
        pairs_matched=len(plan.todo),
        pairs_reused=plan.reused,
        prepare_calls=stats.prepare_calls,
        cache_hits=stats.cache_hits,
        cache_misses=stats.cache_misses,
        seconds_matching=seconds_matching,
        seconds_total=time.perf_counter() - start,
        up_to_date=False,
        keypoints_per_image=keypoints_count,
        matches_per_pair=match_count,
        pairs_turned=stats.pairs_turned,
        turns=turned,
        tracks=track_stats,
        seconds_shared_keypoints=seconds_shared,
        distributed=stats.distributed,
        peak_rss_mb={"raw_matching": round(peak_after_matching, 1), "shared_keypoints": round(peak_rss_mb(), 1)},
    )


def _recorded_turns(stamp_path: Path) -> dict[Pair, int]:
    """The nonzero quarter turns a finished run recorded in its stamp (rotation="auto")."""
    try:
        return {(first, second): int(k) for first, second, k in json.loads(stamp_path.read_text()).get("turns", [])}
    except (OSError, ValueError, TypeError):
        return {}


def _up_to_date(stamp_path: Path, stamp: str, features: Path, matches: Path) -> bool:
    try:
        done = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(done, dict)
        and done.get("stamp") == stamp
        and done.get("features") == file_state(features)
        and done.get("matches") == file_state(matches)
    )


# ------------------------------------------------------------------------------------ raw matching
@dataclass(frozen=True)
class _LoopStats:
    prepare_calls: int
    cache_hits: int
    cache_misses: int
    pairs_turned: int
    distributed: ShardStats | None = None


class _PreparedImages:
    """The prepared views of the images being matched, in an LRU cache of ``cache_size`` images, decoded by
    ``loader``; with ``keep_pixels`` also their uint8 originals (for KLT), as long as their cache entry."""

    def __init__(
        self,
        matcher: Matcher,
        loader: ImagePrefetcher,
        views: Mapping[str, set[View]],
        cache_size: int,
        keep_pixels: bool,
    ) -> None:
        self.matcher, self.loader, self.views, self.keep_pixels = matcher, loader, views, keep_pixels
        self.cache: LRUCache[dict[View, PreparedView]] = LRUCache(max_items=cache_size)
        self.pixels: dict[str, np.ndarray] = {}
        self.prepare_calls = 0

    def __getitem__(self, name: str) -> dict[View, PreparedView]:
        entry = self.cache.get(name)
        if entry is None:
            image = self.loader.take(name)
            entry = {view: prepare_view(self.matcher, image, view) for view in sorted(self.views[name], key=_view_key)}
            self.prepare_calls += len(entry)
            self.cache.put(name, entry)
            if self.keep_pixels:
                self.pixels[name] = to_uint8(image)
        return entry

    def forget_evicted(self) -> None:
        """Drop the originals of images no longer cached (called between batches, whose pairs may need them)."""
        for evicted in set(self.pixels) - set(self.cache.keys()):
            del self.pixels[evicted]


def _views_needed(oriented: Sequence[Pair], tta: TTAConfig, turns: Mapping[Pair, int]) -> dict[str, set[View]]:
    """Every view (size x quarter turn) each image is matched at, as first or as second image."""
    views: dict[str, set[View]] = defaultdict(set)
    for pair in oriented:
        views[pair[0]].update(first_views(tta))
        views[pair[1]].update(second_views(tta, turns.get(pair, 0)))
    return views


def _match_chunk(
    matcher: Matcher,
    images: _PreparedImages,
    pairs: Sequence[Pair],
    tta: TTAConfig,
    turns: Mapping[Pair, int],
    batched: bool,
) -> list[Matches]:
    """Raw matches of consecutive pairs: in one matcher call when ``batched`` (each pair matched once), else
    one pair at a time with its augmentations."""
    if batched:
        size = tta.resize[0]
        views = [
            (images[first][View(size, 0)], images[second][View(size, turns.get((first, second), 0))])
            for first, second in pairs
        ]
        return match_views_batch(matcher, views)
    return [
        match_pair(matcher, images[first], images[second], tta, turns.get((first, second), 0)).matches
        for first, second in pairs
    ]


def _match_pairs(
    plan: _MatchingPlan,
    image_dir: Path,
    matcher: Matcher,
    config: DenseMatchConfig,
    store: RawMatchStore,
    distributed: DistributedConfig = DistributedConfig(),
    worker_matcher: Callable[[], Matcher] | None = None,
) -> _LoopStats:
    """Raw-match the pairs of ``plan.todo`` and store each result as soon as its batch (or shard) is computed."""
    # Matching order of each pair: (first, second); the second image gets the rotations.
    oriented = [(b, a) if plan.swapped[(a, b)] else (a, b) for a, b in plan.todo]
    turned = sum(plan.turns.get(pair, 0) != 0 for pair in oriented)
    if config.rotation == "auto" and oriented:
        logger.info("rotation auto: %d of %d pairs matched with image 1 turned", turned, len(oriented))
    order = plan_order(oriented, config.cache_size)
    ordered = [oriented[i] for i in order]
    original = {oriented[i]: plan.todo[i] for i in order}

    def save(pairs: Sequence[Pair], results: Sequence[Matches]) -> None:
        items = []
        for first_second, result in zip(pairs, results):
            pair = original[first_second]
            items.append((pair, plan.swapped[pair], result.swapped() if plan.swapped[pair] else result))
        store.save_many(items)

    with tqdm(total=len(ordered), desc="matching", unit="pair", smoothing=0.1, disable=not ordered) as bar:
        if distributed.distributed == "none":
            stats = _match_ordered(matcher, image_dir, ordered, config, plan.turns, save, bar.update)
            return dataclasses.replace(stats, pairs_turned=turned)
        task = MatchShardTask(worker_matcher or (lambda: matcher), image_dir, config, plan.turns)
        shard_stats = ShardStats()
        totals = np.zeros(3, int)
        per_shard = shard_size(len(ordered), distributed, distributed.shard_pairs, _batching(matcher, config)[1])
        shards: Sequence[Any] = [list(ordered[i : i + per_shard]) for i in range(0, len(ordered), per_shard)]
        if ships_images(distributed):
            shards = ShippedShards(shards, image_dir)
        for outcome in run_shards(task, shards, distributed, shard_stats):
            pairs, results, loop = outcome.result
            save(pairs, results)
            totals += (loop.prepare_calls, loop.cache_hits, loop.cache_misses)
            bar.update(len(pairs))
    return _LoopStats(*map(int, totals), turned, shard_stats)


def _batching(matcher: Matcher, config: DenseMatchConfig) -> tuple[bool, int]:
    """(batched, pairs per matcher call). Pairs matched once each (no rotation / multi-size / two-way TTA) go to the
    matcher in batches of consecutive pairs of the cache-friendly order; shards hold whole batches, so a worker
    forms the same batches as one process (the same matches)."""
    batched = config.tta_config().single_pass and matcher.batches_pairs
    return batched, config.batch_pairs if batched else 1


@dataclass
class MatchShardTask:
    """Raw matching of shards of pairs in a worker (:mod:`core.distributed`): the matcher is built once per
    worker by ``make_matcher``, each shard is matched exactly as one process matches those pairs."""

    make_matcher: Callable[[], Matcher]
    image_dir: Path
    config: DenseMatchConfig
    turns: dict[Pair, int]

    def setup(self) -> None:
        self.matcher = self.make_matcher()

    def run(self, shard: list[Pair] | ShippedShard) -> tuple[list[Pair], list[Matches], _LoopStats]:
        results: list[Matches] = []
        shipped = isinstance(shard, ShippedShard)
        pairs = shard.pairs if shipped else shard
        with tempfile.TemporaryDirectory(prefix="loftr-sfm-shard-") if shipped else nullcontext() as folder:
            if shipped:  # the images came with the shard: match them from a local folder
                for name, data in shard.images.items():
                    path = Path(folder) / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
            image_dir = Path(folder) if shipped else self.image_dir
            stats = _match_ordered(
                self.matcher, image_dir, pairs, self.config, self.turns, lambda _, r: results.extend(r), None
            )
        return pairs, results, stats


@dataclass(frozen=True)
class ShippedShard:
    """A shard of pairs with the bytes of its image files (Ray's object store carries them to the worker)."""

    pairs: list[Pair]
    images: dict[str, bytes]


class ShippedShards(Sequence[ShippedShard]):
    """Shards whose image files are read when a shard is sent (not all at once: a job's images may not fit)."""

    def __init__(self, shards: Sequence[list[Pair]], image_dir: Path) -> None:
        self.shards, self.image_dir = shards, image_dir

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> ShippedShard:  # type: ignore[override]
        pairs = self.shards[index]
        names = sorted({name for pair in pairs for name in pair})
        return ShippedShard(pairs, {name: io.resolve_image(self.image_dir, name).read_bytes() for name in names})


def _match_ordered(
    matcher: Matcher,
    image_dir: Path,
    ordered: Sequence[Pair],
    config: DenseMatchConfig,
    turns: Mapping[Pair, int],
    on_batch: Callable[[Sequence[Pair], Sequence[Matches]], None],
    progress: Callable[[int], object] | None,
) -> _LoopStats:
    """Match (first, second) pairs in the given order, per-image views cached; ``on_batch`` gets each batch."""
    tta, refine = config.tta_config(), config.refine_config()
    batched, batch = _batching(matcher, config)
    loads = planned_loads(ordered, config.cache_size)
    with ImagePrefetcher(image_dir, loads, config.num_workers) as loader:
        images = _PreparedImages(matcher, loader, _views_needed(ordered, tta, turns), config.cache_size, refine.enabled)
        for start in range(0, len(ordered), batch):
            pairs = ordered[start : start + batch]
            results = _match_chunk(matcher, images, pairs, tta, turns, batched)
            if refine.enabled:
                results = [
                    refine_matches(images.pixels[a], images.pixels[b], r, refine, turns.get((a, b), 0))[0]
                    for (a, b), r in zip(pairs, results)
                ]
            on_batch(pairs, results)
            images.forget_evicted()
            if progress is not None:
                progress(len(pairs))
    return _LoopStats(images.prepare_calls, images.cache.hits, images.cache.misses, 0)


def _view_key(view: View) -> tuple[int, int]:
    return (-1 if view.size is None else view.size, view.rotation)


def main(
    pairs: Path,
    image_dir: Path,
    features: Path,
    matches: Path,
    matcher: Matcher | MatcherSpec = MatcherSpec(matcher="loftr"),
    config: DenseMatchConfig | None = None,
    reference_features: Path | None = None,
    distributed: DistributedConfig = DistributedConfig(),
    worker_matcher: Callable[[], Matcher] | None = None,
) -> DenseMatchResult:
    """Match, quantize and write hloc files (see :func:`run`; ``worker_matcher``: how Ray workers build a
    ready ``matcher``, default a copy of it).

    ``matcher``: a built :class:`~matchers.base.Matcher`, or a :class:`MatcherSpec` built here once the inputs
    are checked (a single matcher; ensembles are pipeline.reconstruct's). ``config`` None: a spec's matcher gets
    :func:`dense_defaults` (what pipeline.reconstruct runs); a built matcher :class:`DenseMatchConfig`'s defaults.
    """
    if isinstance(matcher, MatcherSpec):
        if len(matcher.parts) > 1:
            raise UserError(
                f"--matcher {matcher.matcher} is an ensemble of matchers; pipeline.match_dense runs one matcher "
                f"({' or '.join(matcher.parts)}); pipeline.reconstruct runs ensembles"
            )
        config = config if config is not None else dense_defaults(matcher.matcher, matcher.resize)
        # Validate inputs before a checkpoint is loaded.
        io.check_match_outputs(features, matches)  # a folder / read-only place fails before any pair is matched
        load_pairs(Path(pairs), Path(image_dir))
        spec, matcher = matcher, matcher.make()
        return run(pairs, image_dir, features, matches, matcher, config, reference_features, distributed, spec.make)
    return run(pairs, image_dir, features, matches, matcher, config, reference_features, distributed, worker_matcher)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import WEIGHTS_HELP

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.match_dense",
        description="Match image pairs densely and quantize the matches into hloc features.h5 / matches.h5.",
    )
    parser.add_argument("--images", type=Path, required=True, help="image folder (pairs name paths relative to it)")
    parser.add_argument("--pairs", type=Path, required=True, help="pairs.txt, one 'name0 name1' per line")
    parser.add_argument("--features", type=Path, required=True, help="output features.h5")
    parser.add_argument("--matches", type=Path, required=True, help="output matches.h5")
    parser.add_argument(
        "--reference-features",
        type=Path,
        default=None,
        help="features.h5 whose images keep their keypoints (localization)",
    )
    defaults = _parameter_default(main, "matcher")
    helps = {"weights": WEIGHTS_HELP, "matcher": "loftr or sift (pipeline.reconstruct runs the loftr+sift ensemble)"}
    add_config_arguments(parser, MatcherSpec, defaults=defaults, helps=helps)
    add_config_arguments(parser, DenseOverrides)
    add_config_arguments(parser, DenseMatchConfig, exclude=(*MATCHER_DEPENDENT, "resize"))
    add_config_arguments(parser, DistributedConfig)
    return parser


def _parameter_default(function: Callable[..., Any], parameter: str) -> Any:
    """The default value of ``function``'s ``parameter`` (a CLI takes its preset from the API it calls)."""
    import inspect

    return inspect.signature(function).parameters[parameter].default


def configs_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[MatcherSpec, DenseMatchConfig]:
    """The matcher and the dense matching options a command line asks for (matcher-dependent ones derived by
    :func:`dense_defaults`, as pipeline.reconstruct derives them)."""
    spec = config_from_options(parser, args, MatcherSpec)
    overrides = config_from_options(parser, args, DenseOverrides)
    base = config_from_options(parser, args, DenseMatchConfig)
    return spec, dense_defaults(spec.matcher, spec.resize, overrides, base=base)


def main_cli(argv: Sequence[str] | None = None) -> DenseMatchResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec, config = configs_from_args(parser, args)
    distributed = config_from_options(parser, args, DistributedConfig)
    result = main(
        args.pairs, args.images, args.features, args.matches, spec, config, args.reference_features, distributed
    )
    print(f"wrote {result.features} and {result.matches}")
    return result


if __name__ == "__main__":
    run_cli(main_cli)
