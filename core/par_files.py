"""Middlebury multi-view ``*_par.txt`` camera files: ``name k11..k33 r11..r33 t1 t2 t3`` per line.

The ground truth of temple_ring and of the scenes :mod:`datasets.synthetic` renders; read by
:mod:`pipeline.evaluate_model` and written by the datasets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.files import write_text_atomic

# COLMAP's pixel centres are at +0.5 of the integer-centre convention used by the par files here.
COLMAP_PIXEL_OFFSET = 0.5


@dataclass(frozen=True)
class GTCamera:
    """A calibrated camera: intrinsics ``K`` (pixel centres at integers) and world-to-camera ``R``, ``t``."""

    name: str
    K: np.ndarray  # (3, 3)
    R: np.ndarray  # (3, 3) rotation, world -> camera
    t: np.ndarray  # (3,) translation, world -> camera

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates, ``-R^T t``."""
        return -self.R.T @ self.t

    @property
    def projection(self) -> np.ndarray:
        """The 3x4 projection matrix ``K [R | t]``."""
        return self.K @ np.concatenate([self.R, self.t[:, None]], axis=1)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Project (N, 3) world points to (N, 2) pixels (integer-centre convention)."""
        cam = points @ self.R.T + self.t
        uvw = cam @ self.K.T
        return uvw[:, :2] / uvw[:, 2:3]


def read_par_file(path: str | Path) -> dict[str, GTCamera]:
    """Read a Middlebury ``*_par.txt`` file into ``{name: GTCamera}`` (file order kept)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: camera file not found; give the Middlebury *_par.txt file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path}: the camera file is empty")
    start = 1 if len(lines[0].split()) == 1 else 0  # the count line is optional
    cameras: dict[str, GTCamera] = {}
    for number, line in enumerate(lines[start:], start=start + 1):
        parts = line.split()
        if len(parts) != 22:
            raise UserError(
                f"{path}:{number}: expected 'name k11..k33 r11..r33 t1 t2 t3' (22 fields), got {len(parts)}"
            )
        try:
            values = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError:
            raise UserError(f"{path}:{number}: non-numeric camera parameters") from None
        rotation = values[9:18].reshape(3, 3)
        if abs(np.linalg.det(rotation) - 1.0) > 1e-3 or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3):
            raise UserError(f"{path}:{number}: r11..r33 is not a rotation matrix")
        cameras[parts[0]] = GTCamera(parts[0], values[:9].reshape(3, 3), rotation, values[18:21].copy())
    if start == 1 and lines[0].isdigit() and int(lines[0]) != len(cameras):
        raise UserError(f"{path}: the first line announces {lines[0]} cameras but {len(cameras)} follow")
    return cameras


def write_par_file(path: str | Path, cameras: Iterable[GTCamera]) -> None:
    """Write cameras in the Middlebury par format (atomically)."""
    cameras = list(cameras)
    lines = [str(len(cameras))]
    for camera in cameras:
        numbers = np.concatenate([camera.K.reshape(-1), camera.R.reshape(-1), camera.t.reshape(-1)])
        lines.append(camera.name + " " + " ".join(f"{v:.17g}" for v in numbers))
    write_text_atomic(path, "\n".join(lines) + "\n")
