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
``fallback``). Each query's outcome is one frozen :class:`QueryRecord` (retrieval, matches, pose,
timing); the records are written at the end as one JSON log. Outputs: pose lines
``name qw qx qy qz tx ty tz`` (world-to-camera) and that log.

CLI::

    python -m localization.localize --reference-sfm sfm/ --queries queries.txt --pairs pairs-loc.txt \\
        --features features.h5 --matches matches.h5 --results poses.txt [--estimator magsac]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import h5py
import numpy as np
import pycolmap
from tqdm import tqdm

from core.cameras import parse_query_list
from core.cli import add_config_arguments, generated_options
from core.colmap_model import read_model
from core.errors import UserError, run_cli
from core.files import write_text_atomic
from core.io import find_pair, open_h5, read_pairs
from core.poses import qt_from_rigid, write_poses
from matchers.sift import SIFTBackend

from .absolute_pose import PoseEstimate, PoseEstimationConfig, estimate_absolute_pose

Fallback = Literal["none", "nearest"]
FALLBACKS: tuple[str, ...] = get_args(Fallback)
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
            reconstruction = read_model(reconstruction, "the reference model folder (--reference-sfm)")
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


# ------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RetrievalRecord:
    """The db images listed for a query (retrieval or a pairs file)."""

    db: tuple[str, ...]  # listed and in the reference, in listed order
    unknown_db: tuple[str, ...] = ()  # listed but not in the reference


@dataclass(frozen=True)
class ClusterRecord:
    """One covisibility cluster's attempt (covisibility clustering only)."""

    db: tuple[str, ...]
    num_correspondences: int
    num_inliers: int
    reason: str  # why its estimate failed ('' on success)


@dataclass(frozen=True)
class MatchRecord:
    """What the query's matches gave."""

    num_matches: int = 0  # raw query-db matches
    #: 2D-3D correspondences of the winning cluster; of the most promising failed one when none won
    num_correspondences: int = 0
    matches_per_db: Mapping[str, int] | None = None  # raw matches per db image; None: matches not read
    missing_pairs: tuple[str, ...] = ()  # db images listed but absent from matches.h5
    clusters: tuple[ClusterRecord, ...] | None = None  # None: no covisibility clustering


@dataclass(frozen=True)
class PoseRecord:
    """A successful pose estimate."""

    cam_from_world: pycolmap.Rigid3d
    num_inliers: int
    db_used: tuple[str, ...]  # db images giving at least one inlier
    details: Mapping[str, int] = field(default_factory=dict)  # the estimator's own counts


@dataclass(frozen=True)
class QueryRecord:
    """The outcome of one query: written as one entry of the JSON log (:meth:`to_json`)."""

    name: str
    estimator: str
    retrieval: RetrievalRecord
    matches: MatchRecord = MatchRecord()
    pose: PoseRecord | None = None  # None: no pose was estimated
    status: str = STATUS_FAILED
    reason: str = ""  # why it failed ('' when localized)
    fallback_db: str | None = None  # the db image whose pose a failed query took (fallback "nearest")
    fallback_pose: pycolmap.Rigid3d | None = None
    time_s: float = 0.0

    @property
    def cam_from_world(self) -> pycolmap.Rigid3d | None:
        """The pose written for the query: the estimate, else the fallback's, else None."""
        return self.pose.cam_from_world if self.pose is not None else self.fallback_pose

    def to_json(self) -> dict[str, Any]:
        """The log entry (the keys and their order are the log format that tools and tests read)."""
        matches, pose = self.matches, self.pose
        entry: dict[str, Any] = {
            "estimator": self.estimator,
            "db": list(self.retrieval.db),
            "num_matches": matches.num_matches,
            "num_correspondences": matches.num_correspondences,
            "num_inliers": pose.num_inliers if pose is not None else 0,
            "db_used": list(pose.db_used) if pose is not None else [],
            "reason": self.reason,
        }
        if matches.matches_per_db is not None:
            entry["matches_per_db"] = dict(matches.matches_per_db)
        if matches.missing_pairs:
            entry["missing_pairs"] = list(matches.missing_pairs)
        if matches.clusters is not None:
            entry["clusters"] = [asdict(cluster) for cluster in matches.clusters]
        if pose is not None:
            entry.update(pose.details)
        if self.retrieval.unknown_db:
            entry["unknown_db"] = list(self.retrieval.unknown_db)
        entry["status"] = self.status
        if self.fallback_db is not None:
            entry["fallback_db"] = self.fallback_db
        if self.cam_from_world is not None:
            qvec, tvec = qt_from_rigid(self.cam_from_world)
            entry["qvec"], entry["tvec"] = qvec.tolist(), tvec.tolist()
        entry["time_s"] = self.time_s
        return entry


