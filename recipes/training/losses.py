"""The LoFTR training losses (Sun et al., CVPR 2021, Sec. 3.5), computed in log space.

Total loss (paper Eq. 5 / 6): ``L = L_c + L_f``.

Coarse loss ``L_c`` (paper Eq. 5, "focal loss" variant of the official code). With the transformed coarse features
F0 (L tokens), F1 (S tokens), scaled by 1/sqrt(C), the score matrix is ``S(i, j) = <F0_i, F1_j> / tau``
(paper Eq. 2, tau = 0.1) and the dual-softmax confidence is (paper Eq. 3)

    P_c(i, j) = softmax(S(i, .))_j * softmax(S(., j))_i.

It is evaluated here as ``log P_c = 2 S - logsumexp_j S(i, j) - logsumexp_i S(i, j)`` (a log_softmax over each
row plus one over each column). That matters: with ~1200 tokens per image, P_c starts below 1e-6, so a focal loss
on a *clamped* P_c has no gradient, whereas ``log P_c`` keeps its full gradient. Focal loss (alpha = 0.25,
gamma = 2) over the GT matches M_c^gt:

    L_c = -1/|M+| sum_{(i,j) in M+} alpha (1 - P)^gamma log P
          -1/|M-| sum_{(i,j) in M-} (1 - alpha) P^gamma log(1 - P)          (the M- term only if ``dense``)

The official dual-softmax training uses sparse supervision (positives only, there is no dustbin); ``dense`` adds
every non-match as a negative, with ``log(1 - P) = log(-expm1(log P))``.

Optimal-transport variant (paper Eq. 4, SuperGlue's log-space Sinkhorn with a dustbin): positives are the GT
entries of the (L+1) x (S+1) assignment, negatives are the dustbin entries of unmatched rows / columns, both with
the same focal weighting on ``log P`` of the coupling.

Fine loss ``L_f`` (paper Eq. 6): for each GT coarse match whose GT offset lies inside the 5x5 window
(max |offset| < 1 in normalised units), the squared error of the predicted expectation, weighted by the inverse of
the predicted heat-map standard deviation (normalised to mean 1 and detached, as in the official
``_compute_fine_loss_l2_std``):

    L_f = 1/|M_f| sum_i  (1 / sigma^2(i) normalised) * || j_hat'_i - j'_gt,i ||^2

(the official code uses 1/std with std the summed per-axis standard deviation; so does this module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and focal parameters (official defaults)."""

    focal_alpha: float = 0.25  # focal loss alpha (coarse)
    focal_gamma: float = 2.0  # focal loss gamma (coarse)
    pos_weight: float = 1.0  # weight of the coarse loss on true matches
    neg_weight: float = 1.0  # weight of the coarse loss on non-matches
    coarse_weight: float = 1.0  # weight of the coarse loss in the total
    fine_weight: float = 1.0  # weight of the fine loss in the total
    #: dual-softmax: also supervise non-matches (official: False, "sparse supervision")
    dense: bool = False
    #: fine GT offsets with max |offset| >= this are outside the window and ignored
    fine_correct_thr: float = 1.0


def dual_softmax_log_confidence(
    sim: torch.Tensor, mask0: torch.Tensor | None = None, mask1: torch.Tensor | None = None
) -> torch.Tensor:
    """log P_c (paper Eq. 3) of temperature-scaled scores ``sim`` (N, L, S): log_softmax over rows + columns.

    Padded cells (masks (N, L) / (N, S), True = real) are excluded from both softmaxes; their log-confidence is
    set to a very negative value (they are never used as GT anyway).
    """
    if mask0 is not None or mask1 is not None:
        valid = torch.ones_like(sim, dtype=torch.bool)
        if mask0 is not None:
            valid = valid & mask0[:, :, None].bool()
        if mask1 is not None:
            valid = valid & mask1[:, None, :].bool()
        sim = sim.masked_fill(~valid, -1e9)
    log_p = torch.log_softmax(sim, dim=2) + torch.log_softmax(sim, dim=1)
    if mask0 is not None or mask1 is not None:
        log_p = log_p.masked_fill(~valid, -1e9)
    return log_p


