"""A folder of images in, a COLMAP reconstruction out: check -> pairs -> matching (exact tracks) -> database ->
geometric verification -> incremental mapping with staged self-calibration -> geometry refinement (pycolmap).

    python -m pipeline.reconstruct --images DIR --outputs OUT [--matcher loftr+sift|loftr|sift] [--weights W]
        [--pairs exhaustive|sequential|retrieval] [--num-pairs K] [--resize 640 [840 ...]]
        [--rotation none|auto|best|union] [--refine tracks|klt|none] [--calibration staged|colmap]
        [--refine-iterations 2] [--camera-mode auto|single|per-image] [--device auto|cpu|cuda]

Outputs under OUT (:class:`ReconstructPaths`): ``pairs.txt``, ``features.h5``, ``matches.h5`` (hloc formats; for
an ensemble each matcher's own files under ``OUT/<matcher>/``), ``database.db``, ``sfm/`` (the largest model,
COLMAP binary and text), ``models/`` (every model the mapper made), ``points.ply``, ``summary.json``
(registered/total, points, track lengths, reprojection error per refinement round, the cameras and every
calibration decision, the tracks' figures, per unregistered image its matched and verified pairs, timings per
step), ``reconstruction.png`` and ``reconstruction.html`` (an interactive viewer).

Resuming: run the same command again. Matching resumes pair by pair (:mod:`pipeline.match_dense`);
the verified database is reused when ``database.json`` records the same matches and options (else it
is rebuilt in a temporary file and renamed into place); the mapping is skipped when ``summary.json``
records the same inputs and the model is complete, else redone.

The default matcher is the ``loftr+sift`` ensemble (:mod:`pipeline.ensemble`): SIFT's keypoints and
LoFTR's exact tracks in one model (LoFTR with the outdoor weights; offline and without ``--weights`` the
shipped ``loftr-compact``, announced on stderr; it never switches to another matcher by itself). The dense
matching options follow the matcher (:func:`pipeline.match_dense.dense_defaults`); for LoFTR:

* ``--rotation auto``: pairs whose images are turned against each other (SIFT orientations vote, see
  :mod:`pipeline.orientation`) are matched with image 1 turned back; upright pairs are matched as is.
* ``--refine tracks`` (detector-free SfM, :mod:`pipeline.tracks`): tracks are built exactly on LoFTR's
  coarse cells and every observation is aligned to its track's reference view; ``--refine klt`` is the
  earlier per-pair Lucas-Kanade refinement with quantization on a 4 px / 0.5 px grid.

Mapping (:mod:`pipeline.mapping`) holds the distortion until enough images support it, maps again with
COLMAP's options when images are left out, and refines the geometry in two rounds of bundle adjustment,
observation filtering (3 px, 2 px), re-triangulation and registration of left-over images.

API: ``main(images, outputs, ReconstructConfig(...))``; the config composes the steps' own configs
(:class:`~pipeline.match_dense.MatcherSpec`, :class:`~pipeline.pairs.PairsConfig`,
:class:`~pipeline.match_dense.DenseMatchConfig`, :class:`~pipeline.colmap_db.VerificationConfig`,
:class:`~pipeline.mapping.MappingConfig`), and the command line is generated from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core import io
from core.cli import add_config_arguments, config_from_options
from core.colmap_model import incomplete_write, read_model, write_model
from core.distributed import DistributedConfig
from core.errors import UserError, run_cli
from core.resources import peak_rss_mb
from core.stamps import digest, file_state
from pipeline.colmap_db import CAMERA_MODES, CameraMode, VerificationConfig, build_database
from pipeline.ensemble import EnsembleStats
from pipeline.image_check import ImageCheck, check_h5, check_images
from pipeline.mapping import MappingConfig, MappingResult, run_mapping
from pipeline.match_dense import (
    DenseMatchConfig,
    DenseMatchResult,
    DenseOverrides,
    MatcherSpec,
    dense_defaults,
)
from pipeline.pairs import IMAGE_METHODS, PairsConfig, make_pairs
from pipeline.tta import split_resize

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
#: single detector-free matchers (their pairs need DENSE_MIN_INLIERS verified inliers)
MATCHERS_DENSE = ("loftr",)
MODEL_FILES = ("cameras.bin", "images.bin", "points3D.bin")
#: verified inliers a pair needs with a dense matcher (COLMAP's 15 is meant for SIFT): LoFTR returns hundreds of
#: matches on overlapping pairs, and on pairs that share nothing (e.g. opposite sides of a symmetric object) its
#: few wrong matches can still fit an epipolar geometry with 15-27 inliers, which then joins wrong images
DENSE_MIN_INLIERS = 30


@dataclass(frozen=True)
class ReconstructConfig:
    """Every option of a reconstruction run: the steps' configs, composed (the CLI is generated from them)."""

    matcher: MatcherSpec = MatcherSpec()
    pairs: PairsConfig = PairsConfig()
    #: None: derived from the matcher (pipeline.match_dense.dense_defaults); for an ensemble it is its dense
    #: part's (the SIFT part keeps SIFT's); build one with dense_defaults(matcher, resize, overrides)
    dense: DenseMatchConfig | None = None
    #: min_num_inliers None: COLMAP's 15, or DENSE_MIN_INLIERS for a dense matcher alone
    verification: VerificationConfig = VerificationConfig()
    #: min_num_matches None: the verification's minimum; verbose also shows COLMAP's log while verifying
    mapping: MappingConfig = MappingConfig()
    camera_mode: CameraMode = "auto"  # images sharing a camera: auto (same size and EXIF), single or per-image
    camera_model: str = "SIMPLE_RADIAL"  # COLMAP camera model
    min_match_score: float | None = None  # matches scored at or below this are not imported
    distributed: DistributedConfig = DistributedConfig()  # raw matching over Ray workers (--distributed ray)

    def __post_init__(self) -> None:
        if self.pairs.method not in IMAGE_METHODS:
            raise UserError(
                f"--pairs {self.pairs.method} needs a model, not images; choose one of {', '.join(IMAGE_METHODS)}"
            )
        if self.camera_mode not in CAMERA_MODES:
            raise UserError(f"unknown camera mode {self.camera_mode!r}; choose one of {', '.join(CAMERA_MODES)}")
        if self.dense is not None:
            if self.dense.max_error <= 0:
                raise UserError(f"--max-error must be > 0 px, got {self.dense.max_error}")
            views = split_resize(self.matcher.resize)[1]
            if self.dense.resize != views:
                raise UserError(
                    f"the dense matching sizes {self.dense.resize} are not those of the matcher's resize "
                    f"{self.matcher.resize}; give the sizes in the MatcherSpec and build the DenseMatchConfig with "
                    f"pipeline.match_dense.dense_defaults(matcher, resize, ...)"
                )


