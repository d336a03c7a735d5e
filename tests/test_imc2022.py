"""IMC 2022 recipe: converter, Kaggle CSV schema, resume, time budget, errors, local score."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import UserError
from datasets.imc import (
    ScanNet2022Config,
    convert_scannet_2022,
    read_calibration_2022,
    read_scannet_pairs,
    read_test_2022,
    write_submission_2022,
)
from datasets.imc_metrics import fundamental_from_pose
from matchers.base import Matches
from recipes import imc2022

NUM_PAIRS = 3


@pytest.fixture(scope="module")
def imc2022_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ScanNet sample in the 2022 layout (images at 320 px), cut to a few pairs for speed."""
    from tests.conftest import data_path

    source = data_path("scannet_sample")
    output = tmp_path_factory.mktemp("imc2022")
    summary = convert_scannet_2022(source, output, ScanNet2022Config(max_size=320))
    assert summary == {"pairs": 15, "images": 30}
    lines = (output / "test.csv").read_text().splitlines()
    (output / "test.csv").write_text("\n".join(lines[: NUM_PAIRS + 1]) + "\n")
    return output


def test_converter_layout_and_ground_truth(imc2022_dir: Path, scannet_sample: Path) -> None:
    table = pd.read_csv(imc2022_dir / "test.csv")
    assert list(table.columns) == ["sample_id", "batch_id", "image_1_id", "image_2_id"]
    source_pairs = read_scannet_pairs(scannet_sample / "pairs_with_gt.txt")
    for row, (_name0, _name1, K0, _K1, T01) in zip(read_test_2022(imc2022_dir / "test.csv"), source_pairs):
        assert "-" not in row.image_1_id + row.image_2_id  # pair keys are 'id1-id2'
        for image_id in (row.image_1_id, row.image_2_id):
            with open(imc2022_dir / "test_images" / row.batch_id / f"{image_id}.png", "rb") as handle:
                assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        calibration = read_calibration_2022(imc2022_dir / "train" / row.batch_id / "calibration.csv")
        gt0, gt1 = calibration[row.image_1_id], calibration[row.image_2_id]
        # camera 0 at the origin, camera 1 at T_0to1; K follows the 1296 -> 320 px downscale
        np.testing.assert_allclose(gt0.R, np.eye(3))
        np.testing.assert_allclose(gt1.R, T01[:3, :3])
        np.testing.assert_allclose(gt1.T, T01[:3, 3])
        assert gt0.K[0, 0] == pytest.approx(K0[0, 0] * 320 / 1296, rel=1e-3)
        assert gt0.K[0, 2] == pytest.approx((K0[0, 2] + 0.5) * 320 / 1296 - 0.5, rel=1e-3)
    scales = pd.read_csv(imc2022_dir / "train" / "scaling_factors.csv")
    assert list(scales.columns) == ["scene", "scaling_factor"] and (scales.scaling_factor == 1.0).all()
    covisibility = pd.read_csv(imc2022_dir / "train" / row.batch_id / "pair_covisibility.csv")
    assert list(covisibility.columns) == ["pair", "covisibility", "fundamental_matrix"]


def gt_fundamentals(data: Path) -> list[tuple[str, np.ndarray]]:
    out = []
    for row in read_test_2022(data / "test.csv"):
        calibration = read_calibration_2022(data / "train" / row.batch_id / "calibration.csv")
        gt1 = calibration[row.image_2_id]  # camera 1 relative to camera 0 = its absolute pose here
        out.append((row.sample_id, fundamental_from_pose(calibration[row.image_1_id].K, gt1.K, gt1.R, gt1.T)))
    return out


def test_score_of_ground_truth_and_of_zeros(imc2022_dir: Path, tmp_path: Path) -> None:
    perfect = tmp_path / "perfect.csv"
    write_submission_2022(perfect, gt_fundamentals(imc2022_dir))
    score = imc2022.score_submission(perfect, imc2022_dir / "test.csv", imc2022_dir / "train")
    assert score.maa == pytest.approx(1.0) and len(score.per_scene) == NUM_PAIRS
    zeros = tmp_path / "zeros.csv"
    write_submission_2022(zeros, [(sid, np.zeros((3, 3))) for sid, _ in gt_fundamentals(imc2022_dir)])
    assert imc2022.score_submission(zeros, imc2022_dir / "test.csv", imc2022_dir / "train").maa == 0.0


