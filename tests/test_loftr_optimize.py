"""Inference optimisations of matchers.loftr give the same results as the plain model, and the benchmark recipe.

Expectations are independent of the code under test: an unfused Conv2d + BatchNorm2d, the plain dual-softmax
formula written out here, crops of the whole fine map, and the unoptimised model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from matchers.loftr import LoFTR, LoFTRConfig, LoFTRMatcher, coarse_matching
from matchers.loftr.coarse_matching import select_dual_softmax
from matchers.loftr.fine_preprocess import gather_windows
from matchers.loftr.optimize import (
    FusedLocalFeatureTransformer,
    InferenceOptions,
    fold_batchnorm,
    fold_conv_bn,
    optimize_for_inference,
)
from tests.test_loftr_equivalence import as_tensor, perturb, textured_image, warped


@pytest.fixture(scope="module")
def model() -> LoFTR:
    """A seeded random model with random BatchNorm statistics (so folding changes the weights), threshold 0."""
    torch.manual_seed(3)
    net = LoFTR(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": 0.0}))
    net.load_state_dict(perturb(net.state_dict(), seed=1))
    return net.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    image0 = textured_image(120, 160, seed=1)
    return as_tensor(image0), as_tensor(warped(image0, (160, 120)))


def keyed(out: dict[str, torch.Tensor]) -> dict[tuple[int, int, int], int]:
    rows = zip(out["batch_indexes"].tolist(), out["coarse_index0"].tolist(), out["coarse_index1"].tolist())
    return {key: n for n, key in enumerate(rows)}


def assert_same_matches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], minimum: int = 20) -> None:
    ka, kb = keyed(a), keyed(b)
    assert set(ka) == set(kb)
    assert len(ka) >= minimum, f"only {len(ka)} matches: the comparison would be weak"
    ia = torch.tensor([ka[k] for k in sorted(ka)], dtype=torch.long)
    ib = torch.tensor([kb[k] for k in sorted(ka)], dtype=torch.long)
    for name in ("keypoints0", "keypoints1"):
        assert (a[name][ia] - b[name][ib]).abs().max().item() <= 1e-3
    assert torch.allclose(a["confidence"][ia], b["confidence"][ib], atol=1e-5, rtol=1e-3)


# ----------------------------------------------------------------------------------------------- BN folding
def test_fold_conv_bn_equals_conv_then_bn() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    reference = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 17, 21)
    fused = fold_conv_bn(conv, bn)
    assert fused.bias is not None
    assert torch.allclose(fused(x), reference(x), atol=1e-5)


def test_fold_batchnorm_backbone_and_original_untouched(model: LoFTR, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    keys_before = set(model.state_dict())
    assert any(isinstance(m, nn.BatchNorm2d) for m in optimize_for_inference(model).backbone.modules())  # opt-in
    optimized = optimize_for_inference(model, InferenceOptions(fold_bn=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.backbone.modules())
    assert (
        sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules()) == 17
    )  # stem, 6 blocks x 2, 2 shortcuts, 2 FPN heads
    assert set(model.state_dict()) == keys_before  # the public model keeps its keys and BatchNorms
    with torch.inference_mode():
        for ours, reference in zip(optimized.backbone(pair[0]), model.backbone(pair[0])):
            assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(LoFTR(model.config).backbone.train())


def test_optimized_model_gives_the_same_matches(model: LoFTR, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    optimized = optimize_for_inference(model, InferenceOptions(fold_bn=True, onnxruntime=False))
    assert isinstance(optimized.loftr_coarse, FusedLocalFeatureTransformer)
    with torch.inference_mode():
        reference = model.match_encoded(model.encode(pair[0]), model.encode(pair[1]))
        assert_same_matches(reference, optimized.match(*pair))
        assert_same_matches(reference, optimized.match_encoded(optimized.encode(pair[0]), optimized.encode(pair[1])))
    # each option alone
    for options in (
        InferenceOptions(fold_bn=True, channels_last=False, fuse_transformer=False, onnxruntime=False),
        InferenceOptions(fold_bn=False, channels_last=True, fuse_transformer=False, onnxruntime=False),
        InferenceOptions(fold_bn=False, channels_last=False, fuse_transformer=True, onnxruntime=False),
        InferenceOptions(fold_bn=False, channels_last=False, fuse_transformer=True, onnxruntime=True),
    ):
        with torch.inference_mode():
            assert_same_matches(reference, optimize_for_inference(model, options).match(*pair))


def test_fused_transformer_with_masks_and_unequal_lengths(model: LoFTR) -> None:
    fused = FusedLocalFeatureTransformer(model.loftr_coarse)
    torch.manual_seed(1)
    feat0, feat1 = torch.randn(2, 30, 256), torch.randn(2, 22, 256)
    mask0 = torch.ones(2, 30, dtype=torch.bool)
    mask1 = torch.ones(2, 22, dtype=torch.bool)
    mask0[1, 20:] = False
    mask1[0, 15:] = False
    with torch.no_grad():
        for masks in ((None, None), (mask0, mask1)):
            expected = model.loftr_coarse(feat0, feat1, *masks)
            got = fused(feat0, feat1, *masks)
            for a, b in zip(expected, got):
                assert torch.allclose(a, b, atol=1e-4)
        same = torch.randn(2, 22, 256)  # equal lengths: both images in one batch for the self layers
        for a, b in zip(model.loftr_coarse(same, feat1), fused(same, feat1)):
            assert torch.allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------------------------- coarse matching
def plain_selection(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    temperature: float,
    shape0: tuple[int, int],
    shape1: tuple[int, int],
    threshold: float,
    border: int,
    mask0: torch.Tensor | None,
    mask1: torch.Tensor | None,
) -> set[tuple[int, int, int]]:
    """The official rule written out: dual-softmax, threshold, border, mutual row/column maximum."""
    sim = torch.einsum("nlc,nsc->nls", feat0 / 16, feat1 / 16) / temperature
    valid = torch.ones_like(sim, dtype=torch.bool)
    if mask0 is not None:
        valid &= mask0.flatten(1)[:, :, None]
    if mask1 is not None:
        valid &= mask1.flatten(1)[:, None, :]
    sim = sim.masked_fill(~valid, float("-inf"))
    conf = torch.nan_to_num(torch.softmax(sim, 1)) * torch.nan_to_num(torch.softmax(sim, 2))
    result = set()
    for b in range(conf.shape[0]):
        h0 = int(mask0[b].sum(0).max()) if mask0 is not None else shape0[0]
        w0 = int(mask0[b].sum(1).max()) if mask0 is not None else shape0[1]
        h1 = int(mask1[b].sum(0).max()) if mask1 is not None else shape1[0]
        w1 = int(mask1[b].sum(1).max()) if mask1 is not None else shape1[1]
        for i in range(conf.shape[1]):
            j = int(conf[b, i].argmax())
            value = conf[b, i, j]
            if value <= threshold or value < conf[b, :, j].max():
                continue
            yi, xi, yj, xj = i // shape0[1], i % shape0[1], j // shape1[1], j % shape1[1]
            if (
                border <= yi < h0 - border
                and border <= xi < w0 - border
                and border <= yj < h1 - border
                and border <= xj < w1 - border
            ):
                result.add((b, i, j))
    return result


@pytest.mark.parametrize("budget", [None, 0])
def test_blocked_selection_equals_plain_rule(budget: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored similarity and the chunked path (nothing L x S kept), with blocks of a few rows."""
    monkeypatch.setattr(coarse_matching, "_BLOCK_ELEMENTS", 2 * 7 * 19 * 3)  # several row blocks
    monkeypatch.setattr(coarse_matching, "_RECOMPUTE_ROWS", 1)
    torch.manual_seed(2)
    shape0, shape1 = (9, 11), (7, 19)
    feat0 = torch.randn(2, 99, 256) * 2
    feat1 = torch.randn(2, 133, 256) * 2
    feat1[:, 10:60] = feat0[:, 30:80] + 0.3 * torch.randn(2, 50, 256)  # some strong correspondences
    mask0 = torch.ones(2, *shape0, dtype=torch.bool)
    mask1 = torch.ones(2, *shape1, dtype=torch.bool)
    mask0[1, 7:] = False
    mask1[1, :, 15:] = False
    for masks in ((None, None), (mask0, mask1)):
        for threshold in (0.0, 0.05):
            expected = plain_selection(feat0, feat1, 0.1, shape0, shape1, threshold, 2, *masks)
            got = select_dual_softmax(feat0, feat1, 0.1, shape0, shape1, threshold, 2, *masks, max_matrix_bytes=budget)
            assert len(expected) >= 8  # enough matches for the comparison to mean something
            assert set(zip(got.b_ids.tolist(), got.i_ids.tolist(), got.j_ids.tolist())) == expected


