"""Multi-head attention kernels used by the LoFTR transformer layers.

Both take queries (N, L, H, D), keys (N, S, H, D), values (N, S, H, D) and optional boolean masks
(N, L) / (N, S) where True marks a real (not padded) token, and return (N, L, H, D). Padded keys take no part in
any output, padded queries get a zero message.

The attention arithmetic runs in float32 even under CUDA autocast: the linear attention sums over thousands of
tokens, which overflows float16.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or kept in float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def float32_region(device: torch.device) -> AbstractContextManager[None]:
    """Disable autocast around a block so it computes in float32."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device argument
        enabled = torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()
    if enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


class LinearAttention(nn.Module):
    """Linear attention of "Transformers are RNNs" with the elu(x)+1 feature map.

    out_l = phi(q_l) . sum_s phi(k_s) v_s^T / (phi(q_l) . sum_s phi(k_s) + eps); cost O((L + S) D^2) per head.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        q_mask: torch.Tensor | None = None,
        kv_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out_dtype = queries.dtype
        with float32_region(queries.device):
            q = F.elu(at_least_float32(queries)) + 1
            k = F.elu(at_least_float32(keys)) + 1
            v = at_least_float32(values)
            if q_mask is not None:
                q = q * q_mask[:, :, None, None].to(q.dtype)
            if kv_mask is not None:
                kv = kv_mask[:, :, None, None].to(k.dtype)
                k = k * kv
                v = v * kv
            length = v.shape[1]
            # Scaling the values by 1/S and the result by S is the official formulation; it keeps the KV sums
            # small. The factors cancel up to rounding, so we keep them for bit-level closeness to the reference.
            v = v / length
            kv_sum = torch.einsum("nshd,nshv->nhdv", k, v)  # (N, H, D, V)
            normaliser = torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + self.eps
            out = torch.einsum("nlhd,nhdv->nlhv", q, kv_sum) / normaliser[..., None] * length
        return out.to(out_dtype)


class FullAttention(nn.Module):
    """Softmax attention (scaled by 1/sqrt(D)) through ``torch.nn.functional.scaled_dot_product_attention``."""

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        q_mask: torch.Tensor | None = None,
        kv_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (queries, keys, values))  # (N, H, L|S, D)
        attn_mask = None
        if kv_mask is not None:
            # Masking keys only: a padded query still has valid keys, so no row is all -inf (which gives NaN);
            # its output is zeroed below instead.
            attn_mask = kv_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
        if q_mask is not None:
            out = out * q_mask[:, :, None, None].to(out.dtype)
        return out.contiguous()


def build_attention(kind: str) -> nn.Module:
    """'linear' or 'full'."""
    if kind == "linear":
        return LinearAttention()
    if kind == "full":
        return FullAttention()
    raise ValueError(f"unknown attention {kind!r}")
