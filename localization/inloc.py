"""InLoc localization: ``python -m localization.inloc --dataset DIR --outputs OUT [--matcher loftr]``.

Layout (the InLoc dataset as hloc uses it; image names are relative to ``DIR``)::

    DIR/query/iphone7/*.JPG                                       queries
    DIR/database/cutouts/<floor>/<scan>/<name>.jpg                db cutouts
    DIR/database/cutouts/<floor>/<scan>/<name>.jpg.mat            'XYZcut' (H, W, 3): 3D point per pixel
                                                                  in the scan's frame, NaN where no return
    DIR/database/alignments/<floor>/transformations/<bldg>_trans_<scan>.txt
                                                                  scan -> world: lines 8-11 (1-based) hold the
                                                                  4x4 P_after_GICP (lines 2-5: P_before_GICP);
                                                                  <bldg> is the first 3 letters of <name>

3D of a db keypoint: XYZcut interpolated bilinearly at the keypoint (hloc convention, pixel centres at
integers), nearest-pixel where the bilinear window touches a hole (NaN), then mapped by P_after_GICP.
Query camera: SIMPLE_PINHOLE with the iPhone 7's 28 mm-equivalent focal length at the image's size,
f = max(W, H) * 28 / 36 (= 4032 * 28 / 36 at full resolution), principal point at the centre.

Steps (:func:`localization.benchmark.run`'s; :class:`InLocAdapter` holds what is InLoc's): query-db pairs
(``--pairs-query``, e.g. hloc's ``pairs-query-netvlad40.txt``, or global retrieval), dense matching, 2D-3D
from the scans, absolute pose, submission for visuallocalization.net (``name qw qx qy qz tx ty tz`` with the
query's file name), with ``--gt`` the recall. LoFTR uses the indoor weights unless ``--weights`` names others.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pycolmap

from core.cache import LRUCache
from core.cameras import camera_from_size_and_focal, write_query_list
from core.errors import UserError, run_cli
from core.image_io import image_size, is_image_file
from core.io import open_h5, resolve_image, write_text_atomic
from matchers.base import Matcher

from .benchmark import (
    BenchmarkAdapter,
    BenchmarkConfig,
    BenchmarkOutputs,
    add_benchmark_arguments,
    run,
    run_cli_main,
)
from .evaluate import INLOC_THRESHOLDS
from .localize import LocalizeConfig, PointSource

if TYPE_CHECKING:
    from pipeline.match_dense import DenseMatchConfig

QUERY_DIR = "query/iphone7"
CUTOUT_DIR = "database/cutouts"
ALIGNMENT_DIR = "database/alignments"
FOCAL_35MM_EQUIVALENT = 28.0  # iPhone 7 main camera, mm (35 mm film equivalent: 36 mm wide sensor)
DEFAULT_MAX_ERROR = 48.0  # px, hloc's RANSAC threshold for InLoc's full-size 4032x3024 queries
FULL_SIZE = 4032  # longer side of InLoc's queries; the default threshold scales with the actual size

LAYOUT = (
    "expected the InLoc layout: query/iphone7/*.JPG, database/cutouts/<floor>/<scan>/*.jpg with .jpg.mat "
    "(XYZcut), database/alignments/<floor>/transformations/<bldg>_trans_<scan>.txt"
)


# ------------------------------------------------------------------------------------------- camera
def query_focal_length(width: int, height: int) -> float:
    """InLoc's query focal length (pixels) for an image of this size: 4032 * 28 / 36 at 4032 px."""
    return max(width, height) * FOCAL_35MM_EQUIVALENT / 36.0


def query_camera(width: int, height: int) -> pycolmap.Camera:
    return camera_from_size_and_focal(width, height, query_focal_length(width, height))


