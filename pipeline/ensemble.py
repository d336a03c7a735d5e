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

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from core import io
from core.geometry import fundamental_magsac

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


def _geometry(
    points0: np.ndarray, points1: np.ndarray, config: EnsembleConfig, threshold: float = 1.0
) -> np.ndarray | None:
    """A fundamental matrix with at least ``config.min_inliers`` MAGSAC++ inliers at ``threshold`` px, or None."""
    matrix, inliers = fundamental_magsac(points0, points1, threshold, confidence=0.9999)
    return matrix if int(inliers.sum()) >= config.min_inliers else None


def merge(
    parts: Sequence[tuple[str, Path, Path]],
    pairs: Sequence[Pair],
    features: Path,
    matches: Path,
    config: EnsembleConfig | None = None,
) -> EnsembleStats:
    """Merge ``parts`` (name, features.h5, matches.h5) into ``features`` and ``matches`` (see the module docstring)."""
    config = config if config is not None else EnsembleConfig()
    with contextlib.ExitStack() as stack:  # every part's matches.h5 opened once, not once per pair
        loaded = [(name, io.read_features(f), stack.enter_context(io.open_h5(m))) for name, f, m in parts]
        merged_features, offsets = _concatenate_keypoints(loaded, sorted({n for pair in pairs for n in pair}))
        merged_matches, stats = _merge_matches(loaded, pairs, merged_features, offsets, config)
    io.write_features(features, merged_features)
    io.write_matches(matches, merged_matches)
    return stats


def _concatenate_keypoints(loaded, names: Sequence[str]):
    """Each image's keypoints of all parts, in part order, and each part's offset into them per image."""
    empty = (np.zeros((0, 2), np.float32), np.zeros(0, np.float32), None)
    offsets: list[dict[str, int]] = [{} for _ in loaded]
    merged_features = {}
    for name in names:
        keypoints, scores, size = [], [], None
        for index, (_, part_features, _) in enumerate(loaded):
            kp, sc, part_size = part_features.get(name, empty)
            offsets[index][name] = sum(len(k) for k in keypoints)
            keypoints.append(kp)
            scores.append(sc)
            size = size if size is not None else part_size
        merged_features[name] = (np.concatenate(keypoints), np.concatenate(scores), size)
    return merged_features, offsets


def _merge_matches(loaded, pairs: Sequence[Pair], merged_features, offsets, config: EnsembleConfig):
    """Per pair the union of the parts' matches (re-indexed), gated as the module docstring says; and the stats."""
    import pycolmap

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
                ids, scores = io.read_pair_matches(part_matches, name0, name1)
            except KeyError:  # a part without this pair contributes nothing
                continue
            if len(ids) == 0:
                continue
            points0 = part_features[name0][0][ids[:, 0]]
            points1 = part_features[name1][0][ids[:, 1]]
            if index == 0:
                geometry = _geometry(points0, points1, config)
                verifiable = geometry is not None or _geometry(points0, points1, config, config.verify_px) is not None
            elif geometry is not None:
                sampson = np.sqrt(pycolmap.compute_squared_sampson_error(points0, points1, geometry))
                agree = sampson <= config.agreement_px
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
    keypoint_counts = {part: int(sum(len(f[n][0]) for n in merged_features if n in f)) for part, f, _ in loaded}
    return merged_matches, EnsembleStats(keypoint_counts, kept, gated, rejected, unverified, dropped)


__all__ = ["EnsembleConfig", "EnsembleStats", "merge"]