@dataclass(frozen=True)
class ReconstructPaths:
    """Where a run writes what, under its outputs folder."""

    outputs: Path
    pairs: Path
    features: Path
    matches: Path
    database: Path
    database_stamp: Path  # database.json: what the verified database was built from
    ensemble_stamp: Path  # ensemble.json: what the merged ensemble files were made from
    sfm: Path  # the largest model
    models: Path  # every model the mapper made
    ply: Path
    summary: Path
    png: Path
    html: Path

    @classmethod
    def under(cls, outputs: Path) -> ReconstructPaths:
        outputs = Path(outputs)
        return cls(
            outputs,
            *(outputs / name for name in ("pairs.txt", "features.h5", "matches.h5", "database.db", "database.json")),
            *(outputs / name for name in ("ensemble.json", "sfm", "models", "points.ply", "summary.json")),
            outputs / "reconstruction.png",
            outputs / "reconstruction.html",
        )

    def part_files(self, matcher: str, parts: Sequence[str]) -> tuple[Path, Path]:
        """features.h5 and matches.h5 of one matcher of the run (an ensemble's under ``OUT/<matcher>/``)."""
        if len(parts) == 1:
            return self.features, self.matches
        return self.outputs / matcher / "features.h5", self.outputs / matcher / "matches.h5"


