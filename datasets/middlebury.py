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
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from core.errors import UserError, run_cli
from core.image_io import image_size
from core.par_files import COLMAP_PIXEL_OFFSET, GTCamera, read_par_file


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.middlebury", description=__doc__.split("\n")[0])
    parser.add_argument("--par", type=Path, required=True, help="Middlebury *_par.txt camera file")
    parser.add_argument("--output", type=Path, required=True, help="output folder for the COLMAP model")
    parser.add_argument("--images", type=Path, help="image folder (to read image sizes; default 640x480)")
    return parser


def main_cli(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    path = main(args.par, args.output, args.images)
    print(f"wrote the ground-truth model to {path}")


if __name__ == "__main__":
    run_cli(main_cli)