def test_chunked_path_is_used_for_large_matrices(model: LoFTR, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A budget of 0 bytes (as for a 1600x1200 pair with the default) gives the same matches end to end."""
    optimized = optimize_for_inference(model)
    with torch.inference_mode():
        reference = optimized.match(*pair)
        optimized.coarse_matching.max_matrix_bytes = 0
        assert_same_matches(reference, optimized.match(*pair))


# ----------------------------------------------------------------------------------------------- lazy fine map
@pytest.mark.parametrize("size", [(120, 160), (97, 131), (17, 40)])
def test_fine_windows_equal_crops_of_the_whole_map(model: LoFTR, size: tuple[int, int]) -> None:
    backbone = model.backbone
    images = torch.cat([as_tensor(textured_image(*size, seed=s)) for s in (1, 2)])
    with torch.inference_mode():
        coarse, inputs = backbone.forward_coarse(images)
        fine = backbone.fine_full(inputs)
        assert torch.allclose(fine, backbone(images)[1], atol=1e-5)
        hc, wc = coarse.shape[2:]
        gen = torch.Generator().manual_seed(0)
        b = torch.randint(0, 2, (70,), generator=gen)
        cells = torch.randint(0, hc * wc, (70,), generator=gen)
        cells[:4] = torch.tensor([0, wc - 1, (hc - 1) * wc, hc * wc - 1])  # every corner: zero padding matters
        expected = gather_windows(fine, b, cells, wc, 5, 4)
        got = backbone.fine_windows(inputs, b, cells // wc * 4, cells % wc * 4, 5, chunk=32)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_lazy_fine_both_decisions(
    model: LoFTR, pair: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """match() computes only the windows (few matches) or the whole map (many); both equal the eager path."""
    with torch.inference_mode():
        reference = model.match_encoded(model.encode(pair[0]), model.encode(pair[1]))
        calls = []
        original = type(model.backbone).fine_windows
        monkeypatch.setattr(
            type(model.backbone), "fine_windows", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
        )
        for ratio, windows_used in ((1e9, True), (0.0, False)):
            calls.clear()
            monkeypatch.setattr(model, "lazy_fine_ratio", ratio)
            assert_same_matches(reference, model.match(*pair))
            assert bool(calls) == windows_used


def test_matcher_optimized_and_lazy_match_agree(model: LoFTR) -> None:
    image0 = textured_image(120, 160, seed=7)
    image1 = warped(image0, (160, 120))
    plain = LoFTRMatcher(model, resize=None, device="cpu", optimize=False)
    fast = LoFTRMatcher(model, resize=None, device="cpu", optimize=True)
    expected = plain.match_prepared(plain.prepare(image0), plain.prepare(image1))
    for got in (fast.match(image0, image1), fast.match_prepared(fast.prepare(image0), fast.prepare(image1))):
        assert len(got) == len(expected) >= 20
        order_e, order_g = np.lexsort(expected.keypoints0.T), np.lexsort(got.keypoints0.T)
        assert np.array_equal(expected.keypoints0[order_e], got.keypoints0[order_g])
        assert np.abs(expected.keypoints1[order_e] - got.keypoints1[order_g]).max() <= 1e-3


# ----------------------------------------------------------------------------------------------- benchmark
def test_compare_matches_detects_differences() -> None:
    from recipes.benchmark import compare_matches

    a = {"keypoints0": np.array([[8.0, 16.0], [24.0, 8.0]]), "keypoints1": np.array([[9.1, 15.2], [20.0, 7.5]])}
    assert compare_matches(a, a)["same"]
    shifted = {"keypoints0": a["keypoints0"], "keypoints1": a["keypoints1"] + np.array([[0.0, 0.002], [0, 0]])}
    result = compare_matches(a, shifted)
    assert not result["same"] and result["max_keypoint_diff_px"] == pytest.approx(0.002)
    fewer = {"keypoints0": a["keypoints0"][:1], "keypoints1": a["keypoints1"][:1]}
    result = compare_matches(a, fewer)
    assert not result["same"] and result["only_kornia"] == 1


def test_benchmark_tiny_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every section at a tiny size: JSON written, table printed, matches identical to kornia's."""
    pytest.importorskip("kornia.feature")
    from recipes.benchmark import BenchmarkConfig, main

    config = BenchmarkConfig(
        sizes=((128, 96),),
        runs=1,
        rss_sizes=((128, 96),),
        dense_images=3,
        dense_resize=128,
        technique_size=(128, 96),
        technique_runs=1,
        compile_size=None,
        threads=1,
    )
    out = tmp_path / "bench.json"
    report = main(config, out, large=False)
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["single_pair"][0]["check"]["same"] and report["single_pair"][0]["check"]["matches_kornia"] > 0
    assert saved["dense"]["pairs"] == 3 and saved["dense"]["pairs_same"] == 3
    assert saved["dense"]["ours_prepare_calls"] == 3  # one backbone pass per image, not per pair
    rss = saved["peak_rss"][0]
    assert rss["ours"]["ok"] and rss["kornia"]["ok"] and rss["ours"]["peak_rss_mb"] > 50
    assert "single cold pair" in table and "targets (issue 6)" in table and "128x96" in table
    assert saved["techniques"]["coarse_matching"]["same_matches"]


def test_benchmark_cli_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    from core.errors import run_cli
    from recipes.benchmark import main_cli

    with pytest.raises(SystemExit) as error:
        run_cli(lambda: main_cli(["--runs", "0"]))
    assert error.value.code == 2
    assert "--runs" in capsys.readouterr().err


def test_pre_attended_images_skip_the_first_layer_with_the_same_matches(
    model: LoFTR, pair: tuple[torch.Tensor, torch.Tensor]
) -> None:
    optimized = optimize_for_inference(model, InferenceOptions(onnxruntime=False))  # its layer 0 is spied on below
    with torch.inference_mode():
        reference = model.match_encoded(model.encode(pair[0]), model.encode(pair[1]))
        e0, e1 = optimized.encode(pair[0]), optimized.encode(pair[1])
        assert model.pre_attend(model.encode(pair[0])).tokens is None  # the plain transformer cannot resume
        p0, p1 = optimized.pre_attend(e0), optimized.pre_attend(e1)
        assert p0.tokens is not None and p0.tokens.shape == (1, e0.coarse.shape[2] * e0.coarse.shape[3], 256)
        first = optimized.loftr_coarse.layers[0]
        calls = []
        original = first.message
        first.message = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
        try:
            assert_same_matches(reference, optimized.match_encoded(p0, p1))
            assert calls == []  # layer 0 was not run again for the pair
            assert_same_matches(reference, optimized.match_encoded(e0, e1))
            assert len(calls) == 1  # without pre-attention it runs (on both images at once)
        finally:
            first.message = original
