"""Inference-time optimisations of a :class:`~matchers.loftr.model.LoFTR` (results equal up to float rounding).

``optimize_for_inference(model)`` returns an evaluation-mode *copy* (the given model, its state dict and its
training use are untouched) with:

* **BatchNorm folded into the preceding convolutions** (``fold_batchnorm``, opt-in:
  ``InferenceOptions(fold_bn=True)``): ``bn(conv(x)) = conv'(x)`` with ``w' = w * gamma / sqrt(var + eps)`` and
  ``b' = beta - mean * gamma / sqrt(var + eps)``; every BatchNorm layer of the backbone becomes an ``Identity``,
  saving one read/write pass over each feature map. It is off by default: it saves about 5 % of a 640x480 pair, but
  its rounding changes the features by ~1e-6 relative, enough to flip a mutual-nearest-neighbour near-tie now and
  then (one of 22 random-weight matches at 640x480 in the benchmark), whereas the other two options give exactly
  kornia's matches;
* **channels_last** convolution weights (oneDNN's fast layout on CPU, tensor cores on GPU);
* **fused transformers** (linear attention only): one q/k/v product, both images' self layers in one batch, one
  product for the attention's numerator and normaliser (:class:`FusedLocalFeatureTransformer`);
* **onnxruntime** for the backbone's coarse pass and the coarse transformer on the CPU, when it is installed
  (:mod:`matchers.loftr.ort_stages`; the torch modules above stay the fallback for masks, autocast, GPUs).

The folded copy has different state-dict keys (conv biases, no BN buffers), so it is meant for inference only:
load weights into the original model, then optimise. Measured effects on this project's benchmark machine are in
``recipes/benchmark.py``'s output and the README.

GPU notes (not measurable on the CPU-only benchmark machine): run the matcher under fp16/bf16 autocast
(``LoFTRMatcher(amp="bf16")``); the attention kernels, coarse matching and fine matching keep their sums and
softmaxes in float32 (see :mod:`matchers.loftr.attention`), and ``attention="full"`` goes through
``scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LinearAttention, at_least_float32, float32_region
from .model import LoFTR
from .ort_stages import to_onnxruntime
from .transformer import EncoderLayer, LocalFeatureTransformer


@dataclass(frozen=True)
class InferenceOptions:
    """What :func:`optimize_for_inference` applies."""

    fold_bn: bool = False  # opt-in: ~5 % faster, but can flip near-tie matches (see the module docstring)
    channels_last: bool = True
    fuse_transformer: bool = True
    #: the coarse pass and the coarse transformer in onnxruntime on the CPU (:mod:`matchers.loftr.ort_stages`)
    onnxruntime: bool = True


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution equal to ``bn(conv(x))`` with ``bn`` in evaluation mode (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        # computed in float64 so the folded weights round once, like the unfolded two-step computation
        inv_std = (bn.running_var.double() + bn.eps).rsqrt()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
        scale = gamma * inv_std
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
        fused.weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype))
        fused.bias.copy_(((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype))
    fused.requires_grad_(conv.weight.requires_grad)
    return fused


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold, in place, every ``BatchNorm2d`` that directly follows a ``Conv2d`` into it; returns ``module``.

    Pairs are found the way the LoFTR backbone (and most ResNets) are written: adjacent ``Conv2d``, ``BatchNorm2d``
    children of a ``Sequential``, and ``convK`` / ``bnK`` attributes of other modules. The BatchNorm is replaced by
    ``Identity`` so the parent's ``forward`` is unchanged. Only valid in evaluation mode.
    """
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (BatchNorm must use running statistics)")
    for parent in list(module.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            setattr(parent, conv_name, fold_conv_bn(getattr(parent, conv_name), getattr(parent, bn_name)))
            setattr(parent, bn_name, nn.Identity())
    return module


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) child names of ``parent`` whose forward applies the BatchNorm to the convolution's output only."""
    children = dict(parent.named_children())
    names = list(children)
    if isinstance(parent, nn.Sequential):
        candidates = list(zip(names, names[1:]))  # a Sequential chains its children in order
    else:
        # hand-written blocks: conv1 -> bn1, conv2 -> bn2 (anything else is left alone rather than guessed)
        candidates = [(name, "bn" + name[len("conv") :]) for name in names if name.startswith("conv")]
    return [
        (c, b)
        for c, b in candidates
        if isinstance(children.get(c), nn.Conv2d) and isinstance(children.get(b), nn.BatchNorm2d)
    ]


