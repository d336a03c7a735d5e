"""Robust absolute pose (2D-3D) estimators: pycolmap LO-RANSAC and OpenCV USAC MAGSAC++.

Both take 2D points in COLMAP pixel coordinates (hloc keypoints + 0.5), 3D points in world coordinates
and a pycolmap camera, and return a world-to-camera pose (pycolmap ``Rigid3d``) with its inlier mask.

* ``pycolmap``: ``pycolmap.estimate_and_refine_absolute_pose`` — P3P inside LO-RANSAC, then non-linear
  refinement on the inliers (hloc's estimator).
* ``magsac``: ``cv2.solvePnPRansac`` with a ``cv2.UsacParams`` configured exactly as OpenCV's
  ``USAC_MAGSAC`` preset (uniform sampler, MAGSAC++ score, sigma-consensus local optimisation), on
  points undistorted by the camera's distortion model; then ``pycolmap.refine_absolute_pose`` on the
  MAGSAC++ inliers with the full (distorted) camera model.

Any estimator failure (too few points, degenerate configuration, OpenCV error, non-finite pose,
fewer inliers than required) is returned as ``success=False`` with a reason, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import cv2
import numpy as np
import pycolmap

from core.cameras import pinhole_matrix, undistort_points
from core.errors import UserError

Estimator = Literal["pycolmap", "magsac"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
MIN_CORRESPONDENCES = 4  # P3P needs 3 points plus one to pick among its solutions


@dataclass(frozen=True)
class PoseEstimationConfig:
    """Options of :func:`estimate_absolute_pose`."""

    estimator: Estimator = "pycolmap"  # pycolmap LO-RANSAC or OpenCV USAC MAGSAC++
    max_error: float = 12.0  # RANSAC inlier threshold in pixels (hloc uses 12 px for Aachen, 48 px for InLoc)
    confidence: float = 0.9999  # RANSAC confidence
    max_iterations: int = 10000  # RANSAC iterations at most
    min_inliers: int = 6  # fewer inliers than this is a failed query
    seed: int = 0  # RANSAC random seed, for reproducible runs
    refine: bool = True  # magsac only: non-linear refinement on the inliers (pycolmap always refines)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UserError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if not self.max_error > 0:
            raise UserError(f"max_error must be a positive number of pixels, got {self.max_error}")
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.max_iterations < 1 or self.min_inliers < MIN_CORRESPONDENCES:
            raise UserError(
                f"max_iterations must be >= 1 and min_inliers >= {MIN_CORRESPONDENCES}, "
                f"got {self.max_iterations} and {self.min_inliers}"
            )


@dataclass
class PoseEstimate:
    """The outcome of one estimation; ``cam_from_world`` is None when it failed."""

    success: bool
    cam_from_world: pycolmap.Rigid3d | None
    inlier_mask: np.ndarray  # (M,) bool over the input correspondences
    reason: str = ""  # why it failed ('' on success)
    details: dict = field(default_factory=dict)

    @property
    def num_inliers(self) -> int:
        return int(self.inlier_mask.sum())


def _failure(count: int, reason: str) -> PoseEstimate:
    return PoseEstimate(False, None, np.zeros(count, dtype=bool), reason)


def magsac_params(config: PoseEstimationConfig) -> cv2.UsacParams:
    """UsacParams equal to OpenCV's ``USAC_MAGSAC`` preset, with our threshold, budget and seed."""
    params = cv2.UsacParams()
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_SIGMA
    params.loSampleSize = 50  # the preset's values for non-homography models
    params.loIterations = 10
    params.threshold = float(config.max_error)
    params.confidence = float(config.confidence)
    params.maxIterations = int(config.max_iterations)
    params.randomGeneratorState = int(config.seed)
    return params


def _valid_pose(pose: pycolmap.Rigid3d | None) -> bool:
    if pose is None:
        return False
    return bool(np.all(np.isfinite(pose.rotation.quat)) and np.all(np.isfinite(pose.translation)))


