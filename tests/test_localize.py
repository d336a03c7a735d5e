"""Localization core: query lists, undistortion, pose files, estimators (pycolmap / MAGSAC++), localize."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest

from core.cameras import make_camera, parse_query_list, undistort_points, write_query_list
from core.errors import UserError
from core.io import write_features, write_matches, write_pairs
from core.poses import qt_from_rigid, read_poses, rigid_from_matrix, write_poses, write_submission
from localization import absolute_pose
from localization import localize as loc
from localization.absolute_pose import PoseEstimationConfig, estimate_absolute_pose, magsac_params
from localization.evaluate import pose_errors


# ------------------------------------------------------------------------------------------ helpers
def random_pose(rng: np.random.Generator, center: np.ndarray, spread: float = 0.05) -> pycolmap.Rigid3d:
    """A camera at ``center`` looking roughly along +z."""
    R = np.asarray(pycolmap.Rotation3d(rng.normal(0, spread, 3)).matrix())
    return rigid_from_matrix(R, -R @ center)


def project(camera: pycolmap.Camera, pose: pycolmap.Rigid3d, points: np.ndarray) -> np.ndarray:
    cam = points @ np.asarray(pose.rotation.matrix()).T + np.asarray(pose.translation)
    return np.asarray(camera.img_from_cam(cam), dtype=np.float64)


def planted_problem(
    seed: int, camera: pycolmap.Camera, n_in: int = 100, n_near: int = 100, n_out: int = 400, noise: float = 1.0
):
    """2D-3D correspondences: ``n_in`` inliers (Gaussian noise), ``n_near`` outliers displaced 4-15 px
    (the hard ones for a 12 px threshold), ``n_out`` gross outliers. Returns (p2d, p3d, pose, is_inlier)."""
    rng = np.random.default_rng(seed)
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rng.normal(0, 0.2, 3)), rng.normal(0, 0.3, 3))
    inverse = np.asarray(pose.inverse().matrix())

    def visible(n: int) -> tuple[np.ndarray, np.ndarray]:
        cam = np.c_[rng.uniform(-2, 2, (n, 2)), rng.uniform(4, 8, n)]
        return cam @ inverse[:, :3].T + inverse[:, 3], np.asarray(camera.img_from_cam(cam))

    p3_in, p2_in = visible(n_in)
    p2_in = p2_in + rng.normal(0, noise, p2_in.shape)
    p3_near, p2_near = visible(n_near)
    direction = rng.normal(size=(n_near, 2))
    p2_near += direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(4, 15, (n_near, 1))
    p3_out = rng.uniform(p3_in.min(0), p3_in.max(0), (n_out, 3))
    p2_out = rng.uniform([0, 0], [camera.width, camera.height], (n_out, 2))
    is_inlier = np.r_[np.ones(n_in, bool), np.zeros(n_near + n_out, bool)]
    return np.r_[p2_in, p2_near, p2_out], np.r_[p3_in, p3_near, p3_out], pose, is_inlier


CAMERA = make_camera("SIMPLE_RADIAL", 640, 480, [500.0, 320.0, 240.0, -0.08])


class Scene:
    """A synthetic reference: a COLMAP model of db images, features.h5, matches.h5, pairs and queries."""

    def __init__(self, root: Path, seed: int = 0, outlier_ratio: float = 0.3) -> None:
        rng = np.random.default_rng(seed)
        self.root = root
        self.points = rng.uniform([-3, -2, 4], [3, 2, 8], (900, 3))
        self.db = [f"db/{i:02d}.jpg" for i in range(4)]
        self.queries = ["query/day/q0.jpg", "query/day/q1.jpg"]
        centers = [np.array([x, 0.2 * x, 0.0]) for x in (-1.0, -0.5, 0.5, 1.0, 0.1, -0.3)]
        self.poses = {name: random_pose(rng, c) for name, c in zip(self.db + self.queries, centers)}
        self.visible: dict[str, np.ndarray] = {}
        features = {}
        for name, pose in self.poses.items():
            xy = project(CAMERA, pose, self.points)
            keep = np.where((xy[:, 0] > 0) & (xy[:, 0] < 640) & (xy[:, 1] > 0) & (xy[:, 1] < 480))[0]
            self.visible[name] = keep
            keypoints = xy[keep] - 0.5 + rng.normal(0, 0.3, (len(keep), 2))  # COLMAP -> hloc pixels
            features[name] = (keypoints, np.ones(len(keep)), (640, 480))
        self.features = root / "features.h5"
        write_features(self.features, features)

        model = pycolmap.Reconstruction()
        camera = pycolmap.Camera(model=CAMERA.model, width=640, height=480, params=CAMERA.params, camera_id=1)
        model.add_camera_with_trivial_rig(camera)
        for image_id, name in enumerate(self.db, start=1):
            image = pycolmap.Image(name=name, keypoints=features[name][0] + 0.5, camera_id=1, image_id=image_id)
            model.add_image_with_trivial_frame(image, self.poses[name])
        for j, xyz in enumerate(self.points):
            track = pycolmap.Track()
            for image_id, name in enumerate(self.db, start=1):
                where = np.where(self.visible[name] == j)[0]
                if len(where):
                    track.add_element(image_id, int(where[0]))
            if track.length() >= 2:
                model.add_point3D(xyz, track)
        self.model_dir = root / "sfm"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        model.write(str(self.model_dir))

        matches, pairs = {}, []
        for query in self.queries:
            for db in self.db:
                index = {point: k for k, point in enumerate(self.visible[db])}
                matches0 = np.array([index.get(p, -1) for p in self.visible[query]], dtype=np.int64)
                bad = rng.choice(len(matches0), int(outlier_ratio * len(matches0)), replace=False)
                matches0[bad] = rng.integers(0, len(self.visible[db]), len(bad))
                matches[(query, db)] = (matches0, np.ones(len(matches0)))
                pairs.append((query, db))
        self.matches = root / "matches.h5"
        write_matches(self.matches, matches)
        self.pairs = root / "pairs.txt"
        write_pairs(self.pairs, pairs)
        self.query_list = root / "queries.txt"
        write_query_list(self.query_list, {q: CAMERA for q in self.queries})


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return Scene(tmp_path_factory.mktemp("scene"))


# ------------------------------------------------------------------------------------------ cameras
def test_query_list_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "q.txt"
    path.write_text(
        "query/day/a.jpg SIMPLE_RADIAL 1600 1200 1469.2 800 600 -0.0353\n\n"
        "query/night/b.jpg PINHOLE 640 480 500 510 320 240\n"
    )
    cameras = parse_query_list(path)
    assert list(cameras) == ["query/day/a.jpg", "query/night/b.jpg"]
    a = cameras["query/day/a.jpg"]
    assert a.model.name == "SIMPLE_RADIAL" and (a.width, a.height) == (1600, 1200)
    np.testing.assert_allclose(a.params, [1469.2, 800, 600, -0.0353])
    write_query_list(tmp_path / "q2.txt", cameras)
    again = parse_query_list(tmp_path / "q2.txt")
    for name in cameras:
        np.testing.assert_array_equal(again[name].params, cameras[name].params)
    for bad in (
        "x.jpg SIMPLE_RADIAL 10 10 1 2 3\n",
        "x.jpg FOO 10 10 1 2 3\n",
        "x.jpg PINHOLE ten 10 1 1 1 1\n",
        "../x.jpg PINHOLE 10 10 1 1 1 1\n",
        "x.jpg PINHOLE\n",
    ):
        path.write_text(bad)
        with pytest.raises(UserError, match="q.txt:1"):
            parse_query_list(path)


@pytest.mark.parametrize(
    "model,params",
    [
        ("SIMPLE_RADIAL", [800, 320, 240, -0.12]),
        ("RADIAL", [800, 320, 240, -0.1, 0.03]),
        ("OPENCV", [800, 790, 321, 239, -0.1, 0.02, 0.001, -0.002]),
        ("FULL_OPENCV", [800, 790, 321, 239, -0.1, 0.02, 0.001, -0.002, 0.001, 0.01, 0.002, 0.001]),
        ("OPENCV_FISHEYE", [400, 400, 320, 240, 0.05, 0.01, 0.0, 0.0]),
    ],
)
def test_undistortion_inverts_colmap_distortion(model: str, params: list[float]) -> None:
    camera = make_camera(model, 640, 480, params)
    rng = np.random.default_rng(1)
    normalized = rng.uniform([-0.35, -0.28], [0.35, 0.28], (200, 2))  # up to the image corners
    distorted = np.asarray(camera.img_from_cam(np.c_[normalized, np.ones(len(normalized))]))
    K = np.asarray(camera.calibration_matrix())
    expected = normalized @ K[:2, :2].T + K[:2, 2]  # the same ray through the distortion-free camera
    np.testing.assert_allclose(undistort_points(distorted, camera), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ poses
def test_pose_file_and_submission_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    poses = {f"query/day/cam{i}/IMG_{i}.jpg": random_pose(rng, rng.normal(0, 5, 3), 1.0) for i in range(5)}
    write_poses(tmp_path / "poses.txt", poses)
    names = write_submission(tmp_path / "submission.txt", poses)
    lines = (tmp_path / "submission.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [f"IMG_{i}.jpg" for i in range(5)]
    for path, key in ((tmp_path / "poses.txt", lambda n: n), (tmp_path / "submission.txt", lambda n: names[n])):
        parsed = read_poses(path)
        for name, pose in poses.items():
            q0, t0 = qt_from_rigid(pose)
            q1, t1 = qt_from_rigid(parsed[key(name)])
            np.testing.assert_allclose(q1, q0, atol=1e-15)
            np.testing.assert_array_equal(t1, t0)
            np.testing.assert_allclose(np.asarray(parsed[key(name)].matrix()), np.asarray(pose.matrix()), atol=1e-12)
    clash = {"a/IMG.jpg": poses[next(iter(poses))], "b/IMG.jpg": poses[next(iter(poses))]}
    with pytest.raises(UserError, match="same file name"):
        write_submission(tmp_path / "s2.txt", clash)
    (tmp_path / "bad.txt").write_text("IMG.jpg 1 0 0\n")
    with pytest.raises(UserError, match="bad.txt:1"):
        read_poses(tmp_path / "bad.txt")


def test_quaternion_convention_is_colmap_wxyz() -> None:
    """A 90 degree rotation about z: COLMAP writes qw = qz = sqrt(1/2)."""
    R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    qvec, tvec = qt_from_rigid(rigid_from_matrix(R, np.array([1.0, 2.0, 3.0])))
    np.testing.assert_allclose(qvec, [np.sqrt(0.5), 0, 0, np.sqrt(0.5)], atol=1e-12)
    np.testing.assert_array_equal(tvec, [1, 2, 3])


# ------------------------------------------------------------------------------------------ estimators
@pytest.mark.parametrize("estimator", ["pycolmap", "magsac"])
def test_estimators_recover_pose_with_distortion_and_outliers(estimator: str) -> None:
    p2d, p3d, truth, is_inlier = planted_problem(0, CAMERA, noise=0.5)
    estimate = estimate_absolute_pose(p2d, p3d, CAMERA, PoseEstimationConfig(estimator=estimator, max_error=4.0))
    assert estimate.success, estimate.reason
    position, rotation = pose_errors(estimate.cam_from_world, truth)
    assert position < 0.02 and rotation < 0.2
    assert estimate.inlier_mask[is_inlier].mean() > 0.97  # planted inliers found
    assert estimate.inlier_mask[100 + 100 :].sum() <= 2  # gross outliers rejected


def test_magsac_path_runs_opencv_usac_magsac(monkeypatch: pytest.MonkeyPatch) -> None:
    """The magsac estimator calls solvePnPRansac with MAGSAC++ UsacParams, and its inlier set is exactly
    the one of OpenCV's own USAC_MAGSAC preset (not of USAC with the MSAC score)."""
    camera = make_camera("SIMPLE_PINHOLE", 640, 480, [500.0, 320.0, 240.0])  # no undistortion involved
    p2d, p3d, _, _ = planted_problem(1, camera)
    calls = []
    original = cv2.solvePnPRansac

    def spy(*args, **kwargs):
        calls.append(kwargs.get("params"))
        return original(*args, **kwargs)

    monkeypatch.setattr(absolute_pose.cv2, "solvePnPRansac", spy)
    config = PoseEstimationConfig(estimator="magsac", max_error=12.0, seed=0, refine=False)
    ours = estimate_absolute_pose(p2d, p3d, camera, config)
    monkeypatch.undo()
    assert len(calls) == 1 and isinstance(calls[0], cv2.UsacParams)
    assert calls[0].score == cv2.SCORE_METHOD_MAGSAC and calls[0].loMethod == cv2.LOCAL_OPTIM_SIGMA
    K = np.ascontiguousarray(camera.calibration_matrix())
    _, _, _, preset = cv2.solvePnPRansac(
        p3d,
        p2d,
        K,
        np.zeros(4),
        iterationsCount=config.max_iterations,
        reprojectionError=12.0,
        confidence=config.confidence,
        flags=cv2.USAC_MAGSAC,
    )
    assert set(np.flatnonzero(ours.inlier_mask)) == set(preset.ravel())
    msac = magsac_params(config)
    msac.score, msac.loMethod = cv2.SCORE_METHOD_MSAC, cv2.LOCAL_OPTIM_INNER_AND_ITER_LO
    _, _, _, _, msac_inliers = cv2.solvePnPRansac(p3d, p2d, K, np.zeros(4), params=msac)
    assert set(np.flatnonzero(ours.inlier_mask)) != set(msac_inliers.ravel())