# ---------------------------------------------------------------------------------------- alignments
def alignment_path(dataset: str | Path, cutout: str) -> Path:
    """The alignment file of a cutout named ``database/cutouts/<floor>/<scan>/<image>``."""
    parts = cutout.split("/")
    if len(parts) < 3:
        raise UserError(f"cutout name {cutout!r} is not '<...>/<floor>/<scan>/<image>'; {LAYOUT}")
    floor, scan, image = parts[-3], parts[-2], parts[-1]
    return Path(dataset) / ALIGNMENT_DIR / floor / "transformations" / f"{image[:3]}_trans_{scan}.txt"


def read_alignment(path: str | Path) -> np.ndarray:
    """P_after_GICP (4x4, scan -> world) of an InLoc alignment file (rows on lines 8-11, 1-based)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: alignment file not found; {LAYOUT}")
    lines = path.read_text().splitlines()
    try:
        matrix = np.array([[float(v) for v in lines[i].split()] for i in range(7, 11)], dtype=np.float64)
    except (IndexError, ValueError):
        raise UserError(f"{path}: expected P_after_GICP as 4 rows of 4 numbers on lines 8-11") from None
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise UserError(f"{path}: P_after_GICP on lines 8-11 is not a finite 4x4 matrix")
    return matrix


def write_alignment(path: str | Path, p_after: np.ndarray, p_before: np.ndarray | None = None) -> None:
    """Write an alignment file in InLoc's layout (readable by :func:`read_alignment` and hloc)."""
    p_before = np.eye(4) if p_before is None else p_before

    def rows(matrix: np.ndarray) -> list[str]:
        return [" ".join(f"{v:.12f}" for v in row) for row in np.asarray(matrix, np.float64).reshape(4, 4)]

    lines = ["P_before_GICP", *rows(p_before), "-" * 40, "P_after_GICP", *rows(p_after)]
    write_text_atomic(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------- XYZ lookup
def interpolate_xyz(xyz: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3D at (N, 2) keypoints (pixel centres at integers) of an (H, W, 3) map: bilinear, else nearest.

    Returns (points (N, 3), valid (N,)); a keypoint is invalid when outside the map or when both the
    bilinear value and the nearest pixel are holes (NaN).
    """
    height, width = xyz.shape[:2]
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    x, y = keypoints[:, 0], keypoints[:, 1]
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    xc, yc = np.clip(x, 0, width - 1), np.clip(y, 0, height - 1)
    x0 = np.minimum(np.floor(xc).astype(np.int64), width - 2 if width > 1 else 0)
    y0 = np.minimum(np.floor(yc).astype(np.int64), height - 2 if height > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx, wy = (xc - x0)[:, None], (yc - y0)[:, None]
    bilinear = (
        xyz[y0, x0] * (1 - wx) * (1 - wy)
        + xyz[y0, x1] * wx * (1 - wy)
        + xyz[y1, x0] * (1 - wx) * wy
        + xyz[y1, x1] * wx * wy
    )
    nearest = xyz[np.rint(yc).astype(np.int64), np.rint(xc).astype(np.int64)]
    # NaN * 0 is NaN, so a hole anywhere in the 2x2 window makes the bilinear value NaN -> nearest
    points = np.where(np.isnan(bilinear).any(axis=1, keepdims=True), nearest, bilinear)
    valid = inside & np.isfinite(points).all(axis=1)
    return points, valid


def load_xyzcut(path: str | Path) -> np.ndarray:
    """The ``XYZcut`` array (H, W, 3) of a cutout's .mat file (all-zero points count as holes)."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: cutout scan not found; {LAYOUT}")
    try:
        data = loadmat(str(path), variable_names=["XYZcut"])
    except Exception as error:  # scipy raises several types for broken files
        raise UserError(f"{path}: cannot read the .mat file ({error})") from None
    if "XYZcut" not in data:
        raise UserError(f"{path}: no XYZcut variable in the .mat file")
    xyz = np.asarray(data["XYZcut"], dtype=np.float64)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise UserError(f"{path}: XYZcut must be H x W x 3, got shape {xyz.shape}")
    xyz = xyz.copy()
    xyz[np.all(xyz == 0, axis=2)] = np.nan  # the scanner's origin marks missing returns in some exports
    return xyz


class ScanPoints:
    """:class:`localization.localize.PointSource` over InLoc cutouts: 3D from XYZcut + alignment.

    Ids are unique per (cutout, keypoint): scans do not share 3D points.
    """

    def __init__(self, dataset: str | Path, features: str | Path, cache_size: int = 256) -> None:
        self.dataset = Path(dataset)
        self.features = Path(features)
        self._cache: LRUCache[tuple[np.ndarray, np.ndarray]] = LRUCache(max_items=cache_size)
        self._offsets: dict[str, int] = {}
        self._next_offset = 0
        self._alignments: dict[Path, np.ndarray] = {}

    def has_image(self, name: str) -> bool:
        return name.startswith(CUTOUT_DIR + "/") and (self.dataset / (name + ".mat")).is_file()

    def keypoint_points(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self._cache.get_or_create(name, lambda: self._scan_points(name))

    def _scan_points(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        with open_h5(self.features) as file:
            if name not in file:
                raise UserError(f"{self.features}: no keypoints for cutout {name!r}; re-run the matching step")
            keypoints = file[name]["keypoints"][()].astype(np.float64).reshape(-1, 2)
        xyz = load_xyzcut(self.dataset / (name + ".mat"))
        local, valid = interpolate_xyz(xyz, keypoints)
        path = alignment_path(self.dataset, name)
        if path not in self._alignments:
            self._alignments[path] = read_alignment(path)
        transform = self._alignments[path]
        world = local @ transform[:3, :3].T + transform[:3, 3]
        if name not in self._offsets:  # disjoint, stable id ranges per cutout (also across cache evictions)
            self._offsets[name] = self._next_offset
            self._next_offset += len(keypoints)
        ids = np.where(valid, self._offsets[name] + np.arange(len(keypoints)), -1).astype(np.int64)
        world[~valid] = np.nan
        return ids, world

    def db_pose(self, name: str) -> pycolmap.Rigid3d | None:
        return None  # cutout poses are not part of the InLoc release


# ------------------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class InLocConfig(BenchmarkConfig):
    """Options of the InLoc pipeline (:func:`main`)."""

    num_loc: int = 40  # db images retrieved per query
    default_weights: str | None = "indoor"  # LoFTR weights when none are given (never swapped for others)
    #: RANSAC inlier threshold in pixels; none: hloc's 48 px at 4032 px, scaled to the largest query
    max_error: float | None = None


@dataclass(kw_only=True)
class InLocOutputs(BenchmarkOutputs):
    """Files written by :func:`main` (with the query files of every benchmark) and the localization result."""

    queries: Path  # the query list with the intrinsics used


def check_layout(dataset: Path) -> tuple[list[str], list[str]]:
    """(query names, cutout names) of an InLoc folder; a missing part is one UserError naming the layout."""
    if not dataset.is_dir():
        raise UserError(f"{dataset}: dataset folder not found; {LAYOUT}")
    query_dir, cutout_dir, alignment_dir = dataset / QUERY_DIR, dataset / CUTOUT_DIR, dataset / ALIGNMENT_DIR
    for folder in (query_dir, cutout_dir, alignment_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder missing; {LAYOUT}")
    queries = sorted(p.relative_to(dataset).as_posix() for p in query_dir.iterdir() if is_image_file(p))
    cutouts = sorted(
        p.relative_to(dataset).as_posix() for p in cutout_dir.rglob("*") if is_image_file(p) and p.is_file()
    )
    if not queries:
        raise UserError(f"{query_dir}: no query images; {LAYOUT}")
    if not cutouts:
        raise UserError(f"{cutout_dir}: no cutout images; {LAYOUT}")
    without_scan = [c for c in cutouts if not (dataset / (c + ".mat")).is_file()]
    if len(without_scan) == len(cutouts):
        raise UserError(f"{dataset / without_scan[0]}.mat: cutouts have no XYZcut .mat files; {LAYOUT}")
    return queries, cutouts


def default_max_error(cameras: "Iterable[pycolmap.Camera]") -> float:
    """hloc's 48 px at 4032 px, scaled to the largest query (e.g. 2.9 px for 240-px queries)."""
    longest = max((max(c.width, c.height) for c in cameras), default=FULL_SIZE)
    return DEFAULT_MAX_ERROR * longest / FULL_SIZE


class InLocAdapter(BenchmarkAdapter):
    """InLoc: iPhone 7 queries (intrinsics from the image size); the db images are the cutouts, their
    keypoints' 3D from the scans (:class:`ScanPoints`)."""

    submission_prefix = "InLoc"
    thresholds = INLOC_THRESHOLDS
    unknown_query = f"is not under {QUERY_DIR}; names are relative to the dataset"
    unknown_db = "is not a cutout of the dataset"

    def __init__(self, dataset: str | Path, config: InLocConfig) -> None:
        super().__init__(dataset)
        self.config = config
        self.cutouts: list[str] = []

    @property
    def image_root(self) -> Path:
        return self.dataset

    def query_cameras(self) -> dict[str, pycolmap.Camera]:
        queries, self.cutouts = check_layout(self.dataset)
        return {name: query_camera(*image_size(resolve_image(self.dataset, name))) for name in queries}

    def localize_config(self, config: InLocConfig, cameras: dict[str, pycolmap.Camera]) -> LocalizeConfig:
        max_error = config.max_error if config.max_error is not None else default_max_error(cameras.values())
        pose = dataclasses.replace(config.localize.pose, max_error=max_error)
        return dataclasses.replace(config.localize, pose=pose)

    def output_paths(self, outputs: Path, label: str, common: dict[str, Path]) -> InLocOutputs:
        return InLocOutputs(
            **common,
            queries=outputs / "queries_with_intrinsics.txt",
            query_features=outputs / f"features-{label}.h5",
            query_matches=outputs / f"matches-{label}.h5",
        )

    def prepare_reference(
        self,
        matcher: Matcher,
        dense: DenseMatchConfig,
        out: InLocOutputs,
        cameras: dict[str, pycolmap.Camera],
        worker_matcher: Callable[[], Matcher] | None = None,
    ) -> list[str]:
        """Nothing to build (the scans are the reference); the query list is written for the record."""
        write_query_list(out.queries, cameras)
        return self.cutouts

    def point_source(self, out: InLocOutputs) -> PointSource:
        return ScanPoints(self.dataset, out.query_features)


def main(
    dataset: str | Path,
    outputs: str | Path,
    config: InLocConfig = InLocConfig(),
    matcher: Matcher | None = None,
    gt: str | Path | None = None,
) -> InLocOutputs:
    """Run the InLoc pipeline on ``dataset``; writes everything under ``outputs``.

    ``config.pairs_query``: a query-db pairs file (names relative to ``dataset``, e.g. hloc's
    ``pairs-query-netvlad40.txt``); without it, db images are retrieved by global descriptors (top
    ``config.num_loc``); ``"exhaustive"`` pairs every query with every cutout (small datasets).
    ``matcher``: a ready :class:`matchers.base.Matcher` instead of ``config.localize.matching``'s.
    ``gt``: ground-truth poses to evaluate against.
    """
    return run(InLocAdapter(dataset, config), outputs, config, matcher, gt)


def build_parser() -> argparse.ArgumentParser:
    defaults = InLocConfig()
    parser = argparse.ArgumentParser(prog="python -m localization.inloc", description=__doc__.split("\n")[0])
    add_benchmark_arguments(
        parser,
        defaults,
        "InLoc folder (query/, database/)",
        {
            "weights": f"LoFTR checkpoint name or path (default {defaults.default_weights}, never swapped for "
            "other weights)",
            "pairs_query": "query-db pairs file (e.g. hloc's pairs-query-netvlad40.txt), or 'exhaustive'",
        },
        exclude_pose=("max_error",),  # InLocConfig.max_error: its default depends on the queries' size
    )
    return parser


def main_cli(argv: "list[str] | None" = None) -> InLocOutputs:
    return run_cli_main(argv, build_parser, main, InLocConfig())


if __name__ == "__main__":
    run_cli(main_cli)
