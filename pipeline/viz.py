"""Plots of reconstructions: cameras and 3D points, as a PNG and as an interactive HTML page.

* :func:`plot_reconstruction`: a PNG (3D view and top view), with matplotlib's object-oriented API on
  the Agg canvas, so it works headless and never changes the global pyplot backend.
* :func:`write_html`: one self-contained HTML file (plotly, as hloc's ``viz_3d``, with plotly.js inlined
  so it opens offline): cameras as frusta coloured by registration order, points in their colours,
  hover for image names, registration rank and track lengths. The page's ``<body>`` carries
  ``data-cameras`` / ``data-points`` (what was written) and, once plotly has drawn the figure,
  ``data-drawn-cameras`` (camera frusta traces in the live figure) for scripted checks.

(Match plots live in :mod:`matchers.viz`.)

CLI: ``python -m pipeline.viz MODEL_DIR [--output model.png] [--html model.html] [--title T]``
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.colmap_model import read_model
from core.errors import UserError, run_cli
from core.io import atomic_path, check_output_file

MAX_POINTS = 30000  # plotted points (random subset beyond that)
HTML_MAX_POINTS = 50000  # points in the HTML viewer (random subset beyond that)
COLORSCALE = "Viridis"  # camera colours: first registered dark purple ... last yellow


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


def _point_selection(xyz: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Indices of the points to draw: outliers beyond the 1-99 % box removed, at most ``max_points``."""
    keep = np.arange(len(xyz))
    if len(xyz) > 20:
        low, high = np.percentile(xyz, 1, axis=0), np.percentile(xyz, 99, axis=0)
        margin = 0.1 * (high - low)
        keep = keep[np.all((xyz >= low - margin) & (xyz <= high + margin), axis=1)]
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
    return keep