def test_magsac_matches_or_beats_lo_ransac_on_planted_outliers() -> None:
    """Over several scenes with 83 % outliers (a sixth of them 4-15 px off, inside the 12 px threshold):
    MAGSAC++ keeps every planted inlier, accepts no more planted outliers than LO-RANSAC, and its
    refined poses are as accurate (median within 10 %)."""
    stats = {"pycolmap": [], "magsac": []}
    for seed in range(6):
        p2d, p3d, truth, is_inlier = planted_problem(seed, CAMERA)
        for estimator in stats:
            estimate = estimate_absolute_pose(
                p2d, p3d, CAMERA, PoseEstimationConfig(estimator=estimator, max_error=12.0, seed=seed)
            )
            assert estimate.success, (estimator, seed, estimate.reason)
            position, rotation = pose_errors(estimate.cam_from_world, truth)
            mask = estimate.inlier_mask
            stats[estimator].append((mask[is_inlier].mean(), mask[~is_inlier].sum(), position, rotation))
    lo, magsac = np.array(stats["pycolmap"]), np.array(stats["magsac"])
    assert magsac[:, 0].min() == 1.0
    assert magsac[:, 1].sum() <= lo[:, 1].sum()
    assert np.median(magsac[:, 2]) <= 1.1 * np.median(lo[:, 2])
    assert np.median(magsac[:, 3]) <= 1.1 * np.median(lo[:, 3])


