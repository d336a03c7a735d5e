"""Fine matching: sub-pixel refinement by spatial expectation over the window of image 1.

The centre token of image 0's window is correlated with the window^2 tokens of image 1; a softmax at temperature
1/sqrt(C) gives a heatmap whose expectation on the window grid (normalised to [-1, 1]) is the offset of the match
in image 1, and whose per-axis standard deviations (summed) are the uncertainty used by the official fine loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import at_least_float32, float32_region


class FineMatching(nn.Module):
    """No parameters. Returns (offsets (M, 2) in [-1, 1] window units as (x, y), std (M,))."""

    def forward(self, feat0: torch.Tensor, feat1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count, ww, channels = feat1.shape
        side = int(round(ww**0.5))
        if count == 0:
            empty = feat1.new_zeros(0, 2, dtype=torch.float32)
            return empty, empty[:, 0]
        with float32_region(feat1.device):
            centre = at_least_float32(feat0[:, ww // 2, :])
            sim = torch.einsum("mc,mrc->mr", centre, at_least_float32(feat1))
            heatmap = torch.softmax(sim / channels**0.5, dim=1)  # (M, ww), row-major (y, x)
            axis = torch.linspace(-1.0, 1.0, side, device=feat1.device, dtype=heatmap.dtype)
            grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
            grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)  # (ww, 2) as (x, y)
            mean = heatmap @ grid  # (M, 2)
            var = heatmap @ grid.square() - mean.square()
            std = var.clamp(min=1e-10).sqrt().sum(dim=1)
        return mean, std
