"""Coarse matching: the confidence matrix between the two coarse token sets and the match selection.

Two ways to build the (N, L, S) confidence matrix from transformed features scaled by 1/sqrt(C):

* dual-softmax: ``softmax_rows(sim / T) * softmax_cols(sim / T)``, computed as ``exp(2 s - lse_row - lse_col)``
  so only one L x S matrix is alive (plus row-chunk temporaries);
* optimal transport: log-space Sinkhorn with a learnable dustbin score ``bin_score`` (the SuperGlue formulation
  used by the official ``*_ot`` checkpoints).

A match is a cell pair whose confidence exceeds the threshold, is the maximum of its row and of its column (mutual
nearest neighbour) and lies at least ``border_rm`` cells inside both images' valid areas.

All of this runs in float32 even under autocast, so masked entries never need float16-overflowing constants.
Masks are boolean, True for real (unpadded) cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import at_least_float32, float32_region
from .config import MatchingConfig

#: similarity given to padded cells: effectively -inf for a softmax, but finite so doubled it stays finite
_MASKED = torch.finfo(torch.float32).min / 8
#: rows per block when reducing an L x S matrix, so temporaries stay around 16 MB
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class CoarseMatches:
    """Selected coarse matches: batch index, cell index in image 0 (row-major) and in image 1, confidence."""

    b_ids: torch.Tensor
    i_ids: torch.Tensor
    j_ids: torch.Tensor
    confidence: torch.Tensor

    def __len__(self) -> int:
        return int(self.b_ids.shape[0])


def _scaled_similarity(feat0: torch.Tensor, feat1: torch.Tensor) -> torch.Tensor:
    """(N, L, S) dot products of the features, each scaled by 1/sqrt(C) as in the official code."""
    scale = feat0.shape[-1] ** 0.5
    return torch.bmm(feat0 / scale, (feat1 / scale).transpose(1, 2))


def _apply_masks(
    sim: torch.Tensor, mask0: torch.Tensor | None, mask1: torch.Tensor | None, value: float, inplace: bool
) -> torch.Tensor:
    """Set rows of padded image-0 cells and columns of padded image-1 cells to ``value``."""
    if mask0 is not None:
        sim = sim.masked_fill_(~mask0[:, :, None], value) if inplace else sim.masked_fill(~mask0[:, :, None], value)
        inplace = True  # sim is now our own copy
    if mask1 is not None:
        sim = sim.masked_fill_(~mask1[:, None, :], value) if inplace else sim.masked_fill(~mask1[:, None, :], value)
    return sim


def _row_col_logsumexp(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over columns (N, L) and over rows (N, S), reading ``sim`` in row blocks."""
    n, rows, cols = sim.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * cols))
    row_lse = sim.new_empty(n, rows)
    col_parts = []
    for start in range(0, rows, chunk):
        block = sim[:, start : start + chunk]
        row_lse[:, start : start + chunk] = torch.logsumexp(block, dim=2)
        col_parts.append(torch.logsumexp(block, dim=1))
    col_lse = col_parts[0] if len(col_parts) == 1 else torch.logsumexp(torch.stack(col_parts, dim=1), dim=1)
    return row_lse, col_lse


def dual_softmax(
    sim: torch.Tensor, mask0: torch.Tensor | None = None, mask1: torch.Tensor | None = None, inplace: bool = False
) -> torch.Tensor:
    """softmax(sim, dim=1) * softmax(sim, dim=2), zero at padded cells. ``sim`` is float32 (N, L, S).

    ``inplace`` reuses ``sim``'s memory for the result (inference only).
    """
    sim = _apply_masks(sim, mask0, mask1, _MASKED, inplace)
    row_lse, col_lse = _row_col_logsumexp(sim)
    if inplace or not sim.requires_grad:
        conf = sim.mul_(2).sub_(row_lse[:, :, None]).sub_(col_lse[:, None, :]).exp_()
    else:
        conf = torch.exp(2 * sim - row_lse[:, :, None] - col_lse[:, None, :])
    if mask0 is not None or mask1 is not None:
        conf = _apply_masks(conf, mask0, mask1, 0.0, inplace=not conf.requires_grad)
    return conf


