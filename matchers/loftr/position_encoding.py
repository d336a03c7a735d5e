"""2D sinusoidal position encoding added to the coarse feature map.

Channel ``4k`` holds ``sin(x * f_k)``, ``4k+1`` ``cos(x * f_k)``, ``4k+2`` ``sin(y * f_k)``, ``4k+3`` ``cos(y * f_k)``
with 1-based cell positions x, y. With ``temp_bug_fix`` the frequencies are ``10000^(-2k / (d/2))``; without it they
are ``exp(-2k)``, the operator-precedence slip of the original code (zju3dv/LoFTR issue #41) that every released
checkpoint except ``indoor_ds_new`` was trained with, so it must be reproduced to use those weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def frequencies(d_model: int, temp_bug_fix: bool) -> torch.Tensor:
    """The ``d_model // 4`` angular frequencies, float32."""
    steps = torch.arange(0, d_model // 2, 2, dtype=torch.float32)
    if temp_bug_fix:
        rate = -math.log(10000.0) / (d_model // 2)
    else:
        # The released code evaluates `-log(10000) / d_model // 2`, i.e. floor(-log(10000)/d_model / 2) = -1.
        rate = -math.log(10000.0) / d_model // 2
    return torch.exp(steps * rate)


def position_encoding(
    d_model: int, height: int, width: int, temp_bug_fix: bool, device: torch.device | None = None
) -> torch.Tensor:
    """The (1, d_model, height, width) float32 encoding of a coarse map."""
    freq = frequencies(d_model, temp_bug_fix).to(device)[:, None, None]
    ys = torch.arange(1, height + 1, dtype=torch.float32, device=device)[None, :, None].expand(1, height, width)
    xs = torch.arange(1, width + 1, dtype=torch.float32, device=device)[None, None, :].expand(1, height, width)
    x_angle, y_angle = xs * freq, ys * freq  # (d/4, H, W)
    pe = torch.stack([x_angle.sin(), x_angle.cos(), y_angle.sin(), y_angle.cos()], dim=1)  # (d/4, 4, H, W)
    return pe.reshape(1, d_model, height, width)


class PositionEncodingSine(nn.Module):
    """Adds the encoding to an (N, d_model, H, W) map; encodings are cached per size (not in the state dict)."""

    def __init__(self, d_model: int, temp_bug_fix: bool) -> None:
        super().__init__()
        self.d_model = d_model
        self.temp_bug_fix = temp_bug_fix
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def encoding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._cache:
            if len(self._cache) > 16:  # many image sizes: keep memory bounded
                self._cache.clear()
            self._cache[key] = position_encoding(self.d_model, height, width, self.temp_bug_fix, device)
        return self._cache[key]

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        pe = self.encoding(feat.shape[2], feat.shape[3], feat.device)
        return feat + pe.to(feat.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, temp_bug_fix={self.temp_bug_fix}"