@pytest.mark.parametrize("estimator", ["pycolmap", "magsac"])
def test_degenerate_inputs_fail_cleanly(estimator: str) -> None:
    config = PoseEstimationConfig(estimator=estimator)
    rng = np.random.default_rng(0)
    cases = {
        "empty": (np.zeros((0, 2)), np.zeros((0, 3))),
        "three points": (rng.uniform(0, 400, (3, 2)), rng.uniform(4, 5, (3, 3))),
        "one 3D point": (rng.uniform(0, 400, (50, 2)), np.tile([0.0, 0.0, 5.0], (50, 1))),
        "nan": (np.full((20, 2), np.nan), rng.uniform(4, 5, (20, 3))),
    }
    for name, (p2d, p3d) in cases.items():
        estimate = estimate_absolute_pose(p2d, p3d, CAMERA, config)
        assert not estimate.success and estimate.reason and estimate.cam_from_world is None, name
    with pytest.raises(UserError):
        PoseEstimationConfig(estimator="ransac")


# ------------------------------------------------------------------------------------------ localize
@pytest.mark.parametrize("estimator", ["pycolmap", "magsac"])
def test_localize_against_model(scene: Scene, tmp_path: Path, estimator: str) -> None:
    config = loc.LocalizeConfig(pose=PoseEstimationConfig(estimator=estimator))
    results = tmp_path / "poses.txt"
    result = loc.main(scene.model_dir, scene.query_list, scene.pairs, scene.features, scene.matches, results, config)
    parsed = read_poses(results)
    assert set(parsed) == set(scene.queries)
    saved = json.loads((tmp_path / "poses_log.json").read_text())
    for query in scene.queries:
        position, rotation = pose_errors(parsed[query], scene.poses[query])
        assert position < 0.01 and rotation < 0.1, (query, position, rotation)
        record = result.record(query)
        assert record.status == "localized" and record.estimator == estimator
        assert record.pose.num_inliers > 300 and record.matches.num_matches >= record.pose.num_inliers
        assert set(record.pose.db_used) <= set(scene.db) and record.pose.db_used
        # the log entry: the format tools read, in its order, with the record's values
        entry = saved["queries"][query]
        own_count = "ransac_inliers" if estimator == "pycolmap" else "magsac_inliers"
        assert list(entry) == [
            "estimator", "db", "num_matches", "num_correspondences", "num_inliers", "db_used", "reason",
            "matches_per_db", own_count, "status", "qvec", "tvec", "time_s",
        ]  # fmt: skip
        assert entry["status"] == "localized" and entry["num_inliers"] == record.pose.num_inliers
        assert entry["db_used"] == list(record.pose.db_used) and entry["db"] == scene.db
        assert sum(entry["matches_per_db"].values()) == entry["num_matches"] == record.matches.num_matches
        qvec, tvec = qt_from_rigid(parsed[query])
        np.testing.assert_allclose(entry["qvec"], qvec, atol=1e-12)
        np.testing.assert_allclose(entry["tvec"], tvec, atol=1e-12)
    assert saved["summary"] == {"queries": 2, "localized": 2, "fallback": 0, "failed": 0}
    assert saved["config"] == {
        "pose": asdict(config.pose),
        "covisibility_clustering": False,
        "fallback": "none",
    }
    assert saved["config"]["pose"]["estimator"] == estimator


