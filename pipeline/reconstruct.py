"""A folder of images in, a COLMAP reconstruction out: check -> pairs -> matching (exact tracks) -> database ->
geometric verification -> incremental mapping with staged self-calibration -> geometry refinement (pycolmap).

    python -m pipeline.reconstruct --images DIR --outputs OUT [--matcher loftr+sift|loftr|sift] [--weights W]
        [--pairs exhaustive|sequential|retrieval] [--num-pairs K] [--resize 640 [840 ...]]
        [--rotation none|auto|best|union] [--refine tracks|klt|none] [--calibration staged|colmap]
        [--refine-iterations 2] [--camera-mode auto|single|per-image] [--device auto|cpu|cuda]

Outputs under OUT: ``pairs.txt``, ``features.h5``, ``matches.h5`` (hloc formats; for an ensemble each
matcher's own files under ``OUT/<matcher>/``), ``database.db``, ``sfm/`` (the largest model, COLMAP binary
and text), ``models/`` (every model the mapper made), ``points.ply``, ``summary.json`` (registered/total,
points, track lengths, reprojection error per refinement round, the cameras and every calibration decision,
the tracks' figures, per unregistered image its matched and verified pairs, timings per step),
``reconstruction.png`` and ``reconstruction.html`` (an interactive viewer).

Resuming: run the same command again. Matching resumes pair by pair (:mod:`pipeline.match_dense`);
the verified database is reused when ``database.json`` records the same matches and options (else it
is rebuilt in a temporary file and renamed into place); the mapping is skipped when ``summary.json``
records the same inputs and the model is complete, else redone.

The default matcher is the ``loftr+sift`` ensemble (:mod:`pipeline.ensemble`): SIFT's keypoints and
LoFTR's exact tracks in one model (LoFTR with the outdoor weights; offline and without ``--weights`` the
shipped ``loftr-compact``, announced on stderr; it never switches to another matcher by itself). For LoFTR:

* ``--rotation auto``: pairs whose images are turned against each other (SIFT orientations vote, see
  :mod:`pipeline.orientation`) are matched with image 1 turned back; upright pairs are matched as is.
* ``--refine tracks`` (detector-free SfM, :mod:`pipeline.tracks`): tracks are built exactly on LoFTR's
  coarse cells and every observation is aligned to its track's reference view; ``--refine klt`` is the
  earlier per-pair Lucas-Kanade refinement with quantization on a 4 px / 0.5 px grid.

Mapping (:mod:`pipeline.mapping`) holds the distortion until enough images support it, maps again with
COLMAP's options when images are left out, and refines the geometry in two rounds of bundle adjustment,
observation filtering (3 px, 2 px), re-triangulation and registration of left-over images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core import io
from core.errors import UserError, run_cli
from matchers.factory import AMP_MODES
from matchers.sift import SIFTOptions
from pipeline.colmap_db import CAMERA_MODES, VerificationConfig, build_database
from pipeline.image_check import check_h5, check_images
from pipeline.mapping import (
    CALIBRATION_MODES,
    MappingConfig,
    MappingResult,
    check_model_written,
    incomplete_write,
    run_mapping,
)
from pipeline.refine import KLT_CELL_SIZE, MATCH_REFINE_MODES, default_refine

logger = logging.getLogger(__name__)

PAIR_STRATEGIES = ("exhaustive", "sequential", "retrieval")
#: matcher ensembles (pipeline.ensemble): SIFT's keypoints and a dense matcher's tracks in one model
ENSEMBLES = ("loftr+sift",)
#: single detector-free matchers (their pairs need DENSE_MIN_INLIERS verified inliers)
MATCHERS_DENSE = ("loftr",)
DEFAULT_NUM_PAIRS = {"sequential": 10, "retrieval": 20}
MODEL_FILES = ("cameras.bin", "images.bin", "points3D.bin")
# COLMAP's SIFT is the default for SfM: on temple_ring (47 images, exhaustive) it gives a median
# relative-rotation error of 0.88 deg against GT, OpenCV's SIFT 0.99 deg (both 47/47 registered).
SIFT_BACKENDS = ("pycolmap", "opencv")
#: verified inliers a pair needs with a dense matcher (COLMAP's 15 is meant for SIFT): LoFTR returns hundreds of
#: matches on overlapping pairs, and on pairs that share nothing (e.g. opposite sides of a symmetric object) its
#: few wrong matches can still fit an epipolar geometry with 15-27 inliers, which then joins wrong images
DENSE_MIN_INLIERS = 30
#: quantization of KLT-refined dense matches: hloc's 8 px cells and 2 px radius average refined points with
#: others up to 2 px away and undo the refinement. temple_ring, 135 sequential pairs, median epipolar error
#: of the quantized matches against GT: no refinement 0.44 px; refined 0.38 (8 / 2), 0.26 (4 / 1), 0.21 (4 / 0.5).
#: Exhaustive temple_ring with loftr-compact (47/47 registered each), median relative-rotation error:
#: 1.50 deg (4 / 1), 1.49 (4 / 0.75), 1.37 (4 / 0.5); fewer matches survive a smaller radius (mean track
#: length 5.2 -> 4.0), which is why it is not smaller still.
KLT_MAX_ERROR = 0.5


@dataclass(frozen=True)
class ReconstructConfig:
    """Every option of a reconstruction run (the CLI flags map one-to-one)."""

    #: loftr+sift: SIFT's keypoints and LoFTR's exact tracks in one model (pipeline.ensemble); sacre_coeur with the
    #: offline loftr-compact: 10/10 registered (loftr alone: 2/10)
    matcher: str = "loftr+sift"
    weights: str | None = None  # LoFTR checkpoint name or path; None = outdoor
    pairs: str = "exhaustive"  # exhaustive | sequential | retrieval
    num_pairs: int | None = None  # sequential window / retrieval top-k; None = strategy default
    loop_closure: bool = False  # sequential pairs: also pair the end of the sequence with its start
    resize: tuple[int, ...] | None = None  # longest side(s) for matching; None = matcher default; 0 = original
    rotation: str | None = None  # none | auto | best | union (see pipeline.tta); None = auto for dense matchers
    camera_mode: str = "auto"  # auto | single | per-image
    camera_model: str = "SIMPLE_RADIAL"
    device: str = "auto"
    sift_backend: str = SIFTOptions.backend  # SIFT matcher only: COLMAP's SIFT ("pycolmap") or OpenCV's ("opencv")
    amp: str | None = None  # LoFTR only: autocast precision "bf16" / "fp16" (None: float32)
    cell_size: int | None = None  # quantization cell (px); None: 4 for refined dense matches, 8 unrefined, 2 SIFT
    max_error: float | None = None  # quantization sub-bin and re-assignment radius (px); None: 0.5 refined, else 2
    refine: str | None = None  # none | klt (sub-pixel refinement of dense matches); None = klt for dense matchers
    min_match_score: float | None = None
    #: None: COLMAP's two-view options, with at least DENSE_MIN_INLIERS inliers per pair for dense matchers
    verification: VerificationConfig | None = None
    #: staged: focal first, distortion only once enough images support it (pipeline.mapping); colmap: COLMAP's options
    calibration: str = "staged"
    refine_iterations: int = (
        2  # geometry refinement rounds after mapping (bundle adjustment, filtering, re-triangulation)
    )
    num_threads: int = -1  # mapper threads; -1 = all cores
    seed: int | None = 0  # COLMAP's random seed (reproducible runs); None = random
    verbose: bool = False  # COLMAP's own log on stderr

    def __post_init__(self) -> None:
        if self.pairs not in PAIR_STRATEGIES:
            raise UserError(f"unknown pairs strategy {self.pairs!r}; choose one of {', '.join(PAIR_STRATEGIES)}")
        if self.calibration not in CALIBRATION_MODES:
            raise UserError(f"unknown calibration {self.calibration!r}; choose one of {', '.join(CALIBRATION_MODES)}")
        if self.refine_iterations < 0:
            raise UserError(f"--refine-iterations must be >= 0, got {self.refine_iterations}")
        if self.camera_mode not in CAMERA_MODES:
            raise UserError(f"unknown camera mode {self.camera_mode!r}; choose one of {', '.join(CAMERA_MODES)}")
        if self.verification is not None and self.verification.min_num_inliers < 1:
            raise UserError(f"--min-num-inliers must be >= 1, got {self.verification.min_num_inliers}")
        from matchers.factory import MATCHERS

        if self.matcher not in MATCHERS + ENSEMBLES:
            raise UserError(f"unknown matcher {self.matcher!r}; choose one of {', '.join(MATCHERS + ENSEMBLES)}")
        if self.amp is not None and (self.amp not in AMP_MODES or "loftr" not in self.matcher):
            raise UserError(f"--amp {self.amp} applies to the loftr matcher only, with one of {', '.join(AMP_MODES)}")
        if self.refine is not None and self.refine not in MATCH_REFINE_MODES:
            raise UserError(f"unknown refinement {self.refine!r}; choose one of {', '.join(MATCH_REFINE_MODES)}")
        if self.max_error is not None and self.max_error <= 0:
            raise UserError(f"--max-error must be > 0 px, got {self.max_error}")
        if self.sift_backend not in SIFT_BACKENDS:
            raise UserError(f"unknown SIFT backend {self.sift_backend!r}; choose one of {', '.join(SIFT_BACKENDS)}")
        if self.num_pairs is not None and self.num_pairs < 1:
            raise UserError(f"--num-pairs must be >= 1, got {self.num_pairs}")
        if self.resize is not None:
            object.__setattr__(self, "resize", tuple(int(size) for size in self.resize))
            if not self.resize or any(size < 0 for size in self.resize):
                raise UserError(f"--resize sizes must be >= 0 (0 = original size), got {list(self.resize)}")


@dataclass
class ReconstructResult:
    """What :func:`main` returns: the largest model (None if nothing was reconstructed) and the summary."""

    reconstruction: Any
    summary: dict[str, Any]
    outputs: Path


class _Timer:
    """Collects wall-clock seconds per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str):
        timer = self

        class _Step:
            def __enter__(self) -> None:
                self.start = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                timer.seconds[step] = round(timer.seconds.get(step, 0.0) + time.perf_counter() - self.start, 3)

        return _Step()