@dataclass
class ReconstructResult:
    """What :func:`main` returns: the largest model (None if nothing was reconstructed), the summary (as written
    to summary.json) and where the outputs are."""

    reconstruction: Any
    summary: dict[str, Any]
    outputs: Path
    paths: ReconstructPaths


class _Timer:
    """Collects wall-clock seconds per step, and the process's peak resident memory (MB) after each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    def __call__(self, step: str):
        timer = self

        class _Step:
            def __enter__(self) -> None:
                self.start = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                timer.seconds[step] = round(timer.seconds.get(step, 0.0) + time.perf_counter() - self.start, 3)
                timer.peak_rss_mb[step] = round(peak_rss_mb(), 1)

        return _Step()


# ------------------------------------------------------------------------------------------ options
def dense_config(config: ReconstructConfig, part: str) -> DenseMatchConfig:
    """The dense matching options of one matcher of the run: the run's ``dense`` (or the matcher's defaults);
    an ensemble's SIFT part always keeps SIFT's."""
    spec = config.matcher
    if config.dense is None or (part == "sift" and len(spec.parts) > 1):
        return dense_defaults(part, spec.resize)
    return config.dense


def verification_options(config: ReconstructConfig) -> VerificationConfig:
    """The two-view verification of a run: the given one, with the matcher's inlier minimum unless given."""
    if config.verification.min_num_inliers is not None:
        return config.verification
    # An ensemble's dense matches of pairs SIFT cannot verify already needed DENSE_MIN_INLIERS (pipeline.ensemble).
    dense_alone = config.matcher.matcher in MATCHERS_DENSE
    return dataclasses.replace(config.verification, min_num_inliers=DENSE_MIN_INLIERS if dense_alone else None)


def mapping_options(config: ReconstructConfig) -> MappingConfig:
    """The mapping step's options of a run: pairs need what the verification required, unless given."""
    if config.mapping.min_num_matches is not None:
        return config.mapping
    return dataclasses.replace(config.mapping, min_num_matches=verification_options(config).required_inliers)


def recorded_options(config: ReconstructConfig) -> dict[str, Any]:
    """The run's options as summary.json records them (and its mapping stamp uses: verbosity and how the work was
    spread over workers left out, as neither changes the model)."""
    options = asdict(config)
    options["mapping"].pop("verbose")
    options.pop("distributed")
    return options


# ------------------------------------------------------------------------------------------ steps
def check_inputs(images: Path, paths: ReconstructPaths) -> ImageCheck:
    """The usable images (the others logged); damaged HDF5 files of an earlier crash are a clear message now."""
    checked = check_images(images)
    for name, reason in checked.skipped.items():
        logger.warning("skipping %s: %s", name, reason)
    for path in (paths.features, paths.matches):
        check_h5(path)
    return checked


def choose_pairs(names: Sequence[str], config: ReconstructConfig, images: Path, paths: ReconstructPaths) -> list[Pair]:
    """The run's image pairs (pipeline.pairs), written to pairs.txt unless it already lists exactly them."""
    pair_list = make_pairs(names, config.pairs, images, paths.outputs, config.matcher.device)
    if not pair_list:
        raise UserError(f"{images}: no image pairs to match (strategy {config.pairs.method!r}); use more images")
    if not paths.pairs.is_file() or paths.pairs.read_text() != "".join(f"{a} {b}\n" for a, b in pair_list):
        io.write_pairs(paths.pairs, pair_list)
    return pair_list


@dataclass(frozen=True)
class Matched:
    """What the matching step did: one DenseMatchResult per matcher of the run, their descriptions and configs,
    the ensemble merge (None for a single matcher), and which matcher's figures the run reports."""

    results: dict[str, DenseMatchResult]
    descriptions: dict[str, dict[str, Any]]
    configs: dict[str, DenseMatchConfig]
    ensemble: EnsembleStats | None
    primary: str

    @property
    def result(self) -> DenseMatchResult:
        return self.results[self.primary]

    @property
    def config(self) -> DenseMatchConfig:
        return self.configs[self.primary]


