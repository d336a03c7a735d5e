"""A mini Aachen-v1.1-layout dataset from a calibrated image set (Middlebury temple_ring by default).

    python -m datasets.mini_aachen --source ../shared/data/temple_ring --output DIR [--scene-scale 40]
        [--query-every 4] [--query-offset 0] [--max-size 320] [--subset 18:30]

Every ``query_every``-th image (index 0, 4, 8, ... of the sequence, shifted by ``query_offset``) becomes a
day-time query, the others the database. Layout written (Aachen v1.1's, see :mod:`localization.aachen`)::

    DIR/images_upright/db/<name>                                    database images
    DIR/images_upright/query/day/temple/<name>                      queries
    DIR/3D-models/aachen_v_1_1/{cameras,images,points3D}.bin        reference SIFT model of the db images
    DIR/queries/day_time_queries_with_intrinsics.txt                name MODEL W H params (PINHOLE)
    DIR/ground_truth.txt                                            query poses: name qw qx qy qz tx ty tz
    DIR/mini_aachen.json                                            how it was made (scale, split, sizes)

Like Aachen's own model, the reference model is a SIFT triangulation: SIFT keypoints of the db images
(``matchers.sift``), mutual-NN + ratio matches between each db image and its ``num_neighbors`` nearest
db cameras, then :mod:`pipeline.triangulate` (verification by the known epipolar geometry,
``pycolmap.triangulate_points``) with the ground-truth poses held fixed. Queries are in none of it.

Intrinsics: temple_ring's focal lengths differ per axis (fx 1520.4, fy 1525.9), which Aachen's
SIMPLE_RADIAL cannot express; the list uses PINHOLE (the pipeline reads any COLMAP model).

Scene scale. temple_ring is a 16 cm plaster model shot from ~0.56 m; Aachen's thresholds
(0.25 m, 2 deg) / (0.5 m, 5 deg) / (5 m, 10 deg) are for a city where cameras stand typically 20-25 m
from the facades they see. The poses are therefore written multiplied by ``scene_scale`` = 40 by
default: the camera ring gets a radius of ~22 m and the temple becomes a ~6.5 m-high facade, so the
standard thresholds keep their meaning relative to the viewing distance (0.25 m at 22 m is ~1.1 %; in
the original units it is 6.25 mm at 0.56 m). Rotations are scale-free. ``mini_aachen.json`` records the
factor; ``localization.evaluate --scale 1`` then applies as is (pass ``--scale 1/40`` to compare files
in the original units).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from core.cli import add_config_arguments, config_from_args, field_comments
from core.errors import UserError, run_cli

DB_DIR = "db"
QUERY_DIR = "query/day/temple"
MODEL_DIR = "3D-models/aachen_v_1_1"
QUERY_LIST = "queries/day_time_queries_with_intrinsics.txt"


@dataclass(frozen=True)
class MiniAachenConfig:
    """Options of :func:`main`."""

    scene_scale: float = 40.0  # metres per source unit (see the module docstring)
    query_every: int = 4  # images offset, offset + k, offset + 2k, ... of the sequence are queries
    query_offset: int = 0  # index of the first query in the sequence
    max_size: int | None = None  # downscale images so the longer side is at most this (none: keep)
    subset: tuple[int, int] | None = None  # only images START:STOP of the par file (start inclusive)
    num_neighbors: int = 8  # db pairs for the reference model: nearest db cameras per db image
    sift_max_keypoints: int = 4096  # SIFT keypoints per db image for the reference model

    def __post_init__(self) -> None:
        if not self.scene_scale > 0:
            raise UserError(f"scene_scale must be positive, got {self.scene_scale}")
        if self.query_every < 2:
            raise UserError(f"query_every must be >= 2 (some images must stay in the database), got {self.query_every}")
        if not 0 <= self.query_offset < self.query_every:
            raise UserError(f"query_offset must be in [0, query_every), got {self.query_offset}")
        if self.max_size is not None and self.max_size < 32:
            raise UserError(f"max_size must be >= 32 px, got {self.max_size}")
        if self.num_neighbors < 1:
            raise UserError(f"num_neighbors must be >= 1, got {self.num_neighbors}")


def _scaled_camera(camera, factor: tuple[float, float], scene_scale: float):
    """The GT camera of an image resized by (sx, sy), in a world scaled by ``scene_scale``."""
    from core.par_files import GTCamera

    sx, sy = factor
    K = camera.K.copy()
    # integer-centre convention: x' = (x + 0.5) * s - 0.5
    K[0, 0], K[0, 1], K[0, 2] = K[0, 0] * sx, K[0, 1] * sx, (K[0, 2] + 0.5) * sx - 0.5
    K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
    return GTCamera(camera.name, K, camera.R.copy(), camera.t * scene_scale)


def _copy_image(source: Path, target: Path, max_size: int | None) -> tuple[tuple[int, int], tuple[float, float]]:
    """Copy (and maybe downscale) an image; returns ((W, H) written, (sx, sy) applied)."""
    from core.io import atomic_path

    image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UserError(f"{source}: cannot be read as an image")
    height, width = image.shape[:2]
    target.parent.mkdir(parents=True, exist_ok=True)
    if max_size is None or max(width, height) <= max_size:
        shutil.copyfile(source, target)
        return (width, height), (1.0, 1.0)
    factor = max_size / max(width, height)
    new_w, new_h = int(round(width * factor)), int(round(height * factor))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(target.suffix or ".png", resized)
    if not ok:
        raise UserError(f"cannot encode {target.name}")
    with atomic_path(target) as temp:
        temp.write_bytes(encoded.tobytes())
    return (new_w, new_h), (new_w / width, new_h / height)


def sift_reference_model(gt_model, image_dir: Path, work_dir: Path, num_neighbors: int, max_keypoints: int):
    """Triangulate SIFT matches of the db images of ``gt_model`` (poses fixed): an Aachen-like model.

    SIFT keypoints and mutual-NN + ratio matches (``matchers.sift``, no quantization: the model keeps
    SIFT's own keypoints, as Aachen's does) go to hloc files, then :func:`pipeline.triangulate.main`.
    """
    from core.image_io import read_gray
    from core.io import write_features, write_matches, write_pairs
    from matchers.sift import SIFTMatcher, SIFTOptions, match_descriptors
    from pipeline import triangulate

    # OpenCV's SIFT, as the published reference models were built
    sift = SIFTMatcher(SIFTOptions(max_keypoints=max_keypoints, resize=None, backend="opencv"))
    images = list(gt_model.images.values())
    features = {image.name: sift.prepare(read_gray(image_dir / image.name)) for image in images}
    centers = {image.name: np.asarray(image.projection_center()) for image in images}
    pairs: set[tuple[str, str]] = set()
    for name, center in centers.items():
        nearest = sorted((n for n in centers if n != name), key=lambda n: np.linalg.norm(centers[n] - center))
        pairs.update(tuple(sorted((name, other))) for other in nearest[:num_neighbors])
    matches = {}
    for name0, name1 in sorted(pairs):
        index0, index1, scores = match_descriptors(features[name0].descriptors, features[name1].descriptors)
        matches0 = np.full(len(features[name0].keypoints), -1, np.int64)
        scores0 = np.zeros(len(matches0), np.float32)
        matches0[index0], scores0[index0] = index1, scores
        matches[(name0, name1)] = (matches0, scores0)
    write_features(work_dir / "features.h5", {n: (f.keypoints, f.scores, f.image_size) for n, f in features.items()})
    write_matches(work_dir / "matches.h5", matches)
    write_pairs(work_dir / "pairs.txt", sorted(pairs))
    model, _ = triangulate.main(
        gt_model,
        image_dir,
        work_dir / "pairs.txt",
        work_dir / "features.h5",
        work_dir / "matches.h5",
        work_dir / "sfm",
        triangulate.TriangulationConfig(verification="known"),
    )
    return model


def main(source: str | Path, output: str | Path, config: MiniAachenConfig = MiniAachenConfig()) -> dict:
    """Build the mini Aachen dataset from ``source`` (images/ + *_par.txt); returns its description."""
    from core.cameras import make_camera, write_query_list
    from core.colmap_model import write_model
    from core.io import write_text_atomic
    from core.par_files import read_par_file
    from core.poses import rigid_from_matrix, write_poses
    from datasets.middlebury import gt_reconstruction

    source, output = Path(source), Path(output)
    par_files = sorted(source.glob("*_par.txt"))
    if not (source / "images").is_dir() or len(par_files) != 1:
        raise UserError(f"{source}: expected images/ and one Middlebury *_par.txt camera file (temple_ring layout)")
    cameras = read_par_file(par_files[0])
    names = list(cameras)
    if config.subset is not None:
        names = names[config.subset[0] : config.subset[1]]
    queries = [n for i, n in enumerate(names) if i % config.query_every == config.query_offset]
    db = [n for n in names if n not in queries]
    if len(db) < 2 or not queries:
        raise UserError(f"{len(names)} images: too few for a query/db split every {config.query_every}")

    images_root = output / "images_upright"
    db_cameras, query_cameras, sizes = {}, {}, {}
    for name in names:
        target = f"{DB_DIR}/{name}" if name in db else f"{QUERY_DIR}/{name}"
        size, factor = _copy_image(source / "images" / name, images_root / target, config.max_size)
        camera = _scaled_camera(cameras[name], factor, config.scene_scale)
        (db_cameras if name in db else query_cameras)[target] = dataclasses.replace(camera, name=target)
        sizes[target] = size

    gt_model = gt_reconstruction(db_cameras, {n: sizes[n] for n in db_cameras})
    with tempfile.TemporaryDirectory(prefix=".mini_aachen.", dir=output) as work:
        model = sift_reference_model(gt_model, images_root, Path(work), config.num_neighbors, config.sift_max_keypoints)
        model_dir = output / MODEL_DIR
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        write_model(model, model_dir, kinds=("binary",))
    if model.num_points3D() == 0:
        raise UserError("the reference SIFT model has no 3D points; the images do not overlap enough")

    intrinsics = {}
    for name, camera in query_cameras.items():
        width, height = sizes[name]
        K = camera.K
        intrinsics[name] = make_camera("PINHOLE", width, height, [K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5])
    (output / "queries").mkdir(parents=True, exist_ok=True)
    write_query_list(output / QUERY_LIST, intrinsics)
    write_poses(
        output / "ground_truth.txt",
        {name: rigid_from_matrix(camera.R, camera.t) for name, camera in query_cameras.items()},
    )
    description = {
        "source": str(source),
        "config": asdict(config),
        "scene_scale": config.scene_scale,
        "units": f"poses are in source units x {config.scene_scale:g} (scene metres)",
        "queries": list(query_cameras),
        "db": list(db_cameras),
        "reference_model": {
            "images": model.num_reg_images(),
            "points3D": model.num_points3D(),
            "mean_track_length": model.compute_mean_track_length(),
            "mean_reprojection_error": model.compute_mean_reprojection_error(),
        },
        "ground_truth": "ground_truth.txt",
    }
    write_text_atomic(output / "mini_aachen.json", json.dumps(description, indent=1))
    return description


def _subset(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"subset must be START:STOP, got {text!r}") from None
    return start, stop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.mini_aachen", description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with images/ and a *_par.txt file")
    parser.add_argument("--output", type=Path, required=True)
    add_config_arguments(parser, MiniAachenConfig, exclude=("subset",))
    # written START:STOP, as users type it (a generated tuple option would take two numbers)
    parser.add_argument("--subset", type=_subset, default=None, help=field_comments(MiniAachenConfig)["subset"])
    return parser


def main_cli(argv: "list[str] | None" = None) -> dict:
    args = build_parser().parse_args(argv)
    description = main(args.source, args.output, config_from_args(args, MiniAachenConfig))
    model = description["reference_model"]
    print(
        f"wrote {len(description['db'])} db images, {len(description['queries'])} queries and a SIFT model "
        f"({model['points3D']} points) to {args.output}"
    )
    return description


if __name__ == "__main__":
    run_cli(main_cli)
