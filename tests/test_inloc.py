"""InLoc: XYZcut interpolation, alignment files, query camera, mini-InLoc end to end (SIFT and LoFTR)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import UserError
from core.poses import read_poses
from datasets import mini_inloc
from localization import inloc
from localization.benchmark import benchmark_config_from_args
from localization.evaluate import INLOC_THRESHOLDS, evaluate
from localization.localize import LocalizeConfig, QueryMatchingConfig


def sift(**fields) -> inloc.InLocConfig:
    """The InLoc options with SIFT matching and ``fields`` replaced."""
    return inloc.InLocConfig(localize=LocalizeConfig(matching=QueryMatchingConfig(matcher="sift")), **fields)


# ------------------------------------------------------------------------------------ interpolation
def reference_interpolation(xyz: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hloc's recipe with torch.grid_sample (align_corners=True): bilinear, nearest where NaN."""
    import torch

    height, width = xyz.shape[:2]
    grid = torch.from_numpy(keypoints / np.array([width - 1, height - 1]) * 2 - 1)[None, None]
    scan = torch.from_numpy(xyz).permute(2, 0, 1)[None]
    bilinear = torch.nn.functional.grid_sample(scan, grid, mode="bilinear", align_corners=True)[0, :, 0]
    nearest = torch.nn.functional.grid_sample(scan, grid, mode="nearest", align_corners=True)[0, :, 0]
    out = torch.where(torch.isnan(bilinear), nearest, bilinear)
    return out.T.numpy(), ~torch.isnan(out).any(0).numpy()


def test_interpolation_matches_hloc_grid_sample() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(30, 40, 3))
    xyz[rng.random((30, 40)) < 0.1] = np.nan  # holes
    xyz[5:8, 10:14] = np.nan  # a block hole: bilinear and nearest both fail inside
    keypoints = np.c_[rng.uniform(0.01, 38.99, 500), rng.uniform(0.01, 28.99, 500)]
    keypoints = np.r_[keypoints, [[11.6, 6.4], [12.0, 6.0]]]  # inside the block
    ours, valid = inloc.interpolate_xyz(xyz, keypoints)
    expected, expected_valid = reference_interpolation(xyz, keypoints)
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_allclose(ours[valid], expected[valid], atol=1e-12)
    assert not valid[-2:].any() and valid.mean() > 0.7
    # exact on an affine field (bilinear reproduces it), and nearest next to a hole
    ys, xs = np.mgrid[0:30, 0:40].astype(np.float64)
    field = np.stack([2 * xs + 1, -ys, xs + ys], axis=2)
    points, ok = inloc.interpolate_xyz(field, np.array([[3.25, 7.5], [39.0, 29.0]]))
    np.testing.assert_allclose(points, [[7.5, -7.5, 10.75], [79.0, -29.0, 68.0]])
    field[7, 4] = np.nan
    points, ok = inloc.interpolate_xyz(field, np.array([[3.25, 7.5], [60.0, 3.0]]))
    np.testing.assert_allclose(points[0], field[8, 3])  # rint(7.5) = 8, rint(3.25) = 3
    assert ok.tolist() == [True, False]  # outside the map


def test_alignment_file_round_trip_and_hloc_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p_after, p_before = np.eye(4), np.eye(4)
    p_after[:3, :] = rng.normal(size=(3, 4))
    p_before[:3, 3] = [1, 2, 3]
    path = tmp_path / "database/alignments/DUC1/transformations/DUC_trans_024.txt"
    inloc.write_alignment(path, p_after, p_before)
    np.testing.assert_allclose(inloc.read_alignment(path), p_after, atol=1e-11)
    lines = path.read_text().splitlines()  # hloc reads rows 7..10 (0-based) with np.fromstring
    hloc_style = np.array([[float(v) for v in lines[i].split()] for i in range(7, 11)])
    np.testing.assert_allclose(hloc_style, p_after, atol=1e-11)
    assert inloc.alignment_path(tmp_path, "database/cutouts/DUC1/024/DUC_cutout_024_30_0.jpg") == path
    path.write_text("\n".join(lines[:9]))
    with pytest.raises(UserError, match="lines 8-11"):
        inloc.read_alignment(path)


def test_query_camera() -> None:
    camera = inloc.query_camera(4032, 3024)
    np.testing.assert_allclose(camera.params, [4032 * 28 / 36, 2016, 1512])
    small = inloc.query_camera(1008, 756)
    np.testing.assert_allclose(small.params, [1008 * 28 / 36, 504, 378])  # same field of view


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini_inloc")
    config = mini_inloc.MiniInLocConfig(
        num_scans=6,
        cutouts_per_scan=2,
        num_queries=3,
        width=240,
        height=180,
        query_width=240,
        query_height=180,
        yaw_step_degrees=25.0,
    )
    mini_inloc.main(root, config)
    return root