def match_images(config: ReconstructConfig, images: Path, paths: ReconstructPaths) -> Matched:
    """Match the pairs with the run's matcher, or with each matcher of an ensemble and merge their files."""
    from pipeline import match_dense

    pair_list = match_dense.load_pairs(paths.pairs, images)  # validated before a checkpoint is loaded
    spec = config.matcher
    configs = {name: dense_config(config, name) for name in spec.parts}
    matchers = {name: spec.make(name) for name in spec.parts}  # every matcher made (weights loaded) before matching
    results = {}
    for name in spec.parts:
        features, matches = paths.part_files(name, spec.parts)
        features.parent.mkdir(parents=True, exist_ok=True)
        results[name] = match_dense.run(
            paths.pairs,
            images,
            features,
            matches,
            matchers[name],
            configs[name],
            distributed=config.distributed,
            worker_matcher=functools.partial(spec.make, name),
        )
    merged = merge_ensemble(results, spec.parts, pair_list, paths) if len(spec.parts) > 1 else None
    descriptions = {name: matcher.describe() for name, matcher in matchers.items()}
    return Matched(results, descriptions, configs, merged, spec.primary)


def merge_ensemble(
    results: dict[str, DenseMatchResult], parts: Sequence[str], pair_list: Sequence[Pair], paths: ReconstructPaths
) -> EnsembleStats:
    """The ensemble's features.h5 / matches.h5 from its parts' (pipeline.ensemble), reused when ``ensemble.json``
    records the same part files and the merged files are intact."""
    from pipeline import ensemble

    inputs: list[Any] = [
        [name, file_state(results[name].features), file_state(results[name].matches)] for name in parts
    ]
    inputs.append(asdict(ensemble.EnsembleConfig()))
    try:
        recorded = json.loads(paths.ensemble_stamp.read_text())
    except (OSError, ValueError):
        recorded = {}
    outputs = [file_state(paths.features), file_state(paths.matches)]
    if isinstance(recorded, dict) and recorded.get("inputs") == inputs and recorded.get("outputs") == outputs:
        return ensemble.EnsembleStats(**recorded["stats"])
    merged = ensemble.merge(
        [(name, results[name].features, results[name].matches) for name in parts],
        pair_list,
        paths.features,
        paths.matches,
    )
    record = {
        "inputs": inputs,
        "stats": asdict(merged),
        "outputs": [file_state(paths.features), file_state(paths.matches)],
    }
    io.write_text_atomic(paths.ensemble_stamp, json.dumps(record))
    return merged


@dataclass(frozen=True)
class DatabaseStep:
    """The verified database's figures (DatabaseStats as a dict; None when none was built) and whether an
    earlier run's was reused."""

    stats: dict[str, Any] | None
    reused: bool

    @property
    def verified_pairs(self) -> int:
        return (self.stats or {}).get("num_verified_pairs", 0)


def build_or_reuse_database(
    config: ReconstructConfig, images: Path, names: Sequence[str], pair_list: Sequence[Pair], paths: ReconstructPaths
) -> DatabaseStep:
    """The verified COLMAP database, reused when ``database.json`` records exactly these inputs (the mapper writes
    rigs and frames into the database, so its own file state is not part of the check)."""
    verification = verification_options(config)
    stamp = digest(
        {
            "features": file_state(paths.features),
            "matches": file_state(paths.matches),
            "names": names,
            "pairs": pair_list,
            "camera_mode": config.camera_mode,
            "camera_model": config.camera_model,
            "verification": asdict(verification),
            "min_match_score": config.min_match_score,
        }
    )
    try:
        recorded = json.loads(paths.database_stamp.read_text())
    except (OSError, ValueError):
        recorded = None
    if (
        isinstance(recorded, dict)
        and recorded.get("stamp") == stamp
        and paths.database.is_file()
        and isinstance(recorded.get("stats"), dict)
    ):
        logger.info("reusing the verified database %s", paths.database)
        return DatabaseStep(recorded["stats"], reused=True)
    _, built = build_database(
        paths.database,
        images,
        names,
        pair_list,
        paths.features,
        paths.matches,
        camera_mode=config.camera_mode,
        camera_model=config.camera_model,
        verification=verification,
        min_match_score=config.min_match_score,
        verbose=config.mapping.verbose,
    )
    stats = asdict(built)
    # Verification is the slow part: a run interrupted during mapping reuses the database.
    io.write_text_atomic(paths.database_stamp, json.dumps({"stamp": stamp, "stats": stats}))
    return DatabaseStep(stats, reused=False)


