"""A mini InLoc-layout dataset rendered from the synthetic scene (exact depth -> ``XYZcut``).

    python -m datasets.mini_inloc --output DIR [--scans 8] [--queries 6] [--width 320 --height 240]

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
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from core.errors import UserError, run_cli

FLOORS = ("DUC1", "DUC2")
BUILDING = "DUC"


@dataclass(frozen=True)
class MiniInLocConfig:
    """What :func:`main` renders."""

    num_scans: int = 8
    cutouts_per_scan: int = 3
    yaw_step_degrees: float = 30.0  # cutouts of a scan look at yaw offsets (k - (n-1)/2) * step
    num_queries: int = 6
    width: int = 320  # cutout size
    height: int = 240
    query_width: int = 320  # query size (4:3, like the iPhone 7's 4032x3024)
    query_height: int = 240
    cutout_fov_degrees: float = 60.0
    hole_fraction: float = 0.02  # random pixels without a scan point
    seed: int = 0
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.num_scans < 1 or self.cutouts_per_scan < 1 or self.num_queries < 1:
            raise UserError("mini InLoc needs at least one scan, one cutout per scan and one query")
        if not 0 <= self.hole_fraction < 1:
            raise UserError(f"hole_fraction must be in [0, 1), got {self.hole_fraction}")


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


def main(output: str | Path, config: MiniInLocConfig | None = None) -> dict:
    """Render and write the mini InLoc dataset; returns its description (also in mini_inloc.json)."""
    from scipy.io import savemat

    from core.io import atomic_path, write_text_atomic
    from core.poses import rigid_from_matrix, write_poses
    from datasets.synthetic import SceneConfig, intrinsics, look_at, make_world, render_view, unproject
    from localization.inloc import ALIGNMENT_DIR, CUTOUT_DIR, QUERY_DIR, query_focal_length, write_alignment

    config = config if config is not None else MiniInLocConfig()
    output = Path(output)
    rng = np.random.default_rng(config.seed)
    scene_config = SceneConfig(
        width=config.width, height=config.height, seed=config.seed, fov_degrees=config.cutout_fov_degrees
    )
    world = make_world(scene_config)
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

    focal = query_focal_length(config.query_width, config.query_height)
    K_query = np.array(
        [[focal, 0.0, (config.query_width - 1) / 2], [0.0, focal, (config.query_height - 1) / 2], [0.0, 0.0, 1.0]]
    )  # centre W/2 in COLMAP's convention = (W-1)/2 with integer centres
    gt = {}
    for q in range(config.num_queries):
        angle = 2 * np.pi * (q + 0.5) / config.num_queries + rng.uniform(-0.15, 0.15)
        radius = scene_config.radius * rng.uniform(0.8, 1.0)
        height = scene_config.camera_height * rng.uniform(0.6, 1.0)
        eye = np.array([radius * np.cos(angle), radius * np.sin(angle), height])
        pose = look_at(eye, target + rng.uniform(-0.5, 0.5, 3))
        image, _ = render_view(world, K_query, pose, config.query_width, config.query_height, scene_config.supersample)
        name = f"{QUERY_DIR}/IMG_{q + 1:04d}.JPG"
        _write_jpeg(output / name, image, config.jpeg_quality)
        gt[name] = rigid_from_matrix(pose[:3, :3], pose[:3, 3])
    write_poses(output / "ground_truth.txt", gt)
    write_poses(output / "database_poses.txt", cutout_poses)  # not part of InLoc; for checks
    description = {
        "source": "datasets.synthetic",
        "config": asdict(config),
        "units": "metres (synthetic world units)",
        "queries": list(gt),
        "cutouts": cutouts,
        "ground_truth": "ground_truth.txt",
        "database_poses": "database_poses.txt",
        "cutout_intrinsics_K": K_cut.tolist(),
    }
    write_text_atomic(output / "mini_inloc.json", json.dumps(description, indent=1))
    return description


def main_cli(argv: "list[str] | None" = None) -> dict:
    defaults = MiniInLocConfig()
    parser = argparse.ArgumentParser(prog="python -m datasets.mini_inloc", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--scans", type=int, default=defaults.num_scans)
    parser.add_argument("--cutouts-per-scan", type=int, default=defaults.cutouts_per_scan)
    parser.add_argument("--queries", type=int, default=defaults.num_queries)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    config = MiniInLocConfig(
        num_scans=args.scans,
        cutouts_per_scan=args.cutouts_per_scan,
        num_queries=args.queries,
        width=args.width,
        height=args.height,
        query_width=args.width,
        query_height=args.height,
        seed=args.seed,
    )
    description = main(args.output, config)
    print(f"wrote {len(description['cutouts'])} cutouts and {len(description['queries'])} queries to {args.output}")
    return description


if __name__ == "__main__":
    run_cli(main_cli)
