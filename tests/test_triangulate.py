"""Middlebury GT cameras -> reference model -> triangulation with known-pose verification."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from core import io
from core.errors import UserError
from core.image_io import read_gray
from core.par_files import read_par_file
from datasets.middlebury import gt_reconstruction, load
from matchers.sift import SIFTMatcher, match_descriptors
from pipeline import triangulate

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SUBSET = [f"templeR{i:04d}.png" for i in range(13, 19)]  # consecutive on the ring
# templeRing README: the tight bounding box of the model
BBOX = (np.array([-0.023121, -0.038009, -0.091940]), np.array([0.078626, 0.121636, -0.017395]))


def test_par_file_projects_the_temple_into_every_view(temple_ring: Path) -> None:
    cameras = read_par_file(temple_ring / "templeR_par.txt")
    assert len(cameras) == 47
    corners = np.array(list(itertools.product(*zip(*BBOX))))
    for camera in cameras.values():
        assert np.allclose(camera.projection, camera.K @ np.hstack([camera.R, camera.t[:, None]]))
        pixels = camera.project(corners)
        depth = corners @ camera.R.T + camera.t
        assert (depth[:, 2] > 0).all()
        # the whole object is in the 640x480 image
        assert (pixels[:, 0] > 0).all() and (pixels[:, 0] < 640).all()
        assert (pixels[:, 1] > 0).all() and (pixels[:, 1] < 480).all()


def test_gt_reconstruction_matches_the_par_file(temple_ring: Path) -> None:
    cameras, reconstruction = load(temple_ring / "templeR_par.txt", temple_ring / "images")
    assert reconstruction.num_reg_images() == 47 and reconstruction.num_cameras() == 1
    point = np.array([0.03, 0.04, -0.05])
    for name in ("templeR0001.png", "templeR0030.png"):
        image = reconstruction.find_image_with_name(name)
        camera = reconstruction.cameras[image.camera_id]
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        colmap_pixel = camera.img_from_cam(pose * point)
        # COLMAP puts pixel centres at +0.5 of the par file's convention
        assert np.allclose(colmap_pixel, cameras[name].project(point[None])[0] + 0.5, atol=1e-6)


def _write_sift_files(temple_ring: Path, folder: Path, outliers_per_pair: int = 30) -> dict:
    """SIFT keypoints and mutual-NN matches of SUBSET in hloc files, plus random (wrong) matches."""
    matcher = SIFTMatcher()
    features = {n: matcher.prepare(read_gray(temple_ring / "images" / n)) for n in SUBSET}
    io.write_features(folder / "features.h5", {n: (f.keypoints, f.scores, f.image_size) for n, f in features.items()})
    pairs = list(itertools.combinations(SUBSET, 2))
    io.write_pairs(folder / "pairs.txt", pairs)
    rng = np.random.default_rng(0)
    matches, injected = {}, {}
    for a, b in pairs:
        index0, index1, scores = match_descriptors(features[a].descriptors, features[b].descriptors)
        matches0 = np.full(len(features[a].keypoints), -1, np.int32)
        matches0[index0] = index1
        free = np.flatnonzero(matches0 < 0)
        wrong0 = rng.choice(free, outliers_per_pair, replace=False)
        wrong1 = rng.integers(0, len(features[b].keypoints), outliers_per_pair)
        matches0[wrong0] = wrong1
        matches[(a, b)] = (matches0, np.ones(len(matches0), np.float32))
        injected[(a, b)] = set(zip(wrong0.tolist(), wrong1.tolist()))
    io.write_matches(folder / "matches.h5", matches)
    return {"features": features, "injected": injected}


def _sampson(F: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    h0 = np.concatenate([x0, np.ones((len(x0), 1))], 1)
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    Fx0, Ftx1 = h0 @ F.T, h1 @ F
    numerator = np.einsum("ij,ij->i", h1, Fx0) ** 2
    return np.sqrt(numerator / (Fx0[:, 0] ** 2 + Fx0[:, 1] ** 2 + Ftx1[:, 0] ** 2 + Ftx1[:, 1] ** 2))


def test_triangulation_into_gt_cameras(temple_ring: Path, tmp_path: Path) -> None:
    data = _write_sift_files(temple_ring, tmp_path)
    cameras, reference = load(temple_ring / "templeR_par.txt", temple_ring / "images")
    reconstruction, stats = triangulate.main(
        reference,
        temple_ring / "images",
        tmp_path / "pairs.txt",
        tmp_path / "features.h5",
        tmp_path / "matches.h5",
        tmp_path / "sfm",
        triangulate.TriangulationConfig(verification="known", max_error=4.0),
    )
    # poses are unchanged and points reproject well
    for name in SUBSET:
        image = reconstruction.find_image_with_name(name)
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        assert np.allclose(np.asarray(pose.matrix())[:, :3], cameras[name].R, atol=1e-9)
    assert stats.num_points > 300 and stats.mean_track_length > 2.5
    assert stats.mean_reprojection_error < 0.6
    assert (tmp_path / "sfm" / "points3D.bin").is_file() and (tmp_path / "sfm" / "database.db").is_file()

    # Verified matches agree with the GT epipolar geometry (computed here independently from K, R, t);
    # the injected random matches are rejected.
    ids = {reconstruction.images[i].name: i for i in reconstruction.images}
    kept_outliers = total_outliers = 0
    with pycolmap.Database.open(str(tmp_path / "sfm" / "database.db")) as db:
        for (a, b), wrong in data["injected"].items():
            geometry = db.read_two_view_geometry(ids[a], ids[b])
            inliers = np.asarray(geometry.inlier_matches)
            if ids[a] > ids[b]:
                inliers = inliers[:, ::-1]
            ca, cb = cameras[a], cameras[b]
            R = cb.R @ ca.R.T
            t = cb.t - R @ ca.t
            E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ R
            F = np.linalg.inv(cb.K).T @ E @ np.linalg.inv(ca.K)
            x0 = data["features"][a].keypoints[inliers[:, 0]]
            x1 = data["features"][b].keypoints[inliers[:, 1]]
            assert np.all(_sampson(F, x0, x1) < 4.0 * 1.05), (a, b)
            kept_outliers += len(wrong & set(map(tuple, inliers.tolist())))
            total_outliers += len(wrong)
    assert kept_outliers <= 0.1 * total_outliers


def test_unknown_image_in_pairs(temple_ring: Path, tmp_path: Path) -> None:
    cameras = read_par_file(temple_ring / "templeR_par.txt")
    reference = gt_reconstruction({n: cameras[n] for n in SUBSET[:3]}, (640, 480))
    io.write_pairs(tmp_path / "pairs.txt", [(SUBSET[0], SUBSET[4])])
    with pytest.raises(UserError, match="not in the reference model"):
        triangulate.main(
            reference,
            temple_ring / "images",
            tmp_path / "pairs.txt",
            tmp_path / "f.h5",
            tmp_path / "m.h5",
            tmp_path / "out",
        )


def test_cli_end_to_end(temple_ring: Path, tmp_path: Path) -> None:
    _write_sift_files(temple_ring, tmp_path, outliers_per_pair=0)
    gt_dir = tmp_path / "gt"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "datasets.middlebury",
            "--par",
            str(temple_ring / "templeR_par.txt"),
            "--images",
            str(temple_ring / "images"),
            "--output",
            str(gt_dir),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert pycolmap.Reconstruction(str(gt_dir)).num_reg_images() == 47
    command = [
        sys.executable,
        "-m",
        "pipeline.triangulate",
        "--reference",
        str(gt_dir),
        "--images",
        str(temple_ring / "images"),
        "--pairs",
        str(tmp_path / "pairs.txt"),
        "--features",
        str(tmp_path / "features.h5"),
        "--matches",
        str(tmp_path / "matches.h5"),
        "--outputs",
        str(tmp_path / "tri"),
    ]
    run = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "num_points" in run.stdout
    assert pycolmap.Reconstruction(str(tmp_path / "tri")).num_points3D() > 300
    # bad input: a reference folder without a model -> one line, exit code 2
    run = subprocess.run(command[:4] + [str(tmp_path)] + command[5:], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "no COLMAP model" in run.stderr