@dataclass(frozen=True)
class ModelStep:
    """The mapping step's outcome: the largest model (None: nothing reconstructed), registered images per model
    (largest first), the mapping report for summary.json, and whether the model is an earlier run's."""

    reconstruction: Any | None
    models: list[int]
    report: dict[str, Any]
    resumed: bool


def map_images(
    config: ReconstructConfig, images: Path, num_images: int, database: DatabaseStep, paths: ReconstructPaths
) -> ModelStep:
    """Incremental mapping and geometry refinement (pipeline.mapping); the largest model goes to sfm/."""
    mapped = (
        run_mapping(paths.database, images, paths.models, mapping_options(config), num_images)
        if database.verified_pairs
        else MappingResult({}, None)
    )
    report = {
        "attempts": mapped.attempts,
        "calibration": mapped.calibration,
        "refinement": mapped.refinement,
        "cameras": mapped.cameras(),
    }
    sizes = sorted((model.num_reg_images() for model in mapped.models.values()), reverse=True)
    if mapped.reconstruction is not None:
        write_model(mapped.reconstruction, paths.sfm)
    elif paths.sfm.exists():
        shutil.rmtree(paths.sfm)  # a stale model from other inputs must not survive
    return ModelStep(mapped.reconstruction, sizes, report, resumed=False)


@dataclass(frozen=True)
class PreviousRun:
    """What an earlier run's summary.json says, as far as a re-run reuses it."""

    inputs_stamp: str | None
    database: dict[str, Any] | None
    models: list[int]
    mapping: dict[str, Any]
    timings: dict[str, float]

    @classmethod
    def read(cls, path: Path) -> PreviousRun | None:
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(summary, dict):
            return None
        return cls(
            summary.get("inputs_stamp"),
            summary.get("database"),
            list(summary.get("models", [])),
            dict(summary.get("mapping", {})),
            dict(summary.get("timings", {})),
        )


def inputs_stamp(config: ReconstructConfig, names: Sequence[str], paths: ReconstructPaths) -> str:
    """What the model depends on: the matching outputs, the images and every option."""
    return digest(
        {
            "features": file_state(paths.features),
            "matches": file_state(paths.matches),
            "names": list(names),
            "options": recorded_options(config),
        }
    )


def resume_model(previous: PreviousRun, paths: ReconstructPaths) -> ModelStep:
    logger.info("the model in %s is up to date; skipping the database and the mapping", paths.sfm)
    return ModelStep(read_model(paths.sfm, "the model folder sfm/"), previous.models, previous.mapping, resumed=True)


def write_views(reconstruction: Any, images: Path, paths: ReconstructPaths, resumed: bool) -> None:
    """points.ply, reconstruction.png and the interactive reconstruction.html (kept when a resumed run has them)."""
    from pipeline.viz import plot_reconstruction, write_html

    if reconstruction is None:
        return
    title = images.parent.name if images.name == "images" else images.name
    if not (resumed and paths.ply.is_file()):
        export_ply(reconstruction, paths.ply)
    if not (resumed and paths.png.is_file()):
        plot_reconstruction(reconstruction, paths.png, title=title)
    if not (resumed and paths.html.is_file()):
        write_html(reconstruction, paths.html, title=title)


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


@dataclass(frozen=True)
class RunSteps:
    """The typed results of a run's steps, from which its summary is written."""

    checked: ImageCheck
    pairs: list[Pair]
    matched: Matched
    database: DatabaseStep
    model: ModelStep
    inputs_stamp: str


