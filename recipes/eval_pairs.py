"""Evaluate any matcher on image pairs with ground truth: homography AUC and relative-pose AUC.

    python -m recipes.eval_pairs --matcher loftr --weights loftr-compact --homography photos/ [--size 640x480]
    python -m recipes.eval_pairs --matcher sift --pairs-with-gt ../shared/data/scannet_sample/pairs_with_gt.txt

Homography protocol (HPatches, as in the LoFTR paper): for every pair, H is estimated from the matches with
RANSAC (3 px), the four image corners of image 0 are mapped by the estimate and by the GT, and the pair's error is
their mean distance; AUC of the error curve up to 3 / 5 / 10 px. The pairs are held-out synthetic homographies of
the photos in DIR (deterministic given ``--seed``; see :func:`make_homography_pairs`), so any photo folder becomes
a benchmark. Also reported: matches per pair and the precision of the matches (keypoint 1 within
``--precision-px``, default 8 px = one coarse LoFTR cell, of the GT position).

Relative-pose protocol (SuperGlue / LoFTR on ScanNet-1500): keypoints normalised with K, essential matrix by
RANSAC (threshold 0.5 px / mean focal, confidence 0.99999), ``recoverPose`` on every candidate, the pair's error is
max(rotation error, translation-direction error) in degrees (inf when estimation fails); AUC at 5 / 10 / 20 deg.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from core.errors import UserError, run_cli
from core.image_io import read_gray
from matchers.base import Matcher
from recipes.training.data import HomographyConfig, PhotometricConfig, homography_pair, parse_size

HOMOGRAPHY_THRESHOLDS = (3.0, 5.0, 10.0)
POSE_THRESHOLDS = (5.0, 10.0, 20.0)
#: held-out evaluation homographies: milder than training (HPatches-like viewpoint changes), light photometric
EVAL_HOMOGRAPHY = HomographyConfig(
    height=480,
    width=640,
    zoom=(1.0, 1.3),
    max_rotation_deg=15.0,
    scale=(0.8, 1.25),
    perspective=0.1,
    translation=0.1,
    photometric=PhotometricConfig(brightness=0.1, contrast=0.2, gamma=0.2, noise=0.01, blur_probability=0.0),
)


def error_auc(errors: Sequence[float], thresholds: Sequence[float]) -> list[float]:
    """Area under the recall-vs-error curve up to each threshold, normalised to [0, 1] (SuperGlue's pose_auc)."""
    errs = np.sort(np.asarray(errors, np.float64))
    recall = (np.arange(len(errs)) + 1) / max(len(errs), 1)
    errs = np.concatenate([[0.0], errs])
    recall = np.concatenate([[0.0], recall])
    aucs = []
    for t in thresholds:
        last = int(np.searchsorted(errs, t))
        x = np.concatenate([errs[:last], [t]])
        y = np.concatenate([recall[:last], [recall[last - 1]]])
        aucs.append(float(np.trapezoid(y, x) / t))
    return aucs


# ---------------------------------------------------------------------------------------------- homographies
@dataclass(frozen=True)
class HomographyPair:
    name: str
    image0: np.ndarray
    image1: np.ndarray
    H: np.ndarray  # image 0 -> image 1


def make_homography_pairs(
    folder: str | Path, pairs_per_image: int = 2, seed: int = 12345, config: HomographyConfig = EVAL_HOMOGRAPHY
) -> list[HomographyPair]:
    """Deterministic held-out homography pairs of every photo in ``folder`` (image 0 a crop, image 1 its warp)."""
    from recipes.training.data import limit_size, list_images

    paths = list_images(folder)
    names = [p.relative_to(folder).as_posix() for p in paths]
    photos = [limit_size(read_gray(p), 2048) for p in paths]
    pairs = []
    for k, (name, photo) in enumerate(zip(names, photos)):
        for r in range(pairs_per_image):
            rng = np.random.default_rng([seed, k, r])
            image0, image1, H = homography_pair(photo, rng, config, augment=True)
            pairs.append(HomographyPair(f"{name}#{r}", image0, image1, H))
    return pairs


def corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, width: int, height: int) -> float:
    """Mean distance of image 0's corners mapped by the estimate and by the GT (inf without an estimate)."""
    if H_est is None:
        return math.inf
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    est = cv2.perspectiveTransform(corners[None], H_est)[0]
    gt = cv2.perspectiveTransform(corners[None], H_gt)[0]
    return float(np.linalg.norm(est - gt, axis=1).mean())


