"""End-to-end reconstruction: temple_ring subset and a synthetic scene against ground truth, output
formats (read as hloc and COLMAP read them), resuming, and bad input through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest

from core.errors import UserError
from core.io import names_to_pair, read_pairs
from core.par_files import read_par_file
from datasets.synthetic import SceneConfig, render_scene, write_scene
from pipeline import reconstruct
from pipeline.evaluate_model import evaluate
from pipeline.match_dense import MatcherSpec
from pipeline.pairs import PairsConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# 12 views in a row on the ring (the file numbering jumps around the ring elsewhere)
TEMPLE_SUBSET = [f"templeR{i:04d}.png" for i in range(13, 25)]
SIFT = reconstruct.ReconstructConfig(matcher=MatcherSpec("sift"))


def _copy_images(source: Path, names: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def temple_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.conftest import data_path

    temple = data_path("temple_ring")
    root = tmp_path_factory.mktemp("temple")
    images = _copy_images(temple / "images", TEMPLE_SUBSET, root / "images")
    outputs = root / "out"
    start = time.perf_counter()
    result = reconstruct.main(images, outputs, SIFT)
    return {
        "result": result,
        "images": images,
        "outputs": outputs,
        "seconds": time.perf_counter() - start,
        "gt": read_par_file(temple / "templeR_par.txt"),
    }


def test_temple_subset_is_accurate(temple_run: dict) -> None:
    result = temple_run["result"]
    assert result.summary["registered"] == len(TEMPLE_SUBSET) == result.summary["total"]
    gt = {name: temple_run["gt"][name] for name in TEMPLE_SUBSET}
    accuracy = evaluate(result.reconstruction, gt)
    assert accuracy.num_registered == 12
    assert accuracy.median_rotation_error < 1.5, accuracy.describe()
    assert accuracy.median_center_error_relative < 0.02, accuracy.describe()
    assert temple_run["seconds"] < 90


def test_outputs_follow_hloc_and_colmap_formats(temple_run: dict) -> None:
    out = temple_run["outputs"]
    pairs = read_pairs(out / "pairs.txt")
    assert len(pairs) == 66 and {n for p in pairs for n in p} == set(TEMPLE_SUBSET)
    # features.h5 / matches.h5 opened with plain h5py, the way hloc reads them
    with h5py.File(out / "features.h5", "r") as features, h5py.File(out / "matches.h5", "r") as matches:
        name0, name1 = pairs[0]
        keypoints0 = features[name0]["keypoints"].__array__()
        assert keypoints0.dtype == np.float32 and keypoints0.shape[1] == 2
        assert tuple(features[name0]["image_size"].__array__()) == (640, 480)
        matches0 = matches[names_to_pair(name0, name1)]["matches0"].__array__()
        assert matches0.dtype == np.int32 and len(matches0) == len(keypoints0)
        assert matches0.max() < len(features[name1]["keypoints"])
    # the COLMAP model: binary and text, readable by pycolmap; points.ply has one vertex per point
    sfm = out / "sfm"
    for stem in ("cameras", "images", "points3D"):
        assert (sfm / f"{stem}.bin").is_file() and (sfm / f"{stem}.txt").is_file()
    model = pycolmap.Reconstruction(str(sfm))
    assert model.num_reg_images() == 12
    header = (out / "points.ply").read_bytes()[:300].decode("ascii", "replace")
    assert header.startswith("ply") and f"element vertex {model.num_points3D()}" in header
    summary = json.loads((out / "summary.json").read_text())
    assert summary["registered"] == 12 and summary["total"] == 12
    assert summary["points"] == model.num_points3D() > 500
    assert 2.0 < summary["mean_track_length"] and 0.0 < summary["mean_reprojection_error"] < 1.0
    assert summary["matcher"] == "sift" and summary["weights"] is None
    assert set(summary["timings"]) >= {"check_images", "pairs", "matching", "database", "mapping", "total"}
    peaks = summary["peak_rss_mb"]  # high-water marks: they never fall from one step to the next
    steps = ["check_images", "pairs", "matching", "database", "mapping", "outputs"]
    assert [peaks[s] for s in steps] == sorted(peaks[s] for s in steps) and peaks["check_images"] > 50
    assert summary["matching"]["peak_rss_mb"]["sift"]["shared_keypoints"] <= peaks["matching"]
    png = (out / "reconstruction.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    viewer = (out / "reconstruction.html").read_text()  # the interactive viewer, self-contained
    assert 'data-cameras="12"' in viewer


def test_database_keypoints_use_colmap_origin(temple_run: dict) -> None:
    out = temple_run["outputs"]
    with pycolmap.Database.open(str(out / "database.db")) as db, h5py.File(out / "features.h5", "r") as features:
        cameras = db.read_all_cameras()
        # auto mode: same size, no EXIF -> one shared camera with COLMAP's default focal 1.2 * max(W, H)
        assert len(cameras) == 1
        assert cameras[0].model_name == "SIMPLE_RADIAL" and not cameras[0].has_prior_focal_length
        assert cameras[0].params[0] == pytest.approx(1.2 * 640)
        for image in db.read_all_images()[:3]:
            stored = db.read_keypoints(image.image_id)[:, :2]
            assert np.allclose(stored, features[image.name]["keypoints"].__array__() + 0.5)


def test_rerun_resumes_without_recomputing(temple_run: dict) -> None:
    images, out = temple_run["images"], temple_run["outputs"]
    first_database = temple_run["result"].summary["database"]
    before = (out / "sfm" / "points3D.bin").stat().st_mtime_ns
    start = time.perf_counter()
    again = reconstruct.main(images, out, SIFT)
    assert time.perf_counter() - start < 0.5 * temple_run["seconds"]
    assert again.summary["matching"]["up_to_date"] and again.summary["resumed_model"]
    assert (out / "sfm" / "points3D.bin").stat().st_mtime_ns == before
    assert again.summary["registered"] == 12
    # A run interrupted during mapping (no summary yet): matches and the verified database are reused.
    (out / "summary.json").unlink()
    third = reconstruct.main(images, out, SIFT)
    assert third.summary["matching"]["up_to_date"] and third.summary["matching"]["pairs_matched"] == 0
    assert third.summary["reused_database"] and not third.summary["resumed_model"]
    assert third.summary["registered"] == 12
    # Interrupted during verification (no database stamp): the database is rebuilt from the matches.
    (out / "summary.json").unlink()
    (out / "database.json").unlink()
    fourth = reconstruct.main(images, out, SIFT)
    assert not fourth.summary["reused_database"] and fourth.summary["matching"]["pairs_matched"] == 0
    rebuilt = fourth.summary["database"]
    for key in ("num_images", "num_keypoints", "num_matched_pairs", "num_matches"):
        assert rebuilt[key] == first_database[key]
    assert rebuilt["num_inlier_matches"] == pytest.approx(first_database["num_inlier_matches"], rel=0.02)
    assert fourth.summary["registered"] == 12


def test_synthetic_scene_with_junk_files(tmp_path: Path) -> None:
    scene = render_scene(SceneConfig(num_views=12, seed=0))
    folder = write_scene(scene, tmp_path / "scene")
    images = folder / "images"
    (images / "notes.txt").write_text("junk")
    (images / "broken.png").write_bytes(b"")
    result = reconstruct.main(images, tmp_path / "out", SIFT)
    assert set(result.summary["skipped_images"]) == {"notes.txt", "broken.png"}
    assert result.summary["total"] == 12 and result.summary["registered"] >= 11
    accuracy = evaluate(result.reconstruction, scene.cameras())
    assert accuracy.median_rotation_error < 0.5, accuracy.describe()
    assert accuracy.median_center_error_relative < 0.01, accuracy.describe()


def test_damaged_hdf5_is_a_clear_error(tmp_path: Path) -> None:
    scene = render_scene(SceneConfig(width=96, height=72, num_views=2, num_boxes=2))
    images = write_scene(scene, tmp_path / "scene") / "images"
    out = tmp_path / "out"
    out.mkdir()
    (out / "matches.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)  # an HDF5 signature, then nothing
    with pytest.raises(UserError, match=r"matches\.h5: damaged HDF5 file.*delete it"):
        reconstruct.main(images, out, SIFT)


def test_config_validation() -> None:
    with pytest.raises(UserError, match="pairs method"):
        PairsConfig(method="random")
    with pytest.raises(UserError, match="needs a model"):
        reconstruct.ReconstructConfig(pairs=PairsConfig(method="covisibility"))
    with pytest.raises(UserError, match="camera mode"):
        reconstruct.ReconstructConfig(camera_mode="rig")
    with pytest.raises(UserError, match="resize"):
        MatcherSpec(resize=(-5,))
    with pytest.raises(UserError, match="dense_defaults"):  # sizes given twice must agree
        reconstruct.ReconstructConfig(
            matcher=MatcherSpec(resize=(640, 840)), dense=reconstruct.dense_defaults("loftr", (640,))
        )


def test_cli_builds_the_steps_configs() -> None:
    """Every option lands in the step config that owns it; --num-pairs is the window or the top-k."""
    parser = reconstruct.build_parser()
    images = ["--images", "i", "--outputs", "o"]
    config = reconstruct.config_from_args(parser, parser.parse_args(images))
    assert config == reconstruct.ReconstructConfig()
    assert reconstruct.dense_config(config, "loftr").refine == "tracks"
    assert reconstruct.verification_options(config).required_inliers == 15  # the ensemble: SIFT gates
    flags = ["--matcher", "loftr", "--pairs", "sequential", "--num-pairs", "3", "--loop-closure", "--cell-size", "4"]
    flags += ["--min-num-inliers", "20", "--refine-iterations", "1", "--verbose", "--camera-mode", "single"]
    config = reconstruct.config_from_args(parser, parser.parse_args([*images, *flags]))
    assert config.pairs == PairsConfig("sequential", window=3, loop_closure=True)
    assert config.dense is not None and (config.dense.cell_size, config.dense.max_error) == (4, 2.0)
    assert config.verification.min_num_inliers == 20 and config.verification.max_error == 4.0
    assert reconstruct.mapping_options(config).min_num_matches == 20
    assert (config.mapping.refine_iterations, config.mapping.verbose, config.camera_mode) == (1, True, "single")
    loftr = reconstruct.config_from_args(parser, parser.parse_args([*images, "--matcher", "loftr"]))
    assert reconstruct.verification_options(loftr).required_inliers == reconstruct.DENSE_MIN_INLIERS
    assert (
        reconstruct.config_from_args(parser, parser.parse_args([*images, "--pairs", "retrieval"])).pairs.num_matched
        == 20
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.reconstruct", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    return errors[0]


def test_cli_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _one_error_line(_cli("--images", str(empty), "--outputs", str(tmp_path / "o1")))
    assert "not found" in _one_error_line(_cli("--images", str(tmp_path / "nope"), "--outputs", str(tmp_path / "o2")))

    scene = render_scene(SceneConfig(width=96, height=72, num_views=3, num_boxes=2))
    images = write_scene(scene, tmp_path / "scene") / "images"
    line = _one_error_line(
        _cli("--images", str(images), "--outputs", str(tmp_path / "o3"), "--matcher", "sift", "--resize", "-5")
    )
    assert "resize" in line
    line = _one_error_line(
        _cli("--images", str(images), "--outputs", str(tmp_path / "o5"), "--matcher", "sift", "--amp", "bf16")
    )
    assert "--amp" in line and "loftr" in line
    # LoFTR whose weights cannot be had: the loader's message, no silent switch to another matcher
    line = _one_error_line(
        _cli("--images", str(images), "--outputs", str(tmp_path / "o4"), "--weights", str(tmp_path / "missing.ckpt"))
    )
    assert "missing.ckpt" in line
    assert not (tmp_path / "o4" / "features.h5").exists()


def test_cli_runs_loftr_end_to_end(tmp_path: Path) -> None:
    """LoFTR path through the whole CLI with random weights on small images: it runs, writes valid
    files, and — as random weights give no consistent geometry — ends with a clear one-line error."""
    torch = pytest.importorskip("torch")
    from matchers.loftr import LoFTR, LoFTRConfig
    from matchers.loftr.weights import save_checkpoint

    torch.manual_seed(0)
    weights = save_checkpoint(LoFTR(LoFTRConfig.preset("outdoor_ds")), tmp_path / "random.ckpt")
    scene = render_scene(SceneConfig(width=96, height=72, num_views=3, num_boxes=2))
    images = write_scene(scene, tmp_path / "scene") / "images"
    out = tmp_path / "out"
    run = _cli(
        "--images",
        str(images),
        "--outputs",
        str(out),
        "--weights",
        str(weights),
        "--device",
        "cpu",
        "--resize",
        "96",
        "--amp",
        "bf16",
        "--matcher",
        "loftr",
    )  # bf16 autocast runs on the CPU too
    if run.returncode == 0:  # random weights can, rarely, still give a model
        summary = json.loads((out / "summary.json").read_text())
    else:
        assert "no model could be reconstructed" in _one_error_line(run)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["registered"] == 0
    assert summary["matcher"] == "loftr" and str(weights) in str(summary["weights"])
    with h5py.File(out / "features.h5", "r") as features, h5py.File(out / "matches.h5", "r") as matches:
        assert set(features) == {name for name in scene.names}
        assert len(matches) >= 1


def test_cli_defaults_ensemble_with_exact_tracks_are_recorded_and_can_be_switched_off(tmp_path: Path) -> None:
    """With the shipped loftr-compact: the default matcher is the loftr+sift ensemble whose dense part uses
    rotation auto and exact tracks (pipeline.tracks); an upright scene gets no turned pair; the flags give back
    LoFTR alone with per-pair KLT on the 4 px / 0.5 px grid, or no refinement at all."""
    pytest.importorskip("torch")
    scene = render_scene(SceneConfig(width=160, height=120, num_views=4, num_boxes=3))
    images = write_scene(scene, tmp_path / "scene") / "images"
    expected = {
        (): ("loftr+sift", {"rotation": "auto", "refine": "tracks", "pairs_turned": 0}),
        ("--matcher", "loftr", "--refine", "klt"): (
            "loftr",
            {"rotation": "auto", "refine": "klt", "cell_size": 4, "max_error": 0.5, "pairs_turned": 0},
        ),
        ("--matcher", "loftr", "--rotation", "none", "--refine", "none"): (
            "loftr",
            {"rotation": "none", "refine": "none", "cell_size": 8, "max_error": 2.0, "pairs_turned": 0},
        ),
    }
    for index, (flags, (matcher, figures)) in enumerate(expected.items()):
        out = tmp_path / f"out{index}"
        run = _cli(
            "--images", str(images), "--outputs", str(out), "--weights", "loftr-compact", "--device", "cpu", *flags
        )
        summary = json.loads((out / "summary.json").read_text())
        assert summary["matcher"] == matcher, run.stderr[-2000:]
        assert {key: summary["matching"][key] for key in figures} == figures, run.stderr[-2000:]
        assert summary["matching"]["turned_pairs"] == []
        assert (summary["matching"]["tracks"] is not None) == (figures["refine"] == "tracks")
        assert (summary["matching"]["ensemble"] is not None) == (matcher == "loftr+sift")
        if matcher == "loftr+sift":
            assert summary["matching"]["ensemble"]["keypoints"]["sift"] > 0
        with h5py.File(out / "features.h5", "r") as features:
            assert set(features) == set(scene.names)
    line = _one_error_line(_cli("--images", str(images), "--outputs", str(tmp_path / "bad"), "--max-error", "0"))
    assert "--max-error" in line