def test_one_keypoint_several_3d_points_and_dedup(scene: Scene) -> None:
    """A query keypoint matched in several db images to the same 3D point is one correspondence;
    matched to different 3D points it is several."""
    import h5py

    source = loc.ModelPoints(scene.model_dir)
    with h5py.File(scene.features) as features, h5py.File(scene.matches) as matches:
        keypoints = features[scene.queries[0]]["keypoints"][()]
        corr = loc.gather_correspondences(keypoints, scene.queries[0], scene.db, source, matches)
    pairs = set(zip(corr.query_indices.tolist(), corr.point_ids.tolist()))
    assert len(pairs) == len(corr.query_indices)  # no duplicates
    assert corr.num_matches > len(pairs)  # several db images observed the same points
    per_keypoint = np.bincount(corr.query_indices)
    assert per_keypoint.max() > 1  # outlier matches give some keypoints several 3D points
    np.testing.assert_allclose(corr.points2D, keypoints[corr.query_indices] + 0.5)


def test_covisibility_clusters(scene: Scene, tmp_path: Path) -> None:
    source = loc.ModelPoints(scene.model_dir)
    assert loc.covisibility_clusters(scene.db, source) == [scene.db]  # all share points

    class Split:  # two db images that share no 3D point
        def has_image(self, name):
            return True

        def db_pose(self, name):
            return None

        def keypoint_points(self, name):
            ids = np.arange(10) + (0 if name in ("a", "c") else 100)
            return ids, np.zeros((10, 3))

    assert loc.covisibility_clusters(["a", "b", "c"], Split()) == [["a", "c"], ["b"]]
    config = loc.LocalizeConfig(covisibility_clustering=True)
    result = loc.main(
        scene.model_dir, scene.query_list, scene.pairs, scene.features, scene.matches, tmp_path / "p.txt", config
    )
    assert all(r.status == "localized" and len(r.matches.clusters) == 1 for r in result.records)
    cluster = result.records[0].matches.clusters[0]
    assert cluster.db == tuple(scene.db) and cluster.num_inliers == result.records[0].pose.num_inliers
    saved = json.loads((tmp_path / "p_log.json").read_text())
    assert saved["queries"][scene.queries[0]]["clusters"] == [asdict(cluster) | {"db": scene.db}]