def evaluate_homographies(
    matcher: Matcher,
    pairs: Sequence[HomographyPair],
    precision_px: float = 8.0,
    ransac_px: float = 3.0,
    progress: bool = True,
) -> dict[str, float]:
    """Homography AUC@3/5/10 px, matches per pair, precision and per-pair details."""
    errors, counts, precisions = [], [], []
    for pair in tqdm(pairs, desc="homography pairs", disable=not progress):
        m = matcher.match(pair.image0, pair.image1)
        counts.append(len(m))
        if len(m):
            warped = cv2.perspectiveTransform(m.keypoints0.astype(np.float64)[None], pair.H)[0]
            precisions.append(float((np.linalg.norm(warped - m.keypoints1, axis=1) < precision_px).mean()))
        else:
            precisions.append(0.0)
        H_est = None
        if len(m) >= 4:
            H_est, _ = cv2.findHomography(
                m.keypoints0, m.keypoints1, cv2.RANSAC, ransac_px, maxIters=10000, confidence=0.9999
            )
        h, w = pair.image0.shape
        errors.append(corner_error(H_est, pair.H, w, h))
    aucs = error_auc(errors, HOMOGRAPHY_THRESHOLDS)
    result = {f"auc@{int(t)}px": 100 * a for t, a in zip(HOMOGRAPHY_THRESHOLDS, aucs)}
    result.update(
        {
            "pairs": len(pairs),
            "matches_per_pair": float(np.mean(counts)) if counts else 0.0,
            "min_matches": float(np.min(counts)) if counts else 0.0,
            "precision": float(np.mean(precisions)) if precisions else 0.0,
            "median_corner_error_px": float(np.median(errors)) if errors else math.inf,
        }
    )
    return result


