"""Pairs strategies against hand-computed expectations, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pycolmap
import pytest

from core import io
from core.errors import UserError
from pipeline import pairs
from tests.conftest import PROJECT_ROOT


def test_exhaustive_lists_each_unordered_pair_once():
    assert pairs.exhaustive(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_sequential_window_and_loop_closure():
    names = [f"{i:02d}" for i in range(10)]
    plain = pairs.sequential(names, window=2)
    assert plain[:3] == [("00", "01"), ("00", "02"), ("01", "02")]
    assert len(plain) == 2 * 10 - 3  # the last image has no successor, the one before only one
    closed = set(pairs.sequential(names, window=2, loop_closure=True))
    # Gaps 4 and 8 beyond the window: 0-4, 0-8, 1-5, 1-9, ...
    assert {("00", "04"), ("00", "08"), ("01", "09")} <= closed
    assert ("00", "03") not in closed


def _write_global(path, descriptors):
    with h5py.File(path, "w") as file:
        for name, vector in descriptors.items():
            file.create_group(name).create_dataset("global_descriptor", data=np.asarray(vector, np.float32))


def test_retrieval_top_k_by_cosine_excludes_self(tmp_path):
    path = tmp_path / "global.h5"
    _write_global(path, {"a": [1, 0, 0], "b": [0.9, 0.1, 0], "c": [0, 1, 0], "d": [0.1, 1, 0]})
    result = pairs.from_retrieval(path, None, None, num_matched=1)
    assert result == [("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")]
    queries = pairs.from_retrieval(path, ["a"], ["c", "d"], num_matched=2)
    assert queries == [("a", "d"), ("a", "c")]


def _model_with_points() -> pycolmap.Reconstruction:
    """Three cameras on the x axis looking along +z; image 1 shares 5 points with 2 and 2 with 3."""
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(
        pycolmap.Camera(model="SIMPLE_PINHOLE", width=100, height=100, params=[100, 50, 50], camera_id=1)
    )
    for image_id, x in ((1, 0.0), (2, 1.0), (3, 10.0)):
        image = pycolmap.Image(name=f"im{image_id}.png", camera_id=1, image_id=image_id)
        image.points2D = pycolmap.Point2DList([pycolmap.Point2D(np.array([50.0, 50.0])) for _ in range(8)])
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.array([[-x], [0.0], [0.0]]))
        reconstruction.add_image_with_trivial_frame(image, pose)
    shared = [(2, k) for k in range(5)] + [(3, k) for k in range(5, 7)]
    for other, k in shared:
        track = pycolmap.Track()
        track.add_element(1, k)
        track.add_element(other, k)
        reconstruction.add_point3D(np.array([0.0, 0.0, 5.0]), track)
    return reconstruction


def test_covisibility_ranks_by_shared_points():
    result = pairs.covisibility(_model_with_points(), num_matched=2)
    assert result[:2] == [("im1.png", "im2.png"), ("im1.png", "im3.png")]
    assert ("im2.png", "im1.png") in result and ("im2.png", "im3.png") not in result


def test_covisibility_unique_lists_each_unordered_pair_once_as_localization_needs():
    model = _model_with_points()
    assert pairs.covisibility(model, num_matched=2, unique=True) == [("im1.png", "im2.png"), ("im1.png", "im3.png")]
    # each image's best partner, each unordered pair once: im1-im2 (im1 and im2 agree), im3-im1
    assert pairs.covisibility(model, 1, unique=True) == [("im1.png", "im2.png"), ("im1.png", "im3.png")]


def test_one_sequential_window_and_retrieval_does_not_import_pairs_back():
    assert pairs.PairsConfig().window == 5  # pipeline.pairs and pipeline.reconstruct alike
    names = [f"{i:02d}" for i in range(8)]
    assert pairs.sequential(names) == pairs.make_pairs(
        names, pairs.PairsConfig("sequential"), PROJECT_ROOT, PROJECT_ROOT
    )
    with pytest.raises(UserError, match="window"):
        pairs.PairsConfig("sequential", window=0)
    code = "import sys, pipeline.retrieval; assert 'pipeline.pairs' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT).returncode == 0


def test_from_poses_nearest_within_angle():
    reconstruction = _model_with_points()
    result = pairs.from_poses(reconstruction, num_matched=1, rotation_threshold=10)
    assert result == [("im1.png", "im2.png"), ("im2.png", "im1.png"), ("im3.png", "im2.png")]


def test_from_poses_on_temple_ring_ground_truth(temple_ring):
    from core.par_files import read_par_file
    from datasets.middlebury import gt_reconstruction

    cameras = read_par_file(temple_ring / "templeR_par.txt")
    result = pairs.from_poses(gt_reconstruction(cameras, (640, 480)), num_matched=2, rotation_threshold=30)
    names = list(cameras)
    # On a ring, the nearest cameras of an interior view are its two neighbours in capture order.
    partners = {b for a, b in result if a == names[10]}
    assert partners == {names[9], names[11]}


def test_cli_writes_hloc_pairs_and_rejects_bad_input(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        (images / name).write_bytes(b"x")
    (images / "notes.txt").write_text("not an image")
    output = tmp_path / "pairs.txt"
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.pairs", "--images", str(images), "--output", str(output)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert io.read_pairs(output) == [("a.png", "b.jpg"), ("a.png", "sub/c.png"), ("b.jpg", "sub/c.png")]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.pairs",
            "--method",
            "covisibility",
            "--model",
            str(tmp_path),
            "--output",
            str(output),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def _look_at(centre, direction):
    """cam_from_world (3, 4) of a camera at ``centre`` whose optical axis (z) points along ``direction``."""
    z = np.asarray(direction, float) / np.linalg.norm(direction)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    camera_to_world = np.stack([x, np.cross(z, x), z], axis=1)  # columns: camera axes in the world
    rotation = camera_to_world.T
    return np.concatenate([rotation, -rotation @ np.asarray(centre, float)[:, None]], axis=1)


def test_from_poses_with_synthetic_poses():
    # a: origin, looking +z. b: 1 m right, same direction. c: 0.5 m away but looking along +x (90 deg).
    # d: 5 m right, turned 20 deg. e: 3 m away, turned 40 deg (beyond a 30 deg threshold from a).
    turned = lambda degrees: [np.sin(np.radians(degrees)), 0.0, np.cos(np.radians(degrees))]  # noqa: E731
    poses = {
        "a": _look_at([0, 0, 0], [0, 0, 1]),
        "b": _look_at([1, 0, 0], [0, 0, 1]),
        "c": _look_at([0, 0.5, 0], [1, 0, 0]),
        "d": np.vstack([_look_at([5, 0, 0], turned(20)), [0, 0, 0, 1]]),  # (4, 4) accepted too
        "e": _look_at([0, 3, 0], turned(40)),
    }
    result = pairs.from_poses(poses, num_matched=2, rotation_threshold=30)
    partners = {name: [b for a, b in result if a == name] for name in poses}
    assert partners["a"] == ["b", "d"]  # c is closer but looks elsewhere; e is turned 40 deg
    assert partners["b"] == ["a", "d"]
    assert partners["c"] == []  # the others look 50 to 90 deg away from +x
    assert partners["d"] == ["b", "a"]  # 20 deg from a, b and e; distances 4, 5 and sqrt(34)
    assert partners["e"] == ["d"]  # 40 deg from a and b, 50 from c, 20 from d
    with pytest.raises(UserError, match="shape"):
        pairs.from_poses({"a": np.eye(3), "b": np.eye(3)}, num_matched=1)
