"""LoFTR training losses: log-space dual-softmax, focal terms, optimal-transport variant, fine L2 / std."""

from __future__ import annotations

import math

import torch

from matchers.loftr.coarse_matching import dual_softmax, log_optimal_transport
from recipes.training.losses import (
    LossConfig,
    coarse_loss,
    dual_softmax_log_confidence,
    fine_loss,
    focal_negative,
    focal_positive,
)


def test_log_confidence_equals_log_of_the_models_dual_softmax() -> None:
    torch.manual_seed(0)
    sim = torch.randn(2, 7, 5) * 3
    mask0 = torch.ones(2, 7, dtype=torch.bool)
    mask0[1, 5:] = False
    mask1 = torch.ones(2, 5, dtype=torch.bool)
    mask1[0, 4:] = False
    log_p = dual_softmax_log_confidence(sim, mask0, mask1)
    conf = dual_softmax(sim.clone(), mask0, mask1)
    valid = mask0[:, :, None] & mask1[:, None, :]
    assert torch.allclose(log_p[valid].exp(), conf[valid], atol=1e-6)
    # independent hand computation for an unmasked item
    s = sim[0, :, :4]
    m = mask0[0]
    s = s[m]
    expected = torch.softmax(s, dim=1) * torch.softmax(s, dim=0)
    assert torch.allclose(log_p[0, :, :4][m].exp(), expected, atol=1e-6)
    assert (log_p[~valid] < -1e8).all()


def test_focal_loss_has_a_gradient_where_clamped_confidence_has_none() -> None:
    # 1200 tokens a side (320x240): at initialisation every dual-softmax confidence is about 1/1200^2 < 1e-6
    torch.manual_seed(0)
    feats0 = (0.1 * torch.randn(1, 1200, 32)).requires_grad_()
    feats1 = 0.1 * torch.randn(1, 1200, 32)
    sim = feats0 @ feats1.transpose(1, 2) / 32 / 0.1
    conf_gt = torch.zeros(1, 1200, 1200)
    idx = torch.arange(1200)
    conf_gt[0, idx, idx.flip(0)] = 1
    log_p = dual_softmax_log_confidence(sim)
    assert float(log_p.detach().exp()[conf_gt > 0].max()) < 1e-6
    loss = coarse_loss(log_p, conf_gt)
    (grad,) = torch.autograd.grad(loss, feats0, retain_graph=True)
    assert torch.isfinite(loss) and float(grad.abs().sum()) > 1e-3
    # the clamped version (the official code clamps conf to [1e-6, 1 - 1e-6]) is flat there
    conf = torch.exp(log_p).clamp(1e-6, 1 - 1e-6)
    clamped = (-0.25 * (1 - conf[conf_gt > 0]).pow(2) * conf[conf_gt > 0].log()).mean()
    (grad_clamped,) = torch.autograd.grad(clamped, feats0)
    assert float(grad_clamped.abs().sum()) == 0.0


def test_focal_terms_match_the_formula() -> None:
    p = torch.tensor([0.1, 0.5, 0.9])
    pos = focal_positive(p.log(), 0.25, 2.0)
    neg = focal_negative(p.log(), 0.25, 2.0)
    assert torch.allclose(pos, -0.25 * (1 - p) ** 2 * p.log())
    assert torch.allclose(neg, -0.75 * p**2 * (1 - p).log())
    # a tiny confidence: log(1 - p) stays accurate (not log(1) = 0 in float32)
    tiny = torch.tensor([-30.0])
    assert float(focal_negative(tiny, 0.25, 0.0)) > 0


def test_coarse_loss_sparse_and_dense() -> None:
    log_p = torch.log(torch.tensor([[[0.5, 0.1], [0.2, 0.8]]]))
    gt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    sparse = coarse_loss(log_p, gt)
    expected_pos = (-0.25 * 0.25 * math.log(0.5) - 0.25 * 0.04 * math.log(0.8)) / 2
    assert math.isclose(float(sparse), expected_pos, rel_tol=1e-5)
    dense = coarse_loss(log_p, gt, LossConfig(dense=True))
    expected_neg = (-0.75 * 0.01 * math.log(0.9) - 0.75 * 0.04 * math.log(0.8)) / 2
    assert math.isclose(float(dense), expected_pos + expected_neg, rel_tol=1e-5)
    # no GT: zero, but still differentiable
    x = torch.zeros(1, 2, 2, requires_grad=True)
    empty = coarse_loss(x, torch.zeros(1, 2, 2))
    empty.backward()
    assert float(empty.detach()) == 0.0 and x.grad is not None


def test_optimal_transport_loss_uses_dustbins_for_unmatched_cells() -> None:
    torch.manual_seed(1)
    scores = torch.randn(1, 3, 4, requires_grad=True)
    bin_score = torch.tensor(0.5, requires_grad=True)
    log_assign = log_optimal_transport(scores, bin_score, iters=3)
    gt = torch.zeros(1, 3, 4)
    gt[0, 0, 1] = 1
    gt[0, 2, 3] = 1
    loss = coarse_loss(log_assign, gt, sinkhorn=True)
    # positives: (0,1), (2,3); negatives: row 1 -> dustbin column, columns 0 and 2 -> dustbin row
    pos = torch.stack([log_assign[0, 0, 1], log_assign[0, 2, 3]])
    neg = torch.stack([log_assign[0, 1, 4], log_assign[0, 3, 0], log_assign[0, 3, 2]])
    expected = focal_positive(pos, 0.25, 2).mean() + focal_positive(neg, 0.25, 2).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert bin_score.grad is not None and float(bin_score.grad.abs()) > 0


def test_fine_loss_weights_by_inverse_std_and_ignores_out_of_window() -> None:
    pred = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.0, 0.0]], requires_grad=True)
    std = torch.tensor([1.0, 0.5, 0.1])
    gt = torch.tensor([[0.2, 0.0], [0.5, 0.0], [1.5, 0.0]])  # the third lies outside the window
    loss = fine_loss(pred, std, gt)
    inv = torch.tensor([1.0, 2.0])
    w = inv / inv.mean()
    expected = (w * torch.tensor([0.04, 0.25])).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert float(pred.grad[2].abs().sum()) == 0.0  # ignored match
    none_inside = fine_loss(pred, std, torch.full((3, 2), 2.0))
    assert float(none_inside.detach()) == 0.0
