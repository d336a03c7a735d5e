"""IMC mAA on hand-built poses whose answers are computed by hand in each test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datasets.imc_metrics import (
    DEFAULT_2023_THRESHOLDS,
    IMC2022_THRESHOLDS,
    IMC2023_THRESHOLDS,
    Thresholds,
    average_over_datasets,
    fundamental_from_pose,
    fundamental_pose_errors,
    mean_average_accuracy,
    pose_from_fundamental_points,
    relative_pose,
    rotation_error_deg,
    scene_maa_2023,
    thresholds_2023,
    translation_error,
)


def rotation_about(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rodrigues' formula, written out so the tests do not depend on the code under test."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    a = math.radians(degrees)
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * skew + (1 - math.cos(a)) * skew @ skew


K0 = np.array([[500.0, 0, 320], [0, 510.0, 240], [0, 0, 1]])
K1 = np.array([[620.0, 0, 300], [0, 600.0, 250], [0, 0, 1]])
R_GT = rotation_about((0.3, 1.0, 0.1), 20.0)
T_GT = np.array([1.0, 0.2, 0.1]) / np.linalg.norm([1.0, 0.2, 0.1])  # unit length: err_t is easy by hand


def maa_2022(F: np.ndarray, scale: float = 1.0) -> float:
    err_q, err_t = fundamental_pose_errors(F, K0, K1, R_GT, T_GT, scale)
    return mean_average_accuracy([err_q], [err_t], IMC2022_THRESHOLDS, inclusive=False)


def test_published_threshold_lists() -> None:
    # 2022: 1..10 degrees and 0.2 * 25^(k/9) metres; 2023 'haiper': 0.05 * 10^(k/9) metres
    assert IMC2022_THRESHOLDS.rotation_deg == tuple(float(k) for k in range(1, 11))
    assert IMC2022_THRESHOLDS.translation == pytest.approx([0.2 * 25 ** (k / 9) for k in range(10)])
    assert IMC2023_THRESHOLDS[("haiper", "bike")].translation == pytest.approx(
        [0.05 * 10 ** (k / 9) for k in range(10)]
    )
    assert IMC2023_THRESHOLDS[("heritage", "wall")].rotation_deg[0] == pytest.approx(0.2)
    assert thresholds_2023("middlebury", "temple_ring") == DEFAULT_2023_THRESHOLDS
    with pytest.raises(ValueError):
        Thresholds((1.0, 2.0), (0.1,))


def test_rotation_error_is_the_relative_angle() -> None:
    for degrees in (0.5, 3.0, 45.0, 170.0):
        rotation = R_GT @ rotation_about((1.0, -2.0, 0.5), degrees)
        assert rotation_error_deg(R_GT, rotation) == pytest.approx(degrees, abs=1e-5)
    assert rotation_error_deg(R_GT, R_GT) < 1e-5
    assert rotation_error_deg(R_GT, np.full((3, 3), np.nan)) == math.inf


def test_translation_error_rescales_and_ignores_sign() -> None:
    # direction off by 60 degrees on a unit GT: chord 2 sin(30) = 1, whatever the predicted length or sign
    t = 7.0 * rotation_about((0, 0, 1), 60.0) @ np.array([1.0, 0, 0])
    assert translation_error([1.0, 0, 0], t) == pytest.approx(1.0)
    assert translation_error([1.0, 0, 0], -t) == pytest.approx(1.0)
    assert translation_error([2.0, 0, 0], t, scale=3.0) == pytest.approx(6.0)


def test_2022_perfect_fundamental_scores_one() -> None:
    F = fundamental_from_pose(K0, K1, R_GT, T_GT)
    # epipolar constraint holds for a projected 3D point (F convention x1^T F x0 = 0)
    X = np.array([0.3, -0.2, 4.0])
    x0 = K0 @ X
    x1 = K1 @ (R_GT @ X + T_GT)
    assert abs((x1 / x1[2]) @ F @ (x0 / x0[2])) < 1e-9
    assert maa_2022(F) == 1.0
    assert maa_2022(-3.0 * F) == 1.0  # F is defined up to scale and sign


def test_2022_rotation_perturbation() -> None:
    # 4.5 degrees of rotation error, exact translation: accurate at thresholds 5..10 (6 of 10) -> 0.6
    R_bad = rotation_about((0.2, 0.1, 1.0), 4.5) @ R_GT
    assert maa_2022(fundamental_from_pose(K0, K1, R_bad, T_GT)) == pytest.approx(0.6)


def test_2022_translation_perturbation_and_scaling_factor() -> None:
    # direction off by 60 degrees about an axis orthogonal to t: err_t = 1 m on a unit baseline.
    axis = np.cross(T_GT, [0.0, 0.0, 1.0])
    t_bad = rotation_about(tuple(axis), 60.0) @ T_GT
    F = fundamental_from_pose(K0, K1, R_GT, t_bad)
    # thresholds 0.2*25^(k/9) = 0.2, 0.29, 0.41, 0.58, 0.84, 1.20, 1.71, 2.45, 3.50, 5.0: 1 m < the last 5
    assert maa_2022(F) == pytest.approx(0.5)
    # scaling factor 2: err_t = 2 m, below only 2.45, 3.50, 5.0
    assert maa_2022(F, scale=2.0) == pytest.approx(0.3)


def test_2022_failed_pair_scores_zero() -> None:
    assert maa_2022(np.zeros((3, 3))) == 0.0
    assert maa_2022(np.full((3, 3), np.nan)) == 0.0


def test_2022_cheirality_with_points_recovers_the_pose() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50), rng.uniform(4, 8, 50)])
    x0 = (K0 @ X.T).T
    x1 = (K1 @ (X @ R_GT.T + T_GT).T).T
    F = fundamental_from_pose(K0, K1, R_GT, T_GT)
    rotation, translation = pose_from_fundamental_points(F, K0, K1, x0[:, :2] / x0[:, 2:], x1[:, :2] / x1[:, 2:])
    assert rotation_error_deg(R_GT, rotation) < 1e-3
    assert translation @ T_GT == pytest.approx(1.0, abs=1e-6)  # unit vector, correct sign


def test_mean_average_accuracy_strict_versus_inclusive() -> None:
    thresholds = Thresholds.of(range(1, 11), [1.0] * 10)
    # an error equal to the 5th threshold counts there in 2023 (<=) but not in 2022 (<)
    assert mean_average_accuracy([5.0], [0.0], thresholds, inclusive=False) == pytest.approx(0.5)
    assert mean_average_accuracy([5.0], [0.0], thresholds, inclusive=True) == pytest.approx(0.6)
    assert mean_average_accuracy([0.0, math.nan], [0.0, 0.0], thresholds, inclusive=True) == pytest.approx(0.5)
    assert mean_average_accuracy([], [], thresholds, inclusive=True) == 0.0


# ------------------------------------------------------------------------------------------- 2023
def camera(center: tuple[float, float, float], rotation: np.ndarray = np.eye(3)) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) of a camera at ``center``."""
    return rotation, -rotation @ np.asarray(center, dtype=np.float64)


