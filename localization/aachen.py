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
   is the query's file name; with ``--gt`` (ground-truth poses, e.g. a mini dataset's), the recall.

The steps are :func:`localization.benchmark.run`'s; :class:`AachenAdapter` holds what is Aachen's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pycolmap

from core.cameras import parse_query_list
from core.colmap_model import read_model
from core.errors import UserError, run_cli
from core.io import resolve_image, write_pairs
from matchers.base import Matcher

from .benchmark import (
    BenchmarkAdapter,
    BenchmarkConfig,
    BenchmarkOutputs,
    add_benchmark_arguments,
    run,
    run_cli_main,
)
from .evaluate import AACHEN_THRESHOLDS
from .localize import ModelPoints, PointSource

if TYPE_CHECKING:
    from pipeline.match_dense import DenseMatchConfig

IMAGES_DIR = "images_upright"
MODEL_DIR = "3D-models/aachen_v_1_1"
QUERIES_DIR = "queries"
QUERY_LIST_PATTERN = "*_time_queries_with_intrinsics.txt"
LAYOUT = (
    "expected the Aachen v1.1 layout: images_upright/db/, images_upright/query/, "
    "3D-models/aachen_v_1_1/ (COLMAP model) and queries/*_time_queries_with_intrinsics.txt"
)


@dataclass(frozen=True)
class AachenConfig(BenchmarkConfig):
    """Options of the Aachen pipeline (:func:`main`)."""

    num_covis: int = 20  # covisible db pairs per db image


@dataclass(kw_only=True)
class AachenOutputs(BenchmarkOutputs):
    """Files written by :func:`main` (with the query files of every benchmark) and the localization result."""

    db_pairs: Path
    features: Path  # db keypoints: the dense reference's 2D points
    db_matches: Path
    reference_sfm: Path


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


class AachenAdapter(BenchmarkAdapter):
    """Aachen v1.1: queries with intrinsics lists; the reference is a dense triangulation of the db images
    with the SIFT model's poses held fixed, its 3D points those of the db keypoints (:class:`ModelPoints`)."""

    submission_prefix = "Aachen-v1.1"
    thresholds = AACHEN_THRESHOLDS
    unknown_query = "is in no intrinsics list under queries/"
    unknown_db = "is not in the reference model"

    def __init__(self, dataset: str | Path, config: AachenConfig) -> None:
        super().__init__(dataset)
        self.config = config
        self.reference: pycolmap.Reconstruction | None = None

    @property
    def image_root(self) -> Path:
        return self.dataset / IMAGES_DIR

    def query_cameras(self) -> dict[str, pycolmap.Camera]:
        images, _, lists = check_layout(self.dataset)
        return read_queries(lists, images)

    def output_paths(self, outputs: Path, label: str, common: dict[str, Path]) -> AachenOutputs:
        return AachenOutputs(
            **common,
            db_pairs=outputs / f"pairs-db-covis{self.config.num_covis}.txt",
            features=outputs / f"features-{label}.h5",
            db_matches=outputs / f"matches-db-{label}.h5",
            reference_sfm=outputs / f"sfm_{label}",
            query_features=outputs / f"features-query-{label}.h5",
            query_matches=outputs / f"matches-query-{label}.h5",
        )

    def prepare_reference(
        self,
        matcher: Matcher,
        dense: DenseMatchConfig,
        out: AachenOutputs,
        cameras: dict[str, pycolmap.Camera],
        worker_matcher: Callable[[], Matcher] | None = None,
    ) -> list[str]:
        """Covisible db pairs of the SIFT model, dense matching, triangulation with its poses fixed."""
        from dataclasses import asdict

        from pipeline import match_dense, triangulate
        from pipeline.pairs import covisibility

        sift_model_dir = self.dataset / MODEL_DIR
        sift_model = read_model(sift_model_dir, f"the Aachen reference model; {LAYOUT}")
        db_pairs = covisibility(sift_model, self.config.num_covis, unique=True)  # hloc: pairs_from_covisibility
        if not db_pairs:
            raise UserError(f"{sift_model_dir}: the reference model has no covisible db images (no 3D points?)")
        write_pairs(out.db_pairs, db_pairs)
        match_dense.main(
            out.db_pairs,
            self.image_root,
            out.features,
            out.db_matches,
            matcher,
            dense,
            distributed=self.config.distributed,
            worker_matcher=worker_matcher,
        )
        self.reference, triangulation = triangulate.main(
            sift_model, self.image_root, out.db_pairs, out.features, out.db_matches, out.reference_sfm
        )
        out.stats = {
            "reference_points3D": int(self.reference.num_points3D()),
            "db_pairs": len(db_pairs),
            "triangulation": asdict(triangulation),
        }
        return sorted(self.reference.images[i].name for i in self.reference.reg_image_ids())

    def reference_features(self, out: AachenOutputs) -> Path:
        return out.features  # query keypoints snap to the db keypoints, the reference's 2D points

    def point_source(self, out: AachenOutputs) -> PointSource:
        return ModelPoints(self.reference)


def main(
    dataset: str | Path,
    outputs: str | Path,
    config: AachenConfig = AachenConfig(),
    matcher: Matcher | None = None,
    gt: str | Path | None = None,
) -> AachenOutputs:
    """Run the Aachen pipeline on ``dataset``; writes everything under ``outputs``.

    ``config.pairs_query``: a pairs file (names relative to ``images_upright``), ``"exhaustive"``, or None
    for global retrieval (``config.num_loc``). ``matcher``: a ready :class:`matchers.base.Matcher` instead
    of ``config.localize.matching``'s. ``gt``: ground-truth poses to evaluate against.
    """
    return run(AachenAdapter(dataset, config), outputs, config, matcher, gt)


def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import WEIGHTS_HELP

    parser = argparse.ArgumentParser(prog="python -m localization.aachen", description=__doc__.split("\n")[0])
    add_benchmark_arguments(
        parser,
        AachenConfig(),
        "Aachen v1.1 folder",
        {
            "weights": WEIGHTS_HELP,
            "pairs_query": "query-db pairs file (e.g. hloc's pairs-query-netvlad50.txt), or 'exhaustive'",
        },
    )
    return parser


def main_cli(argv: "list[str] | None" = None) -> AachenOutputs:
    return run_cli_main(argv, build_parser, main, AachenConfig())


if __name__ == "__main__":
    run_cli(main_cli)
