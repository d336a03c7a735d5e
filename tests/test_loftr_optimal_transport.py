"""Optimal-transport coarse matching: log-space Sinkhorn with a dustbin, checked against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matchers.loftr import LoFTR, LoFTRConfig
from matchers.loftr.coarse_matching import CoarseMatching, log_optimal_transport
from matchers.loftr.config import MatchingConfig


def reference_sinkhorn(scores: np.ndarray, bin_score: float, iters: int) -> np.ndarray:
    """Textbook Sinkhorn in probability space, float64, one pair: scale rows then columns, ``iters`` times.

    Coupling K = exp([[scores, bin], [bin, bin]]); marginals a = [1]*m + [n], b = [1]*n + [m], over (m + n).
    Returns the transport plan multiplied by (m + n).
    """
    m, n = scores.shape
    kernel = np.exp(np.block([[scores, np.full((m, 1), bin_score)], [np.full((1, n + 1), bin_score)]]))
    a = np.concatenate([np.ones(m), [n]]) / (m + n)
    b = np.concatenate([np.ones(n), [m]]) / (m + n)
    u, v = np.ones(m + 1), np.ones(n + 1)
    for _ in range(iters):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return (u[:, None] * kernel * v[None, :]) * (m + n)


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_matches_plain_reference(iters: int) -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 7, 5)) * 2.0
    bin_score = 0.7
    ours = log_optimal_transport(torch.from_numpy(scores), torch.tensor(bin_score, dtype=torch.float64), iters)
    for b in range(2):
        np.testing.assert_allclose(
            ours[b].exp().numpy(), reference_sinkhorn(scores[b], bin_score, iters), rtol=1e-10, atol=1e-12
        )


def test_marginals_converge_to_prescribed() -> None:
    rng = np.random.default_rng(1)
    m, n = 9, 6
    scores = torch.from_numpy(rng.normal(size=(1, m, n)))
    plan = log_optimal_transport(scores, torch.tensor(1.0, dtype=torch.float64), iters=200)[0].exp()
    # scaled by m + n: every real row / column carries 1, the dustbins carry the other side's count
    np.testing.assert_allclose(plan.sum(1).numpy(), [1.0] * m + [n], atol=1e-6)
    np.testing.assert_allclose(plan.sum(0).numpy(), [1.0] * n + [m], atol=1e-6)
    # after the last (column) update the column marginals hold exactly, whatever the iteration count
    plan3 = log_optimal_transport(scores, torch.tensor(1.0, dtype=torch.float64), iters=3)[0].exp()
    np.testing.assert_allclose(plan3.sum(0).numpy(), [1.0] * n + [m], atol=1e-10)


def test_padding_masks_give_the_unpadded_result() -> None:
    """Padded rows/columns carry no mass and the real block equals Sinkhorn on the unpadded scores."""
    rng = np.random.default_rng(2)
    scores = torch.from_numpy(rng.normal(size=(1, 6, 4)))
    padded = torch.from_numpy(rng.normal(size=(1, 9, 7))) * 50  # garbage in the padding
    padded[:, :6, :4] = scores
    mask0 = torch.zeros(1, 9, dtype=torch.bool)
    mask1 = torch.zeros(1, 7, dtype=torch.bool)
    mask0[:, :6] = True
    mask1[:, :4] = True
    bin_score = torch.tensor(0.3, dtype=torch.float64)
    plain = log_optimal_transport(scores, bin_score, 3)[0].exp()
    masked = log_optimal_transport(padded, bin_score, 3, mask0, mask1)[0].exp()
    assert torch.isfinite(log_optimal_transport(padded, bin_score, 3, mask0, mask1)[0][:6, :4]).all()
    torch.testing.assert_close(masked[:6, :4], plain[:6, :4])
    torch.testing.assert_close(masked[:6, -1], plain[:6, -1])  # dustbin column
    torch.testing.assert_close(masked[-1, :4], plain[-1, :4])  # dustbin row
    assert masked[6:-1].abs().sum() == 0 and masked[:, 4:-1].abs().sum() == 0


def test_coarse_matching_confidence_uses_reference_sinkhorn() -> None:
    """CoarseMatching('sinkhorn'): similarity of features scaled by 1/sqrt(C), no temperature, dustbin dropped."""
    torch.manual_seed(0)
    layer = CoarseMatching(MatchingConfig(match_type="sinkhorn", skh_iters=3, skh_init_bin_score=1.0)).eval()
    feat0, feat1 = torch.randn(1, 8, 16) * 3, torch.randn(1, 5, 16) * 3
    with torch.no_grad():
        conf = layer.confidence(feat0, feat1)
    scores = (feat0[0] @ feat1[0].T / 16).double().numpy()
    expected = reference_sinkhorn(scores, 1.0, 3)[:-1, :-1]
    np.testing.assert_allclose(conf[0].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_dustbin_prefilter_zeroes_rows_and_columns() -> None:
    torch.manual_seed(1)
    config = MatchingConfig(match_type="sinkhorn", skh_prefilter=True, skh_init_bin_score=2.0)
    layer = CoarseMatching(config).eval()
    feat0, feat1 = torch.randn(1, 10, 16), torch.randn(1, 9, 16)
    with torch.no_grad():
        conf = layer.confidence(feat0, feat1)
    plan = reference_sinkhorn((feat0[0] @ feat1[0].T / 16).double().numpy(), 2.0, 3)
    to_bin0 = plan[:-1].argmax(1) == 9  # rows whose best entry is the dustbin
    to_bin1 = plan[:, :-1].argmax(0) == 10
    assert to_bin0.any() or to_bin1.any()
    expected = plan[:-1, :-1].copy()
    expected[to_bin0] = 0
    expected[:, to_bin1] = 0
    np.testing.assert_allclose(conf[0].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_ot_model_loads_bin_score_and_matches() -> None:
    """An OT model has `coarse_matching.bin_score` (as the official *_ot checkpoints) and it is used."""
    torch.manual_seed(0)
    model = LoFTR(LoFTRConfig.preset("outdoor_ot").replace(matching={"thr": 0.0})).eval()
    state = model.state_dict()
    assert state["coarse_matching.bin_score"].shape == ()
    state["coarse_matching.bin_score"] = torch.tensor(-3.0)
    model.load_state_dict({"matcher." + k: v for k, v in state.items()})  # official prefix accepted
    assert model.coarse_matching.bin_score.item() == -3.0
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 1, 64, 80), dtype=np.float32))
    with torch.inference_mode():
        out = model.match(image, image.flip(-1))
    assert len(out["confidence"]) > 0 and torch.isfinite(out["keypoints1"]).all()
    assert (out["confidence"] <= 1.0 + 1e-5).all()  # real rows carry at most probability 1
