"""Triangulate matches into a reference model whose cameras and poses are known (hloc's triangulation).

Steps: a database mirroring the reference (same camera and image ids), keypoints (+0.5, COLMAP's pixel
origin) and matches imported from hloc files, verification, then :func:`pycolmap.triangulate_points`
(poses and intrinsics stay fixed). Verification modes:

* ``known`` (default): the epipolar geometry of the known poses decides —
  :func:`pycolmap.guided_geometric_verification` builds each pair's essential matrix from the reference
  poses and keeps the matches within ``max_error`` px of it; no RANSAC;
* ``estimate``: two-view geometry estimated from the matches (RANSAC), ignoring the poses;
* ``none``: every match is taken as an inlier.

CLI::

    python -m pipeline.triangulate --reference MODEL --images DIR --pairs pairs.txt \\
        --features features.h5 --matches matches.h5 --outputs OUT
"""

from __future__ import annotations

import argparse
import copy
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from core import io
from core.cli import add_config_arguments, config_from_options
from core.colmap_model import read_model
from core.errors import UserError, run_cli
from pipeline.colmap_db import (
    VerificationConfig,
    colmap_logging,
    import_features,
    import_matches,
    remove_database,
)

VerificationMode = Literal["known", "estimate", "none"]
VERIFICATION_MODES: tuple[str, ...] = get_args(VerificationMode)
Pair = tuple[str, str]


@dataclass(frozen=True)
class TriangulationConfig:
    """How matches are verified and triangulated into the reference model."""

    #: known: the epipolar geometry of the reference poses decides; estimate: two-view geometry from the
    #: matches (RANSAC); none: every match is an inlier
    verification: VerificationMode = "known"
    max_error: float = 4.0  # epipolar / RANSAC threshold in px
    min_match_score: float | None = None  # matches scored at or below this are not imported
    verbose: bool = False  # show COLMAP's log

    def __post_init__(self) -> None:
        if self.verification not in VERIFICATION_MODES:
            raise UserError(
                f"unknown verification {self.verification!r}; choose one of {', '.join(VERIFICATION_MODES)}"
            )


@dataclass(frozen=True)
class TriangulationStats:
    """Figures of a triangulation run."""

    num_images: int
    num_pairs: int
    num_matches: int
    num_verified_matches: int
    num_points: int
    mean_track_length: float
    mean_reprojection_error: float


def load_reference(reference) -> "pycolmap.Reconstruction":  # noqa: F821 - imported lazily
    """A pycolmap Reconstruction from a model folder (or the object itself)."""
    import pycolmap

    if isinstance(reference, pycolmap.Reconstruction):
        return reference
    return read_model(reference, "the reference model folder")


def create_database_from_model(reconstruction, database_path: Path) -> dict[str, int]:
    """A database with every camera (focal flagged as prior) and image of the reference, keeping the
    reference's ids (pycolmap.triangulate_points needs them all); returns {name: image_id}."""
    import pycolmap

    remove_database(database_path)
    image_ids: dict[str, int] = {}
    with pycolmap.Database.open(str(database_path)) as db:
        for camera_id in sorted(reconstruction.cameras):
            camera = copy.copy(reconstruction.cameras[camera_id])  # the reference stays untouched
            camera.has_prior_focal_length = True
            db.write_camera(camera, use_camera_id=True)
        for image_id in sorted(reconstruction.images):
            image = reconstruction.images[image_id]
            db.write_image(
                pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image_id), use_image_id=True
            )
            image_ids[image.name] = image_id
    return image_ids


def read_checked_pairs(reference, pairs: Path, features: Path, matches: Path) -> list[Pair]:
    """The pairs of ``pairs``, every image of which has a pose in the reference; the match files must exist."""
    pair_list = io.read_pairs(pairs)
    named = {n for pair in pair_list for n in pair}
    unknown = sorted(named - {image.name for image in reference.images.values()})
    if unknown:
        raise UserError(f"{pairs}: {len(unknown)} image(s) are not in the reference model (e.g. {unknown[0]!r})")
    unposed = sorted(named - {reference.images[i].name for i in reference.reg_image_ids()})
    if unposed:
        raise UserError(f"{pairs}: image {unposed[0]!r} has no pose in the reference model; remove its pairs")
    for path in (features, matches):
        if not Path(path).is_file():
            raise UserError(f"{path}: not found; run the matching step (python -m pipeline.match_dense) first")
    return pair_list


