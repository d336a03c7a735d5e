"""Evaluate localization results against ground-truth poses: recall at (distance, angle) thresholds.

Errors per query (the visuallocalization.net definitions):

* position: distance between estimated and true camera centres (``-R^T t``), times ``scale`` — the
  number of metres per model unit, for datasets whose poses are not in metres;
* rotation: angle of ``R_est R_gt^T`` in degrees.

A query counts at threshold (d, a) when both errors are within it; queries without a result count as
failures. Medians are over the localized queries. Result names may be full names (``query/day/x.jpg``)
or submission names (``x.jpg``); a submission name is matched to the ground truth by file name.

CLI::

    python -m localization.evaluate --gt gt.txt --results poses.txt [--scale 1] [--thresholds aachen|inloc|all]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycolmap

from core.cli import add_config_arguments, config_from_args
from core.errors import UserError, run_cli
from core.files import write_text_atomic
from core.poses import camera_center, read_poses

from .localize import json_safe

#: Aachen day/night (and most outdoor benchmarks): (metres, degrees)
AACHEN_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.25, 2.0), (0.5, 5.0), (5.0, 10.0))
#: InLoc (DUC1/DUC2)
INLOC_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.25, 10.0), (0.5, 10.0), (1.0, 10.0))
THRESHOLD_SETS = {"aachen": AACHEN_THRESHOLDS, "inloc": INLOC_THRESHOLDS, "all": AACHEN_THRESHOLDS + INLOC_THRESHOLDS}


def pose_errors(estimate: pycolmap.Rigid3d, truth: pycolmap.Rigid3d, scale: float = 1.0) -> tuple[float, float]:
    """(position error in metres = model units x scale, rotation error in degrees)."""
    position = float(np.linalg.norm(camera_center(estimate) - camera_center(truth)) * scale)
    R_est, R_gt = np.asarray(estimate.rotation.matrix()), np.asarray(truth.rotation.matrix())
    cos = np.clip((np.trace(R_est @ R_gt.T) - 1.0) / 2.0, -1.0, 1.0)
    return position, float(np.degrees(np.arccos(cos)))


@dataclass
class Evaluation:
    """Recall per threshold (in %), medians over localized queries, and per-query errors."""

    thresholds: list[tuple[float, float]]
    recall: list[float]  # percent of all GT queries within each threshold
    num_queries: int
    num_localized: int
    median_position: float  # metres (inf when nothing is localized)
    median_rotation: float  # degrees
    scale: float
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # GT name -> (m, deg)
    missing: list[str] = field(default_factory=list)  # GT queries without a result

    def table(self) -> str:
        cells = [f"({d:g}m, {a:g}deg): {r:.1f}%" for (d, a), r in zip(self.thresholds, self.recall)]
        return (
            f"{self.num_localized}/{self.num_queries} localized; recall "
            + ", ".join(cells)
            + f"; median error {self.median_position:.4g} m, {self.median_rotation:.3g} deg (scale {self.scale:g})"
        )

    def to_dict(self) -> dict:
        return {
            "thresholds": [list(t) for t in self.thresholds],
            "recall_percent": self.recall,
            "num_queries": self.num_queries,
            "num_localized": self.num_localized,
            "median_position_m": self.median_position,
            "median_rotation_deg": self.median_rotation,
            "scale": self.scale,
            "missing": self.missing,
            "errors": {name: list(e) for name, e in self.errors.items()},
        }


def match_names(results: "dict[str, pycolmap.Rigid3d]", gt_names: "list[str]") -> dict[str, str]:
    """{gt name: result name}: exact names first, then unique file names (submission files)."""
    by_file: dict[str, list[str]] = {}
    for name in gt_names:
        by_file.setdefault(name.split("/")[-1], []).append(name)
    mapping: dict[str, str] = {}
    for name in results:
        if name in gt_names:
            mapping[name] = name
    for name in results:
        if name in mapping.values() or name in gt_names:
            continue
        candidates = by_file.get(name.split("/")[-1], [])
        if len(candidates) == 1 and candidates[0] not in mapping:
            mapping[candidates[0]] = name
        elif len(candidates) > 1:
            raise UserError(f"result {name!r} matches several ground-truth queries {candidates}; use full names")
    return mapping


def evaluate(
    gt: "dict[str, pycolmap.Rigid3d]",
    results: "dict[str, pycolmap.Rigid3d]",
    thresholds: "tuple[tuple[float, float], ...] | list[tuple[float, float]]" = AACHEN_THRESHOLDS,
    scale: float = 1.0,
) -> Evaluation:
    """Recall of ``results`` against ``gt`` at ``thresholds`` (metres after ``scale``, degrees)."""
    if not gt:
        raise UserError("the ground truth has no queries")
    if not scale > 0:
        raise UserError(f"scale must be positive (metres per model unit), got {scale}")
    mapping = match_names(results, list(gt))
    errors: dict[str, tuple[float, float]] = {}
    for name, truth in gt.items():
        if name in mapping:
            errors[name] = pose_errors(results[mapping[name]], truth, scale)
    missing = [name for name in gt if name not in errors]
    position = np.array([e[0] for e in errors.values()])
    rotation = np.array([e[1] for e in errors.values()])
    recall = []
    for distance, angle in thresholds:
        hits = int(np.sum((position <= distance) & (rotation <= angle))) if len(errors) else 0
        recall.append(100.0 * hits / len(gt))
    return Evaluation(
        thresholds=[(float(d), float(a)) for d, a in thresholds],
        recall=recall,
        num_queries=len(gt),
        num_localized=len(errors),
        median_position=float(np.median(position)) if len(errors) else float("inf"),
        median_rotation=float(np.median(rotation)) if len(errors) else float("inf"),
        scale=float(scale),
        errors=errors,
        missing=missing,
    )


def parse_thresholds(text: str) -> tuple[tuple[float, float], ...]:
    """'aachen', 'inloc', 'all' or explicit 'd1,a1;d2,a2' (metres, degrees)."""
    if text in THRESHOLD_SETS:
        return THRESHOLD_SETS[text]
    try:
        out = tuple((float(part.split(",")[0]), float(part.split(",")[1])) for part in text.split(";") if part.strip())
    except (ValueError, IndexError):
        raise UserError(f"thresholds {text!r}: use aachen, inloc, all or 'metres,degrees;...'") from None
    if not out:
        raise UserError(f"thresholds {text!r}: no thresholds given")
    return out


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of :func:`main`."""

    thresholds: str = "all"  # aachen, inloc, all, or 'metres,degrees;metres,degrees;...'
    scale: float = 1.0  # metres per model unit

    def __post_init__(self) -> None:
        parse_thresholds(self.thresholds)  # a typo fails here, not after reading the poses


def main(
    gt: str | Path, results: str | Path, config: EvaluateConfig = EvaluateConfig(), output: str | Path | None = None
) -> Evaluation:
    """Evaluate a pose file against a ground-truth pose file; optionally write the evaluation as JSON."""
    evaluation = evaluate(read_poses(gt), read_poses(results), parse_thresholds(config.thresholds), config.scale)
    if output is not None:
        write_text_atomic(output, json.dumps(json_safe(evaluation.to_dict()), indent=1, allow_nan=False))
    return evaluation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localization.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--gt", type=Path, required=True, help="ground-truth pose file (name qw qx qy qz tx ty tz)")
    parser.add_argument("--results", type=Path, required=True, help="estimated poses or a submission file")
    add_config_arguments(parser, EvaluateConfig)
    parser.add_argument("--output", type=Path, default=None, help="write the evaluation as JSON")
    return parser


def main_cli(argv: "list[str] | None" = None) -> Evaluation:
    args = build_parser().parse_args(argv)
    evaluation = main(args.gt, args.results, config_from_args(args, EvaluateConfig), args.output)
    print(evaluation.table())
    return evaluation


if __name__ == "__main__":
    run_cli(main_cli)
