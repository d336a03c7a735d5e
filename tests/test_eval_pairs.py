"""recipes.eval_pairs: AUC arithmetic, corner error, pose estimation on exact correspondences, both CLIs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from recipes.eval_pairs import (
    HomographyPair,
    corner_error,
    error_auc,
    estimate_pose,
    evaluate_homographies,
    main_cli,
    make_homography_pairs,
    rotation_error_deg,
)

ROOT = Path(__file__).resolve().parents[1]


def test_error_auc_by_hand() -> None:
    # errors 1 and 3 (and one failure): recall 1/3 from 1 px, 2/3 from 3 px
    aucs = error_auc([1.0, 3.0, np.inf], [2.0, 4.0])
    # up to 2: trapezoid (0,0)-(1,1/3) = 1/6, then flat 1/3 for 1 px -> (1/6 + 1/3) / 2 = 0.25
    assert aucs[0] == pytest.approx(0.25)
    # up to 4 (SuperGlue's curve interpolates linearly between sorted errors): (0,0)-(1,1/3) 1/6,
    # (1,1/3)-(3,2/3) 1, then flat 2/3 for 1 px -> (1/6 + 1 + 2/3) / 4
    assert aucs[1] == pytest.approx((1 / 6 + 1 + 2 / 3) / 4)
    assert error_auc([0.0, 0.0], [5.0]) == [pytest.approx(1.0)]
    assert error_auc([np.inf], [5.0]) == [pytest.approx(0.0)]


def test_corner_error() -> None:
    H = np.array([[1.0, 0.1, 3.0], [0.0, 1.2, -1.0], [1e-4, 0.0, 1.0]])
    assert corner_error(H, H, 640, 480) == pytest.approx(0.0, abs=1e-9)
    shifted = np.array([[1.0, 0, 3.0], [0, 1.0, 4.0], [0, 0, 1.0]]) @ H
    assert corner_error(shifted, H, 640, 480) == pytest.approx(5.0)
    assert corner_error(None, H, 640, 480) == np.inf


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(axis, np.float64) / np.linalg.norm(axis) * np.radians(degrees))[0]


def test_estimate_pose_recovers_a_known_motion() -> None:
    rng = np.random.default_rng(0)
    K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
    points = rng.uniform([-2, -1.5, 4], [2, 1.5, 8], (300, 3))
    R = _rotation([0.2, 1.0, 0.1], 12.0)
    t = np.array([0.5, 0.05, 0.1])
    p0 = points @ K.T
    p0 = p0[:, :2] / p0[:, 2:]
    cam1 = points @ R.T + t
    p1 = cam1 @ K.T
    p1 = p1[:, :2] / p1[:, 2:]
    R_est, t_est = estimate_pose(p0, p1, K, K)
    assert rotation_error_deg(R, R_est) < 0.05
    cos = t_est @ t / np.linalg.norm(t) / np.linalg.norm(t_est)
    assert np.degrees(np.arccos(min(1.0, abs(cos)))) < 0.2
    R_noisy, _ = estimate_pose(p0, p1 + rng.normal(0, 0.1, p1.shape), K, K)  # RANSAC, no refinement
    assert rotation_error_deg(R, R_noisy) < 2.0
    assert estimate_pose(p0[:4], p1[:4], K, K) is None


class _OracleMatcher:
    """A fake matcher that returns GT matches (plus some outliers) for the pair being matched."""

    def __init__(self, pairs: list[HomographyPair]) -> None:
        self.by_id = {id(p.image0): p for p in pairs}

    def match(self, image0, image1):
        from matchers.base import Matches

        pair = self.by_id[id(image0)]
        ys, xs = np.mgrid[8 : image0.shape[0] - 8 : 16, 8 : image0.shape[1] - 8 : 16]
        k0 = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
        k1 = cv2.perspectiveTransform(k0[None].astype(np.float64), pair.H)[0].astype(np.float32)
        k1[::10] += 40.0  # 10 % outliers
        return Matches(k0, k1, np.ones(len(k0), np.float32))


def test_evaluate_homographies_with_an_oracle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = (cv2.GaussianBlur(rng.random((300, 400)).astype(np.float32), (0, 0), 2) * 255 * 4).clip(0, 255)
    cv2.imwrite(str(tmp_path / "a.png"), image.astype(np.uint8))
    pairs = make_homography_pairs(tmp_path, pairs_per_image=3, seed=1)
    assert len(pairs) == 3 and pairs[0].image0.shape == (480, 640)
    again = make_homography_pairs(tmp_path, pairs_per_image=3, seed=1)
    assert np.array_equal(pairs[2].H, again[2].H)
    result = evaluate_homographies(_OracleMatcher(pairs), pairs, progress=False)
    assert result["precision"] == pytest.approx(0.9, abs=0.01)
    assert result["auc@3px"] > 90 and result["auc@10px"] > 97
    assert result["matches_per_pair"] == pytest.approx(len(_OracleMatcher(pairs).match(pairs[0].image0, None)))


def test_cli_homography_with_sift(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((120, 160)).astype(np.float32)
    image = cv2.resize(cv2.GaussianBlur(image, (0, 0), 1.0), (640, 480)) * 255
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "noise.png"), np.clip((image - 127) * 3 + 127, 0, 255).astype(np.uint8))
    out = tmp_path / "r.json"
    result = main_cli(
        [
            "--matcher",
            "sift",
            "--homography",
            str(photos),
            "--size",
            "320x240",
            "--pairs-per-image",
            "1",
            "--output",
            str(out),
        ]
    )
    assert result.homography["pairs"] == 1
    assert result.homography["matches_per_pair"] > 20
    assert result.homography["auc@10px"] > 50  # SIFT solves a mild homography of a textured image
    assert out.is_file() and "auc@5px" in out.read_text()
    assert "homography:" in capsys.readouterr().out


def test_cli_relative_pose_on_scannet_sample(scannet_sample, tmp_path: Path) -> None:
    lines = (scannet_sample / "pairs_with_gt.txt").read_text().splitlines()[:2]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    result = main_cli(
        [
            "--matcher",
            "sift",
            "--pairs-with-gt",
            str(pairs),
            "--images",
            str(scannet_sample / "images"),
            "--resize",
            "640",
        ]
    )
    assert result.pose["pairs"] == 2
    assert 0 <= result.pose["auc@5deg"] <= result.pose["auc@10deg"] <= result.pose["auc@20deg"] <= 100
    assert result.pose["matches_per_pair"] > 10


def test_cli_errors(tmp_path: Path) -> None:
    from core.errors import UserError

    proc = subprocess.run(
        [sys.executable, "-m", "recipes.eval_pairs"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "nothing to evaluate" in proc.stderr and "Traceback" not in proc.stderr
    for args, needle in (
        (["--homography", str(tmp_path / "none")], "does not exist"),
        (["--pairs-with-gt", str(tmp_path / "p.txt")], "not found"),
        (["--matcher", "sift", "--weights", "x", "--homography", str(tmp_path)], "no weights"),
        (["--matcher", "sift", "--homography", str(tmp_path), "--size", "640"], "bad --size"),
    ):
        with pytest.raises(UserError, match=needle):
            main_cli(args)
