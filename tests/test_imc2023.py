"""IMC 2023/2024 recipe: converter, Kaggle CSV schema, scene listing, local score, end to end with SIFT."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.cli import config_from_options
from core.errors import UserError
from core.par_files import read_par_file
from datasets.imc import (
    Middlebury2023Config,
    convert_temple_2023,
    list_scenes_2023,
    read_labels_2023,
    write_submission_2023,
)
from pipeline.match_dense import MatcherSpec
from recipes import imc2023

SUBMISSION_COLUMNS = ["image_path", "dataset", "scene", "rotation_matrix", "translation_vector"]


@pytest.fixture(scope="module")
def temple_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Views 13-20 of the temple ring (a gap-free stretch, neighbours 7.7 degrees apart), 480 px."""
    from tests.conftest import data_path

    output = tmp_path_factory.mktemp("imc2023")
    assert convert_temple_2023(
        data_path("temple_ring"), output, Middlebury2023Config(start=12, limit=8, max_size=480)
    ) == {"images": 8}
    return output


def test_converter_layout_and_labels(temple_small: Path, temple_ring: Path) -> None:
    labels = pd.read_csv(temple_small / "train" / "train_labels.csv")
    assert list(labels.columns) == ["dataset", "scene", "image_path", "rotation_matrix", "translation_vector"]
    assert set(labels.dataset) == {"middlebury"} and set(labels.scene) == {"temple_ring"}
    gt = read_par_file(temple_ring / "templeR_par.txt")
    parsed = read_labels_2023(temple_small / "train" / "train_labels.csv")[("middlebury", "temple_ring")]
    for image_path, (R, t) in parsed.items():
        assert (temple_small / "train" / image_path).is_file()
        camera = gt[Path(image_path).name]
        np.testing.assert_allclose(R, camera.R)
        np.testing.assert_allclose(t, camera.t)
    assert [Path(p).name for p in parsed] == [f"templeR{i:04d}.png" for i in range(13, 21)]


def test_list_scenes_train_and_test_splits(temple_small: Path, tmp_path: Path) -> None:
    split, scenes = list_scenes_2023(temple_small)
    assert split == "train" and len(scenes) == 1
    scene = scenes[0]
    assert scene.image_dir == temple_small / "train" / "middlebury" / "temple_ring" / "images"
    assert (
        scene.names[0] == "templeR0013.png" and scene.image_paths[0] == "middlebury/temple_ring/images/templeR0013.png"
    )
    # a Kaggle-style test folder: sample_submission.csv + test/<dataset>/<scene>/images
    test_dir = tmp_path / "kaggle"
    images = test_dir / "test" / "d" / "s" / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes((scene.image_dir / scene.names[0]).read_bytes())
    (test_dir / "sample_submission.csv").write_text(
        "image_path,dataset,scene,rotation_matrix,translation_vector\nd/s/images/a.png,d,s,0;0;0;0;0;0;0;0;0,0;0;0\n"
    )
    split, scenes = list_scenes_2023(test_dir)
    assert split == "test" and scenes[0].image_dir == images and scenes[0].names == ("a.png",)
    (test_dir / "sample_submission.csv").write_text("image_path,dataset,scene\nd/s/images/b.png,d,s\n")
    with pytest.raises(UserError, match=r"row 2, column 'image_path': image 'd/s/images/b.png' not found"):
        list_scenes_2023(test_dir)
    (test_dir / "sample_submission.csv").write_text("image_path,dataset,scene\nd/s/images/a.png,..,s\n")
    with pytest.raises(UserError, match=r"row 2, column 'dataset': '\.\.' is not a plain name"):
        list_scenes_2023(test_dir)
    (test_dir / "sample_submission.csv").write_text("image,dataset,scene\nd/s/images/a.png,d,s\n")
    with pytest.raises(UserError, match=r"sample_submission\.csv: missing column\(s\) image_path"):
        list_scenes_2023(test_dir)


def test_submission_schema_and_score(temple_small: Path, tmp_path: Path) -> None:
    labels = read_labels_2023(temple_small / "train" / "train_labels.csv")
    gt = labels[("middlebury", "temple_ring")]
    names = list(gt)
    # perfect poses for all but the last image, which is unregistered
    rows = [(p, "middlebury", "temple_ring", gt[p] if p != names[-1] else None) for p in names]
    output = tmp_path / "submission.csv"
    write_submission_2023(output, rows)
    table = pd.read_csv(output)
    assert list(table.columns) == SUBMISSION_COLUMNS and table.image_path.tolist() == names
    for R, t in zip(table.rotation_matrix[:-1], table.translation_vector[:-1]):
        assert len(R.split(";")) == 9 and len(t.split(";")) == 3
    assert table.rotation_matrix.iloc[-1] == ";".join(["nan"] * 9)
    assert table.translation_vector.iloc[-1] == "nan;nan;nan"
    score = imc2023.score_submission(output, temple_small / "train" / "train_labels.csv")
    # 8 images: 28 pairs, the 7 involving the unregistered image fail at every threshold
    assert score.maa == pytest.approx(21 / 28)
    assert score.per_dataset == {"middlebury": pytest.approx(21 / 28)}
    write_submission_2023(output, rows[1:])
    with pytest.raises(UserError, match=r"no row for image 'middlebury/temple_ring/images/templeR0013.png'"):
        imc2023.score_submission(output, temple_small / "train" / "train_labels.csv")


