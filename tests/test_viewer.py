"""The interactive model viewer (pipeline.viz.write_html / ``python -m pipeline.viz MODEL --html OUT``),
checked as a file and in a real headless Chromium (skipped with the reason when no Chromium is installed)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from pipeline.viz import build_figure, write_html
from tests.conftest import PROJECT_ROOT

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def synthetic_reconstruction(num_cameras: int = 5, num_points: int = 200, seed: int = 0) -> pycolmap.Reconstruction:
    """An arc of cameras looking at a slab of coloured points, every point seen by every camera."""
    rng = np.random.default_rng(seed)
    model = pycolmap.Reconstruction()
    camera = pycolmap.Camera.create_from_model_name(1, "SIMPLE_PINHOLE", 120.0, 160, 120)
    model.add_camera_with_trivial_rig(camera)
    points = rng.uniform(-1, 1, (num_points, 3)) * [1, 1, 0.3]
    K = camera.calibration_matrix()
    tracks = [pycolmap.Track() for _ in range(num_points)]
    for i in range(num_cameras):
        angle = np.deg2rad(-40 + 80 * i / max(1, num_cameras - 1))
        center = np.array([6 * np.sin(angle), -6 * np.cos(angle), 2.0])
        forward = -center / np.linalg.norm(center)
        right = np.cross(forward, [0, 0, 1.0])
        right /= np.linalg.norm(right)
        R = np.stack([right, np.cross(forward, right), forward])
        t = -R @ center
        projected = (K @ (points @ R.T + t).T).T
        image = pycolmap.Image(
            name=f"view_{i:02d}.png", keypoints=projected[:, :2] / projected[:, 2:], camera_id=1, image_id=i + 1
        )
        model.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(R), t))
        for j in range(num_points):
            tracks[j].add_element(i + 1, j)
    for j in range(num_points):
        model.add_point3D(points[j], tracks[j], rng.integers(0, 255, 3).astype(np.uint8))
    return model


@pytest.fixture(scope="module")
def model() -> pycolmap.Reconstruction:
    return synthetic_reconstruction()


def test_figure_has_one_frustum_per_registered_image_and_the_points(model):
    figure = build_figure(model, title="synthetic")
    cameras = [trace for trace in figure.data if trace.meta == "camera"]
    assert [trace.name for trace in cameras] == [f"view_{i:02d}.png" for i in range(5)]
    assert all(len(trace.x) == 11 for trace in cameras)  # rectangle + four edges to the apex
    colours = [trace.line.color for trace in cameras]
    assert len(set(colours)) == 5  # one colour per registration rank
    assert "registered #1 of 5" in cameras[0].hovertext and "200 of 200 keypoints" in cameras[0].hovertext
    points = next(trace for trace in figure.data if trace.meta == "points")
    assert len(points.x) == 200
    assert "track length 5" in points.hovertext[0] and "view_00.png" in points.hovertext[0]
    assert "synthetic: 5 registered images, 200 points" in figure.layout.title.text
    # a given registration order recolours the cameras: the first registered gets the first colour
    reordered = build_figure(model, order=[5, 4, 3, 2, 1])
    assert [t.name for t in reordered.data if t.meta == "camera"][0] == "view_04.png"


def test_html_is_self_contained_and_written_atomically_with_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        path = write_html(model, tmp_path / "model.html", title="a <b>title</b>")
    finally:
        os.umask(old)
    page = path.read_text(encoding="utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.html"]
    assert 'data-cameras="5"' in page and 'data-points="200"' in page
    assert "<title>a &lt;b&gt;title&lt;/b&gt;</title>" in page
    assert len(page) > 1_000_000  # plotly.js is inlined ...
    assert not re.search(r"<script[^>]+src=", page)  # ... and nothing is loaded from elsewhere


def test_cli_writes_html_and_png_of_a_model_folder(model, tmp_path):
    (tmp_path / "sfm").mkdir()
    model.write(str(tmp_path / "sfm"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.viz",
            str(tmp_path / "sfm"),
            "--html",
            str(tmp_path / "m.html"),
            "--output",
            str(tmp_path / "m.png"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert 'data-cameras="5"' in (tmp_path / "m.html").read_text()
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "usage: python -m pipeline.viz"
        in subprocess.run(
            [sys.executable, "-m", "pipeline.viz", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout
    )


@pytest.mark.parametrize("case", ["no model", "html is a folder", "nothing to write"])
def test_cli_errors_are_one_line(model, tmp_path, case):
    (tmp_path / "sfm").mkdir()
    model.write(str(tmp_path / "sfm"))
    (tmp_path / "folder.html").mkdir()
    args = {
        "no model": [str(tmp_path / "nope"), "--html", str(tmp_path / "m.html")],
        "html is a folder": [str(tmp_path / "sfm"), "--html", str(tmp_path / "folder.html")],
        "nothing to write": [str(tmp_path / "sfm")],
    }[case]
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.viz", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert not (tmp_path / "m.html").exists()


# ---------------------------------------------------------------------------------- headless Chromium
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium binary (apt-get install chromium) to load the viewer in a real browser")


#: Test-side instrumentation, put into a copy of the page before anything else runs: every console.error
#: and uncaught error is counted on <html data-console-errors>.
ERROR_HOOK = """<script>
(function () {
  var count = 0, root = document.documentElement;
  function note(text) { count += 1; root.setAttribute('data-console-errors', String(count));
                        root.setAttribute('data-last-error', String(text).slice(0, 300)); }
  window.addEventListener('error', function (e) { note(e.message); });
  window.addEventListener('unhandledrejection', function (e) { note(e.reason); });
  var original = console.error;
  console.error = function () { note(Array.prototype.join.call(arguments, ' ')); return original.apply(console, arguments); };
})();
</script>"""


def run_chromium(page: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: the page must not need the network
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HOME": str(page.parent)},  # chromium's profile files go to the test's folder
    )


def test_viewer_loads_in_headless_chromium_and_draws_every_camera(model, tmp_path):
    chromium()
    page = write_html(model, tmp_path / "model.html", title="synthetic")
    instrumented = tmp_path / "instrumented.html"
    instrumented.write_text(page.read_text().replace("<head>", "<head>\n" + ERROR_HOOK, 1))
    run = run_chromium(instrumented, "--dump-dom")
    assert run.returncode == 0, run.stderr[-3000:]
    dom = run.stdout
    root = re.search(r"<html[^>]*>", dom).group(0)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-console-errors" not in root, (root, run.stderr[-3000:])
    assert not re.search(r"CONSOLE.*Uncaught", run.stderr), run.stderr[-3000:]
    assert 'data-cameras="5"' in body and 'data-drawn-cameras="5"' in body, body  # drawn: after newPlot
    assert int(re.search(r'data-canvases="(\d+)"', body).group(1)) >= 1  # the WebGL scene exists
    rendered = re.sub(r"<script.*?</script>", "", dom, flags=re.S)  # plotly.js itself holds the message text
    assert "WebGL is not supported" not in rendered


def test_viewer_screenshot_shows_the_coloured_cameras(model, tmp_path):
    chromium()
    page = write_html(model, tmp_path / "model.html", title="synthetic")
    shot = tmp_path / "shot.png"
    run = run_chromium(page, f"--screenshot={shot}", "--window-size=800,600")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-3000:]
    import cv2

    picture = cv2.imread(str(shot))[:, :, ::-1].astype(int)  # RGB
    assert picture.shape[:2] == (600, 800)
    # Viridis' ends: the first camera is dark purple (68, 1, 84), the last yellow (253, 231, 37)
    purple = np.all(np.abs(picture - [68, 1, 84]) < 40, axis=2).sum()
    yellow = np.all(np.abs(picture - [253, 231, 37]) < 40, axis=2).sum()
    assert purple > 50 and yellow > 50, (purple, yellow)
    assert (np.abs(picture - 255).sum(axis=2) > 30).mean() > 0.005  # more than a blank page
