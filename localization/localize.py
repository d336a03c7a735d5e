"""Localize query images against a reference: 2D-3D correspondences from matches, then absolute pose.

For each query, the db images listed for it (retrieval pairs, or any pairs file) and the query-db
matches (matches.h5) give 2D-3D correspondences through the 3D points of the db keypoints. Where those
3D points come from is a :class:`PointSource`:

* :class:`ModelPoints` — a COLMAP reference model (Aachen): db keypoint ``i`` is the model image's
  ``points2D[i]`` (the model was triangulated from the same features.h5), with its 3D point if any;
* :class:`localization.inloc.ScanPoints` — InLoc cutouts: 3D from the ``XYZcut`` scan of each cutout.

One query keypoint can match keypoints of several db images and so several 3D points; every distinct
(query keypoint, 3D point) pair is one correspondence (hloc's convention), and RANSAC sorts them out.

Optional covisibility clustering (hloc): db images are grouped into connected components of the
"share a 3D point" graph, a pose is estimated per cluster, the one with most inliers wins.

A query without matches, 3D points or a valid pose is logged as failed and the run continues; with
``fallback="nearest"`` it gets the pose of its db image with the most matches instead (status
``fallback``). Outputs: pose lines ``name qw qx qy qz tx ty tz`` (world-to-camera) and a JSON log.

CLI::

    python -m localization.localize --reference-sfm sfm/ --queries queries.txt --pairs pairs-loc.txt \\
        --features features.h5 --matches matches.h5 --results poses.txt [--estimator magsac]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import pycolmap
from tqdm import tqdm

from core.cameras import parse_query_list
from core.errors import UserError, run_cli
from core.io import atomic_path, find_pair, open_h5, read_pairs
from core.poses import qt_from_rigid, write_poses
from pipeline.refine import KLT_CELL_SIZE, REFINE_MODES, default_refine

from .absolute_pose import ESTIMATORS, PoseEstimate, PoseEstimationConfig, estimate_absolute_pose

FALLBACKS = ("none", "nearest")
STATUS_LOCALIZED, STATUS_FAILED, STATUS_FALLBACK = "localized", "failed", "fallback"


# ------------------------------------------------------------------------------------------ 3D sources
class PointSource(Protocol):
    """Where db keypoints get their 3D points."""

    def has_image(self, name: str) -> bool:
        """Whether ``name`` is a db image of this reference."""

    def keypoint_points(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) int64 with -1 for keypoints without 3D, xyz (N, 3)) for every keypoint of db image ``name``.

        Ids identify 3D points across db images (equal ids = the same 3D point).
        """

    def db_pose(self, name: str) -> pycolmap.Rigid3d | None:
        """World-to-camera pose of a db image, if known (for ``--fallback nearest``)."""