# ------------------------------------------------------------------------------------------ pairs
def make_pairs(
    names: Sequence[str], config: ReconstructConfig, image_dir: Path, outputs: Path
) -> list[tuple[str, str]]:
    """Image pairs for the chosen strategy (pipeline.pairs)."""
    from pipeline import pairs as pairs_module

    if config.pairs == "exhaustive":
        return list(pairs_module.exhaustive(list(names)))
    if config.pairs == "sequential":
        window = config.num_pairs or DEFAULT_NUM_PAIRS["sequential"]
        return list(pairs_module.sequential(list(names), window, config.loop_closure))
    try:
        from pipeline import retrieval  # written by another step of the project; may be absent
    except ImportError:
        retrieval = None
    if retrieval is None or not hasattr(retrieval, "pairs_from_images"):
        raise UserError(
            "--pairs retrieval needs global descriptors (pipeline.retrieval), which this installation "
            "does not provide yet; use --pairs exhaustive (small sets) or --pairs sequential (videos)"
        )
    top_k = config.num_pairs or DEFAULT_NUM_PAIRS["retrieval"]
    return list(retrieval.pairs_from_images(image_dir, list(names), top_k, outputs, device=config.device))


# ------------------------------------------------------------------------------------------ matching
def verification_options(config: ReconstructConfig) -> VerificationConfig:
    """The two-view verification of a run: the given one, else COLMAP's with the matcher's inlier minimum."""
    if config.verification is not None:
        return config.verification
    # An ensemble's dense matches of pairs SIFT cannot verify already needed DENSE_MIN_INLIERS (pipeline.ensemble).
    return VerificationConfig(min_num_inliers=DENSE_MIN_INLIERS if config.matcher in MATCHERS_DENSE else 15)


