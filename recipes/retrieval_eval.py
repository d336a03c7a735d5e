"""Retrieval precision@k against ground-truth neighbours on a calibrated image set.

A retrieved image is a true neighbour of the query when the angle between their optical axes (third
row of the world-to-camera rotation) is at most ``--max-angle`` degrees (default 30). Precision@k is the
fraction of the top-k retrieved images (self excluded) that are true neighbours, averaged over queries.

CLI::

    python -m recipes.retrieval_eval --images ../shared/data/temple_ring/images \
        --gt ../shared/data/temple_ring/templeR_par.txt [--descriptor rootsift-vlad] [--k 5]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.cli import add_config_arguments, config_from_args
from core.errors import UserError, run_cli
from pipeline import pairs as pairs_step
from pipeline import retrieval


@dataclass(frozen=True)
class RetrievalEval:
    precision: float  # mean precision@k over queries
    k: int
    num_queries: int
    per_query: dict[str, float]


def neighbour_matrix(rotations: Sequence[np.ndarray], max_angle: float = 30.0) -> np.ndarray:
    """(N, N) bool: optical axes (R[2] of world-to-camera R) within ``max_angle`` degrees."""
    axes = np.stack([np.asarray(R, np.float64)[2] for R in rotations])
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.degrees(np.arccos(np.clip(axes @ axes.T, -1.0, 1.0)))
    return angles <= max_angle


def precision_at_k(
    global_features: Path, rotations: Mapping[str, np.ndarray], k: int = 5, max_angle: float = 30.0
) -> RetrievalEval:
    """Precision@k of retrieval by ``global_features`` among the images with a GT rotation."""
    names = list(rotations)
    if len(names) < 2:
        raise UserError("precision@k needs at least two images with ground truth")
    neighbours = neighbour_matrix([rotations[n] for n in names], max_angle)
    index = {name: i for i, name in enumerate(names)}
    _, descriptors = pairs_step.read_global_descriptors(global_features, names)
    retrieved = pairs_step.top_k_pairs(descriptors @ descriptors.T, names, names, k, exclude_self=True)
    hits: dict[str, list[bool]] = {name: [] for name in names}
    for query, db in retrieved:
        hits[query].append(bool(neighbours[index[query], index[db]]))
    per_query = {name: float(np.mean(h)) if h else 0.0 for name, h in hits.items()}
    return RetrievalEval(float(np.mean(list(per_query.values()))), k, len(names), per_query)


def main(
    images: Path,
    gt: Path,
    descriptor: str = "rootsift-vlad",
    k: int = 5,
    max_angle: float = 30.0,
    output: Path | None = None,
    config: retrieval.RetrievalConfig = retrieval.RetrievalConfig(),
    device: str = "auto",
    weights: Path | None = None,
) -> RetrievalEval:
    """Describe the GT images, retrieve and print precision@k (``output``: keep the global features)."""
    from core.par_files import read_par_file

    cameras = read_par_file(gt)
    rotations = {name: camera.R for name, camera in cameras.items()}
    missing = [name for name in rotations if not (Path(images) / name).is_file()]
    if missing:
        raise UserError(f"{images}: images {missing[:3]} of {gt} are missing; check --images")
    with tempfile.TemporaryDirectory() as temp:
        features = Path(output) if output is not None else Path(temp) / "global-features.h5"
        descriptor = retrieval.resolve_descriptor(descriptor, weights)
        retrieval.main(Path(images), list(rotations), features, descriptor, device, config, weights)
        result = precision_at_k(features, rotations, k, max_angle)
    print(
        f"precision@{k} = {result.precision:.3f} over {result.num_queries} queries "
        f"({descriptor}, neighbours: optical axes within {max_angle:g} deg)"
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.retrieval_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--gt", type=Path, required=True, help="Middlebury *_par.txt cameras")
    parser.add_argument("--descriptor", choices=retrieval.DESCRIPTORS, default="rootsift-vlad")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-angle", type=float, default=30.0)
    parser.add_argument("--output", type=Path, help="keep the global features here")
    parser.add_argument("--device", default="auto", help="NetVLAD: auto, cpu, cuda or cuda:N")
    parser.add_argument("--netvlad-weights", type=Path, help="local VGG16-NetVLAD-Pitts30K .mat")
    add_config_arguments(
        parser.add_argument_group("descriptor settings"),
        retrieval.RetrievalConfig,
        exclude=("rerank_ratio", "rerank_threshold"),  # no re-ranking here
    )
    return parser


def main_cli(argv: Sequence[str] | None = None) -> RetrievalEval:
    args = build_parser().parse_args(argv)
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    config = config_from_args(args, retrieval.RetrievalConfig)
    return main(
        args.images,
        args.gt,
        args.descriptor,
        args.k,
        args.max_angle,
        args.output,
        config,
        args.device,
        weights=args.netvlad_weights,
    )


if __name__ == "__main__":
    run_cli(main_cli)
