"""Knowledge distillation of a coarse-only LoFTR student from a teacher's coarse confidence matrix.

The teacher (any LoFTR: ``loftr-compact``, the official ``outdoor_ds``, ...) runs frozen, in eval mode, on the pair
resized by ``teacher_scale``; its dual-softmax (or Sinkhorn) confidence P_T (L_T x S_T) is pooled onto the
student's coarse grid (:func:`pool_confidence`), and the student learns it with :func:`match_kl`, plus the
ground-truth coarse focal loss of :mod:`.losses` where the data source gives GT (homography and synthetic sources
always do).

Grids. A teacher of coarse stride s_T run on images scaled by ``teacher_scale`` has cells every
s_T / teacher_scale original pixels; the student (stride s_S) has cells every s_S. Their ratio k must be a
positive integer: each student cell then covers k x k teacher cells. With the compact teacher (s_T 8) at scale 0.5
and the student (s_S 16), k = 1 (the teacher at 320x240 and the student at 640x480 share their 40 x 30 grid, up to
the half-pixel shift of a 2x downsampling); with the official teacher at scale 1, k = 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.errors import UserError
from matchers.loftr.model import LoFTR

from .losses import LossConfig, coarse_loss, dual_softmax_log_confidence
from .supervision import Supervision
from .trainer import coarse_log_confidence, encode_pair


@dataclass(frozen=True)
class DistillConfig:
    """What the student learns from (defaults: the shipped ``loftr-student`` run)."""

    distill_weight: float = 1.0  # weight of the KL between teacher and student match distributions
    gt_weight: float = 1.0  # weight of the ground-truth coarse focal loss (0: pure distillation)
    teacher_scale: float = 0.5  # the teacher sees the pair resized by this factor (0.5: compact at 320x240)
    teacher_threshold: float = 0.0  # teacher confidences below this are zeroed before pooling (0: keep all)


def pool_confidence(conf: torch.Tensor, shape0: tuple[int, int], shape1: tuple[int, int], k: int) -> torch.Tensor:
    """(N, L, S) confidence on (h0, w0) x (h1, w1) teacher grids -> (N, L / k^2, S / k^2) on grids k times coarser.

    Entry (I, J) is the teacher's mass between the k x k block I and the block J, divided by k^2: the mean over the
    cells of block I of their mass towards block J. Row and column sums stay <= 1 (a sub-stochastic matrix like a
    dual-softmax confidence), so :func:`match_kl`'s "no match" bins stay well defined. ``k = 1`` is the identity.
    """
    if k == 1:
        return conf
    n = conf.shape[0]
    (h0, w0), (h1, w1) = shape0, shape1
    if h0 % k or w0 % k or h1 % k or w1 % k:
        raise ValueError(f"teacher grids {shape0}, {shape1} are not multiples of the pooling factor {k}")
    x = conf.reshape(n, h0 // k, k, w0 // k, k, h1 // k, k, w1 // k, k)
    x = x.sum(dim=(2, 4, 6, 8))
    return x.reshape(n, (h0 // k) * (w0 // k), (h1 // k) * (w1 // k)) / float(k * k)


def _side_kl(log_student: torch.Tensor, teacher: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over rows (``dim`` 2) or columns (``dim`` 1) of KL(teacher || student) over cells + a no-match bin."""
    eps = 1e-6
    t_none = (1.0 - teacher.sum(dim)).clamp(min=0.0)
    s_sum = torch.logsumexp(log_student, dim).exp().clamp(max=1.0 - eps)
    log_s_none = torch.log1p(-s_sum)
    kl_cells = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(dim)
    kl_none = torch.xlogy(t_none, t_none) - t_none * log_s_none
    return (kl_cells + kl_none).mean()