def test_scan_points_are_true_world_points(mini: Path, tmp_path: Path) -> None:
    """3D from XYZcut + alignment reprojects onto the keypoint in the cutout's true camera."""
    from core.io import write_features
    from core.poses import camera_center

    description = json.loads((mini / "mini_inloc.json").read_text())
    K = np.array(description["cutout_intrinsics_K"])
    poses = read_poses(mini / "database_poses.txt")
    name = description["cutouts"][0]
    rng = np.random.default_rng(2)
    keypoints = np.c_[rng.uniform(0, 239, 400), rng.uniform(0, 179, 400)]
    write_features(tmp_path / "f.h5", {name: (keypoints, np.ones(400), (240, 180))})
    source = inloc.ScanPoints(mini, tmp_path / "f.h5")
    ids, world = source.keypoint_points(name)
    valid = ids >= 0
    assert valid.mean() > 0.5 and np.isnan(world[~valid]).all()
    pose = poses[name]
    cam = world[valid] @ np.asarray(pose.rotation.matrix()).T + np.asarray(pose.translation)
    pixels = cam @ K.T
    error = np.linalg.norm(pixels[:, :2] / pixels[:, 2:] - keypoints[valid], axis=1)
    assert np.median(error) < 0.05 and np.mean(error < 0.5) > 0.9  # only depth edges deviate
    assert np.all(np.linalg.norm(world[valid] - camera_center(pose), axis=1) < 30)
    assert len(set(ids[valid])) == valid.sum()


@pytest.mark.parametrize("estimator", ["pycolmap", "magsac"])
def test_mini_inloc_end_to_end_with_sift(mini: Path, tmp_path: Path, estimator: str) -> None:
    out = inloc.main_cli(
        [
            "--dataset",
            str(mini),
            "--outputs",
            str(tmp_path),
            "--matcher",
            "sift",
            "--pairs-query",
            "exhaustive",
            "--estimator",
            estimator,
        ]
    )
    lines = out.submission.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        parts = line.split()
        assert len(parts) == 8 and parts[0].startswith("IMG_") and parts[0].endswith(".JPG")
        q = np.array([float(v) for v in parts[1:5]])
        assert abs(np.linalg.norm(q) - 1) < 1e-9 and np.all(np.isfinite([float(v) for v in parts[5:]]))
    evaluation = evaluate(read_poses(mini / "ground_truth.txt"), read_poses(out.submission), INLOC_THRESHOLDS)
    assert evaluation.recall[0] == 100.0, evaluation.table()
    submitted = read_poses(out.submission)  # the submission round-trips to the estimated poses
    for name, pose in out.result.poses.items():
        np.testing.assert_allclose(
            np.asarray(submitted[name.split("/")[-1]].matrix()), np.asarray(pose.matrix()), atol=1e-12
        )
    log = json.loads(out.log.read_text())
    assert log["summary"]["localized"] == 3
    assert log["config"]["pose"]["max_error"] == pytest.approx(48 * 240 / 4032)  # hloc's 48 px at 4032 px


def test_blank_query_fails_cleanly(mini: Path, tmp_path: Path) -> None:
    import shutil

    import cv2

    dataset = tmp_path / "data"
    shutil.copytree(mini, dataset)
    cv2.imwrite(str(dataset / "query/iphone7/IMG_0099.JPG"), np.full((180, 240, 3), 128, np.uint8))
    out = inloc.main(dataset, tmp_path / "out", sift(pairs_query="exhaustive"))
    record = out.result.record("query/iphone7/IMG_0099.JPG")
    assert record.status == "failed" and record.reason
    assert out.result.count("localized") == 3
    assert "IMG_0099.JPG" not in out.submission.read_text()


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="InLoc layout"):
        inloc.main(tmp_path, tmp_path / "out", sift())
    (tmp_path / "query/iphone7").mkdir(parents=True)
    (tmp_path / "database/cutouts").mkdir(parents=True)
    (tmp_path / "database/alignments").mkdir(parents=True)
    with pytest.raises(UserError, match="no query images"):
        inloc.main(tmp_path, tmp_path / "out", sift())