def test_failed_queries_are_logged_and_run_continues(scene: Scene, tmp_path: Path) -> None:
    """No pairs, no features, pairs missing from matches.h5 and no 3D: failed (or fallback with
    --fallback nearest, which takes the db image with most matches); the good query still localizes."""
    cameras = parse_query_list(scene.query_list)
    cameras.update(
        {"query/none.jpg": CAMERA, "query/nokp.jpg": CAMERA, "query/nomatch.jpg": CAMERA, "query/unknown.jpg": CAMERA}
    )
    # query/nomatch.jpg has keypoints and pairs, but all its matches are -1
    features = tmp_path / "f.h5"
    from core.io import read_features, read_matches

    all_features = read_features(scene.features)
    all_features["query/nomatch.jpg"] = all_features[scene.queries[0]]
    write_features(features, all_features)
    matches = {}
    for q in scene.queries:
        for d in scene.db:
            idx, sc = read_matches(scene.matches, q, d)
            m0 = np.full(len(all_features[q][0]), -1)
            m0[idx[:, 0]] = idx[:, 1]
            matches[(q, d)] = (m0, np.ones(len(m0)))
    for d in scene.db[:2]:
        matches[("query/nomatch.jpg", d)] = (np.full(len(all_features["query/nomatch.jpg"][0]), -1), np.zeros(0))
    matches_path = tmp_path / "m.h5"
    write_matches(matches_path, matches)
    pairs = loc.parse_retrieval(scene.pairs)
    pairs["query/nokp.jpg"] = scene.db[:1]
    pairs["query/unknown.jpg"] = ["db/not-in-the-model.jpg"]
    pairs["query/nomatch.jpg"] = scene.db  # the last two pairs are absent from matches.h5
    source = loc.ModelPoints(scene.model_dir)
    result = loc.localize(source, cameras, pairs, features, matches_path, loc.LocalizeConfig())
    records = {r.name: r for r in result.records}
    assert list(records) == list(cameras)  # one record per query, in query order
    none, nokp = records["query/none.jpg"], records["query/nokp.jpg"]
    assert none.status == "failed" and "no db images" in none.reason
    assert nokp.status == "failed" and "no keypoints" in nokp.reason
    unknown = records["query/unknown.jpg"]
    assert unknown.status == "failed" and "none of the listed" in unknown.reason
    assert unknown.retrieval.unknown_db == ("db/not-in-the-model.jpg",) and unknown.retrieval.db == ()
    nomatch = records["query/nomatch.jpg"]
    assert nomatch.status == "failed" and "no matches" in nomatch.reason and nomatch.pose is None
    assert nomatch.matches.missing_pairs == tuple(scene.db[2:])
    assert all(records[q].status == "localized" for q in scene.queries)
    assert set(result.poses) == set(scene.queries)
    # the log: failed entries keep their keys (no matches_per_db where no matches were read)
    entries = {r.name: r.to_json() for r in result.records}
    assert list(entries["query/unknown.jpg"]) == [
        "estimator", "db", "num_matches", "num_correspondences", "num_inliers", "db_used", "reason",
        "unknown_db", "status", "time_s",
    ]  # fmt: skip
    assert entries["query/nomatch.jpg"]["missing_pairs"] == scene.db[2:]
    assert entries["query/nomatch.jpg"]["matches_per_db"] == {scene.db[0]: 0, scene.db[1]: 0}
    assert "qvec" not in entries["query/nomatch.jpg"] and "matches_per_db" not in entries["query/nokp.jpg"]

    fallback = loc.localize(source, cameras, pairs, features, matches_path, loc.LocalizeConfig(fallback="nearest"))
    assert fallback.record("query/nomatch.jpg").status == "fallback"
    assert fallback.record("query/nokp.jpg").fallback_db == scene.db[0]
    assert fallback.record("query/none.jpg").status == "failed"  # no db image to fall back to
    db_pose = source.db_pose(fallback.record("query/nokp.jpg").fallback_db)
    np.testing.assert_allclose(np.asarray(fallback.poses["query/nokp.jpg"].matrix()), np.asarray(db_pose.matrix()))
    entry = fallback.record("query/nokp.jpg").to_json()
    assert entry["status"] == "fallback" and entry["fallback_db"] == scene.db[0] and entry["num_inliers"] == 0
    np.testing.assert_allclose(entry["tvec"], qt_from_rigid(db_pose)[1])