def match_kl(log_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distillation loss between the student's log-confidence (N, L, S) and the teacher's confidence (N, L, S).

    Row i of a dual-softmax confidence P (entries >= 0, row sum <= 1) is read as a distribution over the S cells of
    image 1 plus "no match" (mass 1 - sum_j P(i, j)); likewise every column. The loss is the mean of
    KL(teacher row || student row) over rows and of the same over columns, halved: zero exactly when the two
    matrices agree, positive otherwise.
    """
    if log_student.shape != teacher.shape:
        raise ValueError(f"student {tuple(log_student.shape)} and teacher {tuple(teacher.shape)} grids differ")
    teacher = teacher.to(log_student.dtype)
    return 0.5 * (_side_kl(log_student, teacher, 2) + _side_kl(log_student, teacher, 1))


def pool_factor(teacher: LoFTR, student: LoFTR, teacher_scale: float) -> int:
    """How many teacher cells per side one student cell covers (a positive integer, else UserError)."""
    ratio = student.coarse_stride * teacher_scale / teacher.coarse_stride
    k = round(ratio)
    if k < 1 or not math.isclose(ratio, k, rel_tol=1e-6):
        raise UserError(
            f"--teacher-scale {teacher_scale}: a student cell ({student.coarse_stride} px) must cover a whole number "
            f"of teacher cells ({teacher.coarse_stride} px at scale {teacher_scale}); e.g. use "
            f"{teacher.coarse_stride / student.coarse_stride:g} or 1"
        )
    return k


@torch.no_grad()
def teacher_confidence(teacher: LoFTR, batch: dict[str, torch.Tensor], scale: float, k: int) -> torch.Tensor:
    """The teacher's coarse confidence of ``batch`` (images resized by ``scale``), pooled by ``k``: (N, L, S)."""
    small = dict(batch)
    if scale != 1.0:
        for key in ("image0", "image1"):
            image = batch[key]
            size = (round(image.shape[2] * scale), round(image.shape[3] * scale))
            small[key] = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    enc0, enc1 = encode_pair(teacher, small)
    tokens0, tokens1, mask0, mask1 = teacher.transform_coarse(enc0, enc1)
    conf = coarse_log_confidence(teacher, tokens0, tokens1, mask0, mask1).exp()
    if teacher.config.matching.match_type == "sinkhorn":
        conf = conf[:, :-1, :-1]  # drop the dustbin row and column
    return pool_confidence(conf, enc0.coarse_shape, enc1.coarse_shape, k)


def distill_losses(
    student: LoFTR,
    batch: dict[str, torch.Tensor],
    teacher_conf: torch.Tensor,
    sup: Supervision | None,
    config: DistillConfig,
    loss_config: LossConfig = LossConfig(),
) -> dict[str, torch.Tensor]:
    """Student forward pass and its losses: ``loss`` = distill_weight * ``loss_kd`` + gt_weight * ``loss_gt``."""
    enc0, enc1 = encode_pair(student, batch)
    tokens0, tokens1, mask0, mask1 = student.transform_coarse(enc0, enc1)
    cfg = student.config.matching
    scale = tokens0.shape[-1] ** 0.5
    sim = torch.bmm(tokens0.float() / scale, (tokens1.float() / scale).transpose(1, 2))
    log_conf = dual_softmax_log_confidence(sim / cfg.dsmax_temperature, mask0, mask1)
    if config.teacher_threshold > 0:
        teacher_conf = teacher_conf * (teacher_conf >= config.teacher_threshold)
    loss_kd = match_kl(log_conf, teacher_conf.to(log_conf.device))
    if sup is not None and config.gt_weight > 0:
        loss_gt = coarse_loss(log_conf, sup.conf_gt.to(log_conf.device), loss_config, False, mask0, mask1)
    else:
        loss_gt = log_conf.sum() * 0.0
    loss = config.distill_weight * loss_kd + config.gt_weight * loss_gt
    return {"loss": loss, "loss_kd": loss_kd.detach(), "loss_gt": loss_gt.detach()}