def ensemble_parts(matcher: str) -> tuple[str, ...]:
    """The single matchers of ``matcher`` ("loftr+sift" -> ("sift", "loftr"): the detector first, it gates)."""
    parts = tuple(matcher.split("+"))
    return tuple(sorted(parts, key=lambda name: name != "sift"))


def dense_config(config: ReconstructConfig, matcher: str | None = None):
    """The DenseMatchConfig and the matcher's own resize for a run's ``matcher`` (default: the run's; one size:
    the matcher resizes; several: match_dense resizes each view and merges, the matcher takes images as given).
    In an ensemble, the SIFT part keeps SIFT's defaults; the dense part takes --refine / --rotation."""
    from pipeline.match_dense import DenseMatchConfig

    matcher = matcher or config.matcher
    user = config if matcher != "sift" or "+" not in config.matcher else ReconstructConfig(matcher="sift")
    sizes = config.resize or (None,)
    if len(sizes) == 1:
        matcher_size, view_sizes = sizes[0], (None,)
    else:
        matcher_size, view_sizes = 0, tuple(size or None for size in sizes)
    refine = user.refine if user.refine is not None else default_refine(matcher)
    defaults = DenseMatchConfig()
    if matcher == "sift":
        # SIFT keypoints are already shared between pairs: a fine grid keeps them nearly all distinct.
        cell_size, max_error = 2, defaults.max_error
    elif refine == "klt":
        cell_size, max_error = KLT_CELL_SIZE, KLT_MAX_ERROR
    else:
        cell_size, max_error = defaults.cell_size, defaults.max_error
    cell_size = user.cell_size if user.cell_size is not None else cell_size
    max_error = user.max_error if user.max_error is not None else max_error
    rotation = user.rotation
    if rotation is None:
        # SIFT is rotation invariant; LoFTR is not, and SIFT's orientations tell cheaply which pairs need a turn.
        rotation = "none" if matcher == "sift" else "auto"
    return DenseMatchConfig(
        cell_size=cell_size, max_error=max_error, rotation=rotation, resize=view_sizes, refine=refine
    ), matcher_size


