"""Plots of reconstructions: cameras and 3D points, in perspective and from the top.

Uses matplotlib's object-oriented API with the Agg canvas, so it works headless and never changes the
global pyplot backend. (Match plots live in :mod:`matchers.viz`.)

CLI: ``python -m pipeline.viz --model OUT/sfm --output model.png``
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from matchers.errors import UserError, run_cli
from pipeline.io import atomic_path

MAX_POINTS = 30000  # plotted points (random subset beyond that)


def _camera_geometry(reconstruction) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Centres (N, 3), camera-to-world rotations (N, 3, 3) and names of registered images."""
    centers, rotations, names = [], [], []
    for image_id in sorted(reconstruction.reg_image_ids()):
        image = reconstruction.images[image_id]
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        matrix = np.asarray(pose.matrix(), dtype=np.float64)
        R, t = matrix[:, :3], matrix[:, 3]
        centers.append(-R.T @ t)
        rotations.append(R.T)
        names.append(image.name)
    return np.array(centers).reshape(-1, 3), np.array(rotations).reshape(-1, 3, 3), names


def _points(reconstruction, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3D points (M, 3) and colours (M, 3) in [0, 1], outliers beyond the 1-99 % box removed."""
    xyz = np.array([p.xyz for p in reconstruction.points3D.values()], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in reconstruction.points3D.values()], dtype=np.float64).reshape(-1, 3) / 255.0
    if len(xyz) > 20:
        low, high = np.percentile(xyz, 1, axis=0), np.percentile(xyz, 99, axis=0)
        margin = 0.1 * (high - low)
        keep = np.all((xyz >= low - margin) & (xyz <= high + margin), axis=1)
        xyz, rgb = xyz[keep], rgb[keep]
    if len(xyz) > MAX_POINTS:
        keep = np.random.default_rng(seed).choice(len(xyz), MAX_POINTS, replace=False)
        xyz, rgb = xyz[keep], rgb[keep]
    return xyz, rgb


def _top_view_basis(centers: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Rows: two in-plane axes and the 'up' axis (least variance of the camera centres)."""
    data = centers if len(centers) >= 3 else points
    if len(data) < 3:
        return np.eye(3)
    _, _, vt = np.linalg.svd(data - data.mean(0), full_matrices=True)
    return vt


def plot_reconstruction(reconstruction, path: str | Path, title: str | None = None) -> Path:
    """Save a two-panel figure (3D view and top view) of cameras and points to ``path`` (atomically)."""
    path = Path(path)
    centers, rotations, names = _camera_geometry(reconstruction)
    xyz, rgb = _points(reconstruction)
    everything = np.concatenate([centers, xyz]) if len(xyz) else centers
    extent = float(np.ptp(everything, axis=0).max()) if len(everything) > 1 else 1.0
    size = 0.06 * (extent or 1.0)  # camera glyph size

    figure = Figure(figsize=(12, 6), dpi=100)
    FigureCanvasAgg(figure)
    ax3d = figure.add_subplot(1, 2, 1, projection="3d")
    axtop = figure.add_subplot(1, 2, 2)
    if len(xyz):
        ax3d.scatter(*xyz.T, c=rgb, s=0.5, depthshade=False)
    # Camera frusta: apex at the centre, a rectangle one glyph in front (COLMAP: +z forward, +y down).
    corners = np.array([[-1, -0.75, 1.5], [1, -0.75, 1.5], [1, 0.75, 1.5], [-1, 0.75, 1.5]]) * size
    for center, rotation in zip(centers, rotations):
        world = corners @ rotation.T + center
        for corner in world:
            ax3d.plot(*np.stack([center, corner]).T, color="tab:red", linewidth=0.6)
        ax3d.plot(*np.concatenate([world, world[:1]]).T, color="tab:red", linewidth=0.6)
    if len(everything):
        middle = everything.mean(0)
        half = 0.55 * (extent or 1.0)
        ax3d.set_xlim(middle[0] - half, middle[0] + half)
        ax3d.set_ylim(middle[1] - half, middle[1] + half)
        ax3d.set_zlim(middle[2] - half, middle[2] + half)
    ax3d.set_title("3D view")

    basis = _top_view_basis(centers, xyz)
    origin = everything.mean(0) if len(everything) else np.zeros(3)
    if len(xyz):
        top = (xyz - origin) @ basis[:2].T
        axtop.scatter(top[:, 0], top[:, 1], c=rgb, s=0.5)
    if len(centers):
        top_centers = (centers - origin) @ basis[:2].T
        directions = rotations[:, :, 2] @ basis[:2].T  # viewing direction (camera +z) in the plane
        axtop.quiver(
            top_centers[:, 0], top_centers[:, 1], directions[:, 0], directions[:, 1],
            color="tab:red", angles="xy", scale_units="xy", scale=1.0 / (2 * size), width=0.003,
        )
        axtop.scatter(top_centers[:, 0], top_centers[:, 1], color="tab:red", s=8)
    axtop.set_aspect("equal", adjustable="datalim")
    axtop.set_title("top view (cameras in red, viewing directions as arrows)")
    summary = f"{len(names)} registered images, {reconstruction.num_points3D()} points"
    figure.suptitle(f"{title}: {summary}" if title else summary)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format=path.suffix.lstrip(".") or "png")
    return path


def main(model: Path, output: Path, title: str | None = None) -> Path:
    """Plot the COLMAP model in folder ``model`` to ``output``."""
    import pycolmap

    if not (model / "images.bin").is_file() and not (model / "images.txt").is_file():
        raise UserError(f"{model}: no COLMAP model (images.bin / images.txt) found")
    return plot_reconstruction(pycolmap.Reconstruction(str(model)), output, title)


def main_cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot a COLMAP model (cameras and points).")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    print(f"wrote {main(args.model, args.output, args.title)}")


if __name__ == "__main__":
    run_cli(main_cli)