class FusedEncoderLayer(nn.Module):
    """Inference form of :class:`~matchers.loftr.transformer.EncoderLayer` with linear attention (same maths).

    q/k/v projections are one matrix product (k/v one for cross layers), and the linear attention's numerator
    and normaliser come from one batched product (the key sum is appended to the KV matrix as an extra column).
    Fewer, larger kernels matter on a small shared CPU, where every parallel region waits for all threads.
    """

    def __init__(self, layer: EncoderLayer) -> None:
        super().__init__()
        self.nhead, self.head_dim = layer.nhead, layer.head_dim
        self.eps = layer.attention.eps
        with torch.no_grad():
            self.w_qkv = nn.Parameter(
                torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]), requires_grad=False
            )
        self.merge, self.mlp, self.norm1, self.norm2 = layer.merge, layer.mlp, layer.norm1, layer.norm2

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor | None,
        x_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``source=None``: self attention (then ``source_mask`` is ``x_mask``)."""
        return x + self.message(x, source, x_mask, source_mask)

    def message(
        self,
        x: torch.Tensor,
        source: torch.Tensor | None,
        x_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the layer adds to ``x`` (its residual branch)."""
        n, length, channels = x.shape
        if source is None:
            q, k, v = F.linear(x, self.w_qkv).split(channels, dim=2)
            source_mask = x_mask
        else:
            q = F.linear(x, self.w_qkv[:channels])
            k, v = F.linear(source, self.w_qkv[channels:]).split(channels, dim=2)
        heads, dim = self.nhead, self.head_dim
        with float32_region(x.device):
            q = F.elu(at_least_float32(q)).add_(1).view(n, length, heads, dim)
            k = F.elu(at_least_float32(k)).add_(1).view(n, -1, heads, dim)
            v = at_least_float32(v).view(n, -1, heads, dim)
            if x_mask is not None:
                q = q * x_mask[:, :, None, None].to(q.dtype)
            if source_mask is not None:
                kv_mask = source_mask[:, :, None, None].to(k.dtype)
                k, v = k * kv_mask, v * kv_mask
            # [sum_s k v^T | sum_s k] per head: (N, H, D, D + 1); one product gives numerator and normaliser
            kv = torch.einsum("nshd,nshv->nhdv", k, torch.cat([v, torch.ones_like(v[..., :1])], dim=3))
            out = torch.einsum("nlhd,nhdv->nlhv", q, kv)
            message = out[..., :dim] / (out[..., dim:] + self.eps)
        message = self.norm1(self.merge(message.reshape(n, length, channels).to(x.dtype)))
        return self.norm2(self.mlp(torch.cat([x, message], dim=2)))


class FusedLocalFeatureTransformer(nn.Module):
    """Inference form of :class:`~matchers.loftr.transformer.LocalFeatureTransformer` (linear attention only).

    Same layer order and maths; a 'self' layer processes both images as one batch when their token counts match.
    """

    def __init__(self, transformer: LocalFeatureTransformer) -> None:
        super().__init__()
        self.d_model = transformer.d_model
        self.layer_names = transformer.layer_names
        self.layers = nn.ModuleList(FusedEncoderLayer(layer) for layer in transformer.layers)

    @staticmethod
    def supports(transformer: nn.Module) -> bool:
        return isinstance(transformer, LocalFeatureTransformer) and all(
            isinstance(layer.attention, LinearAttention) for layer in transformer.layers
        )

    def first_self_layer(self, feat: torch.Tensor) -> torch.Tensor:
        """Layer 0 (a 'self' layer) on one image's unmasked tokens: resume with ``forward(..., start=1)``."""
        if self.layer_names[0] != "self":
            raise ValueError("the first layer is not a self-attention layer")
        return feat + self.layers[0].message(feat, None, None)

    def forward(
        self,
        feat0: torch.Tensor,
        feat1: torch.Tensor,
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers ``start`` onwards (``start=1`` after :meth:`first_self_layer` on each image)."""
        together = feat0.shape == feat1.shape and (mask0 is None) == (mask1 is None)
        layers = list(zip(self.layers, self.layer_names))[start:]
        if not together:
            for layer, name in layers:
                if name == "self":
                    feat0, feat1 = layer(feat0, None, mask0), layer(feat1, None, mask1)
                else:
                    feat0 = layer(feat0, feat1, mask0, mask1)
                    feat1 = layer(feat1, feat0, mask1, mask0)
            return feat0, feat1
        # Both images' tokens live in one (2N, L, C) buffer for the whole stack: self layers run on it as one
        # batch and every layer adds its message in place, so no layer copies the tokens (same maths and order).
        n = feat0.shape[0]
        both = torch.cat([feat0, feat1])
        masks = None if mask0 is None else torch.cat([mask0, mask1])
        for layer, name in layers:
            if name == "self":
                both.add_(layer.message(both, None, masks))
            else:
                both[:n].add_(layer.message(both[:n], both[n:], mask0, mask1))
                both[n:].add_(layer.message(both[n:], both[:n], mask1, mask0))
        return both[:n], both[n:]


def optimize_for_inference(model: LoFTR, options: InferenceOptions | None = None) -> LoFTR:
    """An evaluation-mode copy of ``model`` with the optimisations of ``options`` (default: all) applied."""
    options = options if options is not None else InferenceOptions()
    optimized = copy.deepcopy(model).eval()
    if options.fold_bn:
        fold_batchnorm(optimized.backbone)
    plain_coarse = optimized.loftr_coarse
    if options.fuse_transformer:
        for name in ("loftr_coarse", "loftr_fine"):  # a coarse-only model has no loftr_fine
            if hasattr(optimized, name) and FusedLocalFeatureTransformer.supports(getattr(optimized, name)):
                setattr(optimized, name, FusedLocalFeatureTransformer(getattr(optimized, name)))
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    optimized.backbone.to(memory_format=memory_format)
    if options.onnxruntime:
        to_onnxruntime(optimized, plain_coarse)
    optimized.inference_options = options  # type: ignore[attr-defined]
    return optimized