def estimate_absolute_pose(
    points2D: np.ndarray, points3D: np.ndarray, camera: pycolmap.Camera, config: PoseEstimationConfig | None = None
) -> PoseEstimate:
    """Estimate the world-to-camera pose from (M, 2) COLMAP pixels and (M, 3) world points."""
    config = config if config is not None else PoseEstimationConfig()
    points2D = np.asarray(points2D, dtype=np.float64).reshape(-1, 2)
    points3D = np.asarray(points3D, dtype=np.float64).reshape(-1, 3)
    count = len(points2D)
    if len(points3D) != count:
        raise ValueError(f"{count} 2D points but {len(points3D)} 3D points")
    needed = max(MIN_CORRESPONDENCES, config.min_inliers)
    if count < needed:
        return _failure(count, f"too few 2D-3D correspondences ({count} < {needed})")
    if not (np.all(np.isfinite(points2D)) and np.all(np.isfinite(points3D))):
        return _failure(count, "non-finite 2D or 3D points")
    if config.estimator == "pycolmap":
        estimate = _estimate_pycolmap(points2D, points3D, camera, config)
    else:
        estimate = _estimate_magsac(points2D, points3D, camera, config)
    if estimate.success and estimate.num_inliers < config.min_inliers:
        return PoseEstimate(
            False, None, estimate.inlier_mask, f"too few inliers ({estimate.num_inliers} < {config.min_inliers})"
        )
    return estimate


def _estimate_pycolmap(
    points2D: np.ndarray, points3D: np.ndarray, camera: pycolmap.Camera, config: PoseEstimationConfig
) -> PoseEstimate:
    options = pycolmap.AbsolutePoseEstimationOptions()
    options.ransac.max_error = float(config.max_error)
    options.ransac.confidence = float(config.confidence)
    options.ransac.max_num_trials = int(config.max_iterations)
    options.ransac.min_num_trials = min(100, int(config.max_iterations))
    options.ransac.random_seed = int(config.seed)
    try:
        result = pycolmap.estimate_and_refine_absolute_pose(points2D, points3D, camera, options)
    except Exception as error:  # pycolmap raises on some degenerate inputs instead of returning None
        return _failure(len(points2D), f"pycolmap error: {error}")
    if result is None or not _valid_pose(result.get("cam_from_world")):
        return _failure(len(points2D), "LO-RANSAC found no pose (degenerate or too many outliers)")
    mask = np.asarray(result["inlier_mask"], dtype=bool).reshape(-1)
    return PoseEstimate(True, result["cam_from_world"], mask, "", {"ransac_inliers": int(mask.sum())})


def _estimate_magsac(
    points2D: np.ndarray, points3D: np.ndarray, camera: pycolmap.Camera, config: PoseEstimationConfig
) -> PoseEstimate:
    count = len(points2D)
    undistorted = np.ascontiguousarray(undistort_points(points2D, camera))
    K = pinhole_matrix(camera)
    try:
        found, _, rvec, tvec, inliers = cv2.solvePnPRansac(
            np.ascontiguousarray(points3D), undistorted, K, np.zeros(4), params=magsac_params(config)
        )
    except cv2.error as error:
        return _failure(count, f"OpenCV USAC error: {str(error).strip().splitlines()[-1]}")
    if not found or inliers is None or rvec is None:
        return _failure(count, "MAGSAC++ found no pose (degenerate or too many outliers)")
    mask = np.zeros(count, dtype=bool)
    mask[np.asarray(inliers, dtype=np.int64).reshape(-1)] = True
    rvec = np.asarray(rvec, dtype=np.float64).reshape(3)
    tvec = np.asarray(tvec, dtype=np.float64).reshape(3)
    if not (np.all(np.isfinite(rvec)) and np.all(np.isfinite(tvec))):
        return _failure(count, "MAGSAC++ returned a non-finite pose")
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rvec), tvec)  # Rotation3d(3-vector) is axis-angle, as rvec
    details = {"magsac_inliers": int(mask.sum())}
    if config.refine and mask.sum() >= MIN_CORRESPONDENCES:
        try:
            refined = pycolmap.refine_absolute_pose(pose, points2D, points3D, mask, camera)
        except Exception as error:
            return PoseEstimate(False, None, mask, f"refinement error: {error}", details)
        if refined is None or not _valid_pose(refined.get("cam_from_world")):
            return PoseEstimate(False, None, mask, "refinement of the MAGSAC++ pose failed", details)
        pose = refined["cam_from_world"]
    return PoseEstimate(True, pose, mask, "", details)
