"""Model accuracy against GT: gauge invariance, known rotation perturbations, Sim3 centre errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from core.par_files import GTCamera, write_par_file
from datasets.middlebury import cameras_from_reconstruction, gt_reconstruction
from pipeline.evaluate_model import SimplePose, evaluate, relative_rotation_errors

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _gt(count: int = 8, seed: int = 0) -> dict[str, GTCamera]:
    rng = np.random.default_rng(seed)
    K = np.array([[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]])
    cameras = {}
    for i in range(count):
        R = Rotation.from_rotvec(rng.normal(0, 0.5, 3)).as_matrix()
        center = rng.normal(0, 2.0, 3)
        cameras[f"im{i}.png"] = GTCamera(f"im{i}.png", K, R, -R @ center)
    return cameras


def _transformed(gt: dict[str, GTCamera], scale: float, rotation: np.ndarray, translation: np.ndarray) -> dict:
    """The same cameras in another world frame x' = s Q x + u (a different gauge)."""
    poses = {}
    for name, camera in gt.items():
        R = camera.R @ rotation.T
        center = scale * rotation @ camera.center + translation
        poses[name] = SimplePose(R, -R @ center)
    return poses


def test_gauge_invariance() -> None:
    gt = _gt()
    Q = Rotation.from_rotvec([0.3, -1.2, 0.4]).as_matrix()
    accuracy = evaluate(_transformed(gt, 3.7, Q, np.array([5.0, -2.0, 1.0])), gt)
    assert accuracy.num_registered == 8 and accuracy.num_pairs == 28
    assert accuracy.median_rotation_error == pytest.approx(0.0, abs=1e-5)
    assert accuracy.max_center_error == pytest.approx(0.0, abs=1e-9)


def test_known_perturbations() -> None:
    gt = _gt()
    poses = _transformed(gt, 1.0, np.eye(3), np.zeros(3))
    # rotate camera im3 by 2 degrees about its optical axis, keeping its centre
    bad = poses["im3.png"]
    delta = Rotation.from_rotvec(np.radians(2.0) * np.array([0, 0, 1.0])).as_matrix()
    R = delta @ bad.R
    poses["im3.png"] = SimplePose(R, -R @ gt["im3.png"].center)
    del poses["im7.png"]  # not registered
    accuracy = evaluate(poses, gt)
    assert accuracy.num_registered == 7 and accuracy.unregistered == ["im7.png"]
    # 6 of the 21 pairs involve im3: their error is exactly 2 degrees; the median is 0
    assert accuracy.num_pairs == 21
    assert accuracy.max_rotation_error == pytest.approx(2.0, abs=1e-6)
    assert accuracy.mean_rotation_error == pytest.approx(2.0 * 6 / 21, abs=1e-6)
    assert accuracy.median_rotation_error == pytest.approx(0.0, abs=1e-6)
    assert accuracy.max_center_error == pytest.approx(0.0, abs=1e-9)
    # move one centre by 0.5: after the least-squares Sim3 the error concentrates on it
    moved = dict(poses)
    shifted = gt["im1.png"].center + np.array([0.5, 0.0, 0.0])
    moved["im1.png"] = SimplePose(poses["im1.png"].R, -poses["im1.png"].R @ shifted)
    centres = evaluate(moved, gt).center_errors
    assert max(centres, key=centres.get) == "im1.png" and 0.3 < centres["im1.png"] < 0.55


def test_relative_rotation_errors_by_hand() -> None:
    a = Rotation.from_rotvec([0.1, 0.2, 0.3]).as_matrix()
    b = Rotation.from_rotvec([0.0, -0.4, 0.2]).as_matrix()
    tilt = Rotation.from_rotvec(np.radians([0, 5.0, 0])).as_matrix()
    errors = relative_rotation_errors([a, tilt @ b], [a, b])
    assert errors.shape == (1,) and errors[0] == pytest.approx(5.0, abs=1e-6)


def test_reconstruction_round_trip_and_cli(tmp_path: Path) -> None:
    gt = _gt()
    model = gt_reconstruction(gt, (320, 240))
    back = cameras_from_reconstruction(model)
    for name in gt:
        assert np.allclose(back[name].K, gt[name].K) and np.allclose(back[name].R, gt[name].R)
    assert evaluate(model, gt).max_rotation_error == pytest.approx(0.0, abs=1e-5)
    model.write_binary(str(tmp_path))
    write_par_file(tmp_path / "gt_par.txt", gt.values())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate_model",
            "--model",
            str(tmp_path),
            "--gt",
            str(tmp_path / "gt_par.txt"),
            "--output",
            str(tmp_path / "acc.json"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("registered 8/8")
    assert (tmp_path / "acc.json").is_file()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate_model",
            "--model",
            str(tmp_path / "none"),
            "--gt",
            str(tmp_path / "gt_par.txt"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
