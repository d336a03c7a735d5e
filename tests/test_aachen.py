"""Mini-Aachen from temple_ring and the Aachen pipeline (SIFT both estimators, LoFTR random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from core.cameras import parse_query_list
from core.errors import UserError
from core.poses import camera_center, read_poses
from datasets import mini_aachen
from localization import aachen
from localization.evaluate import AACHEN_THRESHOLDS, evaluate
from localization.localize import LocalizeConfig, QueryMatchingConfig
from pipeline.pairs import covisibility


def sift(**fields) -> aachen.AachenConfig:
    """The Aachen options with SIFT matching and ``fields`` replaced."""
    return aachen.AachenConfig(localize=LocalizeConfig(matching=QueryMatchingConfig(matcher="sift")), **fields)


SUBSET = (18, 30)  # 12 consecutive views ~8 degrees apart; queries 20, 24, 28 (db on both sides), 9 db
SIZE = 320


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import data_path

    root = tmp_path_factory.mktemp("mini_aachen")
    config = mini_aachen.MiniAachenConfig(max_size=SIZE, subset=SUBSET, query_offset=2)
    mini_aachen.main(data_path("temple_ring"), root, config)
    return root


def test_converter_layout_scale_and_model(mini: Path, temple_ring: Path) -> None:
    from core.par_files import read_par_file

    description = json.loads((mini / "mini_aachen.json").read_text())
    par = read_par_file(temple_ring / "templeR_par.txt")
    names = list(par)[SUBSET[0] : SUBSET[1]]
    assert description["queries"] == [f"query/day/temple/{n}" for n in names[2::4]]
    assert len(description["db"]) == 9 and all(d.startswith("db/") for d in description["db"])
    for name in description["queries"] + description["db"]:
        assert (mini / "images_upright" / name).is_file()
    # ground truth: the par-file poses with positions scaled by 40 (rotations unchanged)
    gt = read_poses(mini / "ground_truth.txt")
    for name in description["queries"]:
        source = par[name.split("/")[-1]]
        np.testing.assert_allclose(np.asarray(gt[name].rotation.matrix()), source.R, atol=1e-12)
        np.testing.assert_allclose(camera_center(gt[name]), 40.0 * source.center, atol=1e-9)
    # query intrinsics: K of the 640x480 original scaled by 1/2 (COLMAP pixels: fx/2, cx_colmap/2)
    cameras = parse_query_list(mini / "queries/day_time_queries_with_intrinsics.txt")
    K = par[names[0]].K
    np.testing.assert_allclose(
        cameras[description["queries"][0]].params, [K[0, 0] / 2, K[1, 1] / 2, (K[0, 2] + 0.5) / 2, (K[1, 2] + 0.5) / 2]
    )
    assert (cameras[description["queries"][0]].width, cameras[description["queries"][0]].height) == (320, 240)
    # the SIFT reference model: db images only, GT poses, points that reproject well
    model = pycolmap.Reconstruction(str(mini / "3D-models/aachen_v_1_1"))
    assert sorted(image.name for image in model.images.values()) == sorted(description["db"])
    assert model.num_points3D() > 300 and model.compute_mean_reprojection_error() < 1.0
    for image in model.images.values():
        source = par[image.name.split("/")[-1]]
        np.testing.assert_allclose(camera_center(image.cam_from_world()), 40.0 * source.center, atol=1e-9)


@pytest.mark.parametrize("estimator", ["pycolmap", "magsac"])
def test_mini_aachen_sift_pipeline(mini: Path, tmp_path_factory: pytest.TempPathFactory, estimator: str) -> None:
    outputs = tmp_path_factory.getbasetemp() / "aachen_sift"  # shared: the second estimator reuses matching
    out = aachen.main_cli(
        [
            "--dataset",
            str(mini),
            "--outputs",
            str(outputs),
            "--matcher",
            "sift",
            "--pairs-query",
            "exhaustive",
            "--estimator",
            estimator,
            "--gt",
            str(mini / "ground_truth.txt"),
        ]
    )
    gt = read_poses(mini / "ground_truth.txt")
    evaluation = evaluate(gt, read_poses(out.submission), AACHEN_THRESHOLDS)
    assert evaluation.recall[0] >= 90.0, evaluation.table()  # (0.25 m, 2 deg) in scene metres
    # --gt: the same evaluation of the run's poses, at Aachen's thresholds, also written as JSON
    assert out.evaluation.recall == evaluation.recall and out.evaluation.thresholds == list(AACHEN_THRESHOLDS)
    assert json.loads(out.evaluation_file.read_text())["recall_percent"] == pytest.approx(evaluation.recall)
    assert out.evaluation_file.name == f"evaluation-sift-{estimator}.json"
    submitted = read_poses(out.submission)
    assert sorted(submitted) == sorted(n.split("/")[-1] for n in gt)
    for name, pose in out.result.poses.items():  # submission lines round-trip to the estimates
        np.testing.assert_allclose(
            np.asarray(submitted[name.split("/")[-1]].matrix()), np.asarray(pose.matrix()), atol=1e-12
        )
    log = json.loads(out.log.read_text())
    assert log["config"]["pose"]["estimator"] == estimator and log["summary"]["localized"] == 3
    assert log["reference_points3D"] > 100
    reference = pycolmap.Reconstruction(str(out.reference_sfm))  # dense-feature triangulation, SIFT poses
    sift = pycolmap.Reconstruction(str(mini / "3D-models/aachen_v_1_1"))
    for image in reference.images.values():
        other = sift.find_image_with_name(image.name)
        np.testing.assert_allclose(
            np.asarray(image.cam_from_world().matrix()), np.asarray(other.cam_from_world().matrix()), atol=1e-9
        )


def test_given_pairs_file_and_errors(mini: Path, tmp_path: Path) -> None:
    description = json.loads((mini / "mini_aachen.json").read_text())
    pairs = tmp_path / "pairs-query-netvlad3.txt"
    pairs.write_text("".join(f"{q} {d}\n" for q in description["queries"] for d in description["db"][:3]))
    out = aachen.main(mini, tmp_path / "out", sift(pairs_query=pairs))
    assert out.query_pairs.read_text() == pairs.read_text()
    assert {r.name for r in out.result.records} == set(description["queries"])
    pairs.write_text(f"{description['queries'][0]} db/nope.png\n")
    with pytest.raises(UserError, match="not in the reference model"):
        aachen.main(mini, tmp_path / "out", sift(pairs_query=pairs))
    with pytest.raises(UserError, match="Aachen v1.1 layout"):
        aachen.main(tmp_path, tmp_path / "out2", sift())
    with pytest.raises(UserError, match="Aachen v1.1 layout"):
        aachen.main(tmp_path / "missing", tmp_path / "out2", sift())


def test_loftr_random_weights_end_to_end(temple_ring: Path, tmp_path: Path) -> None:
    """The LoFTR path with random weights on 5 views at 96-128 px: every file is written and valid;
    whatever fails (random matches) is logged with a reason."""
    import torch

    from matchers.factory import make_matcher
    from matchers.loftr import LoFTR, LoFTRConfig, save_checkpoint

    dataset = tmp_path / "data"
    mini_aachen.main(temple_ring, dataset, mini_aachen.MiniAachenConfig(max_size=128, subset=(20, 25), query_every=3))
    torch.manual_seed(0)
    weights = save_checkpoint(LoFTR(LoFTRConfig.preset("outdoor_ds")), tmp_path / "random.ckpt")
    matcher = make_matcher("loftr", weights=str(weights), resize=96, device="cpu", match_threshold=0.0)
    out = aachen.main(dataset, tmp_path / "out", aachen.AachenConfig(pairs_query="exhaustive"), matcher)
    for path in (
        out.db_pairs,
        out.features,
        out.db_matches,
        out.query_features,
        out.query_matches,
        out.poses,
        out.submission,
        out.log,
    ):
        assert path.is_file(), path
    log = json.loads(out.log.read_text())
    assert log["matching"]["matcher"] == "loftr" and log["summary"]["queries"] == 2
    for entry in log["queries"].values():
        assert entry["num_matches"] > 0
        assert entry["status"] == "localized" or (entry["status"] == "failed" and entry["reason"])
    assert len(read_poses(out.submission)) == out.result.count("localized")
    # the CLI with the default threshold: random weights -> few or no matches, still a clean run
    cli = aachen.main_cli(
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
    assert cli.submission.is_file() and json.loads(cli.log.read_text())["summary"]["queries"] == 2


def test_query_pairs_from_retrieval_by_default(mini: Path, tmp_path: Path) -> None:
    """Without --pairs-query, each query is paired with db images found by the weight-free retrieval."""
    out = aachen.main(mini, tmp_path / "out", sift(num_loc=3))
    assert "retrieval" in out.query_pairs.name
    pairs = [line.split() for line in out.query_pairs.read_text().splitlines()]
    queries = {q for q, _ in pairs}
    assert queries and all(q.startswith("query/") and d.startswith("db/") for q, d in pairs)
    assert all(sum(1 for q2, _ in pairs if q2 == q) <= 3 for q in queries)
    assert read_poses(out.submission)  # localized with those pairs


def test_covisibility_pairs_against_brute_force(mini: Path) -> None:
    model = pycolmap.Reconstruction(str(mini / "3D-models/aachen_v_1_1"))
    observed = {i: {p.point3D_id for p in image.points2D if p.has_point3D()} for i, image in model.images.items()}
    for k in (1, 3):
        expected = set()
        for i in observed:  # the k images sharing most points (ties: lower image id first)
            ranked = sorted(
                (j for j in observed if j != i and observed[i] & observed[j]),
                key=lambda j: (-len(observed[i] & observed[j]), j),
            )[:k]
            for j in ranked:
                a, b = model.images[i].name, model.images[j].name
                expected.add((min(a, b), max(a, b)))
        assert set(covisibility(model, k, unique=True)) == expected


def test_mini_aachen_cli_options() -> None:
    """--subset keeps its START:STOP spelling; the other options come from MiniAachenConfig."""
    from core.cli import config_from_args

    parser = mini_aachen.build_parser()
    args = parser.parse_args(["--source", "s", "--output", "o", "--subset", "18:30", "--max-size", "320"])
    config = config_from_args(args, mini_aachen.MiniAachenConfig)
    assert config == mini_aachen.MiniAachenConfig(subset=(18, 30), max_size=320)
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "s", "--output", "o", "--subset", "18"])
