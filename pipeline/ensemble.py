"""Matcher ensembles: one features.h5 / matches.h5 from several matchers' files (e.g. SIFT + LoFTR tracks).

The Image Matching Challenge 2023 winners added a detector-free matcher's matches to a detector's
(SuperPoint+SuperGlue 0.482 -> +LoFTR 0.526 mAA): each matcher finds what the other misses. Here every
image's keypoints are the concatenation of each part's keypoints (in the order of ``parts``), and every
pair's matches are the union of the parts' matches, re-indexed. The parts' keypoints are not merged with
each other, so each part's tracks stay as they were built (SIFT's shared detections, the dense exact
tracks); COLMAP's verification then sees all matches of a pair at once.

Where the first part (the detector) verifies a pair on its own, the other parts' matches of that pair
must agree with its epipolar geometry (fundamental matrix by MAGSAC++, Sampson distance <=
``agreement_px``): a dense matcher's confident but wrong matches on repeated structure can never outvote
a geometry the detector found, so the ensemble does not lose a registration the detector makes. Where it
does not, the other parts' matches are kept only with ``min_other_inliers`` inliers of their own, so the
database can verify with the detector's minimum (15 inliers) without linking unrelated images. A pair
that no part can verify is written without matches, which spares COLMAP's verification its slowest case.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline import io

Pair = tuple[str, str]


@dataclass(frozen=True)
class EnsembleConfig:
    min_inliers: int = 15  # first-part inliers (MAGSAC++ at 1 px) for its geometry to gate the other parts
    agreement_px: float = 2.0  # Sampson distance (px) within which another part's match agrees with it
    #: a pair the first part cannot verify keeps another part's matches only with this many inliers of their own
    #: (pipeline.reconstruct.DENSE_MIN_INLIERS: a dense matcher's few wrong matches on pairs that share nothing can
    #: fit an epipolar geometry with 15-27 inliers), so the database can use the detector's minimum of 15
    min_other_inliers: int = 30
    #: a pair none of whose parts has min_inliers at this threshold (COLMAP's verification threshold) is written
    #: without matches: COLMAP's RANSAC would otherwise run to its trial cap on it (temple_ring exhaustive: 674 of
    #: 1,041 pairs, most of the 233 s the verification took)
    verify_px: float = 4.0


@dataclass(frozen=True)
class EnsembleStats:
    keypoints: dict[str, int]  # per part name: keypoints over all images
    matches: dict[str, int]  # per part name: matches kept over all pairs
    gated_pairs: int  # pairs whose other-part matches were checked against the first part's geometry
    rejected: int  # other-part matches dropped (disagreeing with it, or of pairs without enough own inliers)
    unverified_pairs: int = 0  # pairs the first part could not verify whose other-part matches were dropped
    dropped_pairs: int = 0  # pairs no part could verify: written without matches


def _sampson(F: np.ndarray, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    x0 = np.hstack([points0, np.ones((len(points0), 1))])
    x1 = np.hstack([points1, np.ones((len(points1), 1))])
    Fx0, Ftx1 = x0 @ F.T, x1 @ F
    numerator = np.sum(x1 * Fx0, axis=1) ** 2
    return np.sqrt(numerator / (Fx0[:, 0] ** 2 + Fx0[:, 1] ** 2 + Ftx1[:, 0] ** 2 + Ftx1[:, 1] ** 2 + 1e-12))


def _geometry(points0: np.ndarray, points1: np.ndarray, config: EnsembleConfig, threshold: float = 1.0
              ) -> np.ndarray | None:
    """A fundamental matrix with at least ``config.min_inliers`` MAGSAC++ inliers at ``threshold`` px, or None."""
    if len(points0) < max(8, config.min_inliers):
        return None
    try:
        F, mask = cv2.findFundamentalMat(points0.astype(np.float64), points1.astype(np.float64), cv2.USAC_MAGSAC,
                                         threshold, 0.9999, 10000)
    except cv2.error:
        return None
    if F is None or mask is None or F.shape != (3, 3) or int(mask.sum()) < config.min_inliers:
        return None
    return F


def merge(parts: Sequence[tuple[str, Path, Path]], pairs: Sequence[Pair], features: Path, matches: Path,
          config: EnsembleConfig | None = None) -> EnsembleStats:
    """Merge ``parts`` (name, features.h5, matches.h5) into ``features`` and ``matches`` (see the module docstring)."""
    config = config if config is not None else EnsembleConfig()
    loaded = [(name, io.read_features(f), m) for name, f, m in parts]
    names = sorted({n for pair in pairs for n in pair})
    offsets: list[dict[str, int]] = []
    merged_features = {}
    for name in names:
        keypoints, scores, size = [], [], None
        for _, part_features, _ in loaded:
            kp, sc, part_size = part_features.get(name, (np.zeros((0, 2), np.float32), np.zeros(0, np.float32), None))
            keypoints.append(kp)
            scores.append(sc)
            size = size if size is not None else part_size
        merged_features[name] = (np.concatenate(keypoints), np.concatenate(scores), size)
    for _, part_features, _ in loaded:
        offsets.append({})
    for name in names:
        start = 0
        for index, (_, part_features, _) in enumerate(loaded):
            offsets[index][name] = start
            start += len(part_features.get(name, (np.zeros((0, 2)),))[0])

    merged_matches = {}
    kept = {part: 0 for part, _, _ in loaded}
    gated = rejected = unverified = dropped = 0
    for name0, name1 in pairs:
        count0 = len(merged_features[name0][0])
        matches0 = np.full(count0, -1, np.int32)
        scores0 = np.zeros(count0, np.float32)
        chosen: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        geometry, verifiable = None, False
        for index, (part, part_features, part_matches) in enumerate(loaded):
            try:
                ids, scores = io.read_matches(part_matches, name0, name1)
            except Exception:  # a part without this pair (e.g. too few matches) contributes nothing
                continue
            if len(ids) == 0:
                continue
            points0 = part_features[name0][0][ids[:, 0]]
            points1 = part_features[name1][0][ids[:, 1]]
            if index == 0:
                geometry = _geometry(points0, points1, config)
                verifiable = geometry is not None or _geometry(points0, points1, config, config.verify_px) is not None
            elif geometry is not None:
                agree = _sampson(geometry, points0, points1) <= config.agreement_px
                gated += 1
                rejected += int((~agree).sum())
                ids, scores = ids[agree], scores[agree]
            elif _geometry(points0, points1, replace(config, min_inliers=config.min_other_inliers)) is None:
                unverified += 1
                rejected += len(ids)
                continue
            else:
                verifiable = True
            chosen.append((index, part, ids, scores))
        if not verifiable:  # no part has a geometry: COLMAP's RANSAC would run to its trial cap for nothing
            dropped += 1
            chosen = []
        for index, part, ids, scores in chosen:
            rows = ids[:, 0] + offsets[index][name0]
            matches0[rows] = ids[:, 1] + offsets[index][name1]
            scores0[rows] = scores
            kept[part] += len(ids)
        merged_matches[(name0, name1)] = (matches0, scores0)
    io.write_features(features, merged_features)
    io.write_matches(matches, merged_matches)
    keypoint_counts = {part: int(sum(len(f[n][0]) for n in names if n in f)) for part, f, _ in loaded}
    return EnsembleStats(keypoint_counts, kept, gated, rejected, unverified, dropped)


__all__ = ["EnsembleConfig", "EnsembleStats", "merge"]