def log_optimal_transport(
    scores: torch.Tensor,
    bin_score: torch.Tensor,
    iters: int,
    mask0: torch.Tensor | None = None,
    mask1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-space Sinkhorn on ``scores`` (N, L, S) augmented with a dustbin row and column of value ``bin_score``.

    Marginals: every real cell of image 0 has mass 1 and image 0's dustbin mass n (image 1's real cells), and
    symmetrically, all divided by (m + n); the returned (N, L+1, S+1) log-coupling is multiplied by (m + n), so a
    converged real row sums to 1 in probability space. m and n count real (unpadded) cells of each pair; padded
    cells get zero mass (log -inf), so a padded pair gives the same result as the unpadded one. Without masks this
    is exactly SuperGlue's ``log_optimal_transport``.
    """
    n_batch, rows, cols = scores.shape
    device, dtype = scores.device, scores.dtype
    valid0 = torch.ones(n_batch, rows, dtype=torch.bool, device=device) if mask0 is None else mask0.bool()
    valid1 = torch.ones(n_batch, cols, dtype=torch.bool, device=device) if mask1 is None else mask1.bool()
    true_col = torch.ones(n_batch, 1, dtype=torch.bool, device=device)
    row_valid = torch.cat([valid0, true_col], dim=1)  # (N, L+1): the dustbin row is always real
    col_valid = torch.cat([valid1, true_col], dim=1)  # (N, S+1)

    m = valid0.sum(1).to(dtype)  # real cells per pair
    n = valid1.sum(1).to(dtype)
    norm = -(m + n).log()  # (N,)

    couplings = torch.cat(
        [
            torch.cat([scores, bin_score.to(dtype).expand(n_batch, rows, 1)], dim=2),
            bin_score.to(dtype).expand(n_batch, 1, cols + 1),
        ],
        dim=1,
    )
    if mask0 is not None or mask1 is not None:
        couplings = couplings.masked_fill(~(row_valid[:, :, None] & col_valid[:, None, :]), float("-inf"))

    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    log_mu = torch.where(row_valid, norm[:, None], neg_inf)
    log_mu[:, -1] = n.log() + norm
    log_nu = torch.where(col_valid, norm[:, None], neg_inf)
    log_nu[:, -1] = m.log() + norm

    u = torch.zeros_like(log_mu)
    v = torch.zeros_like(log_nu)
    zero = torch.zeros((), dtype=dtype, device=device)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
        u = torch.where(row_valid, u, zero)  # padded rows: -inf - (-inf); their mass is zero anyway
        v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)
        v = torch.where(col_valid, v, zero)
    return couplings + u[:, :, None] + v[:, None, :] - norm[:, None, None]


def _off_border(
    shape: tuple[int, int], mask2d: torch.Tensor | None, border: int, batch: int, device: torch.device
) -> torch.Tensor:
    """(N, h*w) bool: cells at least ``border`` cells inside the valid area of each image.

    The valid area is the top-left rectangle given by the mask (the number of valid rows / columns), or the whole
    map without a mask: the official ``mask_border_with_padding`` / ``mask_border``.
    """
    h, w = shape
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    if mask2d is None:
        h_end = torch.full((batch, 1, 1), h, device=device)
        w_end = torch.full((batch, 1, 1), w, device=device)
    else:
        h_end = mask2d.sum(1).amax(-1).view(batch, 1, 1)
        w_end = mask2d.sum(2).amax(-1).view(batch, 1, 1)
    keep = (rows >= border) & (cols >= border) & (rows < h_end - border) & (cols < w_end - border)
    return keep.expand(batch, h, w).reshape(batch, h * w)


def select_matches(
    conf: torch.Tensor,
    shape0: tuple[int, int],
    shape1: tuple[int, int],
    threshold: float,
    border_rm: int,
    mask2d0: torch.Tensor | None = None,
    mask2d1: torch.Tensor | None = None,
) -> CoarseMatches:
    """Threshold + border removal + mutual nearest neighbour on an (N, L, S) confidence matrix.

    A zero confidence is never a match (padded cells have confidence 0), even with a threshold <= 0.
    """
    batch = conf.shape[0]
    with torch.no_grad():
        row_max, j_best = conf.max(dim=2)  # (N, L)
        col_max = conf.amax(dim=1)  # (N, S)
        keep = (row_max > max(threshold, 0.0)) & (torch.gather(col_max, 1, j_best) == row_max)
        keep &= _off_border(shape0, mask2d0, border_rm, batch, conf.device)
        keep &= torch.gather(_off_border(shape1, mask2d1, border_rm, batch, conf.device), 1, j_best)
        b_ids, i_ids = torch.nonzero(keep, as_tuple=True)
        j_ids = j_best[b_ids, i_ids]
    return CoarseMatches(b_ids, i_ids, j_ids, conf[b_ids, i_ids, j_ids])


#: an L x S similarity matrix larger than this is never materialised at inference: it is recomputed in row blocks
#: from the features (two matrix products instead of one), so a 1600x1200 pair (L = S = 30,000, 3.6 GB per
#: L x S copy) runs in a few hundred MB
MAX_MATRIX_BYTES = 1 << 30
#: elements per row block of the blocked selection: a block of about the L2 cache keeps its elementwise passes
#: out of RAM while keeping the number of (thread-synchronising) kernel launches small
_BLOCK_ELEMENTS = 1 << 20
#: at least this many rows per block when blocks are recomputed, so each product reads image 1's features for
#: many rows at once (a product of a few rows is bound by memory bandwidth)
_RECOMPUTE_ROWS = 256


def select_dual_softmax(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    temperature: float,
    shape0: tuple[int, int],
    shape1: tuple[int, int],
    threshold: float,
    border_rm: int,
    mask2d0: torch.Tensor | None = None,
    mask2d1: torch.Tensor | None = None,
    max_matrix_bytes: int | None = None,
) -> CoarseMatches:
    """Dual-softmax matching + selection without materialising the confidence matrix (inference only).

    Equal to ``select_matches(dual_softmax(sim / T), ...)``: the log-confidence ``t = 2 s - lse_row - lse_col`` is
    formed one row block at a time (blocks of L2-cache size) and reduced to row maxima / argmaxima and column
    maxima on the fly, so at most one L x S matrix (the similarity) is alive; when that matrix would exceed
    ``max_matrix_bytes`` (default :data:`MAX_MATRIX_BYTES`) it is not stored at all and each block is recomputed
    from the features in both passes (the chunked mutual-nearest-neighbour path for very large images).
    Row and column maxima are taken over the very same ``t`` values, so the mutual check is exact.
    """
    budget = MAX_MATRIX_BYTES if max_matrix_bytes is None else max_matrix_bytes
    batch, rows, cols = feat0.shape[0], feat0.shape[1], feat1.shape[1]
    device = feat0.device
    mask0 = None if mask2d0 is None else mask2d0.flatten(1)
    mask1 = None if mask2d1 is None else mask2d1.flatten(1)
    with torch.no_grad(), float32_region(device):
        f0, f1 = at_least_float32(feat0), at_least_float32(feat1)
        scale = f0.shape[-1] ** 0.5
        f1t = (f1 / scale).transpose(1, 2)
        stored = batch * rows * cols * f0.element_size() <= budget
        block_rows = max(1, _BLOCK_ELEMENTS // max(1, batch * cols))
        if not stored:
            block_rows = max(block_rows, _RECOMPUTE_ROWS)

        def masked(block: torch.Tensor, start: int) -> torch.Tensor:
            if mask0 is not None:
                block.masked_fill_(~mask0[:, start : start + block.shape[1], None], _MASKED)
            if mask1 is not None:
                block.masked_fill_(~mask1[:, None, :], _MASKED)
            return block

        sim = None
        if stored:
            sim = torch.bmm(f0 / scale, f1t).div_(temperature)
            sim = masked(sim, 0)

        def block_at(start: int) -> torch.Tensor:
            if sim is not None:  # noqa: F821  (freed by `del sim` only after the last call)
                return sim[:, start : start + block_rows]  # noqa: F821
            return masked(torch.bmm(f0[:, start : start + block_rows] / scale, f1t).div_(temperature), start)

        # pass 1: logsumexp of every row, and of every column per block, then over the blocks
        row_lse = f0.new_empty(batch, rows)
        col_parts = []
        for start in range(0, rows, block_rows):
            block = block_at(start)
            row_lse[:, start : start + block.shape[1]] = torch.logsumexp(block, dim=2)
            col_parts.append(torch.logsumexp(block, dim=1))
        col_lse = torch.logsumexp(torch.stack(col_parts, dim=1), dim=1)
        del col_parts

        # pass 2: t = 2 s - lse_row - lse_col per block; its row max / argmax and column max
        row_best = f0.new_empty(batch, rows)
        j_best = torch.empty(batch, rows, dtype=torch.long, device=device)
        col_best = f0.new_full((batch, cols), float("-inf"))
        for start in range(0, rows, block_rows):
            block = block_at(start)
            stop = start + block.shape[1]
            t = block.mul(2.0).sub_(row_lse[:, start:stop, None]).sub_(col_lse[:, None, :])
            row_best[:, start:stop], j_best[:, start:stop] = t.max(dim=2)
            torch.maximum(col_best, t.amax(dim=1), out=col_best)
        del sim

        conf_best = row_best.exp()  # confidence of each row's best column: softmax_row * softmax_col
        keep = (conf_best > max(threshold, 0.0)) & (torch.gather(col_best, 1, j_best) == row_best)
        keep &= _off_border(shape0, mask2d0, border_rm, batch, device)
        keep &= torch.gather(_off_border(shape1, mask2d1, border_rm, batch, device), 1, j_best)
        if mask0 is not None:
            keep &= mask0
        if mask1 is not None:
            keep &= torch.gather(mask1, 1, j_best)
        b_ids, i_ids = torch.nonzero(keep, as_tuple=True)
        j_ids = j_best[b_ids, i_ids]
    return CoarseMatches(b_ids, i_ids, j_ids, conf_best[b_ids, i_ids])


class CoarseMatching(nn.Module):
    """Confidence matrix + selection. Holds ``bin_score`` (state-dict key ``coarse_matching.bin_score``) for OT."""

    def __init__(self, config: MatchingConfig) -> None:
        super().__init__()
        self.config = config
        #: see :data:`MAX_MATRIX_BYTES` (None: that default); inference-only setting, not in the state dict
        self.max_matrix_bytes: int | None = None
        if config.match_type == "sinkhorn":
            self.bin_score = nn.Parameter(torch.tensor(float(config.skh_init_bin_score)))
        elif config.match_type != "dual_softmax":
            raise ValueError(f"unknown match_type {config.match_type!r}")

    def confidence(
        self,
        feat0: torch.Tensor,
        feat1: torch.Tensor,
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, L, S) float32 confidence of transformed coarse tokens (N, L, C), (N, S, C); masks (N, L), (N, S)."""
        cfg = self.config
        with float32_region(feat0.device):
            sim = _scaled_similarity(at_least_float32(feat0), at_least_float32(feat1))
            grad = sim.requires_grad
            if cfg.match_type == "dual_softmax":
                sim = sim.div_(cfg.dsmax_temperature) if not grad else sim / cfg.dsmax_temperature
                return dual_softmax(sim, mask0, mask1, inplace=not grad)
            log_assign = log_optimal_transport(sim, self.bin_score.to(sim.dtype), cfg.skh_iters, mask0, mask1)
            assign = log_assign.exp()
            conf = assign[:, :-1, :-1]
            if cfg.skh_prefilter and not self.training:
                rows, cols = conf.shape[1], conf.shape[2]
                to_bin0 = assign.argmax(dim=2)[:, :-1] == cols  # (N, L): best choice of the row is the dustbin
                to_bin1 = assign.argmax(dim=1)[:, :-1] == rows  # (N, S)
                conf = conf.masked_fill(to_bin0[:, :, None] | to_bin1[:, None, :], 0.0)
            return conf

    def forward(
        self,
        feat0: torch.Tensor,
        feat1: torch.Tensor,
        shape0: tuple[int, int],
        shape1: tuple[int, int],
        mask2d0: torch.Tensor | None = None,
        mask2d1: torch.Tensor | None = None,
        threshold: float | None = None,
    ) -> CoarseMatches:
        """Select matches between coarse maps of sizes ``shape0`` / ``shape1`` (h, w); masks (N, h, w) bool."""
        thr = self.config.thr if threshold is None else threshold
        budget = MAX_MATRIX_BYTES if self.max_matrix_bytes is None else self.max_matrix_bytes
        too_large = feat0.shape[0] * feat0.shape[1] * feat1.shape[1] * 4 > budget
        if self.config.match_type == "dual_softmax" and too_large and not torch.is_grad_enabled():
            # the in-place single-matrix path below is faster when the matrix fits (measured: ~2x at 1024x768)
            return select_dual_softmax(
                feat0,
                feat1,
                self.config.dsmax_temperature,
                shape0,
                shape1,
                thr,
                self.config.border_rm,
                mask2d0,
                mask2d1,
                self.max_matrix_bytes,
            )
        mask0 = None if mask2d0 is None else mask2d0.flatten(1)
        mask1 = None if mask2d1 is None else mask2d1.flatten(1)
        conf = self.confidence(feat0, feat1, mask0, mask1)
        return select_matches(conf, shape0, shape1, thr, self.config.border_rm, mask2d0, mask2d1)