def _points(reconstruction, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3D points (M, 3) and colours (M, 3) in [0, 1], outliers beyond the 1-99 % box removed."""
    xyz = np.array([p.xyz for p in reconstruction.points3D.values()], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in reconstruction.points3D.values()], dtype=np.float64).reshape(-1, 3) / 255.0
    keep = _point_selection(xyz, MAX_POINTS, seed)
    return xyz[keep], rgb[keep]


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
            top_centers[:, 0],
            top_centers[:, 1],
            directions[:, 0],
            directions[:, 1],
            color="tab:red",
            angles="xy",
            scale_units="xy",
            scale=1.0 / (2 * size),
            width=0.003,
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


# ------------------------------------------------------------------------------------------ HTML
def _frustum_corners(camera, size: float) -> np.ndarray:
    """The image corners at depth ``size`` in camera coordinates (4, 3), from the camera's intrinsics."""
    width, height = float(camera.width), float(camera.height)
    pixels = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    try:
        normalized = np.asarray(camera.cam_from_img(pixels), dtype=np.float64).reshape(4, 2)
        if not np.all(np.isfinite(normalized)):
            raise ValueError("non-finite corners")
    except (AttributeError, TypeError, ValueError, RuntimeError):
        normalized = np.array([[-1, -0.75], [1, -0.75], [1, 0.75], [-1, 0.75]], dtype=np.float64)
    # Depth ``size``; very wide lenses would make huge rectangles: cap the half-width at 1.5 depths.
    normalized *= min(1.0, 1.5 / max(1e-9, float(np.abs(normalized).max())))
    return np.concatenate([normalized, np.ones((4, 1))], axis=1) * size


def registration_order(reconstruction) -> list[int]:
    """Registered image ids in the order the model lists them (the mapper's registration order for a
    model still in memory when it keeps one; image-id order for models read from disk)."""
    return [int(image_id) for image_id in reconstruction.reg_image_ids()]


def _poses(reconstruction, order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Camera centres (N, 3) and camera-to-world rotations (N, 3, 3) of the images ``order``."""
    centers = np.zeros((len(order), 3))
    rotations = np.zeros((len(order), 3, 3))
    for k, image_id in enumerate(order):
        image = reconstruction.images[image_id]
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        matrix = np.asarray(pose.matrix(), dtype=np.float64)
        rotations[k], centers[k] = matrix[:, :3].T, -matrix[:, :3].T @ matrix[:, 3]
    return centers, rotations


def _camera_traces(reconstruction, order: list[int], centers: np.ndarray, rotations: np.ndarray, size: float):
    """One frustum trace per registered image (``meta="camera"``) and the trace of camera centres carrying the
    colour bar of the registration order."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale

    if not order:
        return []
    traces, labels = [], []
    colours = sample_colorscale(COLORSCALE, [k / max(1, len(order) - 1) for k in range(len(order))])
    for k, image_id in enumerate(order):
        image = reconstruction.images[image_id]
        label = (
            f"<b>{html.escape(image.name)}</b><br>registered #{k + 1} of {len(order)}<br>"
            f"{image.num_points3D} of {image.num_points2D()} keypoints in 3D points"
        )
        labels.append(label)
        c0, c1, c2, c3 = _frustum_corners(image.camera, size) @ rotations[k].T + centers[k]
        path = np.stack([c0, c1, c2, c3, c0, centers[k], c1, centers[k], c2, centers[k], c3])
        line = {"color": colours[k], "width": 3}
        traces.append(
            go.Scatter3d(
                x=path[:, 0], y=path[:, 1], z=path[:, 2], mode="lines", line=line, name=image.name, meta="camera",
                hovertext=label, hoverinfo="text", showlegend=False,
            )
        )  # fmt: skip
    marker = {
        "size": 3,
        "color": list(range(1, len(order) + 1)),
        "colorscale": COLORSCALE,
        "cmin": 1,
        "cmax": max(2, len(order)),
        "colorbar": {"title": {"text": "registration<br>order"}, "thickness": 14, "len": 0.6},
    }
    traces.append(
        go.Scatter3d(
            x=centers[:, 0], y=centers[:, 1], z=centers[:, 2], mode="markers", meta="camera-centres", marker=marker,
            hovertext=labels, hoverinfo="text", name="cameras", showlegend=False,
        )
    )  # fmt: skip
    return traces


def _points_trace(reconstruction, selected: list, xyz: np.ndarray):
    """The shown points (``meta="points"``) in their colours, each with its track in the hover text."""
    import plotly.graph_objects as go

    names = {int(i): reconstruction.images[i].name for i in reconstruction.reg_image_ids()}
    hover = []
    for point_id, point in selected:
        seen = sorted({names.get(int(e.image_id), str(e.image_id)) for e in point.track.elements})
        shown = ", ".join(html.escape(n) for n in seen[:4]) + (f" +{len(seen) - 4} more" if len(seen) > 4 else "")
        hover.append(
            f"point {point_id}<br>track length {point.track.length()}<br>"
            f"reprojection error {point.error:.2f} px<br>seen in {shown}"
        )
    rgb = np.array([p.color for _, p in selected], dtype=np.int64).reshape(-1, 3)
    marker = {"size": 1.6, "color": [f"rgb({r},{g},{b})" for r, g, b in rgb], "line": {"width": 0}}
    return go.Scatter3d(
        x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", meta="points", name="points", marker=marker,
        hovertext=hover, hoverinfo="text", showlegend=False,
    )  # fmt: skip


def build_figure(reconstruction, title: str | None = None, order: list[int] | None = None):
    """A plotly figure of the model: one frustum trace per registered image (``meta="camera"``), a
    trace of camera centres carrying the colour bar, and the points (``meta="points"``)."""
    import plotly.graph_objects as go

    order = registration_order(reconstruction) if order is None else [int(i) for i in order]
    points = list(reconstruction.points3D.items())
    xyz = np.array([p.xyz for _, p in points], dtype=np.float64).reshape(-1, 3)
    keep = _point_selection(xyz, HTML_MAX_POINTS)
    xyz = xyz[keep]
    centers, rotations = _poses(reconstruction, order)
    everything = np.concatenate([centers, xyz]) if len(xyz) else centers
    extent = float(np.ptp(everything, axis=0).max()) if len(everything) > 1 else 1.0
    traces = _camera_traces(reconstruction, order, centers, rotations, 0.05 * (extent or 1.0))
    if len(xyz):
        traces.append(_points_trace(reconstruction, [points[i] for i in keep], xyz))
    summary = f"{len(order)} registered images, {reconstruction.num_points3D()} points" + (
        f" ({len(xyz)} shown)" if len(xyz) < reconstruction.num_points3D() else ""
    )
    figure = go.Figure(traces)
    hidden = {"visible": False}
    figure.update_layout(
        title={"text": f"{html.escape(title)}: {summary}" if title else summary, "x": 0.5},
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        paper_bgcolor="white",
        hoverlabel={"align": "left"},
        scene={
            "aspectmode": "data",
            "xaxis": hidden,
            "yaxis": hidden,
            "zaxis": hidden,
            "camera": _view(centers, rotations, xyz),
        },
    )
    return figure


def _view(centers: np.ndarray, rotations: np.ndarray, xyz: np.ndarray) -> dict:
    """Plotly's scene camera: 'up' as the cameras' mean up (-y), looking from behind the cameras, a bit above."""
    if not len(centers):
        return {}
    up = -rotations[:, :, 1].mean(0)
    up = up / (np.linalg.norm(up) or 1.0)
    middle = xyz.mean(0) if len(xyz) else centers.mean(0)
    back = centers.mean(0) - middle
    back -= up * (back @ up)
    if np.linalg.norm(back) < 1e-9:
        back = -rotations[:, :, 2].mean(0)  # the cameras' mean viewing direction, reversed
        back -= up * (back @ up)
    back = back / (np.linalg.norm(back) or 1.0)
    eye = 1.6 * (back + 0.7 * up) / np.linalg.norm(back + 0.7 * up)
    as_dict = lambda v: {"x": float(v[0]), "y": float(v[1]), "z": float(v[2])}  # noqa: E731
    return {"up": as_dict(up), "eye": as_dict(eye), "center": {"x": 0, "y": 0, "z": 0}}


_DRAWN = """
var gd = document.getElementById('{plot_id}');
var cameras = gd.data.filter(function (t) {{ return t.meta === 'camera'; }}).length;
document.body.setAttribute('data-drawn-cameras', String(cameras));
document.body.setAttribute('data-canvases', String(gd.querySelectorAll('canvas').length));
""".replace("{{", "{").replace("}}", "}")


def html_page(reconstruction, title: str | None = None, order: list[int] | None = None) -> str:
    """The viewer page as text: self-contained (plotly.js inlined), opens offline."""
    try:
        figure = build_figure(reconstruction, title, order)
    except ImportError:
        raise UserError(
            "the HTML viewer needs plotly: pip install plotly (or reinstall the project: pip install -e .)"
        ) from None
    cameras = sum(trace.meta == "camera" for trace in figure.data)
    points = sum(len(trace.x) for trace in figure.data if trace.meta == "points")
    body = figure.to_html(
        full_html=False,
        include_plotlyjs=True,
        include_mathjax=False,
        div_id="reconstruction",
        default_width="100%",
        default_height="100vh",
        post_script=_DRAWN,
        config={"displaylogo": False, "responsive": True, "scrollZoom": True},
    )
    heading = html.escape(title or "reconstruction")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{heading}</title>\n"
        "<style>html, body { margin: 0; height: 100%; overflow: hidden; }</style>\n</head>\n"
        f'<body data-cameras="{cameras}" data-points="{points}" '
        f'data-model="{html.escape(json.dumps({"registered": cameras, "points3D": reconstruction.num_points3D()}))}">\n'
        f"{body}\n</body>\n</html>\n"
    )


def write_html(reconstruction, path: str | Path, title: str | None = None, order: list[int] | None = None) -> Path:
    """Write the interactive viewer of ``reconstruction`` to ``path`` (one self-contained HTML file, atomically).

    ``order``: registered image ids in registration order (default: as the model lists them).
    """
    path = Path(path)
    page = html_page(reconstruction, title, order)
    with atomic_path(path) as temp:
        temp.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- CLI
def main(
    model: Path, output: Path | None = None, title: str | None = None, html_output: Path | None = None
) -> list[Path]:
    """Plot the COLMAP model in folder ``model`` to the PNG ``output`` and/or the HTML page ``html_output``."""
    model = Path(model)
    if output is None and html_output is None:
        raise UserError("nothing to write: give --output MODEL.png and/or --html MODEL.html")
    if not model.is_dir():
        raise UserError(f"{model}: no such folder; give the folder of a COLMAP model (cameras, images, points3D)")
    for path, option in ((output, "--output"), (html_output, "--html")):
        if path is not None:
            check_output_file(path, option)
    reconstruction = read_model(model, "the folder of a COLMAP model (e.g. OUT/sfm)")
    written = []
    if output is not None:
        written.append(plot_reconstruction(reconstruction, output, title))
    if html_output is not None:
        written.append(write_html(reconstruction, html_output, title))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.viz",
        description="Plot a COLMAP model (cameras and points) as a PNG and/or an interactive HTML page.",
    )
    parser.add_argument("model_dir", type=Path, nargs="?", help="folder of the COLMAP model (e.g. OUT/sfm)")
    parser.add_argument("--model", type=Path, help="the same as MODEL_DIR")
    parser.add_argument("--output", type=Path, help="PNG to write (3D view and top view)")
    parser.add_argument("--html", type=Path, help="self-contained interactive HTML page to write (opens offline)")
    parser.add_argument("--title", help="title over the plot (default: the model's figures only)")
    return parser


def main_cli(argv: list[str] | None = None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    model = args.model_dir or args.model
    if model is None:
        parser.error("give the model folder (MODEL_DIR or --model)")
    if args.model_dir and args.model and args.model_dir != args.model:
        parser.error("give the model folder once (MODEL_DIR or --model)")
    written = main(model, args.output, args.title, args.html)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run_cli(main_cli)
