"""matchers.loftr model API: per-image encoding, padded batches, both directions, the Matcher adapter, autocast."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from matchers.base import resize_image
from matchers.loftr import LoFTR, LoFTRConfig, LoFTRMatcher, collate
from matchers.loftr.position_encoding import frequencies, position_encoding
from tests.test_loftr_equivalence import as_tensor, textured_image, warped


@pytest.fixture(scope="module")
def model() -> LoFTR:
    torch.manual_seed(3)
    return LoFTR(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": 0.0})).eval()


def keyed(out: dict[str, torch.Tensor]) -> dict[tuple[int, int, int], int]:
    """Match index by (batch index, coarse cell of image 0, coarse cell of image 1)."""
    rows = zip(out["batch_indexes"].tolist(), out["coarse_index0"].tolist(), out["coarse_index1"].tolist())
    return {key: n for n, key in enumerate(rows)}


def assert_close_results(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    ka, kb = keyed(a), keyed(b)
    assert set(ka) == set(kb)
    ia = torch.tensor([ka[k] for k in sorted(ka)], dtype=torch.long)
    ib = torch.tensor([kb[k] for k in sorted(ka)], dtype=torch.long)
    assert torch.allclose(a["keypoints0"][ia], b["keypoints0"][ib], atol=1e-3)
    assert torch.allclose(a["keypoints1"][ia], b["keypoints1"][ib], atol=1e-3)
    assert torch.allclose(a["confidence"][ia], b["confidence"][ib], atol=1e-5, rtol=1e-3)


def test_position_encoding_frequencies() -> None:
    """Fixed: 10000^(-2k/(d/2)); the released bug: exp(-2k) (zju3dv/LoFTR issue #41). Channels sin x, cos x,
    sin y, cos y with 1-based positions."""
    k2 = torch.arange(0, 128, 2, dtype=torch.float64)
    assert torch.allclose(frequencies(256, True).double(), 10000.0 ** (-k2 / 128), rtol=1e-6)
    assert torch.allclose(frequencies(256, False).double(), torch.exp(-k2), rtol=1e-6)
    pe = position_encoding(256, 3, 4, temp_bug_fix=True)
    y, x, c = 2, 3, 5  # channel 4*1 + 1: cos(x * f_1) at 1-based x = 4
    assert pe[0, c, y, x].item() == pytest.approx(math.cos(4 * 10000.0 ** (-2 / 128)), abs=1e-6)
    assert pe[0, 4 * 7 + 2, y, x].item() == pytest.approx(math.sin(3 * 10000.0 ** (-14 / 128)), abs=1e-6)


def test_config_presets_and_validation() -> None:
    assert LoFTRConfig.preset("indoor_ds_new").coarse.temp_bug_fix
    assert not LoFTRConfig.preset("outdoor").coarse.temp_bug_fix
    assert LoFTRConfig.preset("indoor_ot").matching.match_type == "sinkhorn"
    compact = LoFTRConfig.preset("compact")
    assert compact.backbone.block_dims == (64, 96, 128) and compact.coarse.d_model == 128
    assert LoFTRConfig.from_dict(compact.to_dict()) == compact
    with pytest.raises(ValueError, match="coarse.d_model"):
        LoFTRConfig.preset("outdoor_ds").replace(coarse={"d_model": 128})
    with pytest.raises(ValueError):
        LoFTRConfig.preset("nope")


def test_parameter_count_and_keys() -> None:
    ds = LoFTR(LoFTRConfig.preset("outdoor_ds"))
    assert len(ds.state_dict()) == 211
    assert sum(p.numel() for p in ds.parameters()) == 11_561_456
    ot = LoFTR(LoFTRConfig.preset("outdoor_ot"))
    assert set(ot.state_dict()) - set(ds.state_dict()) == {"coarse_matching.bin_score"}


def test_encode_batched_equals_per_image(model: LoFTR) -> None:
    """BatchNorm in eval mode: one backbone pass over a batch equals one pass per image."""
    a, b = as_tensor(textured_image(96, 128, seed=11)), as_tensor(textured_image(96, 128, seed=12))
    with torch.inference_mode():
        both = model.encode(torch.cat([a, b]))
        ea, eb = model.encode(a), model.encode(b)
    assert torch.allclose(both.coarse[:1], ea.coarse, atol=1e-4) and torch.allclose(
        both.coarse[1:], eb.coarse, atol=1e-4
    )
    assert torch.allclose(both.fine[:1], ea.fine, atol=1e-4) and torch.allclose(both.fine[1:], eb.fine, atol=1e-4)
    assert ea.coarse.shape[2:] == (12, 16) and ea.fine.shape[2:] == (48, 64)
    with torch.inference_mode():  # items of a lazy batch carry their own fine-branch inputs
        lazy, la = model.encode_lazy(torch.cat([a, b])), model.encode_lazy(a)
    second = lazy[1]
    assert second.fine_inputs is not None and la.fine_inputs is not None
    assert second.fine_inputs.x1.shape == la.fine_inputs.x1.shape
    assert torch.equal(second.fine_inputs.lat2, lazy.fine_inputs.lat2[1:])
    assert torch.allclose(lazy[:1].fine_inputs.x1, la.fine_inputs.x1, atol=1e-4)


def test_encoded_image_reused_across_pairs(model: LoFTR) -> None:
    """match == encode + match_encoded, with image 0 encoded once for two pairs."""
    img0 = textured_image(120, 160, seed=13)
    img1, img2 = warped(img0, (160, 120)), warped(img0, (150, 110), scale=0.95)
    with torch.inference_mode():
        e0 = model.encode(as_tensor(img0))
        for other in (img1, img2):
            cached = model.match_encoded(e0, model.encode(as_tensor(other)))
            direct = model.match(as_tensor(img0), as_tensor(other))
            assert len(direct["keypoints0"]) > 0
            for key in direct:
                assert torch.equal(cached[key], direct[key]), key


def test_match_batch_of_different_sizes_equals_per_pair(model: LoFTR) -> None:
    """Pairs of different sizes (not multiples of 8) padded into one batch give the per-pair results."""
    base = textured_image(150, 190, seed=14)
    pairs = [
        (base[:117, :155], warped(base, (141, 101))),
        (base[:96, :128], warped(base, (190, 150), scale=1.05)),
        (base, base[5:140, 3:170]),
    ]
    tensors = [(as_tensor(np.ascontiguousarray(a)), as_tensor(np.ascontiguousarray(b))) for a, b in pairs]
    with torch.inference_mode():
        batched = model.match_batch(tensors)
        single = [model.match(a, b) for a, b in tensors]
    assert len(batched) == 3
    for (a, b), one, many in zip(pairs, single, batched):
        assert len(one["keypoints0"]) > 0
        assert_close_results(one, many)
        # nothing lands in another image's padding
        assert (many["keypoints0"][:, 0] < a.shape[1]).all() and (many["keypoints0"][:, 1] < a.shape[0]).all()
        assert (many["keypoints1"][:, 0] < b.shape[1]).all() and (many["keypoints1"][:, 1] < b.shape[0]).all()


def test_forward_with_masks_ignores_padding(model: LoFTR) -> None:
    """forward() on zero-padded images with masks: no match in (or within the border of) the padding."""
    a = textured_image(100, 130, seed=15)
    b = warped(a, (120, 90))
    image0 = torch.zeros(1, 1, 128, 160)
    image1 = torch.zeros(1, 1, 128, 160)
    image0[..., :100, :130] = as_tensor(a)
    image1[..., :90, :120] = as_tensor(b)
    mask0 = torch.zeros(1, 128, 160, dtype=torch.bool)
    mask1 = torch.zeros(1, 128, 160, dtype=torch.bool)
    mask0[:, :100, :130] = True
    mask1[:, :90, :120] = True
    with torch.inference_mode():
        out = model(image0, image1, mask0, mask1)
    assert len(out["keypoints0"]) > 0
    # valid coarse cells: ceil(100/8) = 13 rows, ceil(130/8) = 17 columns; border of 2 cells removed
    assert out["keypoints0"][:, 1].max() <= 8 * (13 - 3) and out["keypoints0"][:, 0].max() <= 8 * (17 - 3)
    coarse1 = out["coarse_index1"]
    assert (coarse1 // 20).max() <= math.ceil(90 / 8) - 3 and (coarse1 % 20).max() <= math.ceil(120 / 8) - 3


def test_both_directions_is_the_deduplicated_union(model: LoFTR) -> None:
    img0 = textured_image(120, 160, seed=16)
    img1 = warped(img0, (152, 112), scale=0.97)
    t0, t1 = as_tensor(img0), as_tensor(img1)
    with torch.inference_mode():
        forward = model.match(t0, t1)
        backward = model.match(t1, t0)
        merged = model.match(t0, t1, both_directions=True)
    fwd = {
        (i, j): c
        for i, j, c in zip(
            forward["coarse_index0"].tolist(), forward["coarse_index1"].tolist(), forward["confidence"].tolist()
        )
    }
    bwd = {
        (j, i): c
        for i, j, c in zip(
            backward["coarse_index0"].tolist(), backward["coarse_index1"].tolist(), backward["confidence"].tolist()
        )
    }
    got = {
        (i, j): c
        for i, j, c in zip(
            merged["coarse_index0"].tolist(), merged["coarse_index1"].tolist(), merged["confidence"].tolist()
        )
    }
    assert len(got) == len(merged["confidence"])  # no duplicates
    assert set(got) == set(fwd) | set(bwd)
    assert len(bwd) > 0 and set(bwd) - set(fwd)  # the reverse direction adds matches
    for key, conf in got.items():
        assert conf == pytest.approx(max(fwd.get(key, 0.0), bwd.get(key, 0.0)))
    # reverse-only matches: image 1's keypoint is on its 8-pixel grid
    reverse_only = torch.tensor(
        [key not in fwd for key in zip(merged["coarse_index0"].tolist(), merged["coarse_index1"].tolist())]
    )
    k1 = merged["keypoints1"][reverse_only]
    assert torch.equal(k1, (k1 / 8).round() * 8)


def test_matcher_returns_original_coordinates(model: LoFTR) -> None:
    """LoFTRMatcher resizes, matches and maps back: equals doing it by hand, and an image matched to its 1.5x
    upscaled copy gives keypoints related by x1 = (x0 + 0.5) * 1.5 - 0.5 up to LoFTR's coarse/fine error."""
    image = textured_image(150, 200, seed=7)
    upscaled = cv2.resize(image, (300, 225), interpolation=cv2.INTER_LINEAR)
    matcher = LoFTRMatcher(model, resize=160, device="cpu")
    result = matcher.match(image, upscaled)
    assert len(result) > 20
    r0, r1 = resize_image(image, 160, multiple=8), resize_image(upscaled, 160, multiple=8)
    assert r0.image.shape == r1.image.shape == (120, 160)
    with torch.inference_mode():
        manual = model.match(as_tensor(r0.image), as_tensor(r1.image))
    # the matcher runs the optimised inference copy (fused transformer): equal up to float rounding
    np.testing.assert_allclose(result.keypoints0, r0.to_original(manual["keypoints0"].numpy()), atol=1e-3)
    np.testing.assert_allclose(result.keypoints1, r1.to_original(manual["keypoints1"].numpy()), atol=1e-3)
    np.testing.assert_allclose(result.scores, manual["confidence"].numpy(), rtol=1e-4, atol=1e-6)
    expected = (result.keypoints0 + 0.5) * 1.5 - 0.5
    error = np.linalg.norm(result.keypoints1 - expected, axis=1)
    # random weights: coarse cells right, fine offsets arbitrary (<= 4 px at 160 px = 7.5 px in the original)
    assert np.median(error) < 12.0, np.median(error)
    assert result.keypoints1[:, 0].max() > 160  # really in the 300 px wide original
    described = matcher.describe()
    assert described["matcher"] == "loftr" and described["resize"] == 160 and described["weights"] == "custom"


def test_bfloat16_autocast_stays_finite(model: LoFTR) -> None:
    """Under autocast the overflow-prone steps run in float32: finite outputs, nearly the same matches."""
    t0 = as_tensor(textured_image(120, 160, seed=8))
    t1 = as_tensor(warped(t0[0, 0].numpy(), (160, 120)))
    with torch.inference_mode():
        reference = model.match(t0, t1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.match(t0, t1)
    assert torch.isfinite(low["keypoints1"]).all() and torch.isfinite(low["confidence"]).all()
    ref_set = set(zip(reference["coarse_index0"].tolist(), reference["coarse_index1"].tolist()))
    low_set = set(zip(low["coarse_index0"].tolist(), low["coarse_index1"].tolist()))
    assert len(ref_set) > 20 and len(ref_set & low_set) >= 0.75 * len(ref_set)


def test_compact_preset_runs() -> None:
    torch.manual_seed(0)
    compact = LoFTR(LoFTRConfig.preset("compact").replace(matching={"thr": 0.0})).eval()
    image = as_tensor(textured_image(100, 140, seed=9))
    with torch.inference_mode():
        out = compact.match(image, as_tensor(warped(image[0, 0].numpy(), (140, 100))))
    assert out["keypoints0"].shape == out["keypoints1"].shape and out["keypoints0"].shape[1] == 2
    assert len(out["confidence"]) > 0


def test_collate_masks_and_shapes(model: LoFTR) -> None:
    with torch.inference_mode():
        a = model.encode(as_tensor(textured_image(40, 72, seed=1)))
        b = model.encode(as_tensor(textured_image(57, 33, seed=2)))
    batch = collate([a, b])
    assert batch.coarse.shape[2:] == (8, 9) and batch.fine.shape[2:] == (29, 36)
    assert batch.mask[0].sum() == 5 * 9 and batch.mask[1].sum() == 8 * 5
    assert torch.equal(batch.fine[1, :, :29, :17], b.fine[0]) and batch.fine[1, :, :, 17:].abs().sum() == 0


def test_dual_softmax_matches_plain_formula_with_masks_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused exp(2s - lse_row - lse_col) equals softmax(dim 1) * softmax(dim 2), values and gradients."""
    from matchers.loftr import coarse_matching

    monkeypatch.setattr(coarse_matching, "_CHUNK_ELEMENTS", 16)  # several row blocks
    sim = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    mask0 = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7]).bool()
    mask1 = torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()
    fused = coarse_matching.dual_softmax(sim, mask0, mask1)
    masked = sim.masked_fill(~mask0[:, :, None], -1e9).masked_fill(~mask1[:, None, :], -1e9)
    plain = (masked.softmax(1) * masked.softmax(2)).masked_fill(~(mask0[:, :, None] & mask1[:, None, :]), 0.0)
    torch.testing.assert_close(fused, plain)
    weights = torch.arange(70.0, dtype=torch.float64).view(2, 7, 5)
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), sim)
    (g_plain,) = torch.autograd.grad((plain * weights).sum(), sim)
    torch.testing.assert_close(g_fused, g_plain)


def reference_selection(
    conf: np.ndarray,
    shape0: tuple[int, int],
    shape1: tuple[int, int],
    thr: float,
    border: int,
    valid0: tuple[int, int],
    valid1: tuple[int, int],
) -> set[tuple[int, int]]:
    """The official rule written out: conf > thr, both cells >= border inside the valid area, row and column max."""
    (h0, w0), (h1, w1) = shape0, shape1
    found = set()
    for i in range(h0 * w0):
        for j in range(h1 * w1):
            y0, x0, y1, x1 = i // w0, i % w0, j // w1, j % w1
            inside = (
                border <= y0 < valid0[0] - border
                and border <= x0 < valid0[1] - border
                and border <= y1 < valid1[0] - border
                and border <= x1 < valid1[1] - border
            )
            if conf[i, j] > thr and inside and conf[i, j] == conf[i].max() and conf[i, j] == conf[:, j].max():
                found.add((i, j))
    return found


def test_match_selection_follows_the_official_rule() -> None:
    from matchers.loftr.coarse_matching import select_matches

    rng = np.random.default_rng(5)
    shape0, shape1 = (10, 12), (11, 9)
    conf = rng.random((1, 120, 99)) ** 8  # peaky: a few entries per row pass the threshold
    for valid0, valid1 in (((10, 12), (11, 9)), ((9, 10), (8, 9))):
        mask0 = torch.zeros(1, *shape0, dtype=torch.bool)
        mask1 = torch.zeros(1, *shape1, dtype=torch.bool)
        mask0[:, : valid0[0], : valid0[1]] = True
        mask1[:, : valid1[0], : valid1[1]] = True
        padded = valid0 != shape0
        got = select_matches(
            torch.from_numpy(conf).float(),
            shape0,
            shape1,
            0.05,
            1,
            mask0 if padded else None,
            mask1 if padded else None,
        )
        expected = reference_selection(conf[0].astype(np.float32), shape0, shape1, 0.05, 1, valid0, valid1)
        assert len(expected) >= 5
        assert set(zip(got.i_ids.tolist(), got.j_ids.tolist())) == expected
        np.testing.assert_allclose(got.confidence.numpy(), conf[0][got.i_ids.numpy(), got.j_ids.numpy()], rtol=1e-6)
