"""LoFTR's transformer: encoder layers interleaved as self- and cross-attention on two token sets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import build_attention


class EncoderLayer(nn.Module):
    """One attention layer: message = LN(merge(attn(x, source))); x + LN(MLP([x, message])).

    Projections have no bias and the MLP is 2d -> 2d -> d with ReLU, as in the official layer (whose ``d_ffn``
    setting is unused).
    """

    def __init__(self, d_model: int, nhead: int, attention: str = "linear") -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.attention = build_attention(attention)
        self.merge = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, 2 * d_model, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(2 * d_model, d_model, bias=False),
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        x_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, L, C) attends to source (N, S, C); masks (N, L) / (N, S) bool, True = real token."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, -1, self.nhead, self.head_dim)
        k = self.k_proj(source).view(n, -1, self.nhead, self.head_dim)
        v = self.v_proj(source).view(n, -1, self.nhead, self.head_dim)
        message = self.attention(q, k, v, q_mask=x_mask, kv_mask=source_mask)
        message = self.norm1(self.merge(message.reshape(n, -1, self.nhead * self.head_dim)))
        message = self.norm2(self.mlp(torch.cat([x, message], dim=2)))
        return x + message


class LocalFeatureTransformer(nn.Module):
    """A stack of 'self' / 'cross' layers applied to the features of both images.

    A 'self' layer updates each image from itself. A 'cross' layer first updates feat0 from feat1, then feat1
    from the *updated* feat0 (the official order; the model is therefore not symmetric in its inputs).
    """

    def __init__(self, d_model: int, nhead: int, layer_names: Sequence[str], attention: str = "linear") -> None:
        super().__init__()
        self.d_model = d_model
        self.layer_names = tuple(layer_names)
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, attention) for _ in self.layer_names)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        feat0: torch.Tensor,
        feat1: torch.Tensor,
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if feat0.shape[2] != self.d_model or feat1.shape[2] != self.d_model:
            raise ValueError(f"expected {self.d_model} channels, got {feat0.shape[2]} and {feat1.shape[2]}")
        for layer, name in zip(self.layers, self.layer_names):
            if name == "self":
                feat0 = layer(feat0, feat0, mask0, mask0)
                feat1 = layer(feat1, feat1, mask1, mask1)
            elif name == "cross":
                feat0 = layer(feat0, feat1, mask0, mask1)
                feat1 = layer(feat1, feat0, mask1, mask0)
            else:
                raise ValueError(f"unknown layer type {name!r}")
        return feat0, feat1
