"""Image Matching Challenge metrics: mean Average Accuracy (mAA) of relative poses, 2022 and 2023 definitions.

Both competitions score a pair of cameras by two errors and count the pair as accurate at threshold
``k`` when both errors are below the k-th threshold of two paired lists; mAA is the mean accuracy over
the list (and then over pairs, scenes and datasets).

* rotation error: the angle of the relative-rotation difference, computed from unit quaternions as
  ``arccos(1 - 2 * max(eps, 1 - <q, q_gt>^2))`` degrees (eps = 1e-15 as in the organisers' code);
* translation error: the predicted translation is rescaled to the ground-truth norm (the scale of a
  relative pose is unobservable) and the error is ``min(|t_gt - t|, |t_gt + t|)`` (the sign is not
  observable from F either), optionally multiplied by a per-scene scaling factor to reach metres.

Sources of the definitions and thresholds (read, not copied):

* IMC 2022 — the organisers' training notebook https://www.kaggle.com/code/eduardtrulls/imc2022-training-data
  ("Do not change this -- these are the values used by the scoring back-end"): ``thresholds_q =
  np.linspace(1, 10, 10)`` degrees, ``thresholds_t = np.geomspace(0.2, 5, 10)`` metres after the per-scene
  ``scaling_factors.csv``; strict ``<``; relative GT pose ``dR = R2 R1^T, dT = T2 - dR T1``; per-scene
  mAA averaged over scenes. Only F is submitted, so the pose comes from ``E = K2^T F K1``: the scoring
  reproduction in https://www.kaggle.com/code/tmyok1984/imc2022-validation-code decomposes E into its two
  rotations and keeps the better one (the translation sign does not matter); with inlier correspondences
  the training notebook uses ``cv2.recoverPose`` (cheirality) instead — both are offered here.
* IMC 2023 — the organisers' evaluation notebook https://www.kaggle.com/code/eduardtrulls/imc2023-evaluation
  (``eval_submission``): all pairs ``i < j`` of a scene's ground-truth images, relative poses of both
  the submission and the GT, inclusive ``<=``, per-scene thresholds (``rotation_thresholds_degrees_dict``,
  ``translation_thresholds_meters_dict``, reproduced in :data:`IMC2023_THRESHOLDS`); mAA averaged over
  scenes, then over datasets. Unregistered images (nan poses) make every pair they are in inaccurate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

#: the organisers' epsilon in the rotation and translation errors
EPS = 1e-15


@dataclass(frozen=True)
class Thresholds:
    """Paired threshold lists: pair k is accurate when rotation <= / < rotation_deg[k] and translation likewise."""

    rotation_deg: tuple[float, ...]
    translation: tuple[float, ...]  # metres (2022: after the scene's scaling factor)

    def __post_init__(self) -> None:
        if len(self.rotation_deg) != len(self.translation) or not self.rotation_deg:
            raise ValueError(
                f"threshold lists must be non-empty and of equal length, got {len(self.rotation_deg)} "
                f"rotation and {len(self.translation)} translation thresholds"
            )
        if min(self.rotation_deg) <= 0 or min(self.translation) <= 0:
            raise ValueError("thresholds must be positive")

    @staticmethod
    def of(rotation_deg: Iterable[float], translation: Iterable[float]) -> "Thresholds":
        return Thresholds(tuple(float(v) for v in rotation_deg), tuple(float(v) for v in translation))


#: IMC 2022 (organisers' training notebook, see the module docstring)
IMC2022_THRESHOLDS = Thresholds.of(np.linspace(1, 10, 10), np.geomspace(0.2, 5, 10))

#: IMC 2023 per-scene thresholds (organisers' evaluation notebook, see the module docstring)
IMC2023_THRESHOLDS: dict[tuple[str, str], Thresholds] = {
    **{
        ("haiper", s): Thresholds.of(np.linspace(1, 10, 10), np.geomspace(0.05, 0.5, 10))
        for s in ("bike", "chairs", "fountain")
    },
    **{
        ("heritage", s): Thresholds.of(np.linspace(1, 10, 10), np.geomspace(0.1, 2, 10)) for s in ("cyprus", "dioscuri")
    },
    ("heritage", "wall"): Thresholds.of(np.linspace(0.2, 10, 10), np.geomspace(0.05, 1, 10)),
    ("urban", "kyiv-puppet-theater"): Thresholds.of(np.linspace(1, 10, 10), np.geomspace(0.5, 5, 10)),
}

#: Scenes the organisers did not publish thresholds for (e.g. the converted Middlebury temple) use the
#: lists of the object-centric 'haiper' scenes: the closest in scale (tabletop objects, cameras < 1 m away).
DEFAULT_2023_THRESHOLDS = IMC2023_THRESHOLDS[("haiper", "bike")]


def thresholds_2023(dataset: str, scene: str, default: Thresholds = DEFAULT_2023_THRESHOLDS) -> Thresholds:
    """The published thresholds of a 2023 scene, or ``default`` for scenes outside the competition."""
    return IMC2023_THRESHOLDS.get((dataset, scene), default)


# ---------------------------------------------------------------------------------------- pose errors
def quaternion_from_matrix(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) with w >= 0 of a (near-)rotation matrix.

    Uses the eigenvector of Bar-Itzhack's symmetric 4x4 matrix, like the organisers, so matrices that are
    only approximately orthonormal still give the closest rotation.
    """
    m = np.asarray(rotation, dtype=np.float64)[:3, :3]
    k = (
        np.array(
            [
                [m[0, 0] - m[1, 1] - m[2, 2], m[1, 0] + m[0, 1], m[2, 0] + m[0, 2], m[2, 1] - m[1, 2]],
                [m[1, 0] + m[0, 1], m[1, 1] - m[0, 0] - m[2, 2], m[2, 1] + m[1, 2], m[0, 2] - m[2, 0]],
                [m[2, 0] + m[0, 2], m[2, 1] + m[1, 2], m[2, 2] - m[0, 0] - m[1, 1], m[1, 0] - m[0, 1]],
                [m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1], m[0, 0] + m[1, 1] + m[2, 2]],
            ]
        )
        / 3.0
    )
    values, vectors = np.linalg.eigh(k)
    x, y, z, w = vectors[:, int(np.argmax(values))]
    q = np.array([w, x, y, z])
    return -q if q[0] < 0 else q