def _import_into(
    database: Path, reference, pair_list: Sequence[Pair], features: Path, matches: Path, config: TriangulationConfig
) -> int:
    """Cameras, images, keypoints and matches into a new ``database`` (with ``verification="none"`` every match an
    inlier already); returns the number of matches."""
    import pycolmap

    image_ids = create_database_from_model(reference, database)
    paired = {n for pair in pair_list for n in pair}
    with pycolmap.Database.open(str(database)) as db:
        import_features(db, {name: image_ids[name] for name in sorted(paired)}, Path(features))
        for name, image_id in image_ids.items():
            if name not in paired:  # images without pairs: no keypoints
                db.write_keypoints(image_id, np.zeros((0, 2), np.float32))
        _, num_matches, _ = import_matches(
            db, image_ids, pair_list, Path(matches), config.min_match_score, min_num_matches=1
        )
        if config.verification == "none":
            for pair_id, matched in zip(*db.read_all_matches()):
                id0, id1 = pycolmap.pair_id_to_image_pair(pair_id)
                geometry = pycolmap.TwoViewGeometry()
                geometry.config = pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED
                geometry.inlier_matches = matched
                db.write_two_view_geometry(id0, id1, geometry)
    return num_matches


def build_verified_database(
    reference, pair_list: Sequence[Pair], features: Path, matches: Path, outputs: Path, config: TriangulationConfig
) -> tuple[Path, int, int]:
    """``outputs/database.db`` mirroring the reference with the matches verified (built in a temporary file,
    renamed into place); returns (database, matches, verified matches)."""
    import pycolmap

    database, temp = outputs / "database.db", outputs / ".database.db.tmp"
    remove_database(temp)
    try:
        num_matches = _import_into(temp, reference, pair_list, features, matches, config)
        with colmap_logging(config.verbose):
            if config.verification == "known":
                options = VerificationConfig(max_error=config.max_error, min_num_inliers=1).to_pycolmap()
                pycolmap.guided_geometric_verification(reference, str(temp), two_view_geometry_options=options)
            elif config.verification == "estimate":
                options = VerificationConfig(max_error=config.max_error).to_pycolmap()
                pycolmap.geometric_verification(str(temp), two_view_geometry_options=options)
        remove_database(database, side_files_only=True)
        temp.replace(database)
    finally:
        remove_database(temp)
    with pycolmap.Database.open(str(database)) as db:
        num_verified = int(db.num_inlier_matches())
    return database, num_matches, num_verified


def triangulate_into(reference, database: Path, image_dir: Path, outputs: Path, verbose: bool):
    """The reference's cameras and poses with points triangulated from ``database``, written (COLMAP binary)
    into ``outputs``, each model file replaced in one rename."""
    import pycolmap

    model_dir = outputs / ".model.tmp"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir()
    try:
        with colmap_logging(verbose):
            reconstruction = pycolmap.triangulate_points(
                reference,
                str(database),
                str(image_dir),
                str(model_dir),
                clear_points=True,
                options=pycolmap.IncrementalPipelineOptions(),
                refine_intrinsics=False,
            )
        reconstruction.write_binary(str(model_dir))
        for path in model_dir.iterdir():
            path.replace(outputs / path.name)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return reconstruction


def main(
    reference,
    image_dir: Path,
    pairs: Path,
    features: Path,
    matches: Path,
    outputs: Path,
    config: TriangulationConfig = TriangulationConfig(),
):
    """Triangulate the matches of ``pairs`` into ``reference`` (model folder or Reconstruction).

    Writes ``outputs/database.db`` and the triangulated model (COLMAP binary) into ``outputs``;
    returns ``(reconstruction, TriangulationStats)``.
    """
    reference = load_reference(reference)
    outputs, image_dir = Path(outputs), Path(image_dir)
    pair_list = read_checked_pairs(reference, pairs, features, matches)
    outputs.mkdir(parents=True, exist_ok=True)
    database, num_matches, num_verified = build_verified_database(
        reference, pair_list, features, matches, outputs, config
    )
    reconstruction = triangulate_into(reference, database, image_dir, outputs, config.verbose)
    points = reconstruction.num_points3D()
    stats = TriangulationStats(
        num_images=len({n for pair in pair_list for n in pair}),
        num_pairs=len(pair_list),
        num_matches=num_matches,
        num_verified_matches=num_verified,
        num_points=points,
        mean_track_length=float(reconstruction.compute_mean_track_length()) if points else 0.0,
        mean_reprojection_error=float(reconstruction.compute_mean_reprojection_error()) if points else float("nan"),
    )
    return reconstruction, stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.triangulate",
        description="Triangulate matches into a reference COLMAP model with known poses.",
    )
    parser.add_argument("--reference", type=Path, required=True, help="reference COLMAP model folder (posed images)")
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--pairs", type=Path, required=True, help="pairs.txt")
    parser.add_argument("--features", type=Path, required=True, help="features.h5")
    parser.add_argument("--matches", type=Path, required=True, help="matches.h5")
    parser.add_argument("--outputs", type=Path, required=True, help="output folder (database and model)")
    add_config_arguments(parser, TriangulationConfig)
    return parser


def main_cli(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_options(parser, args, TriangulationConfig)
    _, stats = main(args.reference, args.images, args.pairs, args.features, args.matches, args.outputs, config)
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in asdict(stats).items()))
    print(f"wrote the triangulated model to {args.outputs}")


if __name__ == "__main__":
    run_cli(main_cli)