def test_recipe_end_to_end_with_sift(temple_small: Path, tmp_path: Path) -> None:
    output = tmp_path / "submission.csv"
    # one mapper thread: multi-threaded bundle adjustment is not reproducible, and this short stretch of
    # the ring is fragile enough that a different rounding can stall the mapper at 4 images
    config = imc2023.IMC2023Config(matcher=MatcherSpec("sift"), camera_mode="single", num_threads=1)
    result = imc2023.main(temple_small, output, config, score=True, progress=False)
    (scene,) = result.scenes
    assert scene.status == "reconstructed" and scene.registered == 8
    table = pd.read_csv(output)
    assert list(table.columns) == SUBMISSION_COLUMNS and len(table) == 8
    registered = [not math.isnan(float(r.split(";")[0])) for r in table.rotation_matrix]
    assert sum(registered) == scene.registered
    assert result.score.maa >= 0.8
    # resume: the scene's poses come from the cache, the CSV is identical
    again = imc2023.main(temple_small, output, config, score=True, progress=False)
    assert again.scenes[0].reused and again.score.maa == result.score.maa
    assert pd.read_csv(output).equals(table)


def test_time_budget_writes_nan_rows(temple_small: Path, tmp_path: Path) -> None:
    output = tmp_path / "submission.csv"
    result = imc2023.main(
        temple_small, output, imc2023.IMC2023Config(matcher=MatcherSpec("sift")), time_budget=0.0, progress=False
    )
    assert [s.status for s in result.scenes] == ["skipped"]
    table = pd.read_csv(output)
    assert list(table.columns) == SUBMISSION_COLUMNS and len(table) == 8
    assert (table.translation_vector == "nan;nan;nan").all()


def test_pair_strategy() -> None:
    config = imc2023.IMC2023Config(exhaustive_max=10)
    assert config.pair_strategy(10) == "exhaustive"
    assert config.num_pairs_estimate(10) == 45
    assert config.pair_strategy(11) == "retrieval"
    assert config.num_pairs_estimate(11) == 11 * config.num_pairs
    run = config.reconstruct_config(11)
    assert (run.pairs.method, run.pairs.num_matched, run.dense) == ("retrieval", 20, None)


def test_cli_accepts_every_rotation_its_docstring_offers() -> None:
    parser = imc2023.build_parser()
    for rotation in ("none", "auto", "best", "union"):
        args = parser.parse_args(["--data", "d", "--rotation", rotation, "--resize", "840", "--matcher", "sift"])
        spec = MatcherSpec("sift", resize=(840,))
        config = imc2023.IMC2023Config(matcher=spec, rotation=rotation)
        assert config_from_options(parser, args, imc2023.IMC2023Config, matcher=spec) == config
        assert config.reconstruct_config(3).dense.rotation == rotation
    assert imc2023.IMC2023Config(rotation="auto").reconstruct_config(3).dense.refine == "tracks"
    # LoFTR's exact tracks are built on one rotation per pair: a combination that cannot run fails at once
    with pytest.raises(UserError, match="rotation none or auto"):
        imc2023.IMC2023Config(rotation="union")


def test_converter_adds_scenes_and_cli(temple_ring: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from core.par_files import write_par_file
    from datasets import imc

    # a second Middlebury-style scene in the synthetic layout (cameras.txt): two temple views renamed
    source = tmp_path / "other"
    (source / "images").mkdir(parents=True)
    cameras = list(read_par_file(temple_ring / "templeR_par.txt").values())[:2]
    for index, camera in enumerate(cameras):
        (source / "images" / f"v{index}.png").write_bytes((temple_ring / "images" / camera.name).read_bytes())
    write_par_file(source / "cameras.txt", [replace(c, name=f"v{i}.png") for i, c in enumerate(cameras)])
    output = tmp_path / "multi"
    imc.main_cli(
        [
            "temple2023",
            "--source",
            str(temple_ring),
            "--output",
            str(output),
            "--start",
            "12",
            "--limit",
            "3",
            "--max-size",
            "64",
        ]
    )
    imc.main_cli(
        [
            "middlebury2023",
            "--source",
            str(source),
            "--output",
            str(output),
            "--dataset",
            "synthetic",
            "--scene",
            "pair",
            "--max-size",
            "64",
        ]
    )
    printed = capsys.readouterr().out
    assert "wrote 3 images of middlebury/temple_ring" in printed and "wrote 2 images of synthetic/pair" in printed
    labels = read_labels_2023(output / "train" / "train_labels.csv")
    assert {key: len(v) for key, v in labels.items()} == {("middlebury", "temple_ring"): 3, ("synthetic", "pair"): 2}
    np.testing.assert_allclose(labels[("synthetic", "pair")]["synthetic/pair/images/v1.png"][0], cameras[1].R)
    # converting the temple again with other views replaces its rows and images and keeps the other scene
    convert_temple_2023(temple_ring, output, Middlebury2023Config(start=12, limit=2, max_size=64))
    labels = read_labels_2023(output / "train" / "train_labels.csv")
    assert {key: len(v) for key, v in labels.items()} == {("middlebury", "temple_ring"): 2, ("synthetic", "pair"): 2}
    assert len(list((output / "train" / "middlebury" / "temple_ring" / "images").iterdir())) == 2
    with pytest.raises(UserError, match="no camera file"):
        imc.main_cli(["temple2023", "--source", str(tmp_path / "missing"), "--output", str(output)])


def test_cli_prints_the_score(temple_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "cli.csv"
    result = imc2023.main_cli(
        ["--data", str(temple_small), "--output", str(output), "--matcher", "sift", "--score", "--num-threads", "1"]
    )
    printed = capsys.readouterr().out
    assert "middlebury/temple_ring: reconstructed, 8/8 registered" in printed
    assert f"mAA (IMC 2023, mean over 1 datasets): {result.score.maa:.4f}" in printed
    with pytest.raises(UserError, match="--score needs the train split"):
        imc2023.main(temple_small, output, imc2023.IMC2023Config(matcher=MatcherSpec("sift")), split="test", score=True)