def focal_positive(log_p: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """-alpha (1 - p)^gamma log p, elementwise, from log p."""
    p = log_p.exp()
    return -alpha * (1 - p).clamp(min=0).pow(gamma) * log_p


def focal_negative(log_p: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """-(1 - alpha) p^gamma log(1 - p), elementwise, from log p (log(1 - p) = log(-expm1(log p)))."""
    log_p = log_p.clamp(max=-1e-7)  # p < 1 so log(1 - p) is finite
    p = log_p.exp()
    # accurate log(1 - p) for both ends (Maechler's log1mexp): expm1 near p = 1, log1p for small p
    log_1mp = torch.where(log_p > -math.log(2), torch.log(-torch.expm1(log_p)), torch.log1p(-p))
    return -(1 - alpha) * p.pow(gamma) * log_1mp


def coarse_loss(
    log_conf: torch.Tensor,
    conf_gt: torch.Tensor,
    config: LossConfig = LossConfig(),
    sinkhorn: bool = False,
    mask0: torch.Tensor | None = None,
    mask1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss L_c (paper Eq. 5) on log-confidences.

    ``log_conf``: (N, L, S) dual-softmax log P_c, or (N, L+1, S+1) Sinkhorn log-assignment when ``sinkhorn``;
    ``conf_gt``: (N, L, S) 0/1. Returns a scalar (0 with a zero gradient path when there is no GT match).
    """
    alpha, gamma = config.focal_alpha, config.focal_gamma
    pos = conf_gt > 0.5
    if sinkhorn:
        core = log_conf[:, :-1, :-1]
        loss_pos = focal_positive(core[pos], alpha, gamma)
        neg0 = ~pos.any(dim=2)  # rows without a match -> dustbin column
        neg1 = ~pos.any(dim=1)  # columns without a match -> dustbin row
        if mask0 is not None:
            neg0 &= mask0.bool()
        if mask1 is not None:
            neg1 &= mask1.bool()
        neg_log = torch.cat([log_conf[:, :-1, -1][neg0], log_conf[:, -1, :-1][neg1]])
        # the dustbin entries are the *positives* of unmatched cells: same focal form (official code)
        loss_neg = focal_positive(neg_log, alpha, gamma)
    else:
        loss_pos = focal_positive(log_conf[pos], alpha, gamma)
        if config.dense:
            neg = ~pos
            if mask0 is not None:
                neg &= mask0[:, :, None].bool()
            if mask1 is not None:
                neg &= mask1[:, None, :].bool()
            loss_neg = focal_negative(log_conf[neg], alpha, gamma)
        else:
            loss_neg = log_conf.new_zeros(0)
    total = log_conf.sum() * 0.0  # keeps the graph when a term is empty
    if loss_pos.numel():
        total = total + config.pos_weight * loss_pos.mean()
    if loss_neg.numel():
        total = total + config.neg_weight * loss_neg.mean()
    return total


def fine_loss(
    pred_offsets: torch.Tensor, pred_std: torch.Tensor, gt_offsets: torch.Tensor, config: LossConfig = LossConfig()
) -> torch.Tensor:
    """L2 loss weighted by the inverse std (paper Eq. 6), over matches whose GT lies inside the window.

    ``pred_offsets`` / ``gt_offsets`` (M, 2) in normalised window units, ``pred_std`` (M,).
    """
    correct = gt_offsets.abs().amax(dim=1) < config.fine_correct_thr
    if not bool(correct.any()):
        return pred_offsets.sum() * 0.0
    inverse_std = 1.0 / pred_std[correct].clamp(min=1e-10)
    weight = (inverse_std / inverse_std.mean()).detach()
    error = (pred_offsets[correct] - gt_offsets[correct]).square().sum(dim=1)
    return (error * weight).mean()
