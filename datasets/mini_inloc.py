"""A mini InLoc-layout dataset rendered from the synthetic scene (exact depth -> ``XYZcut``).

    python -m datasets.mini_inloc --output DIR [--scans 8] [--queries 6] [--width 320 --height 240]
        [--query-width W --query-height H] (queries default to the cutouts' size)

The synthetic world of :mod:`datasets.synthetic` (textured boxes on a textured floor, a ~10 m room
in world units taken as metres — InLoc's thresholds then apply as they are) is "scanned" from
``num_scans`` positions on a ring; each scan gives ``cutouts_per_scan`` cutouts looking at the centre
with yaw offsets, like InLoc's cutouts of a panoramic scan. Layout written (InLoc's, see
:mod:`localization.inloc`)::

    DIR/query/iphone7/IMG_0001.JPG ...                   queries (SIMPLE_PINHOLE f = max(W,H)*28/36)
    DIR/database/cutouts/<floor>/<scan>/DUC_cutout_<scan>_<yaw>_0.jpg (+ .jpg.mat with XYZcut)
    DIR/database/alignments/<floor>/transformations/DUC_trans_<scan>.txt   (P_after_GICP on lines 8-11)
    DIR/ground_truth.txt                                  query poses: name qw qx qy qz tx ty tz
    DIR/database_poses.txt                                cutout poses (not in InLoc; for checks)
    DIR/mini_inloc.json                                   how it was made

``XYZcut`` holds, per cutout pixel, the exact 3D point in the *scan's own frame* (NaN for the sky and
for a random ``hole_fraction`` of pixels, like scanner drop-outs); each scan gets a random rigid
scan-to-world ``P_after_GICP``, so a pipeline that forgets the alignment fails. Scans alternate between
two floors (``DUC1``, ``DUC2``) to exercise the folder layout; all share one world frame.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from core.cli import add_config_arguments, config_from_args, field_comments
from core.errors import UserError, run_cli

FLOORS = ("DUC1", "DUC2")
BUILDING = "DUC"


@dataclass(frozen=True)
class MiniInLocConfig:
    """What :func:`main` renders."""

    num_scans: int = 8  # scan positions on a ring
    cutouts_per_scan: int = 3  # cutouts of each scan, at different yaws
    yaw_step_degrees: float = 30.0  # cutouts of a scan look at yaw offsets (k - (n-1)/2) * step
    num_queries: int = 6  # query images between the scans
    width: int = 320  # cutout width
    height: int = 240  # cutout height
    query_width: int | None = None  # query width (none: the cutouts'; 4:3 like the iPhone 7's 4032x3024)
    query_height: int | None = None  # query height (none: the cutouts')
    cutout_fov_degrees: float = 60.0  # horizontal field of view of the cutouts
    hole_fraction: float = 0.02  # random pixels without a scan point
    seed: int = 0  # random seed of the scene, scans and queries
    jpeg_quality: int = 95  # of cutouts and queries

    def __post_init__(self) -> None:
        if self.num_scans < 1 or self.cutouts_per_scan < 1 or self.num_queries < 1:
            raise UserError("mini InLoc needs at least one scan, one cutout per scan and one query")
        if not 0 <= self.hole_fraction < 1:
            raise UserError(f"hole_fraction must be in [0, 1), got {self.hole_fraction}")

    @property
    def query_size(self) -> tuple[int, int]:
        """(W, H) of the queries."""
        return (self.query_width or self.width, self.query_height or self.height)


def _yaw(pose: np.ndarray, degrees: float) -> np.ndarray:
    """Turn a world-to-camera pose about the world's vertical axis through the camera centre."""
    a = np.radians(degrees)
    turn = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    R, t = pose[:3, :3], pose[:3, 3]
    center = -R.T @ t
    out = np.eye(4)
    out[:3, :3] = R @ turn.T
    out[:3, 3] = -out[:3, :3] @ center
    return out


def _random_alignment(rng: np.random.Generator) -> np.ndarray:
    """A rigid scan-to-world transform: any yaw, a small tilt, a few metres of translation."""
    from scipy.spatial.transform import Rotation

    angles = [rng.uniform(-180, 180), rng.uniform(-5, 5), rng.uniform(-5, 5)]
    rotation = Rotation.from_euler("zyx", angles, degrees=True)
    transform = np.eye(4)
    transform[:3, :3] = rotation.as_matrix()
    transform[:3, 3] = rng.uniform(-5, 5, 3)
    return transform


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    from core.io import atomic_path

    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UserError(f"cannot encode {path.name} as JPEG")
    with atomic_path(path) as temp:
        temp.write_bytes(encoded.tobytes())


