"""Pose files: ``name qw qx qy qz tx ty tz`` lines (world-to-camera, COLMAP convention).

The same format is used for our results, for ground-truth files of the mini datasets and for the
submissions to visuallocalization.net (Aachen and InLoc expect the query's file name without folders,
e.g. ``IMG_0731.JPG``; :func:`write_submission` writes that form).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap

from core.errors import UserError
from core.files import text_records
from core.io import write_text_atomic


def rigid_from_qt(qvec_wxyz: "np.ndarray | list[float]", tvec: "np.ndarray | list[float]") -> pycolmap.Rigid3d:
    """A world-to-camera pose from a COLMAP quaternion (w, x, y, z) and translation."""
    q = np.asarray(qvec_wxyz, dtype=np.float64).reshape(4)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"invalid quaternion {q.tolist()}")
    q = q / norm
    return pycolmap.Rigid3d(pycolmap.Rotation3d(q[[1, 2, 3, 0]]), np.asarray(tvec, dtype=np.float64).reshape(3))


def qt_from_rigid(pose: pycolmap.Rigid3d) -> tuple[np.ndarray, np.ndarray]:
    """(qvec w,x,y,z with w >= 0, tvec) of a world-to-camera pose."""
    xyzw = np.asarray(pose.rotation.quat, dtype=np.float64)
    qvec = xyzw[[3, 0, 1, 2]]
    if qvec[0] < 0:  # q and -q are the same rotation; keep one canonical sign
        qvec = -qvec
    return qvec, np.asarray(pose.translation, dtype=np.float64).copy()


def rigid_from_matrix(R: np.ndarray, t: np.ndarray) -> pycolmap.Rigid3d:
    return pycolmap.Rigid3d(pycolmap.Rotation3d(np.asarray(R, np.float64)), np.asarray(t, np.float64).reshape(3))


def camera_center(pose: pycolmap.Rigid3d) -> np.ndarray:
    """Camera centre in world coordinates: -R^T t."""
    R = np.asarray(pose.rotation.matrix())
    return -R.T @ np.asarray(pose.translation)


def format_pose_line(name: str, pose: pycolmap.Rigid3d) -> str:
    qvec, tvec = qt_from_rigid(pose)
    # repr() round-trips float64 exactly, so a parsed file reproduces the estimate bit for bit
    return " ".join([name, *(repr(float(v)) for v in qvec), *(repr(float(v)) for v in tvec)])


def write_poses(path: str | Path, poses: "dict[str, pycolmap.Rigid3d]") -> None:
    """Write ``name qw qx qy qz tx ty tz`` lines, atomically."""
    write_text_atomic(path, "".join(format_pose_line(name, pose) + "\n" for name, pose in poses.items()))


def read_poses(path: str | Path) -> dict[str, pycolmap.Rigid3d]:
    """Read a pose file (results, ground truth or submission)."""
    poses: dict[str, pycolmap.Rigid3d] = {}
    for where, line, parts in text_records(path, "name qw qx qy qz tx ty tz"):
        if len(parts) != 8:
            raise UserError(f"{where}: expected 'name qw qx qy qz tx ty tz', got {line!r}")
        try:
            values = [float(v) for v in parts[1:]]
            poses[parts[0]] = rigid_from_qt(values[:4], values[4:])
        except ValueError as error:
            raise UserError(f"{where}: bad pose ({error}): {line!r}") from None
        if not np.all(np.isfinite(values)):
            raise UserError(f"{where}: pose has non-finite values: {line!r}")
    return poses


def submission_name(name: str, prepend_camera_name: bool = False) -> str:
    """The name a benchmark expects: the file name, optionally with its parent folder (RobotCar style)."""
    parts = name.split("/")
    return "/".join(parts[-2:]) if prepend_camera_name and len(parts) > 1 else parts[-1]


def write_submission(
    path: str | Path, poses: "dict[str, pycolmap.Rigid3d]", prepend_camera_name: bool = False
) -> dict[str, str]:
    """Write a visuallocalization.net submission (file names only); returns {query name: submitted name}.

    Two queries whose file names collide would be ambiguous for the benchmark, so that is an error.
    """
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in poses:
        short = submission_name(name, prepend_camera_name)
        if short in seen:
            raise UserError(
                f"queries {seen[short]!r} and {name!r} have the same file name {short!r}; "
                "the submission would be ambiguous (use prepend_camera_name)"
            )
        seen[short] = name
        names[name] = short
    write_text_atomic(path, "".join(format_pose_line(names[n], p) + "\n" for n, p in poses.items()))
    return names