# ---------------------------------------------------------------------------------------------- relative pose
def angle_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def rotation_error_deg(R_gt: np.ndarray, R: np.ndarray) -> float:
    cos = (np.trace(R_gt.T @ R) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def estimate_pose(
    kpts0: np.ndarray,
    kpts1: np.ndarray,
    K0: np.ndarray,
    K1: np.ndarray,
    threshold_px: float = 0.5,
    confidence: float = 0.99999,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(R, t) of camera 1 relative to camera 0 from matches (SuperGlue's estimate_pose), or None."""
    if len(kpts0) < 5:
        return None
    f_mean = np.mean([K0[0, 0], K1[1, 1], K0[0, 0], K1[1, 1]])
    norm0 = (kpts0 - K0[[0, 1], [2, 2]][None]) / K0[[0, 1], [0, 1]][None]
    norm1 = (kpts1 - K1[[0, 1], [2, 2]][None]) / K1[[0, 1], [0, 1]][None]
    E, mask = cv2.findEssentialMat(
        norm0, norm1, np.eye(3), threshold=threshold_px / f_mean, prob=confidence, method=cv2.RANSAC
    )
    if E is None:
        return None
    best, best_count = None, 0
    for candidate in np.split(E, len(E) // 3):
        count, R, t, _ = cv2.recoverPose(candidate, norm0, norm1, np.eye(3), 1e9, mask=mask)
        if count > best_count:
            best_count, best = count, (R, t[:, 0])
    return best


def evaluate_relative_poses(
    matcher: Matcher, pairs_file: str | Path, images: str | Path | None = None, progress: bool = True
) -> dict[str, float]:
    """Relative-pose AUC@5/10/20 deg over a ``pairs_with_gt.txt`` (images in ``images``, default ``../images``)."""
    from core.io import resolve_image
    from datasets.imc import read_scannet_pairs

    pairs_file = Path(pairs_file)
    root = Path(images) if images is not None else pairs_file.parent / "images"
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; pass --images")
    pairs = read_scannet_pairs(pairs_file)
    errors, counts = [], []
    for name0, name1, K0, K1, T in tqdm(pairs, desc="pose pairs", disable=not progress):
        m = matcher.match(read_gray(resolve_image(root, name0)), read_gray(resolve_image(root, name1)))
        counts.append(len(m))
        pose = estimate_pose(m.keypoints0.astype(np.float64), m.keypoints1.astype(np.float64), K0, K1)
        if pose is None:
            errors.append(math.inf)
            continue
        R, t = pose
        err_t = angle_error_deg(t, T[:3, 3])
        err_t = min(err_t, 180 - err_t)  # the essential matrix fixes t only up to sign
        errors.append(max(err_t, rotation_error_deg(T[:3, :3], R)))
    aucs = error_auc(errors, POSE_THRESHOLDS)
    result = {f"auc@{int(t)}deg": 100 * a for t, a in zip(POSE_THRESHOLDS, aucs)}
    result.update(
        {
            "pairs": len(pairs),
            "matches_per_pair": float(np.mean(counts)) if counts else 0.0,
            "median_pose_error_deg": float(np.median(errors)) if errors else math.inf,
        }
    )
    return result


# ---------------------------------------------------------------------------------------------- entry points
@dataclass
class EvalResult:
    matcher: dict
    homography: dict[str, float] | None = None
    pose: dict[str, float] | None = None
    extra: dict = field(default_factory=dict)


def main(
    matcher: str = "loftr",
    weights: str | None = None,
    homography: str | Path | None = None,
    pairs_with_gt: str | Path | None = None,
    images: str | Path | None = None,
    resize: int | None = None,
    device: str = "auto",
    size: tuple[int, int] = (480, 640),
    pairs_per_image: int = 2,
    seed: int = 12345,
    precision_px: float = 8.0,
    output: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run the requested evaluations with ``matchers.factory.make_matcher(matcher, weights, resize, device)``."""
    from matchers.factory import make_matcher

    if homography is None and pairs_with_gt is None:
        raise UserError("nothing to evaluate: pass --homography DIR and/or --pairs-with-gt FILE")
    # check the inputs before building the matcher (which may load or download weights)
    if homography is not None and not Path(homography).is_dir():
        raise UserError(f"homography photo folder {homography} does not exist; pass --homography DIR")
    if pairs_with_gt is not None and not Path(pairs_with_gt).is_file():
        raise UserError(f"{pairs_with_gt}: file not found; pass a pairs_with_gt.txt (name0 name1 rot0 rot1 K0 K1 T)")
    # OpenCV's SIFT, as the published SIFT figures were measured
    m = make_matcher(matcher, weights=weights, resize=resize, device=device, sift_backend="opencv")
    result = EvalResult(m.describe())
    if homography is not None:
        config = HomographyConfig(**{**EVAL_HOMOGRAPHY.__dict__, "height": size[0], "width": size[1]})
        pairs = make_homography_pairs(homography, pairs_per_image, seed, config)
        result.homography = evaluate_homographies(m, pairs, precision_px, progress=progress)
    if pairs_with_gt is not None:
        result.pose = evaluate_relative_poses(m, pairs_with_gt, images, progress=progress)
    if output is not None:
        from core.io import write_text_atomic

        write_text_atomic(Path(output), json.dumps(result.__dict__, indent=2, default=str))
    return result


def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import MATCHERS, WEIGHTS_HELP

    parser = argparse.ArgumentParser(prog="python -m recipes.eval_pairs", description=__doc__.split("\n")[0])
    parser.add_argument("--matcher", default="loftr", choices=MATCHERS)
    parser.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    parser.add_argument("--homography", default=None, metavar="DIR", help="photos for held-out homography pairs")
    parser.add_argument("--size", type=parse_size, default=(480, 640), help="homography pair size WxH (640x480)")
    parser.add_argument("--pairs-per-image", type=int, default=2)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--precision-px", type=float, default=8.0)
    parser.add_argument("--pairs-with-gt", default=None, metavar="FILE")
    parser.add_argument("--images", default=None, help="image folder of --pairs-with-gt (default: ../images)")
    parser.add_argument("--resize", type=int, default=None, help="matcher's longest side (default: its own)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=None, help="write the results as JSON")
    return parser


def main_cli(argv: Sequence[str] | None = None) -> EvalResult:
    args = build_parser().parse_args(argv)
    result = main(
        args.matcher,
        args.weights,
        args.homography,
        args.pairs_with_gt,
        args.images,
        args.resize,
        args.device,
        args.size,
        args.pairs_per_image,
        args.seed,
        args.precision_px,
        args.output,
    )
    print(f"matcher: {result.matcher}")
    for title, values in (("homography", result.homography), ("relative pose", result.pose)):
        if values:
            print(
                f"{title}: "
                + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            )
    return result


if __name__ == "__main__":
    run_cli(main_cli)