@dataclass
class LocalizationResult:
    """One record per query, in query order."""

    records: list[QueryRecord]

    @property
    def poses(self) -> dict[str, pycolmap.Rigid3d]:
        """Poses of the localized and fallback queries."""
        return {r.name: r.cam_from_world for r in self.records if r.cam_from_world is not None}

    def record(self, name: str) -> QueryRecord:
        """The record of query ``name`` (KeyError if it was not a query)."""
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(name)

    def count(self, status: str) -> int:
        return sum(1 for record in self.records if record.status == status)


# ------------------------------------------------------------------------------------------- configs
RefineMode = Literal["none", "klt"]


@dataclass(frozen=True)
class QueryMatchingConfig:
    """The matcher of a localization run and how its dense matches are refined."""

    matcher: str = "loftr"  # loftr or sift
    weights: str | None = None  # LoFTR checkpoint name or path
    resize: int | None = None  # longest side for matching
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    refine: RefineMode | None = None  # sub-pixel refinement of dense matches (default klt for loftr, none for sift)
    #: SIFT implementation; OpenCV's here, with which the published localization figures were measured
    sift_backend: SIFTBackend = "opencv"

    def dense_config(self, matcher_name: str | None = None):
        """The :class:`pipeline.match_dense.DenseMatchConfig` of both matching steps (db and query pairs).

        LoFTR's points are refined by KLT on a 4 px / 1 px grid (:data:`pipeline.match_dense.LOCALIZATION_KLT_MAX_ERROR` says why) unless
        ``refine`` is none; SIFT's keypoints stay as detected. ``matcher_name``: the matcher actually used
        (a ready matcher object may differ from ``matcher``).
        """
        from pipeline.match_dense import DenseOverrides, dense_defaults

        matcher = (matcher_name or self.matcher).strip().lower()
        return dense_defaults(matcher, overrides=DenseOverrides(refine=self.refine), for_localization=True)

    def make_matcher(self, default_weights: str | None = None):
        """The matcher; LoFTR without ``weights`` gets ``default_weights`` (a benchmark's own, e.g. indoor)."""
        from matchers.factory import make_matcher

        weights = self.weights
        if weights is None and self.matcher.strip().lower() == "loftr":
            weights = default_weights
        return make_matcher(
            self.matcher, weights=weights, resize=self.resize, device=self.device, sift_backend=self.sift_backend
        )


@dataclass(frozen=True)
class LocalizeConfig:
    """Options of localizing queries: how they are matched, and how their poses are estimated."""

    matching: QueryMatchingConfig = field(default_factory=QueryMatchingConfig)  # pipelines that match
    pose: PoseEstimationConfig = field(default_factory=PoseEstimationConfig)
    covisibility_clustering: bool = False  # estimate a pose per covisible db cluster, keep the best
    fallback: Fallback = "none"  # pose for failed queries: none, or the best-matching db image's pose

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise UserError(f"unknown fallback {self.fallback!r}; choose one of {', '.join(FALLBACKS)}")

    def to_json(self) -> dict[str, Any]:
        """The localization options as the log records them (matching is described by the matcher itself)."""
        record = asdict(self)
        del record["matching"]
        return record


# ----------------------------------------------------------------------------------------- the loop
def _query_keypoints(feature_file: h5py.File, name: str) -> np.ndarray | None:
    if name not in feature_file or "keypoints" not in feature_file[name]:
        return None
    return feature_file[name]["keypoints"][()].astype(np.float64).reshape(-1, 2)