def test_loftr_random_weights_end_to_end(tmp_path: Path) -> None:
    """The LoFTR path on a tiny mini-InLoc with random weights: valid files; failures are logged."""
    import torch

    from matchers.factory import make_matcher
    from matchers.loftr import LoFTR, LoFTRConfig, save_checkpoint

    dataset = tmp_path / "data"
    mini_inloc.main(
        dataset,
        mini_inloc.MiniInLocConfig(
            num_scans=2, cutouts_per_scan=1, num_queries=2, width=96, height=72, query_width=96, query_height=72
        ),
    )
    torch.manual_seed(0)
    weights = save_checkpoint(LoFTR(LoFTRConfig.preset("outdoor_ds")), tmp_path / "random.ckpt")
    # default threshold through the CLI: random weights give (almost) no confident match -> clean failures
    out = inloc.main_cli(
        [
            "--dataset",
            str(dataset),
            "--outputs",
            str(tmp_path / "cli"),
            "--weights",
            str(weights),
            "--resize",
            "96",
            "--device",
            "cpu",
            "--pairs-query",
            "exhaustive",
        ]
    )
    assert out.submission.is_file() and out.poses.is_file()
    log = json.loads(out.log.read_text())
    assert log["matching"]["matcher"] == "loftr" and log["summary"]["queries"] == 2
    for entry in log["queries"].values():
        assert entry["status"] in ("localized", "failed") and (entry["status"] == "localized" or entry["reason"])
    # threshold 0: every mutual-best cell matches, so the random model's matches reach localization
    matcher = make_matcher("loftr", weights=str(weights), resize=96, device="cpu", match_threshold=0.0)
    out = inloc.main(dataset, tmp_path / "api", inloc.InLocConfig(pairs_query="exhaustive"), matcher)
    assert all(record.matches.num_matches > 0 for record in out.result.records)
    assert len(read_poses(out.submission)) == out.result.count("localized")


def test_given_pairs_file(mini: Path, tmp_path: Path) -> None:
    description = json.loads((mini / "mini_inloc.json").read_text())
    query, cutouts = description["queries"][0], description["cutouts"]
    pairs = tmp_path / "pairs-query-netvlad40.txt"
    pairs.write_text("".join(f"{query} {c}\n" for c in cutouts[:4]))
    out = inloc.main(mini, tmp_path / "out", sift(pairs_query=pairs))
    # the API's default threshold is the CLI's: hloc's 48 px at 4032 px, scaled to the queries
    assert json.loads(out.log.read_text())["config"]["pose"]["max_error"] == pytest.approx(48 * 240 / 4032)
    assert {r.name for r in out.result.records} == set(description["queries"])  # unpaired: failed, not dropped
    assert out.result.record(description["queries"][1]).reason == "no db images listed for the query"
    pairs.write_text(f"{query} database/cutouts/DUC1/000/missing.jpg\n")
    with pytest.raises(UserError, match="not a cutout"):
        inloc.main(mini, tmp_path / "out", sift(pairs_query=pairs))
    pairs.write_text(f"IMG_0001.JPG {cutouts[0]}\n")
    with pytest.raises(UserError, match="relative to the dataset"):
        inloc.main(mini, tmp_path / "out", sift(pairs_query=pairs))


def test_loftr_weights_default_to_indoor_in_the_config(mini: Path, tmp_path: Path, monkeypatch) -> None:
    """InLoc's LoFTR gets the indoor weights from its config (API and CLI alike); SIFT gets none; given
    weights win; an explicit --max-error is used as is."""
    from matchers import factory

    asked = []

    def no_matcher(name, weights=None, **options):
        asked.append((name, weights))
        raise UserError("no matcher in this test")

    monkeypatch.setattr(factory, "make_matcher", no_matcher)
    for run in (
        lambda: inloc.main(mini, tmp_path / "a"),
        lambda: inloc.main_cli(["--dataset", str(mini), "--outputs", str(tmp_path / "b")]),
        lambda: inloc.main(mini, tmp_path / "c", sift()),
        lambda: inloc.main_cli(["--dataset", str(mini), "--outputs", str(tmp_path / "d"), "--weights", "x.ckpt"]),
    ):
        with pytest.raises(UserError, match="no matcher"):
            run()
    assert asked == [("loftr", "indoor"), ("loftr", "indoor"), ("sift", None), ("loftr", "x.ckpt")]
    parser = inloc.build_parser()
    args = parser.parse_args(["--dataset", "d", "--outputs", "o", "--max-error", "5"])
    config = benchmark_config_from_args(parser, args, inloc.InLocConfig())
    cameras = {"q": inloc.query_camera(240, 180)}
    assert inloc.InLocAdapter(mini, config).localize_config(config, cameras).pose.max_error == 5.0
    default = inloc.InLocConfig()
    assert inloc.InLocAdapter(mini, default).localize_config(default, cameras).pose.max_error == pytest.approx(
        48 * 240 / 4032
    )


def test_mini_inloc_cli_options() -> None:
    """--scans / --queries (the config's num_scans / num_queries) and --width / --height size the queries too."""
    from core.cli import config_from_args

    parser = mini_inloc.build_parser()
    args = parser.parse_args(["--output", "x", "--scans", "2", "--num-queries", "1", "--width", "96", "--height", "72"])
    config = config_from_args(args, mini_inloc.MiniInLocConfig)
    assert (config.num_scans, config.num_queries, config.query_size) == (2, 1, (96, 72))
    args = parser.parse_args(["--output", "x", "--query-width", "128", "--query-height", "96"])
    config = config_from_args(args, mini_inloc.MiniInLocConfig)
    assert config.query_size == (128, 96) and config == mini_inloc.MiniInLocConfig(query_width=128, query_height=96)
