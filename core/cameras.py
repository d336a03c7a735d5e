"""Query cameras: intrinsics lists (``name MODEL W H params...``), OpenCV intrinsics, undistortion.

Pixel convention: COLMAP's, i.e. (0, 0) is the top-left *corner* of the top-left pixel; hloc keypoints
(pixel centres at integers) become COLMAP pixels by adding 0.5. Intrinsics lists (Aachen's
``queries/*_time_queries_with_intrinsics.txt``) are in COLMAP's convention.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pycolmap

from core.errors import UserError
from core.files import text_records
from core.io import check_relative_name, write_text_atomic

#: models whose distortion OpenCV's (k1, k2, p1, p2[, k3, k4, k5, k6]) vector represents exactly
OPENCV_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")


def make_camera(
    model: str, width: int, height: int, params: "list[float] | np.ndarray", where: str = ""
) -> pycolmap.Camera:
    """A pycolmap camera; a wrong model name or parameter count is a :class:`UserError` naming ``where``."""
    where = f"{where}: " if where else ""
    try:
        probe = pycolmap.Camera.create_from_model_name(0, model, 1.0, 1, 1)
    except Exception:  # pycolmap raises a bare RuntimeError/ValueError for unknown names
        raise UserError(f"{where}unknown camera model {model!r}; use a COLMAP model such as SIMPLE_RADIAL") from None
    expected = len(probe.params)
    params = np.asarray(params, dtype=np.float64).reshape(-1)
    if len(params) != expected:
        raise UserError(
            f"{where}camera model {model} takes {expected} parameters ({probe.params_info}), got {len(params)}"
        )
    if width <= 0 or height <= 0 or not np.all(np.isfinite(params)):
        raise UserError(f"{where}invalid camera: size {width}x{height}, params {params.tolist()}")
    return pycolmap.Camera(model=model, width=int(width), height=int(height), params=params)


def parse_query_list(path: str | Path) -> dict[str, pycolmap.Camera]:
    """Read a query list with intrinsics: one ``name MODEL W H params...`` per line (order kept)."""
    cameras: dict[str, pycolmap.Camera] = {}
    for where, line, parts in text_records(path, "name MODEL W H params..."):
        if len(parts) < 5:
            raise UserError(f"{where}: expected 'name MODEL W H params...', got {line!r}")
        name, model = parts[0], parts[1]
        check_relative_name(name, where)
        try:
            width, height = int(parts[2]), int(parts[3])
            params = [float(v) for v in parts[4:]]
        except ValueError:
            raise UserError(f"{where}: width, height and params must be numbers, got {line!r}") from None
        cameras[name] = make_camera(model, width, height, params, where)
    return cameras


def write_query_list(path: str | Path, cameras: "dict[str, pycolmap.Camera]") -> None:
    """Write ``name MODEL W H params...`` lines (the inverse of :func:`parse_query_list`), atomically."""
    lines = []
    for name, camera in cameras.items():
        params = " ".join(repr(float(v)) for v in camera.params)
        lines.append(f"{name} {camera.model.name} {camera.width} {camera.height} {params}\n")
    write_text_atomic(path, "".join(lines))


def opencv_intrinsics(camera: pycolmap.Camera) -> tuple[np.ndarray, np.ndarray] | None:
    """(K 3x3, distortion coefficients) in OpenCV's form, or None for models OpenCV cannot express."""
    model = camera.model.name
    if model not in OPENCV_MODELS:
        return None
    p = np.asarray(camera.params, dtype=np.float64)
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        fx = fy = p[0]
        cx, cy = p[1], p[2]
        extra = p[3:]
    else:
        fx, fy, cx, cy = p[:4]
        extra = p[4:]
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    dist = np.zeros(4)
    if model == "SIMPLE_RADIAL":
        dist[0] = extra[0]
    elif model == "RADIAL":
        dist[:2] = extra[:2]
    elif model == "OPENCV":
        dist[:4] = extra[:4]
    elif model == "FULL_OPENCV":
        dist = extra[:8].copy()  # k1 k2 p1 p2 k3 k4 k5 k6: OpenCV's rational model, same order
    return K, dist


def has_distortion(camera: pycolmap.Camera) -> bool:
    """True when the camera's model has non-zero distortion (or is not a plain pinhole)."""
    intrinsics = opencv_intrinsics(camera)
    if intrinsics is None:
        return True
    return bool(np.any(intrinsics[1] != 0))


def pinhole_matrix(camera: pycolmap.Camera) -> np.ndarray:
    """The 3x3 pinhole part (focal lengths, principal point) of any camera, C-contiguous for OpenCV."""
    return np.ascontiguousarray(camera.calibration_matrix(), dtype=np.float64)


def undistort_points(points: np.ndarray, camera: pycolmap.Camera) -> np.ndarray:
    """Map distorted pixels (COLMAP convention) to the pixels of the same camera without distortion.

    OpenCV-expressible models use ``cv2.undistortPoints`` iterated to convergence (the default five
    iterations leave sub-pixel errors at the corners of wide lenses); other models (fisheye, FOV...) go
    through pycolmap's own ``cam_from_img``. The output keeps the pinhole part of the camera so pixel
    thresholds keep their meaning.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    K = pinhole_matrix(camera)
    if len(points) == 0 or not has_distortion(camera):
        return points.copy()
    intrinsics = opencv_intrinsics(camera)
    if intrinsics is not None:
        K, dist = intrinsics
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
        out = cv2.undistortPoints(points.reshape(-1, 1, 2), K, dist, R=None, P=K, criteria=criteria)
        return out.reshape(-1, 2)
    normalized = np.asarray(camera.cam_from_img(points), dtype=np.float64).reshape(-1, 2)
    return normalized @ K[:2, :2].T + K[:2, 2]


def camera_from_size_and_focal(width: int, height: int, focal: float) -> pycolmap.Camera:
    """SIMPLE_PINHOLE with the principal point at the image centre (COLMAP convention: W/2, H/2)."""
    return make_camera("SIMPLE_PINHOLE", width, height, [focal, width / 2.0, height / 2.0])