def _estimate_per_cluster(
    name: str,
    camera: pycolmap.Camera,
    keypoints: np.ndarray,
    db_names: "tuple[str, ...]",
    source: PointSource,
    match_file: h5py.File,
    config: LocalizeConfig,
) -> tuple[tuple[PoseEstimate, Correspondences] | None, MatchRecord, str]:
    """(best estimate and its correspondences or None, the match record, the most promising failure's reason)."""
    clusters = covisibility_clusters(list(db_names), source) if config.covisibility_clustering else [list(db_names)]
    best: tuple[PoseEstimate, Correspondences] | None = None
    attempts, matches_per_db, missing = [], {}, []
    most_correspondences, failure = -1, ""
    for cluster in clusters:
        corr = gather_correspondences(keypoints, name, cluster, source, match_file)
        matches_per_db.update(corr.matches_per_db)
        missing += corr.missing_pairs
        estimate = estimate_absolute_pose(corr.points2D, corr.points3D, camera, config.pose)
        inliers = estimate.num_inliers if estimate.success else 0
        attempts.append(ClusterRecord(tuple(cluster), len(corr.points2D), inliers, estimate.reason))
        if estimate.success:
            if best is None or estimate.num_inliers > best[0].num_inliers:
                best = (estimate, corr)
        elif len(corr.points2D) > most_correspondences:
            # report the failure of the most promising cluster
            most_correspondences, failure = len(corr.points2D), estimate.reason
    record = MatchRecord(
        num_matches=int(sum(matches_per_db.values())),
        num_correspondences=len(best[1].points2D) if best is not None else max(most_correspondences, 0),
        matches_per_db={db: int(count) for db, count in matches_per_db.items()},
        missing_pairs=tuple(missing),
        clusters=tuple(attempts) if config.covisibility_clustering else None,
    )
    return best, record, failure


def localize_query(
    name: str,
    camera: pycolmap.Camera,
    retrieval: RetrievalRecord,
    source: PointSource,
    feature_file: h5py.File,
    match_file: h5py.File,
    config: LocalizeConfig,
) -> QueryRecord:
    """Localize one query against its listed db images; a failure is a record with a reason, not an error."""
    failed = QueryRecord(name, config.pose.estimator, retrieval)
    if not retrieval.db:
        listed = "none of the listed db images is in the reference" if retrieval.unknown_db else ""
        return dataclasses.replace(failed, reason=listed or "no db images listed for the query")
    keypoints = _query_keypoints(feature_file, name)
    if keypoints is None:
        return dataclasses.replace(failed, reason="no keypoints for the query in the features file")
    best, matches, reason = _estimate_per_cluster(name, camera, keypoints, retrieval.db, source, match_file, config)
    if best is None:
        if matches.num_matches > 0 and matches.num_correspondences == 0:
            reason = "none of the matched db keypoints has a 3D point"
        if matches.num_matches == 0:
            reason = "no matches with the listed db images"
            if matches.missing_pairs:
                reason += " (pairs missing from the matches file)"
        return dataclasses.replace(failed, matches=matches, reason=reason)
    estimate, corr = best
    used = sorted(set(corr.db_indices[estimate.inlier_mask].tolist()))
    pose = PoseRecord(
        estimate.cam_from_world, estimate.num_inliers, tuple(corr.db_names[i] for i in used), dict(estimate.details)
    )
    return dataclasses.replace(failed, matches=matches, pose=pose, status=STATUS_LOCALIZED)


def localize(
    source: PointSource,
    queries: "dict[str, pycolmap.Camera]",
    retrieval: "dict[str, list[str]]",
    features: str | Path,
    matches: str | Path,
    config: LocalizeConfig = LocalizeConfig(),
) -> LocalizationResult:
    """Localize every query of ``queries`` (name -> camera) against the db images listed in ``retrieval``."""
    records: list[QueryRecord] = []
    with open_h5(features) as feature_file, open_h5(matches) as match_file:
        for name, camera in tqdm(queries.items(), desc=f"localize ({config.pose.estimator})", unit="query"):
            start = time.perf_counter()
            listed = retrieval.get(name, [])
            known = RetrievalRecord(
                db=tuple(db for db in listed if source.has_image(db)),
                unknown_db=tuple(db for db in listed if not source.has_image(db)),
            )
            record = localize_query(name, camera, known, source, feature_file, match_file, config)
            if record.status == STATUS_FAILED and config.fallback == "nearest":
                record = _with_fallback(record, source)
            records.append(dataclasses.replace(record, time_s=round(time.perf_counter() - start, 4)))
    return LocalizationResult(records)


def _with_fallback(record: QueryRecord, source: PointSource) -> QueryRecord:
    """A failed query with the pose of its best-matching db image, if one has a pose."""
    nearest = _nearest_db(record.matches.matches_per_db or {}, record.retrieval.db, source)
    if nearest is None:
        return record
    return dataclasses.replace(
        record, status=STATUS_FALLBACK, fallback_db=nearest, fallback_pose=source.db_pose(nearest)
    )


def _nearest_db(
    matches_per_db: Mapping[str, int], db_names: "tuple[str, ...] | list[str]", source: PointSource
) -> str | None:
    """The db image with the most matches (ties and no matches: retrieval order) that has a pose."""
    order = sorted(range(len(db_names)), key=lambda i: (-matches_per_db.get(db_names[i], 0), i))
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


