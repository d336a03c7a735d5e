"""localization.evaluate: pose errors, recall at thresholds, scale factor, name matching, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from core.errors import UserError
from core.poses import camera_center, rigid_from_matrix, write_poses
from localization import evaluate as ev


def rot_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def pose_at(R: np.ndarray, center: np.ndarray) -> pycolmap.Rigid3d:
    return rigid_from_matrix(R, -R @ np.asarray(center, float))


def perturbed(truth: pycolmap.Rigid3d, degrees: float, offset: np.ndarray) -> pycolmap.Rigid3d:
    """The same camera rotated by ``degrees`` about its z axis and moved by ``offset`` (world)."""
    R = rot_z(degrees) @ np.asarray(truth.rotation.matrix())
    return pose_at(R, camera_center(truth) + offset)


def test_pose_errors_hand_computed() -> None:
    truth = pose_at(rot_z(30) @ np.diag([1.0, -1.0, -1.0]), np.array([1.0, 2.0, 3.0]))
    estimate = perturbed(truth, 3.0, np.array([0.3, 0.4, 0.0]))
    position, rotation = ev.pose_errors(estimate, truth)
    assert position == pytest.approx(0.5, abs=1e-12)
    assert rotation == pytest.approx(3.0, abs=1e-9)
    position, _ = ev.pose_errors(estimate, truth, scale=20.0)  # 1 unit = 20 m
    assert position == pytest.approx(10.0, abs=1e-10)


def test_recall_thresholds_medians_and_missing() -> None:
    truth = {f"query/day/q{i}.jpg": pose_at(np.eye(3), np.array([i, 0.0, 0.0])) for i in range(5)}
    # errors: (0.1 m, 1 deg), (0.3 m, 1 deg), (0.2 m, 4 deg), (3 m, 9 deg), missing
    errors = [(0.1, 1.0), (0.3, 1.0), (0.2, 4.0), (3.0, 9.0)]
    results = {}
    for (name, pose), (meters, degrees) in zip(truth.items(), errors):
        results[name] = perturbed(pose, degrees, np.array([0.0, meters, 0.0]))
    evaluation = ev.evaluate(truth, results, ev.AACHEN_THRESHOLDS + ev.INLOC_THRESHOLDS)
    # (0.25,2): q0 -> 1/5; (0.5,5): q0 q1 q2 -> 3/5; (5,10): 4/5; inloc (0.25,10): q0 q2; (0.5,10): 3; (1,10): 3
    assert evaluation.recall == pytest.approx([20.0, 60.0, 80.0, 40.0, 60.0, 60.0])
    assert evaluation.num_localized == 4 and evaluation.missing == ["query/day/q4.jpg"]
    assert evaluation.median_position == pytest.approx(np.median([0.1, 0.3, 0.2, 3.0]))
    assert evaluation.median_rotation == pytest.approx(np.median([1.0, 1.0, 4.0, 9.0]))
    scaled = ev.evaluate(truth, results, ev.AACHEN_THRESHOLDS, scale=0.1)  # errors shrink tenfold
    # 0.01, 0.03, 0.02, 0.3 m: (0.25,2) q0 q1; (0.5,5) q0 q1 q2; (5,10) q0-q3
    assert scaled.recall == pytest.approx([40.0, 60.0, 80.0])
    nothing = ev.evaluate(truth, {}, ev.AACHEN_THRESHOLDS)
    assert nothing.recall == [0.0, 0.0, 0.0] and nothing.median_position == float("inf")


def test_submission_names_match_gt_by_file_name() -> None:
    truth = {
        "query/day/a/IMG_1.jpg": pose_at(np.eye(3), np.zeros(3)),
        "query/night/b/IMG_2.jpg": pose_at(np.eye(3), np.ones(3)),
    }
    results = {"IMG_1.jpg": truth["query/day/a/IMG_1.jpg"], "query/night/b/IMG_2.jpg": truth["query/night/b/IMG_2.jpg"]}
    evaluation = ev.evaluate(truth, results)
    assert evaluation.recall == [100.0] * 3
    ambiguous = {"x/IMG.jpg": truth["query/day/a/IMG_1.jpg"], "y/IMG.jpg": truth["query/day/a/IMG_1.jpg"]}
    with pytest.raises(UserError, match="several ground-truth"):
        ev.evaluate(ambiguous, {"IMG.jpg": truth["query/day/a/IMG_1.jpg"]})


def test_parse_thresholds() -> None:
    assert ev.parse_thresholds("inloc") == ev.INLOC_THRESHOLDS
    assert ev.parse_thresholds("0.1,1;2,20") == ((0.1, 1.0), (2.0, 20.0))
    with pytest.raises(UserError):
        ev.parse_thresholds("fast")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truth = {"q0.jpg": pose_at(np.eye(3), np.zeros(3)), "q1.jpg": pose_at(rot_z(50), np.ones(3))}
    write_poses(tmp_path / "gt.txt", truth)
    write_poses(tmp_path / "res.txt", {"q0.jpg": perturbed(truth["q0.jpg"], 1.0, np.array([0.2, 0, 0]))})
    evaluation = ev.main_cli(
        [
            "--gt",
            str(tmp_path / "gt.txt"),
            "--results",
            str(tmp_path / "res.txt"),
            "--thresholds",
            "aachen",
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    assert "1/2 localized" in capsys.readouterr().out
    assert evaluation.recall == pytest.approx([50.0, 50.0, 50.0])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["recall_percent"] == pytest.approx([50.0, 50.0, 50.0]) and saved["missing"] == ["q1.jpg"]
    with pytest.raises(UserError, match="not found"):
        ev.main_cli(["--gt", str(tmp_path / "nope.txt"), "--results", str(tmp_path / "res.txt")])
    # the API's defaults are the CLI's: all six thresholds, scale 1
    default = ev.main(tmp_path / "gt.txt", tmp_path / "res.txt")
    assert default.thresholds == list(ev.AACHEN_THRESHOLDS + ev.INLOC_THRESHOLDS) and default.scale == 1.0
    scaled = ev.main(tmp_path / "gt.txt", tmp_path / "res.txt", ev.EvaluateConfig(thresholds="1,2", scale=0.5))
    assert scaled.thresholds == [(1.0, 2.0)] and scaled.recall == [50.0] and scaled.scale == 0.5
    with pytest.raises(UserError, match="thresholds 'fast'"):
        ev.EvaluateConfig(thresholds="fast")
