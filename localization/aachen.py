"""Aachen Day-Night v1.1: ``python -m localization.aachen --dataset DIR --outputs OUT [--matcher loftr]``.

Layout (Aachen v1.1 as distributed; image names are relative to ``DIR/images_upright``)::

    DIR/images_upright/db/*.jpg                                   database images
    DIR/images_upright/query/{day,night}/.../*.jpg                queries
    DIR/3D-models/aachen_v_1_1/{cameras,images,points3D}.{bin,txt} reference SIFT model (db poses)
    DIR/queries/*_time_queries_with_intrinsics.txt                'name MODEL W H params...' per query

hloc's LoFTR pipeline for Aachen v1.1, step by step (every step writes files under OUT and can be rerun):

1. db pairs: the ``num_covis`` most covisible db images of each db image in the SIFT model;
2. dense matching of the db pairs -> ``features-<matcher>.h5`` / ``matches-db-<matcher>.h5``;
3. triangulation of those matches with the SIFT model's poses fixed -> ``sfm_<matcher>/``;
4. query pairs: ``--pairs-query FILE`` (e.g. hloc's ``pairs-query-netvlad50.txt``), ``exhaustive``
   (small datasets) or global retrieval of the top ``num_loc`` db images;
5. dense matching of the query pairs with the db keypoints held fixed (they are the model's 2D points);
   with ``--refine klt`` (the default for LoFTR) both matching steps refine LoFTR's points by Lucas-Kanade
   and each query keypoint is aligned to the db keypoint it is matched to (:mod:`pipeline.refine`);
6. localization (:mod:`localization.localize`), then the submission file for visuallocalization.net:
   ``Aachen-v1.1_hloc_<matcher>_<estimator>.txt`` with lines ``name qw qx qy qz tx ty tz`` where ``name``
   is the query's file name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycolmap

from core.cameras import parse_query_list
from core.errors import UserError, run_cli
from core.io import check_output_dir, resolve_image, write_pairs
from core.poses import write_poses, write_submission
from matchers.base import Matcher

from .localize import (
    LocalizationConfig,
    LocalizationResult,
    ModelPoints,
    add_benchmark_arguments,
    config_from_args,
    localize,
    match_config_from_args,
    report,
    write_log,
)
from .retrieval_pairs import pairs_label, query_pairs

IMAGES_DIR = "images_upright"
MODEL_DIR = "3D-models/aachen_v_1_1"
QUERIES_DIR = "queries"
QUERY_LIST_PATTERN = "*_time_queries_with_intrinsics.txt"
LAYOUT = (
    "expected the Aachen v1.1 layout: images_upright/db/, images_upright/query/, "
    "3D-models/aachen_v_1_1/ (COLMAP model) and queries/*_time_queries_with_intrinsics.txt"
)


@dataclass
class AachenOutputs:
    """Files written by :func:`main` and the localization result."""

    db_pairs: Path
    features: Path
    db_matches: Path
    reference_sfm: Path
    query_pairs: Path
    query_features: Path
    query_matches: Path
    poses: Path
    submission: Path
    log: Path
    result: LocalizationResult | None = None
    stats: dict = field(default_factory=dict)


def check_layout(dataset: Path) -> tuple[Path, Path, list[Path]]:
    """(image root, SIFT model folder, query lists); anything missing is one UserError naming the layout."""
    if not dataset.is_dir():
        raise UserError(f"{dataset}: dataset folder not found; {LAYOUT}")
    images, model = dataset / IMAGES_DIR, dataset / MODEL_DIR
    for folder in (images / "db", images / "query", model, dataset / QUERIES_DIR):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder missing; {LAYOUT}")
    if not any((model / f"images{ext}").is_file() for ext in (".bin", ".txt")):
        raise UserError(f"{model}: no COLMAP model (images.bin / images.txt); {LAYOUT}")
    lists = sorted((dataset / QUERIES_DIR).glob(QUERY_LIST_PATTERN))
    if not lists:
        raise UserError(f"{dataset / QUERIES_DIR}: no {QUERY_LIST_PATTERN}; {LAYOUT}")
    return images, model, lists


def read_queries(lists: "list[Path]", images: Path) -> dict[str, pycolmap.Camera]:
    """All queries of the intrinsics lists; every listed image must exist under ``images``."""
    cameras: dict[str, pycolmap.Camera] = {}
    for path in lists:
        for name, camera in parse_query_list(path).items():
            if not resolve_image(images, name).is_file():
                raise UserError(f"{path}: query image {name!r} not found under {images}; {LAYOUT}")
            cameras[name] = camera
    if not cameras:
        raise UserError(f"{', '.join(map(str, lists))}: no queries listed")
    return cameras


def covisibility_pairs(model: pycolmap.Reconstruction, num_covis: int) -> list[tuple[str, str]]:
    """For each registered image, the ``num_covis`` images sharing most 3D points with it (hloc's
    ``pairs_from_covisibility``); each unordered pair once.

    Counts come from one sparse product (images x points) @ (points x images), which keeps Aachen's
    6,697 images and 1.6 M points in seconds.
    """
    from scipy.sparse import coo_matrix

    image_ids = sorted(model.reg_image_ids())
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    rows, cols = [], []
    for column, point in enumerate(model.points3D.values()):
        for element in point.track.elements:
            if element.image_id in row_of:
                rows.append(row_of[element.image_id])
                cols.append(column)
    if not rows:
        return []
    observations = coo_matrix(
        (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(image_ids), model.num_points3D())
    ).tocsr()
    observations.data[:] = 1.0  # an image observing a point twice still counts once
    covisible = (observations @ observations.T).tocsr()
    covisible.setdiag(0)
    covisible.eliminate_zeros()
    pairs: set[tuple[str, str]] = set()
    for row in range(len(image_ids)):
        start, stop = covisible.indptr[row], covisible.indptr[row + 1]
        neighbours, counts = covisible.indices[start:stop], covisible.data[start:stop]
        order = np.lexsort((neighbours, -counts))[:num_covis]  # most shared points, then lower id
        for other in neighbours[order]:
            a, b = model.images[image_ids[row]].name, model.images[image_ids[other]].name
            pairs.add((a, b) if a < b else (b, a))
    return sorted(pairs)


def main(
    dataset: str | Path,
    outputs: str | Path,
    matcher: "str | Matcher" = "loftr",
    weights: str | None = None,
    resize: int | None = None,
    pairs_query: str | Path | None = None,
    num_covis: int = 20,
    num_loc: int = 50,
    config: LocalizationConfig | None = None,
    device: str = "auto",
    match_config=None,
) -> AachenOutputs:
    """Run the Aachen pipeline on ``dataset``; writes everything under ``outputs``.

    ``matcher``: a name for :func:`matchers.factory.make_matcher` (with ``weights``, ``resize``,
    ``device``) or a ready :class:`matchers.base.Matcher`. ``pairs_query``: a pairs file (names
    relative to ``images_upright``), ``"exhaustive"``, or None for global retrieval (``num_loc``).
    ``match_config``: a :class:`pipeline.match_dense.DenseMatchConfig` for both matching steps.
    """
    from matchers.factory import make_matcher
    from pipeline import match_dense, triangulate

    dataset, outputs = Path(dataset), Path(outputs)
    check_output_dir(outputs, "--outputs")  # a file or a read-only place fails now, not after matching
    config = config if config is not None else LocalizationConfig()
    images, sift_model_dir, lists = check_layout(dataset)
    cameras = read_queries(lists, images)
    if isinstance(matcher, Matcher):
        model = matcher
    else:
        # OpenCV's SIFT, as the published SIFT figures were measured
        model = make_matcher(matcher, weights=weights, resize=resize, device=device, sift_backend="opencv")
    label, estimator = model.name, config.pose.estimator
    outputs.mkdir(parents=True, exist_ok=True)
    out = AachenOutputs(
        db_pairs=outputs / f"pairs-db-covis{num_covis}.txt",
        features=outputs / f"features-{label}.h5",
        db_matches=outputs / f"matches-db-{label}.h5",
        reference_sfm=outputs / f"sfm_{label}",
        query_pairs=outputs / f"pairs-query-{pairs_label(pairs_query, num_loc)}.txt",
        query_features=outputs / f"features-query-{label}.h5",
        query_matches=outputs / f"matches-query-{label}.h5",
        poses=outputs / f"poses-{label}-{estimator}.txt",
        submission=outputs / f"Aachen-v1.1_hloc_{label}_{estimator}.txt",
        log=outputs / f"poses-{label}-{estimator}_log.json",
    )

    sift_model = pycolmap.Reconstruction(str(sift_model_dir))
    db_pairs = covisibility_pairs(sift_model, num_covis)
    if not db_pairs:
        raise UserError(f"{sift_model_dir}: the reference model has no covisible db images (no 3D points?)")
    write_pairs(out.db_pairs, db_pairs)
    match_dense.main(out.db_pairs, images, out.features, out.db_matches, model, match_config)
    reference, tri_stats = triangulate.main(
        sift_model, images, out.db_pairs, out.features, out.db_matches, out.reference_sfm
    )
    db_names = sorted(reference.images[i].name for i in reference.reg_image_ids())
    pairs = query_pairs(
        images,
        outputs,
        list(cameras),
        db_names,
        pairs_query,
        num_loc,
        out.query_pairs,
        unknown_query="is in no intrinsics list under queries/",
        unknown_db="is not in the reference model",
    )
    match_dense.main(
        out.query_pairs,
        images,
        out.query_features,
        out.query_matches,
        model,
        match_config,
        reference_features=out.features,
    )
    result = localize(ModelPoints(reference), cameras, pairs, out.query_features, out.query_matches, config)
    write_poses(out.poses, result.poses)
    write_submission(out.submission, result.poses)
    out.stats = {
        "reference_points3D": int(reference.num_points3D()),
        "db_pairs": len(db_pairs),
        "triangulation": _as_dict(tri_stats),
    }
    write_log(
        out.log,
        result,
        config,
        {"dataset": str(dataset), "matching": model.describe(), "pairs": str(out.query_pairs), **out.stats},
    )
    out.result = result
    return out


def _as_dict(stats: object) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(stats) if is_dataclass(stats) else {}


def main_cli(argv: "list[str] | None" = None) -> AachenOutputs:
    parser = argparse.ArgumentParser(prog="python -m localization.aachen", description=__doc__.split("\n")[0])
    add_benchmark_arguments(parser, "Aachen v1.1 folder", "outdoor", "pairs-query-netvlad50.txt", 50)
    parser.add_argument("--num-covis", type=int, default=20, help="covisible db pairs per db image (default 20)")
    args = parser.parse_args(argv)
    out = main(
        args.dataset,
        args.outputs,
        args.matcher,
        args.weights,
        args.resize,
        args.pairs_query,
        args.num_covis,
        args.num_loc,
        config_from_args(args),
        args.device,
        match_config_from_args(args),
    )
    report(out.result, out.submission)
    return out


if __name__ == "__main__":
    run_cli(main_cli)
