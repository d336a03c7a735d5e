"""`python -m matchers.match`: the PNG, the printed figures and the offline failure."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import PROJECT_ROOT


def run_match(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "matchers.match", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_sift_on_a_scannet_pair_writes_a_png(scannet_sample, tmp_path):
    first = (scannet_sample / "pairs_with_gt.txt").read_text().splitlines()[12].split()
    out = tmp_path / "viz.png"
    run = run_match(
        str(scannet_sample / "images" / first[0]),
        str(scannet_sample / "images" / first[1]),
        "--matcher",
        "sift",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert "matches in" in run.stdout and "MAGSAC++" in run.stdout
    picture = np.asarray(Image.open(out))
    assert picture.shape[1] > picture.shape[0] > 200  # side by side


def test_loftr_offline_prints_one_actionable_line_and_exits_2(temple_ring, tmp_path):
    image = str(temple_ring / "images" / "templeR0001.png")
    # An unreachable proxy makes the download fail the same way with or without internet.
    env = {
        "TORCH_HOME": str(tmp_path / "hub"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "LOFTR_WEIGHTS": "",
    }
    # weights asked for by name: no silent substitute
    run = run_match(
        image, image, "--matcher", "loftr", "--weights", "outdoor", "--out", str(tmp_path / "x.png"), env=env
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--weights" in lines[0] and "LOFTR_WEIGHTS" in lines[0]


def test_loftr_default_weights_offline_fall_back_to_the_shipped_compact_model(temple_ring, tmp_path):
    names = [str(temple_ring / "images" / f"templeR000{k}.png") for k in (1, 2)]
    env = {
        "TORCH_HOME": str(tmp_path / "hub"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "LOFTR_WEIGHTS": "",
    }
    run = run_match(*names, "--matcher", "loftr", "--resize", "320", "--out", str(tmp_path / "x.png"), env=env)
    assert run.returncode == 0, run.stderr
    warning = run.stderr.strip().splitlines()
    assert len(warning) == 3 and warning[0].startswith("warning: official LoFTR weights unavailable")
    assert all(len(line) <= 100 for line in warning) and warning[1].startswith("  ") and warning[2].startswith("  ")
    assert "loftr-compact" in warning[1] and "--weights" in warning[2] and "LOFTR_WEIGHTS" in warning[2]
    assert "loftr (loftr-compact)" in run.stdout  # the output names the weights used
    consistent = int(run.stdout.split(" consistent")[0].split(",")[-1].strip())
    assert consistent > 100  # adjacent temple views: a real geometry, not noise
    assert (tmp_path / "x.png").is_file()


def test_missing_image_is_one_line(tmp_path):
    run = run_match(str(tmp_path / "nope.png"), str(tmp_path / "nope.png"), "--matcher", "sift")
    assert run.returncode == 2 and "nope.png" in run.stderr and "Traceback" not in run.stderr


def test_sift_options_reach_the_matcher(temple_ring, tmp_path):
    from core.image_io import read_gray
    from matchers.match import main_cli
    from matchers.sift import SIFTMatcher, SIFTOptions

    paths = [str(temple_ring / "images" / name) for name in ("templeR0010.png", "templeR0012.png")]
    few = main_cli(
        [
            *paths,
            "--matcher",
            "sift",
            "--sift-backend",
            "opencv",
            "--sift-max-keypoints",
            "200",
            "--out",
            str(tmp_path / "few.png"),
        ]
    )
    expected = SIFTMatcher(SIFTOptions(max_keypoints=200, backend="opencv")).match(*map(read_gray, paths))
    assert np.array_equal(few.keypoints0, expected.keypoints0) and np.array_equal(few.scores, expected.scores)
    many = main_cli([*paths, "--matcher", "sift", "--sift-backend", "opencv", "--out", str(tmp_path / "many.png")])
    assert 0 < len(few) < len(many)