class ModelPoints:
    """3D points of db keypoints from a COLMAP reference model (points2D index == keypoint index)."""

    def __init__(self, reconstruction: pycolmap.Reconstruction | str | Path) -> None:
        if not isinstance(reconstruction, pycolmap.Reconstruction):
            path = Path(reconstruction)
            if not path.is_dir() or not any((path / f"images.{ext}").exists() for ext in ("bin", "txt")):
                raise UserError(f"{path}: not a COLMAP model folder (needs cameras/images/points3D .bin or .txt)")
            reconstruction = pycolmap.Reconstruction(str(path))
        self.reconstruction = reconstruction
        self._ids_by_name = {image.name: image_id for image_id, image in reconstruction.images.items()}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def has_image(self, name: str) -> bool:
        return name in self._ids_by_name

    def keypoint_points(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._cache:
            image = self.reconstruction.images[self._ids_by_name[name]]
            ids = np.full(image.num_points2D(), -1, dtype=np.int64)
            xyz = np.full((len(ids), 3), np.nan)
            points3D, points2D = self.reconstruction.points3D, image.points2D
            for index in image.get_observation_point2D_idxs():  # only images a query needs, once each
                point_id = points2D[index].point3D_id
                ids[index] = point_id
                xyz[index] = points3D[point_id].xyz
            self._cache[name] = (ids, xyz)
        return self._cache[name]

    def db_pose(self, name: str) -> pycolmap.Rigid3d | None:
        image = self.reconstruction.images[self._ids_by_name[name]]
        return image.cam_from_world() if image.has_pose else None


# ------------------------------------------------------------------------------------ correspondences
@dataclass
class Correspondences:
    """2D-3D correspondences of one query (against one cluster of db images)."""

    query_indices: np.ndarray  # (M,) index into the query's keypoints
    point_ids: np.ndarray  # (M,) 3D point ids
    points2D: np.ndarray  # (M, 2) COLMAP pixel coordinates (hloc keypoints + 0.5)
    points3D: np.ndarray  # (M, 3) world coordinates
    db_indices: np.ndarray  # (M,) index into ``db_names`` of the first db image giving the correspondence
    db_names: list[str]
    num_matches: int  # query-db matches whose db keypoint has a 3D point (before de-duplication)
    matches_per_db: dict[str, int] = field(default_factory=dict)  # raw matches per db image
    missing_pairs: list[str] = field(default_factory=list)  # db images listed but absent from matches.h5


def gather_correspondences(
    query_keypoints: np.ndarray,
    query: str,
    db_names: "list[str]",
    source: PointSource,
    match_file: h5py.File,
) -> Correspondences:
    """Collect the distinct (query keypoint, 3D point) pairs over ``db_names``."""
    q_idx, p_ids, db_idx, xyz_parts = [], [], [], []
    matches_per_db: dict[str, int] = {}
    missing: list[str] = []
    num_matches = 0
    for i, db in enumerate(db_names):
        try:
            key, reverse = find_pair(match_file, query, db)
        except KeyError:
            missing.append(db)
            continue
        group = match_file[key]
        matches0 = group["matches0"][()]
        valid = np.where(matches0 > -1)[0]
        pairs = np.stack([valid, matches0[valid]], axis=1).astype(np.int64)
        if reverse:
            pairs = pairs[:, ::-1]
        matches_per_db[db] = len(pairs)
        if len(pairs) == 0:
            continue
        ids, xyz = source.keypoint_points(db)
        if pairs[:, 1].max() >= len(ids) or pairs[:, 0].max() >= len(query_keypoints):
            raise UserError(
                f"matches of ({query}, {db}) index keypoints beyond the features/model; "
                "the reference was built from other features — re-run the matching step"
            )
        keep = ids[pairs[:, 1]] >= 0
        pairs = pairs[keep]
        num_matches += len(pairs)
        q_idx.append(pairs[:, 0])
        p_ids.append(ids[pairs[:, 1]])
        db_idx.append(np.full(len(pairs), i, dtype=np.int64))
        xyz_parts.append(xyz[pairs[:, 1]])
    if q_idx:
        q_all, p_all = np.concatenate(q_idx), np.concatenate(p_ids)
        db_all, xyz_all = np.concatenate(db_idx), np.concatenate(xyz_parts)
        # one correspondence per distinct (query keypoint, 3D point); keep the first db image giving it
        _, first = np.unique(np.stack([q_all, p_all], axis=1), axis=0, return_index=True)
        first = np.sort(first)
        q_all, p_all, db_all, xyz_all = q_all[first], p_all[first], db_all[first], xyz_all[first]
    else:
        q_all = p_all = db_all = np.zeros(0, dtype=np.int64)
        xyz_all = np.zeros((0, 3))
    points2D = np.asarray(query_keypoints, np.float64)[q_all] + 0.5  # hloc -> COLMAP pixel convention
    return Correspondences(
        q_all, p_all, points2D, xyz_all, db_all, list(db_names), num_matches, matches_per_db, missing
    )


def covisibility_clusters(db_names: "list[str]", source: PointSource) -> list[list[str]]:
    """Connected components of db images sharing 3D points (largest first, retrieval order within)."""
    parent = list(range(len(db_names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, name in enumerate(db_names):
        ids, _ = source.keypoint_points(name)
        for point_id in np.unique(ids[ids >= 0]).tolist():
            if point_id in owner:
                a, b = find(owner[point_id]), find(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[point_id] = i
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(db_names):
        groups.setdefault(find(i), []).append(name)
    return sorted(groups.values(), key=len, reverse=True)


# ----------------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class LocalizationConfig:
    """Options of :func:`localize`."""

    pose: PoseEstimationConfig = field(default_factory=PoseEstimationConfig)
    covisibility_clustering: bool = False
    fallback: str = "none"  # "none": failed queries get no pose; "nearest": pose of the best-matching db image

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise UserError(f"unknown fallback {self.fallback!r}; choose one of {', '.join(FALLBACKS)}")


@dataclass
class LocalizationResult:
    poses: dict[str, pycolmap.Rigid3d]  # localized and fallback queries
    logs: dict[str, dict]  # per query: status, reason, counts, db images, estimator

    def count(self, status: str) -> int:
        return sum(1 for log in self.logs.values() if log["status"] == status)


def _query_keypoints(feature_file: h5py.File, name: str) -> np.ndarray | None:
    if name not in feature_file or "keypoints" not in feature_file[name]:
        return None
    return feature_file[name]["keypoints"][()].astype(np.float64).reshape(-1, 2)


def localize_query(
    name: str,
    camera: pycolmap.Camera,
    db_names: "list[str]",
    source: PointSource,
    feature_file: h5py.File,
    match_file: h5py.File,
    config: LocalizationConfig,
) -> tuple[PoseEstimate | None, dict]:
    """Localize one query; returns the best estimate (or None) and its log entry."""
    log: dict = {
        "estimator": config.pose.estimator,
        "db": list(db_names),
        "num_matches": 0,
        "num_correspondences": 0,
        "num_inliers": 0,
        "db_used": [],
        "reason": "",
    }
    if not db_names:
        log["reason"] = "no db images listed for the query"
        return None, log
    keypoints = _query_keypoints(feature_file, name)
    if keypoints is None:
        log["reason"] = "no keypoints for the query in the features file"
        return None, log
    clusters = covisibility_clusters(db_names, source) if config.covisibility_clustering else [list(db_names)]
    best: tuple[PoseEstimate, Correspondences] | None = None
    cluster_logs, matches_per_db, missing = [], {}, []
    most_correspondences, failure = -1, ""
    for cluster in clusters:
        corr = gather_correspondences(keypoints, name, cluster, source, match_file)
        matches_per_db.update(corr.matches_per_db)
        missing += corr.missing_pairs
        estimate = estimate_absolute_pose(corr.points2D, corr.points3D, camera, config.pose)
        cluster_logs.append(
            {
                "db": cluster,
                "num_correspondences": len(corr.points2D),
                "num_inliers": estimate.num_inliers if estimate.success else 0,
                "reason": estimate.reason,
            }
        )
        if estimate.success:
            if best is None or estimate.num_inliers > best[0].num_inliers:
                best = (estimate, corr)
        elif len(corr.points2D) > most_correspondences:
            # report the failure of the most promising cluster
            most_correspondences, failure = len(corr.points2D), estimate.reason
    log["num_correspondences"] = max(most_correspondences, 0)
    log["reason"] = failure
    log["num_matches"] = int(sum(matches_per_db.values()))
    log["matches_per_db"] = {k: int(v) for k, v in matches_per_db.items()}
    if missing:
        log["missing_pairs"] = missing
    if config.covisibility_clustering:
        log["clusters"] = cluster_logs
    if best is None and log["num_matches"] > 0 and log["num_correspondences"] == 0:
        log["reason"] = "none of the matched db keypoints has a 3D point"
    if log["num_matches"] == 0 and best is None:
        log["reason"] = "no matches with the listed db images"
        if missing:
            log["reason"] += " (pairs missing from the matches file)"
    if best is None:
        return None, log
    estimate, corr = best
    used = sorted(set(corr.db_indices[estimate.inlier_mask].tolist()))
    log.update(
        num_correspondences=int(len(corr.points2D)),
        num_inliers=estimate.num_inliers,
        db_used=[corr.db_names[i] for i in used],
        reason="",
        **{k: v for k, v in estimate.details.items()},
    )
    return estimate, log


def localize(
    source: PointSource,
    queries: "dict[str, pycolmap.Camera]",
    retrieval: "dict[str, list[str]]",
    features: str | Path,
    matches: str | Path,
    config: LocalizationConfig | None = None,
) -> LocalizationResult:
    """Localize every query of ``queries`` (name -> camera) against the db images listed in ``retrieval``."""
    config = config if config is not None else LocalizationConfig()
    poses: dict[str, pycolmap.Rigid3d] = {}
    logs: dict[str, dict] = {}
    with open_h5(features) as feature_file, open_h5(matches) as match_file:
        for name, camera in tqdm(queries.items(), desc=f"localize ({config.pose.estimator})", unit="query"):
            start = time.perf_counter()
            listed = retrieval.get(name, [])
            db_names = [db for db in listed if source.has_image(db)]
            estimate, log = localize_query(name, camera, db_names, source, feature_file, match_file, config)
            unknown = [db for db in listed if not source.has_image(db)]
            if unknown:
                log["unknown_db"] = unknown
                if not db_names:
                    log["reason"] = "none of the listed db images is in the reference"
            if estimate is not None:
                poses[name] = estimate.cam_from_world
                log["status"] = STATUS_LOCALIZED
            else:
                log["status"] = STATUS_FAILED
                if config.fallback == "nearest":
                    fallback = _nearest_db(log, db_names, source)
                    if fallback is not None:
                        poses[name] = source.db_pose(fallback)
                        log["status"], log["fallback_db"] = STATUS_FALLBACK, fallback
            if name in poses:
                qvec, tvec = qt_from_rigid(poses[name])
                log["qvec"], log["tvec"] = qvec.tolist(), tvec.tolist()
            log["time_s"] = round(time.perf_counter() - start, 4)
            logs[name] = log
    return LocalizationResult(poses, logs)


def _nearest_db(log: dict, db_names: "list[str]", source: PointSource) -> str | None:
    """The db image with the most matches (ties and no matches: retrieval order) that has a pose."""
    counts = log.get("matches_per_db", {})
    order = sorted(range(len(db_names)), key=lambda i: (-counts.get(db_names[i], 0), i))
    for i in order:
        if source.db_pose(db_names[i]) is not None:
            return db_names[i]
    return None


# ------------------------------------------------------------------------------------------- outputs
def parse_retrieval(path: str | Path) -> dict[str, list[str]]:
    """A pairs file ``query db`` as {query: [db, ...]} in file order (duplicates dropped)."""
    retrieval: dict[str, list[str]] = {}
    for query, db in read_pairs(path):
        listed = retrieval.setdefault(query, [])
        if db not in listed:
            listed.append(db)
    return retrieval


def default_log_path(results: str | Path) -> Path:
    results = Path(results)
    return results.with_name(results.stem + "_log.json")


def write_log(
    path: str | Path, result: LocalizationResult, config: LocalizationConfig, extra: dict | None = None
) -> None:
    """The per-query log as JSON (with a summary and the configuration), atomically."""
    summary = {
        "queries": len(result.logs),
        "localized": result.count(STATUS_LOCALIZED),
        "fallback": result.count(STATUS_FALLBACK),
        "failed": result.count(STATUS_FAILED),
    }
    content = {"summary": summary, "config": asdict(config), **(extra or {}), "queries": result.logs}
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(json_safe(content), indent=1, allow_nan=False))


def json_safe(value: object) -> object:
    """``value`` with NaN / inf floats replaced by None and numpy scalars by Python ones (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def main(
    reference: "PointSource | pycolmap.Reconstruction | str | Path",
    queries: "str | Path | dict[str, pycolmap.Camera]",
    retrieval: str | Path,
    features: str | Path,
    matches: str | Path,
    results: str | Path,
    config: LocalizationConfig | None = None,
    log_path: str | Path | None = None,
) -> LocalizationResult:
    """Localize, then write the pose file ``results`` and its JSON log (default ``<results>_log.json``).

    ``reference``: a COLMAP model (folder or Reconstruction) or any :class:`PointSource`;
    ``queries``: an intrinsics list path or {name: camera}; ``retrieval``: pairs file ``query db``.
    """
    config = config if config is not None else LocalizationConfig()
    if isinstance(reference, (str, Path, pycolmap.Reconstruction)):
        source: PointSource = ModelPoints(reference)
    else:
        source = reference
    cameras = queries if isinstance(queries, dict) else parse_query_list(queries)
    pairs = parse_retrieval(retrieval)
    for path in (features, matches):
        if not Path(path).is_file():
            raise UserError(f"{path}: not found; run the matching step (python -m pipeline.match_dense) first")
    result = localize(source, cameras, pairs, features, matches, config)
    write_poses(results, result.poses)
    write_log(
        log_path or default_log_path(results),
        result,
        config,
        {"features": str(features), "matches": str(matches), "pairs": str(retrieval)},
    )
    return result


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    """The pose-estimation flags shared by localize, aachen and inloc."""
    parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="pycolmap",
        help="pycolmap LO-RANSAC or OpenCV USAC MAGSAC++ (default: %(default)s)",
    )
    parser.add_argument("--max-error", type=float, default=None, help="RANSAC inlier threshold in pixels")
    parser.add_argument("--covisibility-clustering", action="store_true", help="estimate per covisible db cluster")
    parser.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="none",
        help="pose for failed queries: none, or the best-matching db image's pose",
    )
    parser.add_argument("--seed", type=int, default=0, help="RANSAC random seed")


def add_benchmark_arguments(
    parser: argparse.ArgumentParser, dataset_help: str, default_weights: str, pairs_example: str, num_loc: int
) -> None:
    """The dataset, matcher and query-pair flags shared by the Aachen and InLoc pipelines."""
    parser.add_argument("--dataset", type=Path, required=True, help=dataset_help)
    parser.add_argument("--outputs", type=Path, required=True, help="output folder")
    parser.add_argument("--matcher", default="loftr", help="loftr or sift (default loftr)")
    from matchers.factory import WEIGHTS_HELP

    parser.add_argument(
        "--weights",
        default=None,
        help=WEIGHTS_HELP
        if default_weights == "outdoor"
        else f"LoFTR checkpoint name or path (default {default_weights}, never swapped for other weights)",
    )
    parser.add_argument("--resize", type=int, default=None, help="longest side for matching")
    parser.add_argument(
        "--pairs-query", default=None, help=f"query-db pairs file (e.g. hloc's {pairs_example}), or 'exhaustive'"
    )
    parser.add_argument(
        "--num-loc", type=int, default=num_loc, help=f"db images retrieved per query (default {num_loc})"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--refine",
        choices=REFINE_MODES,
        default=None,
        help="sub-pixel refinement of dense matches (default klt for loftr, none for sift)",
    )
    add_estimator_arguments(parser)


def report(result: LocalizationResult, submission: Path) -> None:
    """The one-line summary the Aachen and InLoc CLIs print."""
    print(
        f"localized {result.count(STATUS_LOCALIZED)} / {len(result.logs)} queries "
        f"({result.count(STATUS_FALLBACK)} fallback, {result.count(STATUS_FAILED)} failed); "
        f"submission: {submission}"
    )


#: Quantization of KLT-refined matches in localization: the query step snaps database points to the reference
#: keypoints within this radius, so it cannot be as small as reconstruct's 0.5 px. Mini-Aachen from temple_ring
#: with loftr-compact (12 queries, 10 retrieved db images each), recall at (0.25 m, 2 deg) / median error:
#: no refinement (8 px / 2 px) 58 % / 0.225 m 0.59 deg; KLT 8 px / 2 px 92 % / 0.132 m 0.36 deg; KLT 4 px / 1 px
#: 92 % / 0.101 m 0.27 deg.
KLT_MAX_ERROR = 1.0


def match_config_from_args(args: argparse.Namespace):
    """Dense matching of both steps: LoFTR's points refined by KLT on a 4 px / 1 px grid unless ``--refine none``;
    SIFT's keypoints as detected."""
    from pipeline.match_dense import DenseMatchConfig

    refine = args.refine if args.refine is not None else default_refine(args.matcher, fixed_reference=True)
    if refine == "klt":
        return DenseMatchConfig(refine=refine, cell_size=KLT_CELL_SIZE, max_error=KLT_MAX_ERROR)
    return DenseMatchConfig(refine=refine)


def config_from_args(args: argparse.Namespace, default_max_error: float = 12.0) -> LocalizationConfig:
    max_error = args.max_error if args.max_error is not None else default_max_error
    return LocalizationConfig(
        pose=PoseEstimationConfig(estimator=args.estimator, max_error=max_error, seed=args.seed),
        covisibility_clustering=args.covisibility_clustering,
        fallback=args.fallback,
    )


def main_cli(argv: "list[str] | None" = None) -> LocalizationResult:
    parser = argparse.ArgumentParser(prog="python -m localization.localize", description=__doc__.split("\n")[0])
    parser.add_argument("--reference-sfm", type=Path, required=True, help="COLMAP reference model folder")
    parser.add_argument("--queries", type=Path, required=True, help="query list 'name MODEL W H params...'")
    parser.add_argument("--pairs", type=Path, required=True, help="query-db pairs (retrieval)")
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--matches", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True, help="output pose file")
    parser.add_argument("--log", type=Path, default=None, help="JSON log (default <results>_log.json)")
    add_estimator_arguments(parser)
    args = parser.parse_args(argv)
    result = main(
        args.reference_sfm,
        args.queries,
        args.pairs,
        args.features,
        args.matches,
        args.results,
        config_from_args(args),
        args.log,
    )
    print(
        f"localized {result.count(STATUS_LOCALIZED)} / {len(result.logs)} queries "
        f"({result.count(STATUS_FALLBACK)} fallback, {result.count(STATUS_FAILED)} failed) -> {args.results}"
    )
    return result


if __name__ == "__main__":
    run_cli(main_cli)
