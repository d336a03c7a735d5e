"""Mapping with staged self-calibration and geometry refinement (pipeline.mapping)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest

from datasets.synthetic import SceneConfig, render_scene, write_scene
from pipeline import reconstruct
from pipeline.evaluate_model import evaluate
from pipeline.mapping import MappingConfig, camera_problem, refine_geometry
from pipeline.match_dense import MatcherSpec


@pytest.fixture(scope="module")
def sift_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    scene = render_scene(SceneConfig(num_views=10, seed=3))
    root = tmp_path_factory.mktemp("mapping")
    images = write_scene(scene, root / "scene") / "images"
    result = reconstruct.main(images, root / "out", config=reconstruct.ReconstructConfig(matcher=MatcherSpec("sift")))
    return {"scene": scene, "result": result, "outputs": root / "out"}


def test_camera_problem_flags_implausible_parameters():
    camera = pycolmap.Camera.create_from_model_name(1, "SIMPLE_RADIAL", 800.0, 640, 480)
    assert camera_problem(camera, 0.5) is None
    camera.params = [800.0, 320.0, 240.0, -4.2]  # the diverged telephoto camera of the issue
    assert "distortion" in camera_problem(camera, 0.5)
    camera.params = [31000.0, 320.0, 240.0, 0.0]  # 48x the image size
    assert "focal length" in camera_problem(camera, 0.5)


def test_staged_calibration_is_reported_and_registers_every_image(sift_run: dict):
    summary = sift_run["result"].summary
    assert summary["registered"] == 10
    mapping = summary["mapping"]
    assert mapping["attempts"][0] == {"calibration": "staged", "distortion_held": True, "registered": 10, "models": 1}
    assert mapping["calibration"][0].startswith("distortion held at zero during incremental mapping")
    # one shared camera seen by 10 images: its distortion is refined in the geometry refinement, and stays small
    assert any("distortion refined" in line for line in mapping["calibration"])
    (camera,) = mapping["cameras"]
    assert abs(camera["params"][3]) < 0.05 and camera["registered_images"] == 10
    truth_focal = sift_run["scene"].K[0][0, 0]
    assert abs(camera["params"][0] / truth_focal - 1) < 0.02
    accuracy = evaluate(sift_run["result"].reconstruction, sift_run["scene"].cameras())
    assert accuracy.median_rotation_error < 0.3, accuracy.describe()


def test_bundle_adjustment_lowers_the_reprojection_error_of_a_perturbed_model(sift_run: dict):
    model = pycolmap.Reconstruction(str(sift_run["outputs"] / "sfm"))
    before = model.compute_mean_reprojection_error()
    rng = np.random.default_rng(0)
    for _, point in model.points3D.items():
        point.xyz = point.xyz + rng.normal(0, 0.02, 3)  # ~2-4 px in the images
    model.update_point_3d_errors()
    perturbed = model.compute_mean_reprojection_error()
    assert perturbed > 2 * before
    calibration: list[str] = []
    # Filters far above the errors: only the adjustment can lower them.
    rounds = refine_geometry(
        sift_run["outputs"] / "database.db",
        model,
        MappingConfig(refine_iterations=1, filter_errors=(100.0,)),
        calibration,
    )
    assert rounds[0]["mean_reprojection_error"] == pytest.approx(perturbed, rel=1e-3)
    assert rounds[-1]["mean_reprojection_error"] < 1.2 * before < perturbed
    assert rounds[-1]["registered"] == rounds[0]["registered"]


def test_a_scene_whose_pairs_all_fail_is_one_error_line_with_the_pairs_in_the_summary(tmp_path: Path):
    import json
    import subprocess
    import sys

    import cv2

    images = tmp_path / "noise"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):  # unrelated random textures: nothing to verify
        cv2.imwrite(str(images / f"{index}.png"), (rng.random((120, 160)) * 255).astype(np.uint8))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.reconstruct",
            "--images",
            str(images),
            "--outputs",
            str(tmp_path / "out"),
            "--matcher",
            "sift",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no model could be reconstructed" in errors[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["registered"] == 0
    assert set(summary["unregistered_images"]) == {f"{i}.png" for i in range(4)}
    assert all(counts["verified"] == 0 for counts in summary["unregistered_images"].values())


def _telephoto_database(root: Path, seed: int = 1, views: int = 24, points: int = 2000, cell: float = 8.0) -> Path:
    """A database as dense matching makes it on a telephoto ring (focal 5x the width): the true projections of
    points on an object, each snapped to its 8 px coarse cell, matched between views up to 3 apart."""
    from core import io
    from datasets.synthetic import ring_cameras
    from pipeline.colmap_db import build_database

    config = SceneConfig.preset("object_tele", num_views=views)
    K, poses = ring_cameras(config)
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(points, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    world = normals * np.array([1.2, 1.2, 2.5]) + [0, 0, 0.5]
    (root / "images").mkdir(parents=True)
    features, seen = {}, {}
    for index in range(views):
        R, t = poses[index][:3, :3], poses[index][:3, 3]
        centre = -R.T @ t
        rays = (centre - world) / np.linalg.norm(centre - world, axis=1, keepdims=True)
        pixels = (world @ R.T + t) @ K[index].T
        pixels = pixels[:, :2] / pixels[:, 2:]
        visible = (np.einsum("ij,ij->i", normals, rays) > 0.2) & np.all(
            (pixels > 0) & (pixels < [config.width - 1, config.height - 1]), axis=1
        )
        ids = np.nonzero(visible)[0]
        name = f"view_{index:03d}.png"
        (root / "images" / name).write_bytes(b"")  # the database reads sizes from features.h5
        features[name] = (np.round(pixels[ids] / cell) * cell, np.ones(len(ids)), (config.width, config.height))
        seen[name] = {int(point): row for row, point in enumerate(ids)}
    names = sorted(features)
    pairs, matches = [], {}
    for index in range(views):
        for step in (1, 2, 3):
            a, b = names[index], names[(index + step) % views]
            common = sorted(set(seen[a]) & set(seen[b]))
            matches0 = np.full(len(features[a][0]), -1, np.int32)
            matches0[[seen[a][p] for p in common]] = [seen[b][p] for p in common]
            matches[(a, b)] = (matches0, np.ones(len(matches0), np.float32))
            pairs.append((a, b))
    io.write_features(root / "features.h5", features)
    io.write_matches(root / "matches.h5", matches)
    build_database(
        root / "database.db",
        root / "images",
        names,
        pairs,
        root / "features.h5",
        root / "matches.h5",
        camera_mode="single",
    )
    return root / "database.db"


def test_staged_calibration_registers_the_telephoto_ring_on_which_colmaps_distortion_diverges(tmp_path: Path):
    from pipeline.mapping import run_mapping

    database = _telephoto_database(tmp_path)
    colmap = run_mapping(
        database, tmp_path / "images", tmp_path / "colmap", MappingConfig(calibration="colmap", refine_iterations=0), 24
    )
    # COLMAP's options: the shared camera's distortion runs past COLMAP's bogus bound (|k| > 1) and mapping stops.
    assert colmap.reconstruction.num_reg_images() < 20
    assert camera_problem(colmap.reconstruction.cameras[1], 1.0) is not None
    staged = run_mapping(database, tmp_path / "images", tmp_path / "staged", MappingConfig(), 24)
    assert staged.reconstruction.num_reg_images() == 24 and staged.attempts[0]["distortion_held"]
    camera = staged.reconstruction.cameras[1]
    assert camera_problem(camera, 0.5) is None
    assert abs(camera.params[0] / 3200.0 - 1) < 0.1  # focal 5x the width, from coarse (8 px) keypoints
