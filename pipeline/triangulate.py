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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core import io
from core.errors import UserError, run_cli
from pipeline.colmap_db import (
    VerificationConfig,
    colmap_logging,
    import_features,
    import_matches,
    remove_database,
)

VERIFICATION_MODES = ("known", "estimate", "none")


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
    path = Path(reference)
    if not any((path / f"images{ext}").is_file() for ext in (".bin", ".txt")):
        raise UserError(f"{path}: no COLMAP model (images.bin / images.txt) found; give the reference model folder")
    return pycolmap.Reconstruction(str(path))


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


def main(
    reference,
    image_dir: Path,
    pairs: Path,
    features: Path,
    matches: Path,
    outputs: Path,
    verification: str = "known",
    max_error: float = 4.0,
    min_match_score: float | None = None,
    verbose: bool = False,
):
    """Triangulate the matches of ``pairs`` into ``reference`` (model folder or Reconstruction).

    Writes ``outputs/database.db`` and the triangulated model (COLMAP binary) into ``outputs``;
    returns ``(reconstruction, TriangulationStats)``.
    """
    import pycolmap

    if verification not in VERIFICATION_MODES:
        raise UserError(f"unknown verification {verification!r}; choose one of {', '.join(VERIFICATION_MODES)}")
    reference = load_reference(reference)
    outputs, image_dir = Path(outputs), Path(image_dir)
    pair_list = io.read_pairs(pairs)
    known = {image.name for image in reference.images.values()}
    unknown = sorted({n for pair in pair_list for n in pair} - known)
    if unknown:
        raise UserError(f"{pairs}: {len(unknown)} image(s) are not in the reference model (e.g. {unknown[0]!r})")
    registered = {reference.images[i].name for i in reference.reg_image_ids()}
    unposed = sorted({n for pair in pair_list for n in pair} - registered)
    if unposed:
        raise UserError(f"{pairs}: image {unposed[0]!r} has no pose in the reference model; remove its pairs")
    names = sorted({n for pair in pair_list for n in pair})
    paired = set(names)
    for path in (features, matches):
        if not Path(path).is_file():
            raise UserError(f"{path}: not found; run the matching step (python -m pipeline.match_dense) first")

    outputs.mkdir(parents=True, exist_ok=True)
    database = outputs / "database.db"
    temp = outputs / ".database.db.tmp"
    remove_database(temp)
    try:
        image_ids = create_database_from_model(reference, temp)
        options = VerificationConfig(max_error=max_error, min_num_inliers=1)
        with pycolmap.Database.open(str(temp)) as db:
            import_features(db, {name: image_ids[name] for name in names}, Path(features))
            for name, image_id in image_ids.items():
                if name not in paired:  # images without pairs: no keypoints
                    db.write_keypoints(image_id, np.zeros((0, 2), np.float32))
            _, num_matches = import_matches(db, image_ids, pair_list, Path(matches), min_match_score, min_num_matches=1)
            if verification == "none":
                for pair_id, matched in zip(*db.read_all_matches()):
                    id0, id1 = pycolmap.pair_id_to_image_pair(pair_id)
                    geometry = pycolmap.TwoViewGeometry()
                    geometry.config = pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED
                    geometry.inlier_matches = matched
                    db.write_two_view_geometry(id0, id1, geometry)
        with colmap_logging(verbose):
            if verification == "known":
                pycolmap.guided_geometric_verification(
                    reference, str(temp), two_view_geometry_options=options.to_pycolmap()
                )
            elif verification == "estimate":
                pycolmap.geometric_verification(
                    str(temp), two_view_geometry_options=VerificationConfig(max_error=max_error).to_pycolmap()
                )
        remove_database(database, side_files_only=True)
        temp.replace(database)
    finally:
        remove_database(temp)
    with pycolmap.Database.open(str(database)) as db:
        num_verified = int(db.num_inlier_matches())

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
        for path in model_dir.iterdir():  # each model file replaced in one rename
            path.replace(outputs / path.name)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    stats = TriangulationStats(
        num_images=len(names),
        num_pairs=len(pair_list),
        num_matches=num_matches,
        num_verified_matches=num_verified,
        num_points=reconstruction.num_points3D(),
        mean_track_length=float(reconstruction.compute_mean_track_length()) if reconstruction.num_points3D() else 0.0,
        mean_reprojection_error=float(reconstruction.compute_mean_reprojection_error())
        if reconstruction.num_points3D()
        else float("nan"),
    )
    return reconstruction, stats


def main_cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.triangulate",
        description="Triangulate matches into a reference COLMAP model with known poses.",
    )
    parser.add_argument("--reference", type=Path, required=True, help="reference COLMAP model folder (posed images)")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--matches", type=Path, required=True)
    parser.add_argument("--outputs", type=Path, required=True)
    parser.add_argument("--verification", choices=VERIFICATION_MODES, default="known")
    parser.add_argument("--max-error", type=float, default=4.0, help="epipolar / RANSAC threshold in px")
    parser.add_argument("--min-match-score", type=float)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    _, stats = main(
        args.reference,
        args.images,
        args.pairs,
        args.features,
        args.matches,
        args.outputs,
        args.verification,
        args.max_error,
        args.min_match_score,
        args.verbose,
    )
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in asdict(stats).items()))
    print(f"wrote the triangulated model to {args.outputs}")


if __name__ == "__main__":
    run_cli(main_cli)
