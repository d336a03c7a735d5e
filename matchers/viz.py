"""Side-by-side match visualisation written as a PNG (matplotlib's Agg canvas: no screen needed).

Lines are coloured by confidence on an absolute [0, 1] scale (red = low, green = high), so plots of
different matchers and pairs can be compared; the text names the matcher and the match count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_path

from .base import Matches

#: the canvas is scaled down so the written PNG is at most this many pixels wide
MAX_WIDTH_PX = 2400


def plot_matches(
    image0: np.ndarray,
    image1: np.ndarray,
    matches: Matches,
    path: str | Path,
    title: str = "",
    max_lines: int = 2000,
    colormap: str = "RdYlGn",
    inliers: np.ndarray | None = None,
) -> Path:
    """Draw ``image0`` and ``image1`` side by side with one line per match and write a PNG to ``path``.

    Images are RGB (H, W, 3) or grayscale (H, W), float in [0, 1] or uint8, of any sizes. ``title``
    (e.g. the matcher name) is shown with the match count. At most ``max_lines`` matches are drawn
    (the most confident ones) so dense matchers stay readable; the count still reports all of them.
    With ``inliers`` (a boolean mask from geometric verification), outliers are drawn as thin
    magenta lines under the inliers and both counts are shown.
    The file is written atomically (a temporary file in the same folder, then a rename).
    """
    # Imported here so that importing matchers stays light; Figure + FigureCanvasAgg avoid pyplot's
    # global state and never try to open a window.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    canvas, offset = _side_by_side(_as_rgb(image0), _as_rgb(image1))
    height, width = canvas.shape[:2]
    scale = min(1.0, MAX_WIDTH_PX / width)
    dpi = 100
    figure = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    # Pixel centres are at integer coordinates (hloc convention), hence the -0.5 extent.
    axes.imshow(canvas, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear")
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_axis_off()

    order = np.argsort(-matches.scores, kind="stable")[:max_lines]
    shown = matches.subset(order)
    shown_outliers = None
    if inliers is not None:
        inliers = np.asarray(inliers, bool)[order]
        shown_outliers = shown.subset(~inliers)
        shown = shown.subset(inliers)
    if shown_outliers is not None and len(shown_outliers):
        lines = np.stack([shown_outliers.keypoints0.astype(np.float64), shown_outliers.keypoints1 + offset], axis=1)
        axes.add_collection(LineCollection(lines, colors="magenta", alpha=0.5, linewidths=0.4))
    if len(shown):
        _draw_confident_lines(axes, shown, offset, colormaps[colormap], scale)

    drawn = len(shown) + (len(shown_outliers) if shown_outliers is not None else 0)
    count = f"{len(matches)} matches" + (f" ({drawn} most confident drawn)" if drawn < len(matches) else "")
    if inliers is not None:
        count += f", {int(inliers.sum())} inliers of the drawn (outliers magenta)"
    axes.text(
        0.01 * width,
        0.01 * height,
        f"{title}: {count}" if title else count,
        color="white",
        fontsize=max(8.0, 14.0 * scale * max(1.0, height / 600)),
        va="top",
        ha="left",
        bbox={"facecolor": "black", "alpha": 0.6, "pad": 3, "edgecolor": "none"},
    )

    path = Path(path)
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=dpi)
    return path


def _side_by_side(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB images on one white canvas, a small gap between them, and where image 1's origin lies on it."""
    (h0, w0), (h1, w1) = left.shape[:2], right.shape[:2]
    gap = max(10, (w0 + w1) // 100)
    canvas = np.ones((max(h0, h1), w0 + gap + w1, 3), np.float32)
    canvas[:h0, :w0] = left
    canvas[:h1, w0 + gap :] = right
    return canvas, np.array([w0 + gap, 0.0])


def _draw_confident_lines(axes: Any, shown: Matches, offset: np.ndarray, colormap: Any, scale: float) -> None:
    """One line per match coloured by confidence, and its end points; the least confident first, so confident
    (green) lines end up on top."""
    from matplotlib.collections import LineCollection

    shown = shown.subset(np.arange(len(shown))[::-1])
    start = shown.keypoints0.astype(np.float64)
    end = shown.keypoints1.astype(np.float64) + offset
    colors = colormap(np.clip(shown.scores, 0.0, 1.0))
    line_width = max(0.4, 1.2 * scale)
    axes.add_collection(LineCollection(np.stack([start, end], axis=1), colors=colors, linewidths=line_width))
    points = np.concatenate([start, end])
    axes.scatter(points[:, 0], points[:, 1], s=(2.0 * scale) ** 2 + 1, c=np.concatenate([colors, colors]), lw=0)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Float32 RGB (H, W, 3) in [0, 1] from gray/RGB/RGBA, float or uint8."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    array = np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an image (H, W), (H, W, 3) or (H, W, 4), got shape {np.shape(image)}")
    return array