def write_log(path: str | Path, result: LocalizationResult, config: LocalizeConfig, extra: dict | None = None) -> None:
    """The query records as one JSON log (with a summary and the configuration), written atomically."""
    summary = {
        "queries": len(result.records),
        "localized": result.count(STATUS_LOCALIZED),
        "fallback": result.count(STATUS_FALLBACK),
        "failed": result.count(STATUS_FAILED),
    }
    queries = {record.name: record.to_json() for record in result.records}
    content = {"summary": summary, "config": config.to_json(), **(extra or {}), "queries": queries}
    write_text_atomic(path, json.dumps(json_safe(content), indent=1, allow_nan=False))


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


def summary_line(result: LocalizationResult) -> str:
    """``localized L / N queries (F fallback, X failed)``: the start of every localization CLI's last line."""
    return (
        f"localized {result.count(STATUS_LOCALIZED)} / {len(result.records)} queries "
        f"({result.count(STATUS_FALLBACK)} fallback, {result.count(STATUS_FAILED)} failed)"
    )


def main(
    reference: "PointSource | pycolmap.Reconstruction | str | Path",
    queries: "str | Path | dict[str, pycolmap.Camera]",
    retrieval: str | Path,
    features: str | Path,
    matches: str | Path,
    results: str | Path,
    config: LocalizeConfig = LocalizeConfig(),
    log_path: str | Path | None = None,
) -> LocalizationResult:
    """Localize, then write the pose file ``results`` and its JSON log (default ``<results>_log.json``).

    ``reference``: a COLMAP model (folder or Reconstruction) or any :class:`PointSource`;
    ``queries``: an intrinsics list path or {name: camera}; ``retrieval``: pairs file ``query db``.
    ``config.matching`` is not used: the matches are given.
    """
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


# ----------------------------------------------------------------------------------------------- CLI
#: pose options no localization CLI offers: magsac's refinement is always on (and --refine names the
#: dense-matching refinement in the benchmark CLIs)
POSE_OPTIONS_EXCLUDED = ("refine",)


def add_localize_arguments(
    parser: argparse.ArgumentParser, defaults: LocalizeConfig, exclude_pose: "tuple[str, ...]" = ()
) -> None:
    """The options of :class:`LocalizeConfig` (without matching) and its pose estimation, from the configs."""
    add_config_arguments(
        parser, PoseEstimationConfig, defaults=defaults.pose, exclude=POSE_OPTIONS_EXCLUDED + exclude_pose
    )
    add_config_arguments(parser, LocalizeConfig, defaults=defaults)


def options_of(parser: argparse.ArgumentParser, args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """``{field: value}`` of the options ``parser`` generated from the config class ``cls`` (and only those:
    several configs of one command line may share a field name, like ``refine``)."""
    values = {}
    for dest, (owner, name) in generated_options(parser).items():
        if owner is cls:
            value = getattr(args, dest)
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


def localize_config_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: LocalizeConfig
) -> LocalizeConfig:
    """The :class:`LocalizeConfig` the command line describes, on top of ``defaults``."""
    matching = dataclasses.replace(defaults.matching, **options_of(parser, args, QueryMatchingConfig))
    pose = dataclasses.replace(defaults.pose, **options_of(parser, args, PoseEstimationConfig))
    return dataclasses.replace(defaults, matching=matching, pose=pose, **options_of(parser, args, LocalizeConfig))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localization.localize", description=__doc__.split("\n")[0])
    parser.add_argument("--reference-sfm", type=Path, required=True, help="COLMAP reference model folder")
    parser.add_argument("--queries", type=Path, required=True, help="query list 'name MODEL W H params...'")
    parser.add_argument("--pairs", type=Path, required=True, help="query-db pairs (retrieval)")
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--matches", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True, help="output pose file")
    parser.add_argument("--log", dest="log_path", type=Path, default=None, help="JSON log (default <results>_log.json)")
    add_localize_arguments(parser, LocalizeConfig())
    return parser


def main_cli(argv: "list[str] | None" = None) -> LocalizationResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = localize_config_from_args(parser, args, LocalizeConfig())
    result = main(
        args.reference_sfm, args.queries, args.pairs, args.features, args.matches, args.results, config, args.log_path
    )
    print(f"{summary_line(result)} -> {args.results}")
    return result


if __name__ == "__main__":
    run_cli(main_cli)