GT_2023 = {"a.png": camera((0, 0, 0)), "b.png": camera((1, 0, 0)), "c.png": camera((0, 1, 0))}
HAIPER = IMC2023_THRESHOLDS[("haiper", "bike")]


def test_2023_perfect_poses_in_any_similarity_frame_score_one() -> None:
    assert scene_maa_2023(GT_2023, GT_2023, HAIPER) == 1.0
    # same cameras in another world frame: rotated by Q, scaled by 3, shifted by d
    Q = rotation_about((1, 2, 3), 40.0)
    d = np.array([5.0, -1.0, 2.0])
    moved = {}
    for name, (R, t) in GT_2023.items():
        center = -R.T @ t
        moved[name] = camera(tuple(3.0 * Q @ center + d), R @ Q.T)
    assert scene_maa_2023(GT_2023, moved, HAIPER) == pytest.approx(1.0)


def test_2023_one_camera_turned_in_place() -> None:
    # camera c turned by 4.5 degrees about z around its own centre.
    # pair (a,b): perfect -> 10/10.
    # pair (a,c): rotation 4.5 deg; dT = -Rz(0,1,0) vs -(0,1,0): 4.5 deg on a unit baseline,
    #   err_t = 2 sin(2.25 deg) = 0.0785 <= 0.0834 (3rd threshold); rotation <= 5 (5th) -> 6/10.
    # pair (b,c): dT = Rz(1,-1,0) vs (1,-1,0): err_t = sqrt(2) * 0.0785 = 0.111 <= 0.139 (5th) -> 6/10.
    # mAA = (10 + 6 + 6) / 30.
    predicted = dict(GT_2023)
    predicted["c.png"] = camera((0, 1, 0), rotation_about((0, 0, 1), 4.5))
    assert scene_maa_2023(GT_2023, predicted, HAIPER) == pytest.approx(22 / 30)


def test_2023_unregistered_image_fails_its_pairs() -> None:
    predicted = dict(GT_2023)
    predicted["c.png"] = (np.full((3, 3), np.nan), np.full(3, np.nan))
    assert scene_maa_2023(GT_2023, predicted, HAIPER) == pytest.approx(1 / 3)
    del predicted["c.png"]  # missing entirely: same as unregistered
    assert scene_maa_2023(GT_2023, predicted, HAIPER) == pytest.approx(1 / 3)


def test_2023_average_over_scenes_then_datasets() -> None:
    scores = {("a", "s1"): 1.0, ("a", "s2"): 0.0, ("b", "s3"): 1.0}
    # dataset a: 0.5, dataset b: 1.0 -> 0.75 (a plain mean over scenes would give 2/3)
    assert average_over_datasets(scores) == pytest.approx(0.75)


def test_relative_pose_matches_camera_geometry() -> None:
    R0, t0 = camera((0.5, 0.2, -1.0), rotation_about((0, 1, 0), 30.0))
    R1, t1 = camera((1.5, 0.0, -0.5), rotation_about((1, 0, 0), -10.0))
    dR, dT = relative_pose(R0, t0, R1, t1)
    X = np.array([0.3, 0.4, 2.0])
    assert dR @ (R0 @ X + t0) + dT == pytest.approx(R1 @ X + t1)
