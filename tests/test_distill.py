"""The coarse-only student preset and its distillation (``recipes.distill``, ``recipes.training.distill``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core.errors import UserError, run_cli
from matchers.loftr import LoFTR, LoFTRConfig, LoFTRMatcher
from matchers.loftr.config import PRESET_NAMES
from recipes.training.distill import match_kl, pool_confidence
from tests.test_loftr_equivalence import perturb, textured_image, warped


def student_model(seed: int = 3) -> LoFTR:
    torch.manual_seed(seed)
    model = LoFTR(LoFTRConfig.preset("student")).eval()
    model.load_state_dict(perturb(model.state_dict(), seed + 1))
    return model


def test_student_preset_is_a_coarse_only_stride_16_model() -> None:
    config = LoFTRConfig.preset("student")
    assert "student" in PRESET_NAMES and LoFTRConfig.preset("loftr-student") == config
    assert config.coarse_stride == 16 and not config.fine.enabled
    assert config.backbone.block_dims == (8, 16, 32, 32) and config.backbone.initial_dim == 8
    assert (config.coarse.d_model, config.coarse.nhead, config.coarse.layer_names) == (32, 1, ("self", "cross") * 2)
    model = LoFTR(config)
    assert not any(name.startswith(("fine_", "loftr_fine")) for name in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) < 200_000
    with pytest.raises(ValueError, match="fine stage needs the 3-stage"):
        config.replace(fine={"enabled": True, "d_model": 8})


def test_student_returns_matches_on_its_16_px_cells() -> None:
    image0 = textured_image(128, 160, seed=2)
    image1 = warped(image0, (160, 128))
    matcher = LoFTRMatcher(student_model(), resize=None, device="cpu", match_threshold=0.0)
    matches = matcher.match(image0, image1)
    assert len(matches) > 5 and matches.has_coarse
    # coarse-only: both keypoints are the cell centres, on the 16 px lattice the pipeline's tracks use
    np.testing.assert_array_equal(matches.keypoints0, matches.coarse0)
    np.testing.assert_array_equal(matches.keypoints1, matches.coarse1)
    assert np.all(matches.keypoints0 % 16 == 0) and np.all(matches.keypoints1 % 16 == 0)
    grid = matcher.coarse_grid((160, 128))
    assert grid.step == (16.0, 16.0)
    np.testing.assert_array_equal(grid.centres(grid.cells(matches.keypoints1)), matches.keypoints1)
    # the 640 px resize keeps sides multiples of 16
    assert LoFTRMatcher(student_model(), resize=100, device="cpu").prepare(image0).encoded.image_size == (80, 96)


def test_match_kl_is_zero_for_equal_matrices_and_the_hand_computed_value_otherwise() -> None:
    student = torch.tensor([[[0.5, 0.1], [0.1, 0.5]]])
    teacher = torch.tensor([[[0.8, 0.0], [0.0, 0.8]]])
    assert float(match_kl(student.log(), student)) == pytest.approx(0.0, abs=1e-6)
    # every row and column: teacher (0.8, 0, no match 0.2) vs student (0.5, 0.1, no match 0.4)
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.4)
    assert float(match_kl(student.log(), teacher)) == pytest.approx(expected, rel=1e-5)
    # a student's own dual-softmax confidence is its minimum: perturbing the logits raises the loss
    sim = torch.randn(1, 12, 15, generator=torch.Generator().manual_seed(0)) * 3
    log_p = torch.log_softmax(sim, 2) + torch.log_softmax(sim, 1)
    other = sim + 0.5 * torch.randn(sim.shape, generator=torch.Generator().manual_seed(1))
    log_q = torch.log_softmax(other, 2) + torch.log_softmax(other, 1)
    assert float(match_kl(log_p, log_p.exp())) == pytest.approx(0.0, abs=1e-5)
    assert float(match_kl(log_q, log_p.exp())) > 0.01


def test_pool_confidence_averages_k_by_k_blocks() -> None:
    conf = torch.zeros(1, 4, 4)  # 2x2 grids on both sides, pooled to 1x1
    conf[0, 0, 0], conf[0, 1, 3], conf[0, 2, 2] = 0.8, 0.4, 0.2
    pooled = pool_confidence(conf, (2, 2), (2, 2), 2)
    assert pooled.shape == (1, 1, 1) and float(pooled) == pytest.approx((0.8 + 0.4 + 0.2) / 4)
    grid = torch.rand(1, 16, 16) / 16  # 4x4 grids -> 2x2: rows and columns still sum to <= 1
    pooled = pool_confidence(grid, (4, 4), (4, 4), 2)
    assert pooled.shape == (1, 4, 4)
    assert float(pooled.sum()) == pytest.approx(float(grid.sum()) / 4, rel=1e-5)
    assert float(pooled.sum(2).max()) <= 1 and float(pooled.sum(1).max()) <= 1
    assert pool_confidence(grid, (4, 4), (4, 4), 1) is grid


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    cv2.imwrite(str(folder / "a.png"), (255 * textured_image(240, 320, seed=7)).astype(np.uint8))
    return folder


def _distil(photos: Path, out: Path, steps: int):
    import dataclasses

    from recipes.distill import STUDENT_TRAIN, main

    return main(
        "loftr-compact",
        [f"homography:{photos}"],
        out,
        steps=steps,
        val_pairs=1,
        size=(96, 128),
        config=dataclasses.replace(STUDENT_TRAIN, validate_every=1, warmup_steps=1),
        device="cpu",
        progress=False,
    )


def test_distillation_resumes_exactly(photos: Path, tmp_path: Path) -> None:
    whole = _distil(photos, tmp_path / "whole.ckpt", 2)
    _distil(photos, tmp_path / "split.ckpt", 1)
    split = _distil(photos, tmp_path / "split.ckpt", 1)
    assert (whole.end_step, split.start_step, split.end_step) == (2, 1, 2)
    a = torch.load(whole.checkpoint, weights_only=True)
    b = torch.load(split.checkpoint, weights_only=True)
    assert a["step"] == b["step"] == 2 and a["teacher"] == "loftr-compact"
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    rows_a = list(csv.DictReader(open(whole.log)))
    rows_b = list(csv.DictReader(open(split.log)))
    assert [r["step"] for r in rows_b] == ["1", "2"]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert float(rows_a[0]["loss_kd"]) > 0 and rows_a[0]["val_matches"] != ""
    # the weights trained: step 2 differs from step 1's
    first = torch.load(_distil(photos, tmp_path / "one.ckpt", 1).checkpoint, weights_only=True)["state_dict"]
    assert any(not torch.equal(first[k], a["state_dict"][k]) for k in first if first[k].is_floating_point())


def test_student_exports_to_onnx_and_onnxruntime_gives_the_same_matches(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from matchers.loftr.export_onnx import export
    from matchers.loftr.onnx_backend import OnnxLoFTRMatcher
    from tests.test_onnx import assert_same_matches

    model = student_model()
    image0 = textured_image(128, 160, seed=5)
    image1 = warped(image0, (176, 144))
    reference = LoFTRMatcher(model, resize=None, device="cpu", match_threshold=0.0).match(image0, image1)
    path = export(model, tmp_path / "student.onnx")
    onnx_matcher = OnnxLoFTRMatcher(path, resize=None, device="cpu", match_threshold=0.0)
    result = onnx_matcher.match(image0, image1)
    assert onnx_matcher.describe()["coarse_only"] is True
    assert len(reference) > 5
    assert_same_matches(reference, result)
    assert onnx_matcher.coarse_grid((160, 128)) == LoFTRMatcher(model, resize=None, device="cpu").coarse_grid(
        (160, 128)
    )


def test_bad_teacher_path_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recipes.distill import main_cli

    argv = ["--teacher", str(tmp_path / "missing.ckpt"), "--data", "synthetic:1", "--out", str(tmp_path / "s.ckpt")]
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: main_cli(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: LoFTR weights") and "missing.ckpt" in err[0]
    assert not (tmp_path / "s.ckpt").exists()
    with pytest.raises(UserError, match="distillation takes"):
        main_cli(["--teacher", "loftr-compact", "--data", "megadepth:/x", "--out", str(tmp_path / "s.ckpt")])


def test_teacher_confidence_is_pooled_onto_the_student_grid() -> None:
    from recipes.training.distill import pool_factor, teacher_confidence
    from tests.test_onnx import random_model, tiny_config

    teacher, student = random_model(tiny_config()), student_model()
    assert pool_factor(teacher, student, 1.0) == 2 and pool_factor(teacher, student, 0.5) == 1
    with pytest.raises(UserError, match="whole number"):
        pool_factor(teacher, student, 0.3)
    generator = torch.Generator().manual_seed(0)
    batch = {"image0": torch.rand(1, 1, 64, 96, generator=generator), "image1": torch.rand(1, 1, 64, 96)}
    full = teacher_confidence(teacher, batch, 1.0, 1)  # the teacher's own 8 x 12 grid
    pooled = teacher_confidence(teacher, batch, 1.0, 2)  # the student's 4 x 6 grid
    assert full.shape == (1, 96, 96) and pooled.shape == (1, 24, 24)
    torch.testing.assert_close(pooled, pool_confidence(full, (8, 12), (8, 12), 2))
    half = teacher_confidence(teacher, batch, 0.5, 1)  # the teacher on 32 x 48 images: the student's grid too
    assert half.shape == (1, 24, 24)


def test_outputs_are_checked_and_their_folders_made_before_training(tmp_path):
    from core.errors import UserError
    from recipes.training.trainer import prepare_outputs

    prepare_outputs(tmp_path / "new" / "run.ckpt", tmp_path / "other" / "student.ckpt")
    assert (tmp_path / "new").is_dir() and (tmp_path / "other").is_dir()
    assert not (tmp_path / "new" / "run.ckpt").exists()  # nothing written yet
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_outputs(tmp_path / "file" / "run.ckpt")