@dataclass(frozen=True)
class Matched:
    """What the matching step did: one DenseMatchResult per matcher of the run, their descriptions and configs,
    and the ensemble merge (None for a single matcher)."""

    results: dict[str, Any]  # matcher -> DenseMatchResult
    descriptions: dict[str, dict[str, Any]]
    configs: dict[str, Any]  # matcher -> DenseMatchConfig
    ensemble: Any | None  # pipeline.ensemble.EnsembleStats


def match_images(
    config: ReconstructConfig, images: Path, outputs: Path, pairs: Path, features: Path, matches: Path
) -> Matched:
    """Match the pairs with the run's matcher, or with each matcher of an ensemble and merge their files."""
    from matchers.factory import make_matcher
    from pipeline import ensemble, match_dense

    pair_list = match_dense.load_pairs(pairs, images)  # validated before a checkpoint is loaded
    parts = ensemble_parts(config.matcher)
    results, descriptions, configs, matchers = {}, {}, {}, {}
    for name in parts:  # every matcher is made (weights loaded) before any pair is matched
        configs[name], matcher_size = dense_config(config, name)
        extra = {"backend": config.sift_backend} if name == "sift" else {}
        matchers[name] = make_matcher(
            name,
            weights=config.weights if name != "sift" else None,
            resize=matcher_size,
            device=config.device,
            amp=config.amp if name != "sift" else None,
            **extra,
        )
        descriptions[name] = matchers[name].describe()
    for name in parts:
        part_features, part_matches = (
            (features, matches) if len(parts) == 1 else (outputs / name / "features.h5", outputs / name / "matches.h5")
        )
        part_features.parent.mkdir(parents=True, exist_ok=True)
        results[name] = match_dense.run(pairs, images, part_features, part_matches, matchers[name], configs[name])
    merged = None
    if len(parts) > 1:
        stamp_path = outputs / "ensemble.json"
        inputs = [[name, _file_state(results[name].features), _file_state(results[name].matches)] for name in parts]
        inputs.append(asdict(ensemble.EnsembleConfig()))
        try:
            recorded = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            recorded = {}
        if (
            isinstance(recorded, dict)
            and recorded.get("inputs") == inputs
            and recorded.get("outputs") == [_file_state(features), _file_state(matches)]
        ):
            merged = ensemble.EnsembleStats(**recorded["stats"])
        else:
            merged = ensemble.merge(
                [(name, results[name].features, results[name].matches) for name in parts], pair_list, features, matches
            )
            io.write_text_atomic(
                stamp_path,
                json.dumps(
                    {
                        "inputs": inputs,
                        "stats": asdict(merged),
                        "outputs": [_file_state(features), _file_state(matches)],
                    }
                ),
            )
    return Matched(results, descriptions, configs, merged)


# ------------------------------------------------------------------------------------------ mapping
def mapping_options(config: ReconstructConfig) -> MappingConfig:
    """The mapping step's options of a run."""
    return MappingConfig(
        min_num_matches=verification_options(config).min_num_inliers,
        calibration=config.calibration,
        refine_iterations=config.refine_iterations,
        num_threads=config.num_threads,
        seed=config.seed,
        verbose=config.verbose,
    )