def matching_summary(matched: Matched) -> dict[str, Any]:
    """summary.json's "matching": the reported matcher's figures and options, the tracks and the ensemble."""
    result, dense = matched.result, matched.config
    return {
        "pairs_matched": result.pairs_matched,
        "pairs_reused": result.pairs_reused,
        "prepare_calls": result.prepare_calls,
        "up_to_date": result.up_to_date,
        "rotation": dense.rotation,
        "pairs_turned": result.pairs_turned,
        # [first, second, k]: the second image was matched as np.rot90(image, k) (k quarter turns)
        "turned_pairs": [[first, second, k] for (first, second), k in sorted(result.turns.items())],
        "refine": dense.refine,
        "cell_size": dense.cell_size,
        "max_error": dense.max_error,
        "tracks": asdict(result.tracks) if result.tracks is not None else None,
        "ensemble": asdict(matched.ensemble) if matched.ensemble is not None else None,
        # seconds over all matchers of the run: raw matching, then shared keypoints (tracks or quantization)
        "timings": {
            "raw_matching": round(sum(r.seconds_matching for r in matched.results.values()), 3),
            "shared_keypoints": round(sum(r.seconds_shared_keypoints for r in matched.results.values()), 3),
        },
        "distributed": {
            name: asdict(r.distributed) for name, r in matched.results.items() if r.distributed is not None
        },
        # peak resident memory (MB) of the process after each matcher's raw matching and shared keypoints
        "peak_rss_mb": {name: r.peak_rss_mb for name, r in matched.results.items()},
    }


def make_summary(
    images: Path,
    paths: ReconstructPaths,
    config: ReconstructConfig,
    steps: RunSteps,
    timings: dict[str, float],
    peak_rss: dict[str, float] | None = None,
) -> dict[str, Any]:
    """summary.json, from the steps' results."""
    import pycolmap

    names, reconstruction = steps.checked.names, steps.model.reconstruction
    description = steps.matched.descriptions[steps.matched.primary]
    summary: dict[str, Any] = {
        "images": str(images),
        "outputs": str(paths.outputs),
        "num_images": len(names),
        "skipped_images": steps.checked.skipped,
        **(
            model_statistics(reconstruction, names)
            if reconstruction is not None
            else {"registered": 0, "total": len(names)}
        ),
        "models": steps.model.models,
        "matcher": config.matcher.matcher,
        "weights": description.get("weights"),
        "matcher_options": description,
        "options": recorded_options(config),
        "pairs": {"strategy": config.pairs.method, "num_pairs": len(steps.pairs)},
        "matching": matching_summary(steps.matched),
        "database": steps.database.stats,
        "mapping": steps.model.report,
        "reused_database": steps.database.reused,
        "resumed_model": steps.model.resumed,
        "timings": timings,
        "peak_rss_mb": peak_rss or {},  # the process's peak resident memory (MB) after each step of this run
        "inputs_stamp": steps.inputs_stamp,
        "pycolmap": pycolmap.__version__,
    }
    summary["unregistered_images"] = unregistered_report(paths.database, names, summary)
    return summary


# ------------------------------------------------------------------------------------------ main
def main(images: Path, outputs: Path, config: ReconstructConfig = ReconstructConfig()) -> ReconstructResult:
    """Reconstruct the images of folder ``images`` into ``outputs`` (see the module docstring).

    Bad input raises :class:`UserError`; nothing reconstructable also raises it, after writing the summary.
    """
    images, paths = Path(images), ReconstructPaths.under(outputs)
    io.check_output_dir(paths.outputs, "--outputs")  # a file or a read-only place fails now, not after matching
    timer, start = _Timer(), time.perf_counter()
    with timer("check_images"):
        checked = check_inputs(images, paths)
    paths.outputs.mkdir(parents=True, exist_ok=True)
    with timer("pairs"):
        pair_list = choose_pairs(checked.names, config, images, paths)
    with timer("matching"):
        matched = match_images(config, images, paths)
    stamp = inputs_stamp(config, checked.names, paths)
    previous = PreviousRun.read(paths.summary)
    if previous is not None and previous.inputs_stamp == stamp and model_complete(paths.sfm):
        database, model = DatabaseStep(previous.database, reused=True), resume_model(previous, paths)
        timer.seconds.update({k: v for k, v in previous.timings.items() if k in ("database", "mapping")})
    else:
        with timer("database"):
            database = build_or_reuse_database(config, images, checked.names, pair_list, paths)
        with timer("mapping"):
            model = map_images(config, images, len(checked.names), database, paths)
    with timer("outputs"):
        write_views(model.reconstruction, images, paths, model.resumed)
    steps = RunSteps(checked, pair_list, matched, database, model, stamp)
    summary = make_summary(
        images,
        paths,
        config,
        steps,
        {**timer.seconds, "total": round(time.perf_counter() - start, 3)},
        timer.peak_rss_mb,
    )
    io.write_text_atomic(paths.summary, json.dumps(summary, indent=2, default=str))
    if model.reconstruction is None:
        raise UserError(
            f"{images}: no model could be reconstructed ({database.verified_pairs} image pairs passed geometric "
            f"verification); images need overlapping views — try: {'; '.join(what_to_try(summary))} "
            f"(details in {paths.summary})"
        )
    return ReconstructResult(model.reconstruction, summary, paths.outputs, paths)


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


