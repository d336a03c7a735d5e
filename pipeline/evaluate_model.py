"""Accuracy of a reconstruction against ground-truth cameras.

* registered: how many GT images the model registered;
* relative-rotation error: for every pair of registered images, the angle between the estimated and GT
  relative rotations ``R_j R_i^T`` (invariant to the model's gauge, so no alignment is needed);
  median / mean / max in degrees;
* camera centres: the model is aligned to GT by the least-squares similarity (Umeyama, Sim3) of the
  registered camera centres (pycolmap.estimate_sim3d), then centre errors are reported in GT units and
  relative to the scene extent (median distance of GT centres to their centroid).

CLI::

    python -m pipeline.evaluate_model --model OUT/sfm --gt templeR_par.txt
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from core.colmap_model import read_model
from core.errors import UserError, run_cli


class Pose(Protocol):
    """Anything with a world-to-camera rotation ``R`` (3, 3) and translation ``t`` (3,)."""

    R: np.ndarray
    t: np.ndarray


@dataclass(frozen=True)
class SimplePose:
    R: np.ndarray
    t: np.ndarray


@dataclass
class ModelAccuracy:
    """Accuracy figures of a model against GT (angles in degrees, distances in GT units)."""

    num_gt: int
    num_registered: int
    num_pairs: int
    median_rotation_error: float
    mean_rotation_error: float
    max_rotation_error: float
    median_center_error: float
    mean_center_error: float
    max_center_error: float
    scene_extent: float
    median_center_error_relative: float
    center_errors: dict[str, float] = field(default_factory=dict)
    unregistered: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for humans."""
        return (
            f"registered {self.num_registered}/{self.num_gt}; relative-rotation error median "
            f"{self.median_rotation_error:.3f} deg (mean {self.mean_rotation_error:.3f}, max "
            f"{self.max_rotation_error:.3f}) over {self.num_pairs} pairs; Sim3-aligned centre error median "
            f"{self.median_center_error:.4g} ({100 * self.median_center_error_relative:.2f} % of the scene extent)"
        )


def model_poses(reconstruction) -> dict[str, SimplePose]:
    """World-to-camera poses of the registered images of a pycolmap Reconstruction, by image name."""
    poses: dict[str, SimplePose] = {}
    for image_id in reconstruction.reg_image_ids():
        image = reconstruction.images[image_id]
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        matrix = np.asarray(pose.matrix(), dtype=np.float64)
        poses[image.name] = SimplePose(matrix[:, :3].copy(), matrix[:, 3].copy())
    return poses


def rotation_angles(R: np.ndarray) -> np.ndarray:
    """Rotation angles in degrees of a stack of rotation matrices (..., 3, 3)."""
    trace = np.trace(R, axis1=-2, axis2=-1)
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def relative_rotation_errors(est: list[np.ndarray], gt: list[np.ndarray]) -> np.ndarray:
    """Errors (degrees) of all pairwise relative rotations ``R_j R_i^T``, i < j."""
    est_r, gt_r = np.stack(est), np.stack(gt)
    i, j = np.triu_indices(len(est_r), k=1)
    rel_est = est_r[j] @ np.transpose(est_r[i], (0, 2, 1))
    rel_gt = gt_r[j] @ np.transpose(gt_r[i], (0, 2, 1))
    return rotation_angles(np.transpose(rel_est, (0, 2, 1)) @ rel_gt)


def align_sim3(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``source`` points mapped by the least-squares similarity onto ``target`` (pycolmap's Umeyama)."""
    import pycolmap

    transform = pycolmap.estimate_sim3d(np.asarray(source, np.float64), np.asarray(target, np.float64))
    if transform is None:
        raise UserError("cannot align the model to GT: the camera centres are degenerate (collinear or coincident)")
    matrix = np.asarray(transform.matrix(), dtype=np.float64)  # (3, 4) = [s R | t]
    return source @ matrix[:, :3].T + matrix[:, 3]


def evaluate(reconstruction_or_poses, gt: Mapping[str, Pose]) -> ModelAccuracy:
    """Compare a reconstruction (or ``{name: pose}``) with GT poses ``{name: pose with R, t}``."""
    poses = reconstruction_or_poses
    if not isinstance(poses, Mapping):
        poses = model_poses(poses)
    names = [name for name in gt if name in poses]
    unregistered = [name for name in gt if name not in poses]
    nan = float("nan")
    rot = np.zeros(0)
    if len(names) >= 2:
        rot = relative_rotation_errors([poses[n].R for n in names], [gt[n].R for n in names])
    gt_centers = np.array([-gt[n].R.T @ gt[n].t for n in names]).reshape(-1, 3)
    est_centers = np.array([-poses[n].R.T @ poses[n].t for n in names]).reshape(-1, 3)
    all_gt = np.array([-p.R.T @ p.t for p in gt.values()]).reshape(-1, 3)
    extent = float(np.median(np.linalg.norm(all_gt - all_gt.mean(0), axis=1))) if len(all_gt) else nan
    if len(names) >= 3:
        errors = np.linalg.norm(align_sim3(est_centers, gt_centers) - gt_centers, axis=1)
    else:
        errors = np.full(len(names), nan)
    stat = lambda f, x: float(f(x)) if len(x) else nan  # noqa: E731 - tiny local helper
    return ModelAccuracy(
        num_gt=len(gt),
        num_registered=len(names),
        num_pairs=len(rot),
        median_rotation_error=stat(np.median, rot),
        mean_rotation_error=stat(np.mean, rot),
        max_rotation_error=stat(np.max, rot),
        median_center_error=stat(np.median, errors),
        mean_center_error=stat(np.mean, errors),
        max_center_error=stat(np.max, errors),
        scene_extent=extent,
        median_center_error_relative=stat(np.median, errors) / extent if extent and extent > 0 else nan,
        center_errors={n: float(e) for n, e in zip(names, errors)},
        unregistered=unregistered,
    )


def load_gt(path: Path) -> dict[str, Pose]:
    """GT poses from a Middlebury par file or a COLMAP model folder."""
    if path.is_dir():
        return dict(model_poses(read_model(path, "a Middlebury *_par.txt file or a GT COLMAP model folder (--gt)")))
    from core.par_files import read_par_file

    return dict(read_par_file(path))


def main(model: Path, gt: Path, output: Path | None = None) -> ModelAccuracy:
    """Evaluate the COLMAP model in ``model`` against ``gt`` (par file or model folder)."""
    accuracy = evaluate(read_model(model, "the model folder (--model, e.g. OUT/sfm)"), load_gt(Path(gt)))
    if output is not None:
        from core.io import write_text_atomic

        write_text_atomic(output, json.dumps(accuracy.to_dict(), indent=2))
    return accuracy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate_model",
        description="Accuracy of a COLMAP model against ground-truth cameras.",
    )
    parser.add_argument("--model", type=Path, required=True, help="COLMAP model folder (e.g. OUT/sfm)")
    parser.add_argument("--gt", type=Path, required=True, help="Middlebury *_par.txt file or GT COLMAP model folder")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    return parser


def main_cli(argv: list[str] | None = None) -> ModelAccuracy:
    args = build_parser().parse_args(argv)
    accuracy = main(args.model, args.gt, args.output)
    print(accuracy.describe())
    return accuracy


if __name__ == "__main__":
    run_cli(main_cli)