def write_model(reconstruction, sfm_dir: Path) -> None:
    """Write the model as COLMAP binary and text into ``sfm_dir``, replacing it atomically."""
    temp = sfm_dir.with_name(f".{sfm_dir.name}.tmp")
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    try:
        reconstruction.write_binary(str(temp))
        reconstruction.write_text(str(temp))
        check_model_written(reconstruction, temp, sfm_dir, ("binary", "text"))
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    old = sfm_dir.with_name(f".{sfm_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if sfm_dir.exists():
        sfm_dir.rename(old)
    temp.rename(sfm_dir)
    if old.exists():
        shutil.rmtree(old)


#: bytes of the property types of a binary PLY
_PLY_TYPES = {
    "char": 1,
    "uchar": 1,
    "int8": 1,
    "uint8": 1,
    "short": 2,
    "ushort": 2,
    "int16": 2,
    "uint16": 2,
    "int": 4,
    "uint": 4,
    "int32": 4,
    "uint32": 4,
    "float": 4,
    "float32": 4,
    "double": 8,
    "float64": 8,
}


def export_ply(reconstruction, path: Path) -> None:
    """``points.ply`` (COLMAP's binary PLY), atomically; a file cut short by a full disk is an error, not a result."""
    with io.atomic_path(path) as temp:
        reconstruction.export_PLY(str(temp))
        with open(temp, "rb") as handle:
            head = handle.read(4096)
        end = head.find(b"end_header\n")
        lines = head[:end].decode("ascii", "replace").splitlines() if end >= 0 else []
        vertices = [int(line.split()[2]) for line in lines if line.startswith("element vertex")]
        record = sum(_PLY_TYPES.get(line.split()[1], 0) for line in lines if line.startswith("property "))
        binary = any(line.startswith("format binary") for line in lines)
        expected = end + len(b"end_header\n") + (vertices[0] * record if vertices else 0)
        if end < 0 or vertices != [reconstruction.num_points3D()] or (binary and temp.stat().st_size != expected):
            raise incomplete_write(path, f"{temp.stat().st_size} bytes for {reconstruction.num_points3D()} points")


def model_complete(sfm_dir: Path) -> bool:
    return all((sfm_dir / name).is_file() for name in MODEL_FILES)


def model_statistics(reconstruction, names: Sequence[str]) -> dict[str, Any]:
    """Figures for summary.json."""
    registered = {reconstruction.images[i].name for i in reconstruction.reg_image_ids()}
    return {
        "registered": len(registered),
        "total": len(names),
        "points": reconstruction.num_points3D(),
        "observations": reconstruction.compute_num_observations(),
        "mean_track_length": round(float(reconstruction.compute_mean_track_length()), 4),
        "mean_observations_per_image": round(float(reconstruction.compute_mean_observations_per_reg_image()), 2),
        "mean_reprojection_error": round(float(reconstruction.compute_mean_reprojection_error()), 4),
        "cameras": reconstruction.num_cameras(),
        "unregistered": [name for name in names if name not in registered],
    }


def _file_state(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _stamp(payload: Any) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reusable_database(database: Path, stamp_path: Path, stamp: str) -> dict[str, Any] | None:
    """The stats of ``database`` when it was built from exactly these inputs (the mapper writes rigs and
    frames into the database, so its file state is not part of the check)."""
    try:
        recorded = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return None
    if (
        isinstance(recorded, dict)
        and recorded.get("stamp") == stamp
        and database.is_file()
        and isinstance(recorded.get("stats"), dict)
    ):
        return recorded["stats"]
    return None


def _previous_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


# ------------------------------------------------------------------------------------------ main
def main(
    images: Path,
    outputs: Path,
    matcher: str = ReconstructConfig.matcher,
    weights: str | None = None,
    pairs: str = ReconstructConfig.pairs,
    num_pairs: int | None = None,
    resize: Sequence[int] | None = None,
    rotation: str | None = None,
    camera_mode: str = ReconstructConfig.camera_mode,
    device: str = ReconstructConfig.device,
    config: ReconstructConfig | None = None,
) -> ReconstructResult:
    """Reconstruct the images of folder ``images`` into ``outputs`` (see the module docstring).

    Either pass the common options as keywords or a full :class:`ReconstructConfig` (which then wins).
    Bad input raises :class:`UserError`; nothing reconstructable also raises it, after writing the
    summary.
    """
    import pycolmap

    if config is None:
        config = ReconstructConfig(
            matcher=matcher,
            weights=weights,
            pairs=pairs,
            num_pairs=num_pairs,
            resize=tuple(resize) if resize is not None else None,
            rotation=rotation,
            camera_mode=camera_mode,
            device=device,
        )
    images, outputs = Path(images), Path(outputs)
    io.check_output_dir(outputs, "--outputs")  # a file or a read-only place fails now, not after matching
    timer = _Timer()
    start = time.perf_counter()
    paths = {
        "pairs": outputs / "pairs.txt",
        "features": outputs / "features.h5",
        "matches": outputs / "matches.h5",
        "database": outputs / "database.db",
        "database_stamp": outputs / "database.json",
        "sfm": outputs / "sfm",
        "models": outputs / "models",
        "ply": outputs / "points.ply",
        "summary": outputs / "summary.json",
        "png": outputs / "reconstruction.png",
    }

    with timer("check_images"):
        checked = check_images(images)
        for name, reason in checked.skipped.items():
            logger.warning("skipping %s: %s", name, reason)
        for name in ("features", "matches"):
            check_h5(paths[name])  # a damaged file from an earlier crash: a clear message, not a traceback
        names = checked.names
    outputs.mkdir(parents=True, exist_ok=True)

    with timer("pairs"):
        pair_list = make_pairs(names, config, images, outputs)
        if not pair_list:
            raise UserError(f"{images}: no image pairs to match (strategy {config.pairs!r}); use more images")
        new_text = "".join(f"{a} {b}\n" for a, b in pair_list)
        if not paths["pairs"].is_file() or paths["pairs"].read_text() != new_text:
            io.write_pairs(paths["pairs"], pair_list)

    with timer("matching"):
        matched_all = match_images(config, images, outputs, paths["pairs"], paths["features"], paths["matches"])
        primary = [name for name in ensemble_parts(config.matcher) if name != "sift"] or ["sift"]
        matched, dense = matched_all.results[primary[0]], matched_all.configs[primary[0]]

    options = asdict(config)
    options.pop("verbose")
    inputs_stamp = _stamp(
        {
            "features": _file_state(paths["features"]),
            "matches": _file_state(paths["matches"]),
            "names": names,
            "options": options,
        }
    )
    previous = _previous_summary(paths["summary"])
    reconstruction = None
    database_reused = True
    if previous and previous.get("inputs_stamp") == inputs_stamp and model_complete(paths["sfm"]):
        logger.info("the model in %s is up to date; skipping the database and the mapping", paths["sfm"])
        reconstruction = pycolmap.Reconstruction(str(paths["sfm"]))
        database_stats, models_sizes = previous.get("database"), previous.get("models", [])
        mapping_report = previous.get("mapping", {})
        timer.seconds.update({k: v for k, v in previous.get("timings", {}).items() if k in ("database", "mapping")})
        resumed = True
    else:
        resumed = False
        database_stamp = _stamp(
            {
                "features": _file_state(paths["features"]),
                "matches": _file_state(paths["matches"]),
                "names": names,
                "pairs": pair_list,
                "camera_mode": config.camera_mode,
                "camera_model": config.camera_model,
                "verification": asdict(verification_options(config)),
                "min_match_score": config.min_match_score,
            }
        )
        with timer("database"):
            database_stats = _reusable_database(paths["database"], paths["database_stamp"], database_stamp)
            if database_stats is None:
                database_reused = False
                _, stats = build_database(
                    paths["database"],
                    images,
                    names,
                    pair_list,
                    paths["features"],
                    paths["matches"],
                    camera_mode=config.camera_mode,
                    camera_model=config.camera_model,
                    verification=verification_options(config),
                    min_match_score=config.min_match_score,
                    verbose=config.verbose,
                )
                database_stats = asdict(stats)
                # Verification is the slow part: a run interrupted during mapping reuses the database.
                io.write_text_atomic(
                    paths["database_stamp"],
                    json.dumps({"stamp": database_stamp, "stats": database_stats}),
                )
            else:
                logger.info("reusing the verified database %s", paths["database"])
        with timer("mapping"):
            verified = database_stats.get("num_verified_pairs", 0)
            mapped = (
                run_mapping(paths["database"], images, paths["models"], mapping_options(config), len(names))
                if verified
                else MappingResult({}, None)
            )
            mapping_report = {
                "attempts": mapped.attempts,
                "calibration": mapped.calibration,
                "refinement": mapped.refinement,
                "cameras": mapped.cameras(),
            }
            models = mapped.models
            models_sizes = sorted((m.num_reg_images() for m in models.values()), reverse=True)
            if mapped.reconstruction is not None:
                reconstruction = mapped.reconstruction
                write_model(reconstruction, paths["sfm"])
            elif paths["sfm"].exists():
                shutil.rmtree(paths["sfm"])  # a stale model from other inputs must not survive

    with timer("outputs"):
        if reconstruction is not None:
            if resumed and paths["ply"].is_file():
                pass
            else:
                export_ply(reconstruction, paths["ply"])
            if not (resumed and paths["png"].is_file()):
                from pipeline.viz import plot_reconstruction

                title = images.parent.name if images.name == "images" else images.name
                plot_reconstruction(reconstruction, paths["png"], title=title)
            if not (resumed and (outputs / "reconstruction.html").is_file()):  # the interactive viewer
                from pipeline.viz import write_html

                write_html(
                    reconstruction,
                    outputs / "reconstruction.html",
                    title=images.parent.name if images.name == "images" else images.name,
                )

    description = matched_all.descriptions[primary[0]]
    summary: dict[str, Any] = {
        "images": str(images),
        "outputs": str(outputs),
        "num_images": len(names),
        "skipped_images": checked.skipped,
        **(
            model_statistics(reconstruction, names)
            if reconstruction is not None
            else {"registered": 0, "total": len(names)}
        ),
        "models": models_sizes,
        "matcher": config.matcher,
        "weights": description.get("weights"),
        "matcher_options": description,
        "options": options,
        "pairs": {"strategy": config.pairs, "num_pairs": len(pair_list)},
        "matching": {
            "pairs_matched": matched.pairs_matched,
            "pairs_reused": matched.pairs_reused,
            "prepare_calls": matched.prepare_calls,
            "up_to_date": matched.up_to_date,
            "rotation": dense.rotation,
            "pairs_turned": matched.pairs_turned,
            # [first, second, k]: the second image was matched as np.rot90(image, k) (k quarter turns)
            "turned_pairs": [[first, second, k] for (first, second), k in sorted(matched.turns.items())],
            "refine": dense.refine,
            "cell_size": dense.cell_size,
            "max_error": dense.max_error,
            "tracks": asdict(matched.tracks) if matched.tracks is not None else None,
            "ensemble": asdict(matched_all.ensemble) if matched_all.ensemble is not None else None,
        },
        "database": database_stats,
        "mapping": mapping_report,
        "reused_database": database_reused,
        "resumed_model": resumed,
        "timings": {**timer.seconds, "total": round(time.perf_counter() - start, 3)},
        "inputs_stamp": inputs_stamp,
        "pycolmap": pycolmap.__version__,
    }
    summary["unregistered_images"] = unregistered_report(paths["database"], names, summary)
    io.write_text_atomic(paths["summary"], json.dumps(summary, indent=2, default=str))
    if reconstruction is None:
        verified = (database_stats or {}).get("num_verified_pairs", 0)
        raise UserError(
            f"{images}: no model could be reconstructed ({verified} image pairs passed geometric verification); "
            f"images need overlapping views — try: {'; '.join(what_to_try(summary))} (details in {paths['summary']})"
        )
    return ReconstructResult(reconstruction, summary, outputs)


#: below this share of registered images the summary explains each missing image and what to try
WEAK_RUN_SHARE = 0.8


def unregistered_report(database: Path, names: Sequence[str], summary: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per unregistered image: its pairs with matches and with a verified geometry (from the database)."""
    from pipeline.colmap_db import pair_counts

    missing = summary.get("unregistered", list(names) if not summary.get("registered") else [])
    if not missing or not database.is_file():
        return {}
    try:
        counts = pair_counts(database)
    except Exception as error:  # a report must never fail the run
        logger.warning("could not read pair counts from %s: %s", database, error)
        return {}
    return {name: counts.get(name, {"matched": 0, "verified": 0}) for name in missing}


def weak_run_advice(summary: dict[str, Any]) -> list[str]:
    """Lines for a run that registered fewer than WEAK_RUN_SHARE of its images: each missing image with its
    matched / verified pairs, and one line on what to try."""
    total, registered = summary.get("total", 0), summary.get("registered", 0)
    missing = summary.get("unregistered_images") or {}
    if not total or registered >= WEAK_RUN_SHARE * total or not missing:
        return []
    lines = [f"only {registered}/{total} images registered; the others and their pairs (matched / verified):"]
    lines += [f"  {name}: {counts['matched']} / {counts['verified']}" for name, counts in sorted(missing.items())]
    lines.append("try: " + "; ".join(what_to_try(summary)))
    return lines


def what_to_try(summary: dict[str, Any]) -> list[str]:
    """What may register more images, given what this run used."""
    weights = str(summary.get("weights") or "")
    tips = []
    if "loftr-compact" in weights:
        tips.append("the official LoFTR weights (--weights outdoor; loftr-compact is weak on wide baselines)")
    if summary.get("matcher") != "loftr+sift":
        tips.append("--matcher loftr+sift (SIFT's matches added)")
    if summary.get("pairs", {}).get("strategy") != "exhaustive":
        tips.append("--pairs exhaustive or a larger --num-pairs")
    tips.append("more overlapping photos of the missing views")
    return tips


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    backend = summary.get("matcher_options", {}).get("backend")
    lines = [
        f"registered {summary['registered']}/{summary['total']} images; {summary.get('points', 0)} points, "
        f"mean track length {summary.get('mean_track_length', 0):.2f}, mean reprojection error "
        f"{summary.get('mean_reprojection_error', 0):.3f} px",
        f"matcher {summary['matcher']}"
        + (f" (weights {summary['weights']})" if summary.get("weights") else " (no weights)")
        + (f", backend {backend}" if backend else ""),
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["timings"].items()),
        f"outputs in {summary['outputs']}",
        *weak_run_advice(summary),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import DEVICES, MATCHERS, WEIGHTS_HELP
    from pipeline.tta import ROTATION_MODES

    defaults = ReconstructConfig()
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.reconstruct",
        description="Reconstruct a folder of images with dense matching and pycolmap (hloc-style).",
    )
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--outputs", type=Path, required=True, help="output folder (re-run to resume)")
    parser.add_argument(
        "--matcher",
        choices=MATCHERS + ENSEMBLES,
        default=defaults.matcher,
        help="loftr+sift: one set of tracks from SIFT's keypoints and LoFTR's exact tracks",
    )
    parser.add_argument("--weights", help=WEIGHTS_HELP)
    parser.add_argument("--pairs", choices=PAIR_STRATEGIES, default=defaults.pairs)
    parser.add_argument("--num-pairs", type=int, help="sequential window / retrieval top-k (default 10 / 20)")
    parser.add_argument("--loop-closure", action="store_true", help="sequential pairs: close the loop")
    parser.add_argument(
        "--resize",
        type=int,
        nargs="+",
        help="longest side for matching (0 = original); several sizes are matched and merged",
    )
    parser.add_argument(
        "--rotation",
        choices=ROTATION_MODES,
        default=None,
        help="in-plane rotation handling (default: auto for loftr, none for sift)",
    )
    parser.add_argument("--camera-mode", choices=CAMERA_MODES, default=defaults.camera_mode)
    parser.add_argument("--camera-model", default=defaults.camera_model, help="COLMAP camera model")
    parser.add_argument("--device", choices=DEVICES, default=defaults.device)
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=None,
        help="LoFTR autocast precision; bf16 is 2-3x faster on CPUs with AMX and on GPUs "
        "(keypoints move ~0.05 px); default float32",
    )
    parser.add_argument(
        "--sift-backend",
        choices=SIFT_BACKENDS,
        default=defaults.sift_backend,
        help="SIFT implementation for --matcher sift (COLMAP's or OpenCV's)",
    )
    parser.add_argument(
        "--cell-size", type=int, help="quantization cell in px (default 4 with --refine klt, else 8; 2 for sift)"
    )
    parser.add_argument(
        "--max-error",
        type=float,
        help="quantization re-assignment radius in px (default 0.5 with --refine klt, else 2)",
    )
    parser.add_argument(
        "--refine",
        choices=MATCH_REFINE_MODES,
        default=None,
        help="sub-pixel refinement of dense matches (default klt for loftr, none for sift)",
    )
    parser.add_argument("--min-match-score", type=float)
    parser.add_argument(
        "--min-num-inliers",
        type=int,
        default=None,
        help=f"verified inliers a pair needs (default 15 for sift, {DENSE_MIN_INLIERS} for loftr)",
    )
    parser.add_argument(
        "--calibration",
        choices=CALIBRATION_MODES,
        default=defaults.calibration,
        help="staged: focal first, distortion only with enough images (default); colmap: COLMAP's options",
    )
    parser.add_argument(
        "--refine-iterations",
        type=int,
        default=defaults.refine_iterations,
        help="geometry refinement rounds after mapping (bundle adjustment, filtering, re-triangulation)",
    )
    parser.add_argument("--num-threads", type=int, default=defaults.num_threads)
    parser.add_argument("--verbose", action="store_true", help="show COLMAP's log")
    return parser


def main_cli(argv: Sequence[str] | None = None) -> ReconstructResult:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = ReconstructConfig(
        matcher=args.matcher,
        weights=args.weights,
        pairs=args.pairs,
        num_pairs=args.num_pairs,
        loop_closure=args.loop_closure,
        resize=tuple(args.resize) if args.resize else None,
        rotation=args.rotation,
        camera_mode=args.camera_mode,
        camera_model=args.camera_model,
        device=args.device,
        sift_backend=args.sift_backend,
        amp=args.amp,
        cell_size=args.cell_size,
        max_error=args.max_error,
        refine=args.refine,
        min_match_score=args.min_match_score,
        verification=None if args.min_num_inliers is None else VerificationConfig(min_num_inliers=args.min_num_inliers),
        calibration=args.calibration,
        refine_iterations=args.refine_iterations,
        num_threads=args.num_threads,
        verbose=args.verbose,
    )
    result = main(args.images, args.outputs, config=config)
    print(format_summary(result.summary))
    return result


if __name__ == "__main__":
    run_cli(main_cli)
