"""Dense matching over a pairs file, quantized into shared per-image keypoints, written as hloc HDF5.

    python -m pipeline.match_dense --images DIR --pairs pairs.txt --features F.h5 --matches M.h5 \\
        --matcher sift|loftr [--weights W] [--resize 640 [840 ...]] [--rotation none|auto|best|union] \\
        [--both-directions] [--refine none|klt] [--cell-size 8] [--max-error 2] [--max-kps 8192] \\
        [--reference-features REF.h5] [--device auto|cpu|cuda]

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
3. **Output**: hloc ``features.h5`` and ``matches.h5`` (``matches0`` padded to N0), both atomic.
   A stamp in ``<matches>.raw/done.json`` lets an identical re-run return at once.

Pairs whose first image is a reference image and second is not are matched swapped (as hloc does):
LoFTR refines the keypoints of its second image only, and refined points snap to fixed keypoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
import zipfile
from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core import io
from core.errors import UserError, run_cli
from core.image_io import image_size, read_gray, to_uint8
from matchers.base import Matcher, Matches
from pipeline.orientation import OrientationConfig, estimate_quarter_turns
from pipeline.quantize import POSITIONS, ImageKeypoints, QuantizeConfig, aggregate_matches
from pipeline.refine import MATCH_REFINE_MODES, RefineConfig, refine_matches, refine_tracks
from pipeline.tracks import TrackConfig, TrackStats, build_tracks
from pipeline.tta import (
    ROTATION_MODES,
    PreparedView,
    TTAConfig,
    View,
    first_views,
    match_pair,
    match_views_batch,
    prepare_view,
    second_views,
)

logger = logging.getLogger(__name__)

Pair = tuple[str, str]


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DenseMatchConfig:
    """Options of the dense matching step (quantization follows hloc's ``loftr_aachen`` defaults)."""

    cell_size: int = 8  # quantization grid (px): at most one keypoint per cell
    max_error: float = 2.0  # sub-bin size and re-assignment radius (px)
    max_kps: int | None = 8192  # keypoints kept per image (best summed confidence); None = all
    both_directions: bool = False  # union of (0, 1) and (1, 0) matching
    rotation: str = "none"  # none | auto (SIFT's quarter turn per pair) | best | union (image 1 at 0/90/180/270)
    resize: tuple[int | None, ...] = (None,)  # several sizes -> matches merged; None = matcher's own resize
    cache_size: int = 16  # prepared images kept (LRU); each holds all views the image needs
    batch_pairs: int = 8  # pairs per matcher call when each pair is matched once (LoFTR batches equal sizes)
    num_workers: int = 1  # prefetching loader threads (0 = read in the main thread)
    keypoint_position: str = "mean"  # "mean" (weighted mean of the best sub-bin) or "bin" (hloc: its node)
    verify_threshold: float = 1.0  # px, MAGSAC++ threshold used by rotation="best"
    #: none | klt: Lucas-Kanade sub-pixel refinement of each pair's image-1 points, then quantization |
    #: tracks: exact tracks on the matcher's coarse cells, each refined against a reference view (pipeline.tracks)
    refine: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", tuple(self.resize))
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
    cached: OrderedDict[str, None] = OrderedDict()
    ready: dict[int, None] = {}  # pairs with both images cached (insertion-ordered set)
    votes: dict[str, int] = defaultdict(int)  # image -> cached images it still has a pair with

    def unvote(name: str) -> None:
        votes[name] -= 1
        if not votes[name]:
            del votes[name]  # keeps the candidate scan short

    def touch(name: str) -> None:
        if name in cached:
            cached.move_to_end(name)
            return
        cached[name] = None
        for partner, index in remaining[name].items():
            votes[partner] += 1
            if partner in cached:
                ready[index] = None
        if len(cached) > capacity:
            evicted, _ = cached.popitem(last=False)
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
class LRUCache:
    """A bounded least-recently-used map (the prepared-image cache and its planning simulation)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: str, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._items)


def planned_loads(order: Sequence[Pair], capacity: int) -> list[str]:
    """The images the matching loop will have to read, in order (a dry run of its cache)."""
    cache = LRUCache(capacity)
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
def _digest(payload: Any, length: int = 16) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


class RawMatchStore:
    """Raw per-pair matches, one atomically written ``.npz`` per pair, under a matching-config digest.

    A process killed at any point leaves only complete files (temp file + rename); a file that cannot
    be read anyway (disk full, manual tampering) counts as missing and is recomputed.
    """

    def __init__(self, matches_path: Path, description: Mapping[str, Any], image_dir: Path | None = None) -> None:
        self.description = dict(description)
        self.digest = _digest(self.description)
        self.root = raw_root(matches_path) / self.digest
        self.image_dir = image_dir

    def _path(self, pair: Pair, swapped: bool) -> Path:
        # The images' size and modification time are part of the key: a folder rebuilt with the same
        # names must not silently reuse matches of the old images.
        states = [] if self.image_dir is None else [_file_state(io.resolve_image(self.image_dir, n)) for n in pair]
        return self.root / f"{_digest([pair[0], pair[1], swapped, *states], 24)}.npz"

    def load(self, pair: Pair, swapped: bool) -> Matches | None:
        path = self._path(pair, swapped)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if (str(data["name0"]), str(data["name1"])) != pair:
                    return None
                coarse = "coarse0" in data.files
                return Matches(
                    data["keypoints0"].astype(np.float32).reshape(-1, 2),
                    data["keypoints1"].astype(np.float32).reshape(-1, 2),
                    data["scores"].astype(np.float32).reshape(-1),
                    data["coarse0"].astype(np.float32).reshape(-1, 2) if coarse else None,
                    data["coarse1"].astype(np.float32).reshape(-1, 2) if coarse else None,
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logger.warning("%s: unreadable raw matches (%s); recomputing them", path, error)
            return None

    def save(self, pair: Pair, swapped: bool, matches: Matches) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            io.write_text_atomic(self.root / "matcher.json", json.dumps(self.description, indent=2, default=str))
        with io.atomic_path(self._path(pair, swapped)) as temp, open(temp, "wb") as handle:
            np.savez(
                handle,
                name0=np.array(pair[0]),
                name1=np.array(pair[1]),
                keypoints0=matches.keypoints0.astype(np.float32),
                keypoints1=matches.keypoints1.astype(np.float32),
                scores=matches.scores.astype(np.float32),
                **(
                    {"coarse0": matches.coarse0.astype(np.float32), "coarse1": matches.coarse1.astype(np.float32)}
                    if matches.has_coarse
                    else {}
                ),
            )


def raw_root(matches_path: Path) -> Path:
    """The folder of raw matches and stamps kept next to ``matches.h5``."""
    return Path(str(matches_path) + ".raw")


class _RawMatches(Mapping[Pair, Matches]):
    """Lazy read-only view of the stored raw matches, as :func:`aggregate_matches` wants them."""

    def __init__(self, store: RawMatchStore, swapped: Mapping[Pair, bool]) -> None:
        self._store = store
        self._swapped = swapped

    def __getitem__(self, pair: Pair) -> Matches:
        matches = self._store.load(pair, self._swapped[pair])
        if matches is None:
            raise UserError(f"{self._store.root}: raw matches of {pair} vanished during the run; run again")
        return matches

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._swapped)

    def __len__(self) -> int:
        return len(self._swapped)


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


def _file_state(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


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
def run(
    pairs: Path,
    image_dir: Path,
    features: Path,
    matches: Path,
    matcher: Matcher,
    config: DenseMatchConfig | None = None,
    reference_features: Path | None = None,
) -> DenseMatchResult:
    """Match every pair of ``pairs``, quantize into shared keypoints, write ``features`` and ``matches``.

    Resumable: raw matches of finished pairs are reused (same matcher and matching options), and an
    identical re-run returns at once. Returns the paths and figures (prepare calls, cache hits...).
    """
    start = time.perf_counter()
    config = config if config is not None else DenseMatchConfig()
    image_dir, features, matches = Path(image_dir), Path(features), Path(matches)
    pair_list = load_pairs(Path(pairs), image_dir)
    names = sorted({name for pair in pair_list for name in pair})
    reference = _load_reference(reference_features, set(names))
    store = RawMatchStore(matches, describe_matching(matcher, config), image_dir)

    stamp = _digest(
        {
            "matching": store.digest,
            "quantize": asdict(config.quantize_config()) if config.refine != "tracks" else None,
            **({"tracks": asdict(config.track_config())} if config.refine == "tracks" else {}),
            "pairs": pair_list,
            "images": [_file_state(io.resolve_image(image_dir, name)) for name in names],
            "reference": None
            if reference_features is None
            else [str(reference_features), _file_state(Path(reference_features))],
        }
    )
    stamp_path = raw_root(matches) / "done.json"
    if _up_to_date(stamp_path, stamp, features, matches):
        try:
            keypoints_count, match_count = _count_outputs(features, matches, pair_list)
        except (UserError, KeyError, OSError):
            pass  # unreadable despite the stamp: recompute below
        else:
            logger.info("%s and %s are up to date", features, matches)
            return DenseMatchResult(
                features,
                matches,
                len(pair_list),
                0,
                len(pair_list),
                0,
                0,
                0,
                0.0,
                time.perf_counter() - start,
                True,
                keypoints_count,
                match_count,
                0,
                _recorded_turns(stamp_path),
            )

    # Sizes first: a file that is not an image fails now, naming it, not after an hour of matching.
    sizes = {
        name: reference[name][1]
        if name in reference and all(reference[name][1])
        else image_size(io.resolve_image(image_dir, name))
        for name in names
    }

    # The image with fixed keypoints goes second: the matcher refines its second image's points.
    swapped = {(a, b): a in reference and b not in reference for a, b in pair_list}
    if config.refine == "tracks":
        if reference:
            raise UserError("--refine tracks rebuilds every keypoint; with --reference-features use --refine klt")
        grids = {name: matcher.coarse_grid(sizes[name]) for name in names}
        if any(grid is None for grid in grids.values()):
            raise UserError(
                f"--refine tracks needs a detector-free matcher with coarse cells (e.g. loftr), "
                f"not {matcher.name}; use --refine none"
            )

    def stored(pair: Pair) -> bool:
        found = store.load(pair, swapped[pair])
        # Exact tracks need the coarse cells, which raw matches of older runs do not carry.
        return found is not None and (config.refine != "tracks" or found.has_coarse)

    todo = [pair for pair in pair_list if not stored(pair)]
    reused = len(pair_list) - len(todo)
    if reused:
        logger.info("reusing raw matches of %d/%d pairs from %s", reused, len(pair_list), store.root)

    match_start = time.perf_counter()
    refine = config.refine_config()
    oriented = [(b, a) if swapped[(a, b)] else (a, b) for a, b in pair_list]
    # Quarter turns of every pair: for matching the new ones, refining tracks through all, and the record.
    turns = estimate_quarter_turns(image_dir, oriented) if config.rotation == "auto" else {}
    stats = _match_pairs(todo, swapped, image_dir, matcher, config, store, turns)
    seconds_matching = time.perf_counter() - match_start

    track_stats = None
    if config.refine == "tracks":
        quantized, track_stats = build_tracks(
            _RawMatches(store, swapped),
            grids,
            lambda name: read_gray(io.resolve_image(image_dir, name)),
            turns,
            config.track_config(),
        )
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
    else:
        quantized = aggregate_matches(
            pair_list,
            _RawMatches(store, swapped),
            config.quantize_config(),
            {name: kp for name, (kp, _) in reference.items()},
        )
    if refine.enabled:
        quantized, klt_stats = refine_tracks(
            quantized, lambda name: read_gray(io.resolve_image(image_dir, name)), refine, turns, fixed=set(reference)
        )
        logger.info(
            "track refinement: %d tracks, %d of %d keypoints moved",
            klt_stats.tracks,
            klt_stats.moved,
            klt_stats.candidates,
        )
    io.write_features(
        features, {name: (kp.keypoints, kp.scores, sizes[name]) for name, kp in quantized.keypoints.items()}
    )
    io.write_matches(matches, {pair: (pm.matches0, pm.scores0) for pair, pm in quantized.matches.items()})
    turned = {pair: k for pair, k in turns.items() if k}
    io.write_text_atomic(
        stamp_path,
        json.dumps(
            {
                "stamp": stamp,
                "features": _file_state(features),
                "matches": _file_state(matches),
                "turns": [[first, second, k] for (first, second), k in sorted(turned.items())],
            }
        ),
    )
    keypoints_count = {name: len(kp) for name, kp in quantized.keypoints.items()}
    match_count = {pair: pm.num_matches for pair, pm in quantized.matches.items()}
    logger.info(
        "%d pairs (%d matched, %d reused) in %.1f s, %d prepare calls; mean %.0f keypoints/image, %.0f matches/pair",
        len(pair_list),
        len(todo),
        reused,
        time.perf_counter() - start,
        stats.prepare_calls,
        np.mean(list(keypoints_count.values()) or [0]),
        np.mean(list(match_count.values()) or [0]),
    )
    return DenseMatchResult(
        features,
        matches,
        len(pair_list),
        len(todo),
        reused,
        stats.prepare_calls,
        stats.cache_hits,
        stats.cache_misses,
        seconds_matching,
        time.perf_counter() - start,
        False,
        keypoints_count,
        match_count,
        stats.pairs_turned,
        turned,
        track_stats,
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
        and done.get("features") == _file_state(features)
        and done.get("matches") == _file_state(matches)
    )


@dataclass(frozen=True)
class _LoopStats:
    prepare_calls: int
    cache_hits: int
    cache_misses: int
    pairs_turned: int


def _match_pairs(
    todo: Sequence[Pair],
    swapped: Mapping[Pair, bool],
    image_dir: Path,
    matcher: Matcher,
    config: DenseMatchConfig,
    store: RawMatchStore,
    turns: Mapping[Pair, int],
) -> _LoopStats:
    """Raw-match ``todo`` and store each result as soon as it is computed; ``turns``: rotation="auto"'s
    quarter turn of each (first, second) pair."""
    tta = config.tta_config()
    # Matching order of each pair: (first, second); the second image gets the rotations.
    oriented = [(b, a) if swapped[(a, b)] else (a, b) for a, b in todo]
    turned = sum(turns.get(pair, 0) != 0 for pair in oriented)
    if tta.rotation == "auto" and oriented:
        logger.info("rotation auto: %d of %d pairs matched with image 1 turned", turned, len(oriented))
    views: dict[str, set[View]] = defaultdict(set)
    for pair in oriented:
        views[pair[0]].update(first_views(tta))
        views[pair[1]].update(second_views(tta, turns.get(pair, 0)))
    order = plan_order(oriented, config.cache_size)
    ordered = [oriented[i] for i in order]

    refine = config.refine_config()
    cache = LRUCache(config.cache_size)
    pixels: dict[str, np.ndarray] = {}  # uint8 originals of the cached images, for refinement
    prepare_calls = 0
    with ImagePrefetcher(image_dir, planned_loads(ordered, config.cache_size), config.num_workers) as loader:

        def prepared(name: str) -> dict[View, PreparedView]:
            nonlocal prepare_calls
            entry = cache.get(name)
            if entry is None:
                image = loader.take(name)
                entry = {view: prepare_view(matcher, image, view) for view in sorted(views[name], key=_view_key)}
                prepare_calls += len(entry)
                cache.put(name, entry)
                if refine.enabled:
                    pixels[name] = to_uint8(image)
            return entry

        # Pairs matched once each (no rotation / multi-size / two-way TTA) go to the matcher in batches of
        # consecutive pairs of the cache-friendly order; every result is stored as soon as its batch is done.
        batched = tta.single_pass and matcher.batches_pairs
        batch = config.batch_pairs if batched else 1
        size = tta.resize[0]
        with tqdm(total=len(order), desc="matching", unit="pair", smoothing=0.1, disable=not todo) as bar:
            for start in range(0, len(order), batch):
                chunk = order[start : start + batch]
                if batched:
                    views_of = [
                        (
                            prepared(oriented[i][0])[View(size, 0)],
                            prepared(oriented[i][1])[View(size, turns.get(oriented[i], 0))],
                        )
                        for i in chunk
                    ]
                    results = match_views_batch(matcher, views_of)
                else:
                    results = [
                        match_pair(
                            matcher, prepared(oriented[i][0]), prepared(oriented[i][1]), tta, turns.get(oriented[i], 0)
                        ).matches
                        for i in chunk
                    ]
                for index, result in zip(chunk, results):
                    pair = todo[index]
                    if refine.enabled:
                        first, second = oriented[index]
                        result, _ = refine_matches(
                            pixels[first], pixels[second], result, refine, turns.get((first, second), 0)
                        )
                    store.save(pair, swapped[pair], result.swapped() if swapped[pair] else result)
                for evicted in set(pixels) - set(cache.keys()):  # originals live as long as their cache entry
                    del pixels[evicted]
                bar.update(len(chunk))
    return _LoopStats(prepare_calls, cache.hits, cache.misses, turned)


def _view_key(view: View) -> tuple[int, int]:
    return (-1 if view.size is None else view.size, view.rotation)


def main(
    pairs: Path,
    image_dir: Path,
    features: Path,
    matches: Path,
    matcher: Matcher,
    config: DenseMatchConfig | None = None,
    reference_features: Path | None = None,
) -> tuple[Path, Path]:
    """Match, quantize and write hloc files; returns ``(features, matches)``. See :func:`run`."""
    result = run(pairs, image_dir, features, matches, matcher, config, reference_features)
    return result.features, result.matches


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import AMP_MODES, DEVICES, MATCHERS, WEIGHTS_HELP

    defaults = DenseMatchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.match_dense",
        description="Match image pairs densely and quantize the matches into hloc features.h5 / matches.h5.",
    )
    parser.add_argument("--images", type=Path, required=True, help="image folder (pairs name paths relative to it)")
    parser.add_argument("--pairs", type=Path, required=True, help="pairs.txt, one 'name0 name1' per line")
    parser.add_argument("--features", type=Path, required=True, help="output features.h5")
    parser.add_argument("--matches", type=Path, required=True, help="output matches.h5")
    parser.add_argument("--matcher", choices=MATCHERS, default="loftr")
    parser.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    parser.add_argument(
        "--resize",
        type=int,
        nargs="+",
        default=None,
        help="longest side for matching (0 = original); several sizes are matched and merged",
    )
    parser.add_argument("--rotation", choices=ROTATION_MODES, default=defaults.rotation)
    parser.add_argument("--both-directions", action="store_true", help="also match (1, 0) and merge")
    parser.add_argument(
        "--refine",
        choices=MATCH_REFINE_MODES,
        default=defaults.refine,
        help="klt: sub-pixel Lucas-Kanade refinement of each pair's second-image points; tracks: "
        "exact tracks on LoFTR's coarse cells, refined against one reference view each",
    )
    parser.add_argument("--cell-size", type=int, default=defaults.cell_size)
    parser.add_argument("--max-error", type=float, default=defaults.max_error)
    parser.add_argument("--max-kps", type=int, default=defaults.max_kps, help="keypoints per image (0 = no limit)")
    parser.add_argument("--keypoint-position", choices=POSITIONS, default=defaults.keypoint_position)
    parser.add_argument(
        "--reference-features",
        type=Path,
        default=None,
        help="features.h5 whose images keep their keypoints (localization)",
    )
    parser.add_argument("--cache-size", type=int, default=defaults.cache_size)
    parser.add_argument(
        "--batch-pairs",
        type=int,
        default=defaults.batch_pairs,
        help="pairs per matcher call (LoFTR batches equal-size pairs; 1 = one by one)",
    )
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=None,
        help="LoFTR autocast precision; bf16 is 2-3x faster on CPUs with AMX and on GPUs "
        "(keypoints move ~0.05 px); default float32",
    )
    return parser


def main_cli(argv: Sequence[str] | None = None) -> DenseMatchResult:
    from matchers.factory import make_matcher

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sizes = args.resize or [None]
    if any(size is not None and size < 0 for size in sizes):
        raise UserError(f"--resize sizes must be >= 0, got {sizes}")
    if len(sizes) == 1:
        # One size: the matcher resizes (its own way, e.g. LoFTR's multiple of 8).
        matcher_size, view_sizes = sizes[0], (None,)
    else:
        # Several sizes: this step resizes each view and the matcher takes images as given.
        matcher_size, view_sizes = 0, tuple(size or None for size in sizes)
    config = DenseMatchConfig(
        cell_size=args.cell_size,
        max_error=args.max_error,
        max_kps=args.max_kps or None,
        both_directions=args.both_directions,
        rotation=args.rotation,
        resize=view_sizes,
        cache_size=args.cache_size,
        batch_pairs=args.batch_pairs,
        num_workers=args.num_workers,
        keypoint_position=args.keypoint_position,
        refine=args.refine,
    )
    # Validate inputs before a checkpoint is loaded.
    io.check_match_outputs(args.features, args.matches)  # a folder / read-only place fails before any pair is matched
    load_pairs(args.pairs, args.images)
    matcher = make_matcher(args.matcher, weights=args.weights, resize=matcher_size, device=args.device, amp=args.amp)
    result = run(args.pairs, args.images, args.features, args.matches, matcher, config, args.reference_features)
    print(f"wrote {result.features} and {result.matches}")
    return result


if __name__ == "__main__":
    run_cli(main_cli)