def rotation_error_deg(rotation_gt: np.ndarray, rotation: np.ndarray) -> float:
    """Angle between two rotations in degrees (the organisers' quaternion formula)."""
    if not (np.all(np.isfinite(rotation_gt)) and np.all(np.isfinite(rotation))):
        return float("inf")
    q_gt = quaternion_from_matrix(rotation_gt)
    q = quaternion_from_matrix(rotation)
    q_gt = q_gt / (np.linalg.norm(q_gt) + EPS)
    q = q / (np.linalg.norm(q) + EPS)
    loss = max(EPS, 1.0 - float(np.dot(q, q_gt)) ** 2)
    return float(np.degrees(np.arccos(np.clip(1.0 - 2.0 * loss, -1.0, 1.0))))


def translation_error(translation_gt: np.ndarray, translation: np.ndarray, scale: float = 1.0) -> float:
    """Distance between translations after rescaling the prediction to the GT norm; sign-agnostic.

    ``scale`` converts scene units to metres (IMC 2022's per-scene scaling factor; 1 for 2023).
    """
    t_gt = np.asarray(translation_gt, dtype=np.float64).reshape(3)
    t = np.asarray(translation, dtype=np.float64).reshape(3)
    if not (np.all(np.isfinite(t_gt)) and np.all(np.isfinite(t))):
        return float("inf")
    t_gt_scaled = t_gt * scale
    t_scaled = t * np.linalg.norm(t_gt) * scale / (np.linalg.norm(t) + EPS)
    return float(min(np.linalg.norm(t_gt_scaled - t_scaled), np.linalg.norm(t_gt_scaled + t_scaled)))