# ------------------------------------------------------------------------------------------ CLI
#: MappingConfig fields with an option (the others are for the API)
MAPPING_OPTIONS = ("calibration", "refine_iterations", "num_threads", "verbose")


def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import WEIGHTS_HELP

    defaults = ReconstructConfig()
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.reconstruct",
        description="Reconstruct a folder of images with dense matching and pycolmap (hloc-style).",
    )
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--outputs", type=Path, required=True, help="output folder (re-run to resume)")
    add_config_arguments(parser, MatcherSpec, defaults=defaults.matcher, helps={"weights": WEIGHTS_HELP})
    # --pairs and --num-pairs predate PairsConfig: one option names the method, one the window or top-k.
    parser.add_argument("--pairs", choices=IMAGE_METHODS, default=defaults.pairs.method, help="pairs strategy")
    parser.add_argument(
        "--num-pairs",
        type=int,
        help=f"sequential window / retrieval top-k (default {defaults.pairs.window} / {defaults.pairs.num_matched})",
    )
    pairs_fields = {field.name for field in dataclasses.fields(PairsConfig)}
    add_config_arguments(parser, PairsConfig, exclude=pairs_fields - {"loop_closure"}, defaults=defaults.pairs)
    add_config_arguments(parser, DenseOverrides)
    verification_fields = {field.name for field in dataclasses.fields(VerificationConfig)}
    add_config_arguments(
        parser,
        VerificationConfig,
        exclude=verification_fields - {"min_num_inliers", "precheck"},
        defaults=defaults.verification,
    )
    mapping_fields = {field.name for field in dataclasses.fields(MappingConfig)}
    add_config_arguments(
        parser, MappingConfig, exclude=mapping_fields - set(MAPPING_OPTIONS), defaults=defaults.mapping
    )
    add_config_arguments(parser, ReconstructConfig, defaults=defaults)
    add_config_arguments(parser, DistributedConfig, defaults=defaults.distributed)
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ReconstructConfig:
    """The run a parsed command line asks for."""
    defaults = ReconstructConfig()
    spec = config_from_options(parser, args, MatcherSpec)
    if args.num_pairs is not None and args.num_pairs < 1:
        raise UserError(f"--num-pairs must be >= 1, got {args.num_pairs}")
    count = (
        {} if args.num_pairs is None else {"window" if args.pairs == "sequential" else "num_matched": args.num_pairs}
    )
    pairs = config_from_options(parser, args, PairsConfig, base=defaults.pairs, method=args.pairs, **count)
    overrides = config_from_options(parser, args, DenseOverrides)
    dense = None if overrides == DenseOverrides() else dense_defaults(spec.matcher, spec.resize, overrides)
    return config_from_options(
        parser,
        args,
        ReconstructConfig,
        base=defaults,
        matcher=spec,
        pairs=pairs,
        dense=dense,
        verification=config_from_options(parser, args, VerificationConfig, base=defaults.verification),
        mapping=config_from_options(parser, args, MappingConfig, base=defaults.mapping),
        distributed=config_from_options(parser, args, DistributedConfig, base=defaults.distributed),
    )


def main_cli(argv: Sequence[str] | None = None) -> ReconstructResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = main(args.images, args.outputs, config_from_args(parser, args))
    print(format_summary(result.summary))
    return result


if __name__ == "__main__":
    run_cli(main_cli)