def parse_submission(path: Path, data: Path) -> pd.DataFrame:
    """Parse back as Kaggle does and check the schema exactly."""
    table = pd.read_csv(path)
    assert list(table.columns) == ["sample_id", "fundamental_matrix"]
    assert table.sample_id.tolist() == pd.read_csv(data / "test.csv").sample_id.tolist()
    for value in table.fundamental_matrix:
        numbers = [float(v) for v in value.split(" ")]
        assert len(numbers) == 9 and np.all(np.isfinite(numbers))
    return table


def test_recipe_sift_resume_and_schema(imc2022_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "submission.csv"
    config = imc2022.IMC2022Config(matcher="sift", resize=(320,))
    first = imc2022.main(imc2022_dir, output, config, score=True, progress=False)
    assert (first.num_pairs, first.num_matched, first.num_reused) == (NUM_PAIRS, NUM_PAIRS, 0)
    table = parse_submission(output, imc2022_dir)
    assert 0.0 <= first.score.maa <= 1.0 and set(first.score.per_scene) == set(
        pd.read_csv(imc2022_dir / "test.csv").batch_id
    )
    second = imc2022.main(imc2022_dir, output, config, progress=False)
    assert (second.num_matched, second.num_reused) == (0, NUM_PAIRS)
    assert pd.read_csv(output).equals(table)
    # the results are kept under a digest of what decides them, OpenCV's SIFT included (the published figures')
    from matchers.factory import make_matcher

    matcher = make_matcher("sift", resize=320, sift_backend="opencv")
    payload = {
        "matcher": matcher.describe(),
        "tta": asdict(config.tta_config()),
        "fundamental": asdict(config.fundamental),
    }
    key = hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert [p.name for p in (tmp_path / "submission.csv.cache").iterdir()] == [key]


def test_prepared_images_are_kept_for_the_pairs_that_share_them(tmp_path: Path) -> None:
    import cv2

    from matchers.base import Matcher
    from pipeline.tta import TTAConfig

    class CountingMatcher(Matcher):
        def __init__(self) -> None:
            self.prepared: list[float] = []

        def prepare(self, image: np.ndarray) -> float:
            self.prepared.append(float(image.mean()))
            return self.prepared[-1]

        def match_prepared(self, prepared0: float, prepared1: float) -> Matches:
            return Matches.empty()

    paths = []
    for value in (10, 20, 30):
        paths.append(tmp_path / f"{value}.png")
        cv2.imwrite(str(paths[-1]), np.full((16, 16), value, np.uint8))
    matcher = CountingMatcher()
    images = imc2022.PreparedImages(matcher, TTAConfig(), capacity=2)
    for path, second in [(paths[0], False), (paths[1], True), (paths[0], False), (paths[1], True)]:
        images.get(path, second)
    assert len(matcher.prepared) == 2  # both reused
    images.get(paths[1], False)  # another side of an image is prepared apart, evicting the least recent
    images.get(paths[0], False)
    assert len(matcher.prepared) == 4
    images.get(paths[1], False)  # still kept: only two are
    assert len(matcher.prepared) == 4


def test_time_budget_writes_a_valid_csv_of_zeros(imc2022_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "submission.csv"
    result = imc2022.main(imc2022_dir, output, imc2022.IMC2022Config(matcher="sift"), time_budget=0.0, progress=False)
    assert (result.num_matched, result.num_skipped, result.num_zero) == (0, NUM_PAIRS, NUM_PAIRS)
    table = parse_submission(output, imc2022_dir)
    assert all(value.split(" ") == ["0.0"] * 9 for value in table.fundamental_matrix)


def test_estimate_fundamental_on_exact_correspondences() -> None:
    rng = np.random.default_rng(1)
    K = np.array([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]])
    angle = np.radians(10.0)
    R = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    t = np.array([-0.5, 0.05, 0.1])
    X = np.column_stack([rng.uniform(-1, 1, 200), rng.uniform(-1, 1, 200), rng.uniform(3, 6, 200)])
    x0 = (K @ X.T).T
    x1 = (K @ (X @ R.T + t).T).T
    matches = Matches(
        (x0[:, :2] / x0[:, 2:]).astype(np.float32), (x1[:, :2] / x1[:, 2:]).astype(np.float32), np.ones(200, np.float32)
    )
    result = imc2022.estimate_fundamental(matches)
    F_gt = fundamental_from_pose(K, K, R, t)
    F = result.F / np.linalg.norm(result.F) * np.sign(np.sum(result.F * F_gt))
    assert np.abs(F - F_gt).max() < 1e-3
    assert result.num_inliers > 190
    few = imc2022.estimate_fundamental(matches.subset(np.arange(7)))
    assert few.num_matches == 7 and not np.any(few.F)


def test_clear_errors(imc2022_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    (bad / "test_images").mkdir(parents=True)
    (bad / "test.csv").write_text("sample_id,batch_id,image_1_id\na,b,c\n")
    with pytest.raises(UserError, match=r"test\.csv: missing column\(s\) image_2_id"):
        imc2022.main(bad, tmp_path / "s.csv", imc2022.IMC2022Config(matcher="sift"), progress=False)
    (bad / "test.csv").write_text("sample_id,batch_id,image_1_id,image_2_id\na,b,c,d\n")
    with pytest.raises(UserError, match=r"row 2, column 'image_1_id': image .*b/c\.png not found"):
        imc2022.main(bad, tmp_path / "s.csv", imc2022.IMC2022Config(matcher="sift"), progress=False)
    submission = tmp_path / "gt.csv"
    write_submission_2022(submission, gt_fundamentals(imc2022_dir))
    with pytest.raises(UserError, match=r"scaling_factors\.csv: file not found"):
        imc2022.score_submission(submission, imc2022_dir / "test.csv", tmp_path)
    write_submission_2022(submission, gt_fundamentals(imc2022_dir)[1:])
    with pytest.raises(UserError, match=r"gt\.csv: no row for sample_id"):
        imc2022.score_submission(submission, imc2022_dir / "test.csv", imc2022_dir / "train")


def test_multi_resolution_and_rotation_options() -> None:
    single = imc2022.IMC2022Config(matcher="sift", resize=(320,))
    assert single.matcher_resize() == 320 and single.tta_config().resize == (None,)
    # several sizes: each view is resized by the recipe, the matcher takes it as given (0 = no resize)
    multi = imc2022.IMC2022Config(resize=(840, 1280), rotation="best")
    assert multi.matcher_resize() == 0 and multi.tta_config().resize == (840, 1280)
    assert multi.tta_config().rotations == (0, 1, 2, 3)
    with pytest.raises(UserError):
        imc2022.IMC2022Config(resize=(840, 840))
    with pytest.raises(UserError):
        imc2022.FundamentalOptions(method="nope")


def test_cli(imc2022_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "cli.csv"
    imc2022.main_cli(
        [
            "--data",
            str(imc2022_dir),
            "--output",
            str(output),
            "--matcher",
            "sift",
            "--resize",
            "240",
            "320",
            "--rotation",
            "best",
            "--ransac-threshold",
            "0.5",
            "--score",
        ]
    )
    printed = capsys.readouterr().out
    assert f"wrote {output}: {NUM_PAIRS} pairs ({NUM_PAIRS} matched" in printed and "mAA (IMC 2022" in printed
    parse_submission(output, imc2022_dir)
    with open(output, newline="") as handle:
        assert next(csv.reader(handle)) == ["sample_id", "fundamental_matrix"]


def test_converter_cli(scannet_sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datasets import imc

    imc.main_cli(["scannet2022", "--source", str(scannet_sample), "--output", str(tmp_path), "--max-size", "64"])
    assert "wrote 15 pairs (30 images)" in capsys.readouterr().out
    assert len(read_test_2022(tmp_path / "test.csv")) == 15
    with pytest.raises(UserError, match="pairs_with_gt.txt: file not found"):
        imc.main_cli(["scannet2022", "--source", str(tmp_path), "--output", str(tmp_path / "x")])


def test_cli_options_build_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = []

    def fake_main(data, output, config, **kwargs):
        seen.append(config)
        return imc2022.RunResult(Path(output), 0, 0, 0, 0, 0, 0.0)

    monkeypatch.setattr(imc2022, "main", fake_main)
    base = ["--data", str(tmp_path)]
    imc2022.main_cli(base)
    imc2022.main_cli(
        [*base, "--matcher", "sift", "--resize", "840", "1280", "--both-directions", "--min-matches", "12"]
    )
    imc2022.main_cli([*base, "--ransac-min-matches", "12", "--ransac-method", "usac_accurate", "--device", "cuda:1"])
    default, sift, ransac = seen
    assert default == imc2022.IMC2022Config()
    assert sift == imc2022.IMC2022Config(
        matcher="sift", resize=(840, 1280), both_directions=True, fundamental=imc2022.FundamentalOptions(min_matches=12)
    )
    assert ransac.fundamental == imc2022.FundamentalOptions(method="usac_accurate", min_matches=12)
    assert ransac.device == "cuda:1"
    with pytest.raises(UserError, match="rotation must be one of none, best, union"):
        imc2022.main_cli([*base, "--rotation", "auto"])
