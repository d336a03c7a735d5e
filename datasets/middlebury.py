"""Middlebury multi-view stereo camera files (``*_par.txt``) -> ground-truth cameras and COLMAP models.

Format (Seitz et al.; e.g. ``templeR_par.txt``): a first line with the number of images, then one line
per image ``name k11 k12 k13 k21 k22 k23 k31 k32 k33 r11 r12 r13 r21 r22 r23 r31 r32 r33 t1 t2 t3``;
the projection matrix is ``K [R | t]`` (world-to-camera), image origin top-left.

Pixel convention: the intrinsics here are taken with pixel *centres* at integer coordinates (hloc's and
OpenCV's convention, the one :mod:`datasets.synthetic` writes); COLMAP puts pixel centres at +0.5, so
:func:`gt_reconstruction` adds 0.5 to the principal point. (On temple_ring the two choices differ by less
than 0.01 px in mean reprojection error of triangulated points, far below matching noise.)

CLI: write the ground-truth COLMAP model (cameras and posed images, no points) of a par file::

    python -m datasets.middlebury --par templeR_par.txt --images images/ --output gt_model/
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from matchers.errors import UserError, run_cli
from matchers.image_io import image_size

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
    from pipeline.io import write_text_atomic  # local import: datasets must not need pipeline at import

    cameras = list(cameras)
    lines = [str(len(cameras))]
    for camera in cameras:
        numbers = np.concatenate([camera.K.reshape(-1), camera.R.reshape(-1), camera.t.reshape(-1)])
        lines.append(camera.name + " " + " ".join(f"{v:.17g}" for v in numbers))
    write_text_atomic(path, "\n".join(lines) + "\n")


def gt_reconstruction(
    cameras: Mapping[str, GTCamera] | Iterable[GTCamera],
    image_sizes: Mapping[str, tuple[int, int]] | tuple[int, int],
):
    """A pycolmap Reconstruction with the ground-truth cameras and registered images, no 3D points.

    ``image_sizes`` is ``(W, H)`` for all images or ``{name: (W, H)}``. Images sharing intrinsics and
    size share one PINHOLE camera; image ids follow the order of ``cameras`` (1, 2, ...).
    """
    import pycolmap

    if isinstance(cameras, Mapping):
        cameras = list(cameras.values())
    reconstruction = pycolmap.Reconstruction()
    camera_ids: dict[tuple, int] = {}
    for image_id, camera in enumerate(cameras, start=1):
        size = image_sizes if isinstance(image_sizes, tuple) else image_sizes[camera.name]
        width, height = int(size[0]), int(size[1])
        fx, fy = camera.K[0, 0], camera.K[1, 1]
        cx, cy = camera.K[0, 2] + COLMAP_PIXEL_OFFSET, camera.K[1, 2] + COLMAP_PIXEL_OFFSET
        if abs(camera.K[0, 1]) > 1e-9 * max(fx, 1.0):
            raise UserError(f"camera {camera.name}: skewed intrinsics cannot be represented in COLMAP")
        key = (width, height, round(fx, 9), round(fy, 9), round(cx, 9), round(cy, 9))
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            reconstruction.add_camera_with_trivial_rig(
                pycolmap.Camera(
                    model="PINHOLE",
                    width=width,
                    height=height,
                    params=[fx, fy, cx, cy],
                    camera_id=camera_ids[key],
                )
            )
        image = pycolmap.Image(name=camera.name, camera_id=camera_ids[key], image_id=image_id)
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(camera.R), camera.t.reshape(3, 1))
        reconstruction.add_image_with_trivial_frame(image, pose)
    return reconstruction


def cameras_from_reconstruction(reconstruction) -> dict[str, GTCamera]:
    """The registered images of a pycolmap Reconstruction as :class:`GTCamera` (integer-centre K).

    Only the pinhole part of each camera is kept (distortion is ignored).
    """
    cameras: dict[str, GTCamera] = {}
    for image_id in sorted(reconstruction.reg_image_ids()):
        image = reconstruction.images[image_id]
        camera = reconstruction.cameras[image.camera_id]
        K = np.array(camera.calibration_matrix(), dtype=np.float64)
        K[0, 2] -= COLMAP_PIXEL_OFFSET
        K[1, 2] -= COLMAP_PIXEL_OFFSET
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        matrix = np.asarray(pose.matrix(), dtype=np.float64)
        cameras[image.name] = GTCamera(image.name, K, matrix[:, :3].copy(), matrix[:, 3].copy())
    return cameras


def load(par_file: str | Path, image_dir: str | Path | None = None, default_size: tuple[int, int] = (640, 480)):
    """Read a par file and build its GT reconstruction; sizes are read from ``image_dir`` when given."""
    cameras = read_par_file(par_file)
    if image_dir is None:
        sizes: Mapping[str, tuple[int, int]] | tuple[int, int] = default_size
    else:
        image_dir = Path(image_dir)
        missing = [name for name in cameras if not (image_dir / name).is_file()]
        if missing:
            raise UserError(f"{image_dir}: {len(missing)} images of {par_file} are missing (e.g. {missing[0]})")
        sizes = {name: image_size(image_dir / name) for name in cameras}
    return cameras, gt_reconstruction(cameras, sizes)


def main(par: Path, output: Path, images: Path | None = None) -> Path:
    """Write the GT COLMAP model (binary) of a par file to ``output``; returns ``output``."""
    _, reconstruction = load(par, images)
    output.mkdir(parents=True, exist_ok=True)
    reconstruction.write_binary(str(output))
    return output


def main_cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datasets.middlebury", description=__doc__.split("\n")[0])
    parser.add_argument("--par", type=Path, required=True, help="Middlebury *_par.txt camera file")
    parser.add_argument("--output", type=Path, required=True, help="output folder for the COLMAP model")
    parser.add_argument("--images", type=Path, help="image folder (to read image sizes; default 640x480)")
    args = parser.parse_args(argv)
    path = main(args.par, args.output, args.images)
    print(f"wrote the ground-truth model to {path}")


if __name__ == "__main__":
    run_cli(main_cli)