def test_fallback_picks_db_image_with_most_matches() -> None:
    class Posed:
        def db_pose(self, name):
            return pycolmap.Rigid3d()

    assert loc._nearest_db({"a": 3, "b": 10, "c": 10}, ["a", "b", "c"], Posed()) == "b"
    assert loc._nearest_db({}, ["a", "b"], Posed()) == "a"


def test_cli(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "out" / "poses.txt"
    loc.main_cli(
        [
            "--reference-sfm",
            str(scene.model_dir),
            "--queries",
            str(scene.query_list),
            "--pairs",
            str(scene.pairs),
            "--features",
            str(scene.features),
            "--matches",
            str(scene.matches),
            "--results",
            str(results),
            "--estimator",
            "magsac",
            "--max-error",
            "8",
        ]
    )
    assert "localized 2 / 2" in capsys.readouterr().out
    log = json.loads((tmp_path / "out" / "poses_log.json").read_text())
    assert log["config"]["pose"]["max_error"] == 8.0 and log["config"]["pose"]["estimator"] == "magsac"
    with pytest.raises(UserError, match="no COLMAP model"):
        loc.main_cli(
            [
                "--reference-sfm",
                str(tmp_path),
                "--queries",
                str(scene.query_list),
                "--pairs",
                str(scene.pairs),
                "--features",
                str(scene.features),
                "--matches",
                str(scene.matches),
                "--results",
                str(results),
            ]
        )


def test_matches_without_3d_points_fail_with_reason(scene: Scene) -> None:
    class No3D(loc.ModelPoints):
        def keypoint_points(self, name):
            ids, xyz = super().keypoint_points(name)
            return np.full_like(ids, -1), np.full_like(xyz, np.nan)

    result = loc.localize(
        No3D(scene.model_dir),
        parse_query_list(scene.query_list),
        loc.parse_retrieval(scene.pairs),
        scene.features,
        scene.matches,
    )
    for record in result.records:
        assert record.status == "failed" and record.matches.num_matches > 0
        assert record.reason == "none of the matched db keypoints has a 3D point"
    assert result.poses == {}


def test_benchmark_flags_choose_the_dense_matching_of_both_steps():
    from localization import aachen
    from localization.benchmark import benchmark_config_from_args
    from pipeline.match_dense import LOCALIZATION_KLT_MAX_ERROR as KLT_MAX_ERROR
    from pipeline.refine import KLT_CELL_SIZE

    parser = aachen.build_parser()

    def dense(*flags: str):
        args = parser.parse_args(["--dataset", "d", "--outputs", "o", *flags])
        return benchmark_config_from_args(parser, args, aachen.AachenConfig()).localize.matching.dense_config()

    loftr = dense()
    assert (loftr.refine, loftr.cell_size, loftr.max_error) == ("klt", KLT_CELL_SIZE, KLT_MAX_ERROR)
    plain = dense("--refine", "none")
    assert (plain.refine, plain.cell_size, plain.max_error) == ("none", 8, 2.0)  # hloc's loftr_aachen grid
    assert dense("--matcher", "sift").refine == "none"
    # a ready matcher object: its name decides (a SIFT object under the default matcher name)
    assert loc.QueryMatchingConfig().dense_config("sift").refine == "none"


def test_benchmark_options_come_from_the_configs():
    """The Aachen CLI reads back every option into the config it mirrors; refine (matching) and the pose
    estimator's fields do not mix, and flags users type keep working."""
    from localization import aachen
    from localization.benchmark import benchmark_config_from_args

    parser = aachen.build_parser()
    flags = ["--dataset", "d", "--outputs", "o", "--matcher", "sift", "--refine", "none", "--estimator", "magsac"]
    flags += ["--max-error", "8", "--seed", "3", "--covisibility-clustering", "--fallback", "nearest"]
    flags += ["--pairs-query", "exhaustive", "--num-loc", "7", "--num-covis", "5", "--min-inliers", "9"]
    config = benchmark_config_from_args(parser, parser.parse_args(flags), aachen.AachenConfig())
    assert config == aachen.AachenConfig(
        localize=loc.LocalizeConfig(
            matching=loc.QueryMatchingConfig(matcher="sift", refine="none"),
            pose=PoseEstimationConfig(estimator="magsac", max_error=8.0, seed=3, min_inliers=9),
            covisibility_clustering=True,
            fallback="nearest",
        ),
        pairs_query="exhaustive",
        num_loc=7,
        num_covis=5,
    )
    args = parser.parse_args(["--dataset", "d", "--outputs", "o"])
    assert benchmark_config_from_args(parser, args, aachen.AachenConfig()) == aachen.AachenConfig()