def _render_cutouts(output: Path, config: MiniInLocConfig, world, scene_config, rng: np.random.Generator):
    """Scans on a ring, each with its cutouts (JPEG + XYZcut .mat in the scan's frame) and alignment file;
    returns (cutout names, their world-to-camera poses, the cutouts' K)."""
    from scipy.io import savemat

    from core.io import atomic_path
    from core.poses import rigid_from_matrix
    from datasets.synthetic import intrinsics, look_at, render_view, unproject
    from localization.inloc import ALIGNMENT_DIR, CUTOUT_DIR, write_alignment

    target = np.array([0.0, 0.0, scene_config.target_height])
    K_cut = intrinsics(config.width, config.height, config.cutout_fov_degrees)
    cutouts: list[str] = []
    cutout_poses = {}
    for scan in range(config.num_scans):
        angle = 2 * np.pi * scan / config.num_scans
        eye = np.array(
            [scene_config.radius * np.cos(angle), scene_config.radius * np.sin(angle), scene_config.camera_height]
        ) + rng.uniform(-0.2, 0.2, 3)
        floor, scan_id = FLOORS[scan % len(FLOORS)], f"{scan:03d}"
        scan_to_world = _random_alignment(rng)
        world_to_scan = np.linalg.inv(scan_to_world)
        write_alignment(
            output / ALIGNMENT_DIR / floor / "transformations" / f"{BUILDING}_trans_{scan_id}.txt",
            scan_to_world,
            p_before=np.eye(4),
        )
        base = look_at(eye, target)
        for k in range(config.cutouts_per_scan):
            yaw = (k - (config.cutouts_per_scan - 1) / 2) * config.yaw_step_degrees
            pose = _yaw(base, yaw)
            image, depth = render_view(world, K_cut, pose, config.width, config.height, scene_config.supersample)
            ys, xs = np.mgrid[0 : config.height, 0 : config.width]
            points = unproject(depth, K_cut, pose, np.stack([xs.ravel(), ys.ravel()], axis=1))
            local = points @ world_to_scan[:3, :3].T + world_to_scan[:3, 3]
            local[rng.random(len(local)) < config.hole_fraction] = np.nan
            name = f"{CUTOUT_DIR}/{floor}/{scan_id}/{BUILDING}_cutout_{scan_id}_{int(round(yaw)) % 360}_0.jpg"
            _write_jpeg(output / name, image, config.jpeg_quality)
            with atomic_path(output / (name + ".mat")) as temp:
                savemat(
                    str(temp),
                    {"XYZcut": local.reshape(config.height, config.width, 3).astype(np.float32)},
                    do_compression=True,
                )
            cutouts.append(name)
            cutout_poses[name] = rigid_from_matrix(pose[:3, :3], pose[:3, 3])
    return cutouts, cutout_poses, K_cut


def _render_queries(output: Path, config: MiniInLocConfig, world, scene_config, rng: np.random.Generator):
    """Queries between the scans with InLoc's iPhone camera; returns {name: world-to-camera pose}."""
    from core.poses import rigid_from_matrix
    from datasets.synthetic import look_at, render_view
    from localization.inloc import QUERY_DIR, query_focal_length

    width, height = config.query_size
    target = np.array([0.0, 0.0, scene_config.target_height])
    focal = query_focal_length(width, height)
    # centre W/2 in COLMAP's convention = (W-1)/2 with integer centres
    K_query = np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    gt = {}
    for q in range(config.num_queries):
        angle = 2 * np.pi * (q + 0.5) / config.num_queries + rng.uniform(-0.15, 0.15)
        radius = scene_config.radius * rng.uniform(0.8, 1.0)
        camera_height = scene_config.camera_height * rng.uniform(0.6, 1.0)
        eye = np.array([radius * np.cos(angle), radius * np.sin(angle), camera_height])
        pose = look_at(eye, target + rng.uniform(-0.5, 0.5, 3))
        image, _ = render_view(world, K_query, pose, width, height, scene_config.supersample)
        name = f"{QUERY_DIR}/IMG_{q + 1:04d}.JPG"
        _write_jpeg(output / name, image, config.jpeg_quality)
        gt[name] = rigid_from_matrix(pose[:3, :3], pose[:3, 3])
    return gt


def main(output: str | Path, config: MiniInLocConfig = MiniInLocConfig()) -> dict:
    """Render and write the mini InLoc dataset; returns its description (also in mini_inloc.json)."""
    from core.io import write_text_atomic
    from core.poses import write_poses
    from datasets.synthetic import SceneConfig, make_world

    output = Path(output)
    rng = np.random.default_rng(config.seed)  # one stream: scans, then queries
    scene_config = SceneConfig(
        width=config.width, height=config.height, seed=config.seed, fov_degrees=config.cutout_fov_degrees
    )
    world = make_world(scene_config)
    cutouts, cutout_poses, K_cut = _render_cutouts(output, config, world, scene_config, rng)
    gt = _render_queries(output, config, world, scene_config, rng)
    write_poses(output / "ground_truth.txt", gt)
    write_poses(output / "database_poses.txt", cutout_poses)  # not part of InLoc; for checks
    query_width, query_height = config.query_size
    description = {
        "source": "datasets.synthetic",
        "config": asdict(dataclasses.replace(config, query_width=query_width, query_height=query_height)),
        "units": "metres (synthetic world units)",
        "queries": list(gt),
        "cutouts": cutouts,
        "ground_truth": "ground_truth.txt",
        "database_poses": "database_poses.txt",
        "cutout_intrinsics_K": K_cut.tolist(),
    }
    write_text_atomic(output / "mini_inloc.json", json.dumps(description, indent=1))
    return description


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.mini_inloc", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    add_config_arguments(parser, MiniInLocConfig, exclude=("num_scans", "num_queries"))
    # the short spellings users type (--scans, --queries), read back into the config's fields
    defaults, helps = MiniInLocConfig(), field_comments(MiniInLocConfig)
    for field, spellings in (
        ("num_scans", ("--scans", "--num-scans")),
        ("num_queries", ("--queries", "--num-queries")),
    ):
        parser.add_argument(*spellings, dest=field, type=int, default=getattr(defaults, field), help=helps.get(field))
    return parser


def main_cli(argv: "list[str] | None" = None) -> dict:
    args = build_parser().parse_args(argv)
    description = main(args.output, config_from_args(args, MiniInLocConfig))
    print(f"wrote {len(description['cutouts'])} cutouts and {len(description['queries'])} queries to {args.output}")
    return description


if __name__ == "__main__":
    run_cli(main_cli)