def relative_pose(
    rotation0: np.ndarray, translation0: np.ndarray, rotation1: np.ndarray, translation1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pose of camera 1 relative to camera 0 from world-to-camera poses: ``dR = R1 R0^T, dT = T1 - dR T0``."""
    r0 = np.asarray(rotation0, dtype=np.float64).reshape(3, 3)
    r1 = np.asarray(rotation1, dtype=np.float64).reshape(3, 3)
    d_rotation = r1 @ r0.T
    d_translation = np.asarray(translation1, dtype=np.float64).reshape(3) - d_rotation @ np.asarray(
        translation0, dtype=np.float64
    ).reshape(3)
    return d_rotation, d_translation


def mean_average_accuracy(
    rotation_errors: Sequence[float],
    translation_errors: Sequence[float],
    thresholds: Thresholds,
    inclusive: bool,
) -> float:
    """mAA of a set of pairs: accuracy at each paired threshold, averaged over the thresholds.

    ``inclusive``: 2023 counts ``error <= threshold`` as accurate, 2022 only ``error < threshold``.
    An empty set scores 0 (nothing was accurate).
    """
    err_q = np.asarray(rotation_errors, dtype=np.float64).reshape(-1)
    err_t = np.asarray(translation_errors, dtype=np.float64).reshape(-1)
    if err_q.shape != err_t.shape:
        raise ValueError(f"{err_q.size} rotation errors but {err_t.size} translation errors")
    if err_q.size == 0:
        return 0.0
    err_q = np.nan_to_num(err_q, nan=np.inf)
    err_t = np.nan_to_num(err_t, nan=np.inf)
    accuracies = []
    for th_q, th_t in zip(thresholds.rotation_deg, thresholds.translation):
        if inclusive:
            accurate = (err_q <= th_q) & (err_t <= th_t)
        else:
            accurate = (err_q < th_q) & (err_t < th_t)
        accuracies.append(float(accurate.mean()))
    return float(np.mean(accuracies))


# ------------------------------------------------------------------------------------ 2022: from F
def fundamental_from_pose(K0: np.ndarray, K1: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """F with ``x1^T F x0 = 0`` for camera 1 at ``(R, t)`` relative to camera 0: ``K1^-T [t]x R K0^-1``."""
    t = np.asarray(translation, dtype=np.float64).reshape(3)
    skew = np.array([[0.0, -t[2], t[1]], [t[2], 0.0, -t[0]], [-t[1], t[0], 0.0]])
    essential = skew @ np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    F = np.linalg.inv(np.asarray(K1, np.float64)).T @ essential @ np.linalg.inv(np.asarray(K0, np.float64))
    norm = np.linalg.norm(F)
    return F / norm if norm > 0 else F


def is_valid_fundamental(F: np.ndarray) -> bool:
    """A usable F: 3x3, finite, not (numerically) zero — the zero matrix is how failures are submitted."""
    F = np.asarray(F, dtype=np.float64)
    return F.shape == (3, 3) and bool(np.all(np.isfinite(F))) and float(np.abs(F).max()) > 0.0


def essential_from_fundamental(F: np.ndarray, K0: np.ndarray, K1: np.ndarray) -> np.ndarray:
    """``E = K1^T F K0`` (image 0 is ``image_1_id`` of the CSV, image 1 is ``image_2_id``)."""
    return np.asarray(K1, np.float64).T @ np.asarray(F, np.float64) @ np.asarray(K0, np.float64)


def rotation_hypotheses(F: np.ndarray, K0: np.ndarray, K1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two rotations and the (sign-ambiguous) translation direction encoded in ``E = K1^T F K0``.

    Same decomposition as OpenCV's ``decomposeEssentialMat``; scoring keeps the better rotation, as the
    translation sign is irrelevant to the metric.
    """
    rotation_a, rotation_b, translation = cv2.decomposeEssentialMat(essential_from_fundamental(F, K0, K1))
    return rotation_a, rotation_b, translation.reshape(3)


def pose_from_fundamental_points(
    F: np.ndarray, K0: np.ndarray, K1: np.ndarray, points0: np.ndarray, points1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The pose a cheirality check picks: ``cv2.recoverPose`` on ``E = K1^T F K0`` with inlier points."""
    E = essential_from_fundamental(F, K0, K1)
    n0 = cv2.undistortPoints(np.asarray(points0, np.float64).reshape(-1, 1, 2), np.asarray(K0, np.float64), None)
    n1 = cv2.undistortPoints(np.asarray(points1, np.float64).reshape(-1, 1, 2), np.asarray(K1, np.float64), None)
    _, rotation, translation, _ = cv2.recoverPose(E, n0.reshape(-1, 2), n1.reshape(-1, 2))
    return rotation, translation.reshape(3)


def fundamental_pose_errors(
    F: np.ndarray,
    K0: np.ndarray,
    K1: np.ndarray,
    rotation_gt: np.ndarray,
    translation_gt: np.ndarray,
    scale: float = 1.0,
) -> tuple[float, float]:
    """2022 errors of a submitted F against the GT relative pose (better of the two rotations).

    An invalid F (zeros, non-finite) scores infinite errors: it is a failed pair.
    """
    if not is_valid_fundamental(F):
        return float("inf"), float("inf")
    rotation_a, rotation_b, translation = rotation_hypotheses(F, K0, K1)
    err_q = min(rotation_error_deg(rotation_gt, rotation_a), rotation_error_deg(rotation_gt, rotation_b))
    return err_q, translation_error(translation_gt, translation, scale)


# --------------------------------------------------------------------------------- 2023: all pairs
Pose = tuple[np.ndarray, np.ndarray]  # world-to-camera (R (3,3), t (3,))


def scene_pair_errors(
    ground_truth: Mapping[str, Pose], predictions: Mapping[str, Pose]
) -> tuple[list[float], list[float]]:
    """Rotation and translation errors of every pair ``i < j`` of the GT images (GT order).

    Images missing from ``predictions`` or with non-finite poses make their pairs fail (infinite errors).
    """
    names = list(ground_truth)
    nan_pose = (np.full((3, 3), np.nan), np.full(3, np.nan))
    err_q: list[float] = []
    err_t: list[float] = []
    for i, name_i in enumerate(names):
        for name_j in names[i + 1 :]:
            d_rotation_gt, d_translation_gt = relative_pose(*ground_truth[name_i], *ground_truth[name_j])
            pred_i = predictions.get(name_i, nan_pose)
            pred_j = predictions.get(name_j, nan_pose)
            if not all(np.all(np.isfinite(a)) for a in (*pred_i, *pred_j)):
                err_q.append(float("inf"))
                err_t.append(float("inf"))
                continue
            d_rotation, d_translation = relative_pose(*pred_i, *pred_j)
            err_q.append(rotation_error_deg(d_rotation_gt, d_rotation))
            err_t.append(translation_error(d_translation_gt, d_translation))
    return err_q, err_t


def scene_maa_2023(ground_truth: Mapping[str, Pose], predictions: Mapping[str, Pose], thresholds: Thresholds) -> float:
    """IMC 2023 mAA of one scene: all GT pairs, inclusive thresholds."""
    err_q, err_t = scene_pair_errors(ground_truth, predictions)
    return mean_average_accuracy(err_q, err_t, thresholds, inclusive=True)


def average_over_datasets(scene_scores: Mapping[tuple[str, str], float]) -> float:
    """IMC 2023 final score: mean over scenes within a dataset, then mean over datasets."""
    per_dataset: dict[str, list[float]] = {}
    for (dataset, _scene), score in scene_scores.items():
        per_dataset.setdefault(dataset, []).append(score)
    if not per_dataset:
        return 0.0
    return float(np.mean([np.mean(scores) for scores in per_dataset.values()]))
