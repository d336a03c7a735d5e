"""Fine preprocessing: crop a window x window patch of the 1/2 map around each coarse match.

The window of coarse cell (x, y) is centred on fine cell (s x, s y) with s = coarse stride / fine stride = 4, and
is zero outside the map: the same values as ``F.unfold(fine, window, stride=s, padding=window // 2)`` at that
cell, but only the matched windows are gathered instead of unfolding the whole map (window^2 times its size).
With ``concat_coarse_feat`` the transformed coarse feature of the cell is projected to the fine width
(``down_proj``) and merged into every window position (``merge_feat`` on [fine, coarse]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gather_windows(
    fine: torch.Tensor, b_ids: torch.Tensor, cell_ids: torch.Tensor, coarse_width: int, window: int, stride: int
) -> torch.Tensor:
    """(M, window^2, C) patches of ``fine`` (N, C, Hf, Wf) around the cells ``cell_ids`` (row-major on the coarse
    grid of width ``coarse_width``) of batch items ``b_ids``; row-major within the window, zeros off the map."""
    height, width = fine.shape[2], fine.shape[3]
    half = window // 2
    offsets = torch.arange(-half, half + 1, device=fine.device)
    rows = (cell_ids // coarse_width * stride)[:, None] + offsets  # (M, window)
    cols = (cell_ids % coarse_width * stride)[:, None] + offsets
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    patches = fine[b_ids[:, None, None], :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    inside = (row_ok[:, :, None] & col_ok[:, None, :])[..., None]  # (M, window, window, 1)
    patches = patches * inside.to(patches.dtype)  # (M, window, window, C)
    return patches.reshape(cell_ids.shape[0], window * window, fine.shape[1])


class FinePreprocess(nn.Module):
    """Builds the (M, window^2, C_f) token sets of both images for the fine transformer."""

    def __init__(self, coarse_dim: int, fine_dim: int, window: int, concat_coarse_feat: bool, stride: int) -> None:
        super().__init__()
        self.window = window
        self.stride = stride
        self.fine_dim = fine_dim
        self.concat_coarse_feat = concat_coarse_feat
        if concat_coarse_feat:
            self.down_proj = nn.Linear(coarse_dim, fine_dim, bias=True)
            self.merge_feat = nn.Linear(2 * fine_dim, fine_dim, bias=True)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")

    def forward(
        self,
        fine0: torch.Tensor,
        fine1: torch.Tensor,
        coarse0: torch.Tensor,
        coarse1: torch.Tensor,
        b_ids: torch.Tensor,
        i_ids: torch.Tensor,
        j_ids: torch.Tensor,
        coarse_width0: int,
        coarse_width1: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fine maps (N, C_f, Hf, Wf); transformed coarse tokens (N, L|S, C_c); matches (b, i, j)."""
        ww = self.window * self.window
        if b_ids.numel() == 0:
            empty = fine0.new_zeros(0, ww, self.fine_dim)
            return empty, empty.clone()
        win0 = gather_windows(fine0, b_ids, i_ids, coarse_width0, self.window, self.stride)
        win1 = gather_windows(fine1, b_ids, j_ids, coarse_width1, self.window, self.stride)
        return self.merge(win0, win1, coarse0, coarse1, b_ids, i_ids, j_ids)

    def merge(
        self,
        win0: torch.Tensor,
        win1: torch.Tensor,
        coarse0: torch.Tensor,
        coarse1: torch.Tensor,
        b_ids: torch.Tensor,
        i_ids: torch.Tensor,
        j_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge the matched cells' coarse features into their (M, window^2, C_f) windows (if configured)."""
        if not self.concat_coarse_feat or b_ids.numel() == 0:
            return win0, win1
        coarse = self.down_proj(torch.cat([coarse0[b_ids, i_ids], coarse1[b_ids, j_ids]], dim=0))  # (2M, C_f)
        # merge_feat([window, coarse]) split into its two halves: the coarse half is computed once per match
        # instead of once per window position.
        w_fine, w_coarse = self.merge_feat.weight[:, : self.fine_dim], self.merge_feat.weight[:, self.fine_dim :]
        coarse_term = F.linear(coarse, w_coarse, self.merge_feat.bias)  # (2M, C_f)
        merged = F.linear(torch.cat([win0, win1], dim=0), w_fine) + coarse_term[:, None, :]
        return merged[: b_ids.shape[0]], merged[b_ids.shape[0] :]
