"""Export a LoFTR model to ONNX: one graph from two grayscale images to the matches.

    python -m matchers.loftr.export_onnx --weights NAME|PATH --output model.onnx [--coarse-only] [--opset 17]

The graph (:class:`OnnxLoFTR`) has the inputs ``image0`` (1, 1, H0, W0), ``image1`` (1, 1, H1, W1) float32 in
[0, 1] (any sizes, each side best a multiple of 8, as the matcher resizes them) and ``threshold`` (a float32
scalar: the coarse confidence threshold; the exported model's own value is in the metadata), and the outputs
``keypoints0``, ``keypoints1`` (M, 2) float32 in the input images' pixels (hloc convention, like
:meth:`LoFTR.match`), ``confidence`` (M,) float32 and ``coarse_index0``, ``coarse_index1`` (M,) int64 (row-major
coarse cells), M being dynamic. Everything runs in the graph: backbone, position encoding (computed from the map
size), coarse transformer, dual-softmax or Sinkhorn confidence, mutual-nearest selection (``NonZero``), the fine
windows, fine transformer and the spatial expectation. ``--coarse-only`` leaves out the fine stage (image-1
keypoints stay on the 1/8 grid).

Like :meth:`LoFTR.match`, the backbone first computes only the coarse map and the fine branch's inputs
(``forward_coarse``); after matching, each image's window x window fine crops come from one of two branches of an
ONNX ``If``, chosen at run time by :meth:`LoFTR._windows`'s rule on the match count M: the receptive fields of the
M windows only (``fine_windows`` in one batch) when their multiply-adds are below ``lazy_fine_ratio`` of the whole
fine map's, else the whole fine map (``fine_full``) and a gather. The fine FPN heads are ~40 % of the backbone, so
computing them over the whole map made onnxruntime 1.12x slower than torch on a 640x480 scannet pair (32 matches,
``recipes/benchmarks/onnx_quiet_2026-11-30.json``); with the windows it is 0.77-0.94x torch (0.67-0.75 vs
0.80-0.87 s, 2 threads). The ``If`` is traced as a placeholder node that
:func:`branches_to_if` rewrites: each subgraph holds the nodes only its branch needs and reads the rest (and the
initializers) from the main graph, so onnxruntime runs only the chosen branch.

What is done differently from the torch modules so that the graph is exportable and size independent (the maths
is the same; results equal the torch model's up to float rounding, see ``tests/test_onnx.py``):

* linear / full attention with ``matmul`` (no einsum), every reshape with explicit sizes (no ``-1``, so M = 0
  runs too), the position encoding computed from the map size in the graph rather than cached per size;
* fine windows gathered from the zero-padded fine map with one ``Gather`` on flat indices (no ``F.unfold`` with a
  tensor stride, no Python slices sized by the match count); the receptive-field windows likewise use flat
  gathers instead of advanced indexing, map sizes from ``Shape`` (never traced constants) and one batch for all
  M windows instead of chunks.

The model's configuration (``LoFTRConfig.to_dict()`` as JSON) and the SHA-256 digest of its weights
(:func:`state_dict_digest`) are stored in the ONNX ``metadata_props``; :mod:`matchers.loftr.onnx_backend` reads
them back and refuses files without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError, run_cli
from core.files import atomic_path, check_output_file

from .backbone import FineInputs, _mid_patch_side, _valid_conv
from .config import COARSE_STRIDE, FINE_STRIDE, LoFTRConfig
from .model import LoFTR
from .position_encoding import frequencies
from .transformer import EncoderLayer, LocalFeatureTransformer

#: ``metadata_props`` keys (and the value of :data:`FORMAT_KEY`) that mark this project's exports
FORMAT_KEY = "loftr_sfm_format"
FORMAT_VALUE = "loftr-matches"
#: bumped when inputs, outputs or their meaning change; the runtime accepts only versions it knows
FORMAT_VERSION = "1"
VERSION_KEY = "loftr_sfm_format_version"
CONFIG_KEY = "loftr_config"
DIGEST_KEY = "weights_sha256"
WEIGHTS_KEY = "weights"
COARSE_ONLY_KEY = "coarse_only"
PRESET_KEY = "preset"

INPUT_NAMES = ("image0", "image1", "threshold")
OUTPUT_NAMES = ("keypoints0", "keypoints1", "confidence", "coarse_index0", "coarse_index1")
DEFAULT_OPSET = 17
#: size (W, H) of the random images the graph is traced with (any size works afterwards)
TRACE_SIZE = (96, 80)
#: the placeholder node of a run-time choice between two traced branches, turned into an ONNX ``If`` by
#: :func:`branches_to_if` before the file is written (it never reaches a file)
BRANCH_DOMAIN = "loftr_sfm.export"
BRANCH_OP = "SelectBranch"


def state_dict_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict (sorted keys; each key, dtype, shape and the tensor's bytes), layout independent.

    Two models with the same weights have the same digest whatever file (official / kornia layout) they came from.
    """
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def preset_of(config: LoFTRConfig) -> str | None:
    """The preset name whose architecture equals ``config`` (the threshold aside), or None for a custom one."""
    from .config import PRESET_NAMES

    for name in PRESET_NAMES:
        candidate = LoFTRConfig.preset(name)
        if candidate.replace(matching={"thr": config.matching.thr}) == config:
            return name
    return None


# ------------------------------------------------------------------------------------------------ the graph
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """(N, H, L, D) queries against (N, H, S, D) keys / values, with matmul only."""
    if kind == "full":
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        return torch.matmul(torch.softmax(scores, dim=3), v)
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = torch.ones_like(v[:, :, :, :1]).sum(dim=2, keepdim=True)  # S as floats (dynamic; fine with N = 0)
    v = v / length
    kv = torch.matmul(k.transpose(2, 3), v)  # (N, H, D, D)
    normaliser = torch.matmul(q, k.sum(dim=2, keepdim=True).transpose(2, 3)) + eps  # (N, H, L, 1)
    return torch.matmul(q, kv) / normaliser * length


def _layer(layer: EncoderLayer, x: torch.Tensor, source: torch.Tensor, kind: str) -> torch.Tensor:
    """:class:`EncoderLayer` forward without masks, every reshape with explicit (traced) sizes."""
    n, length, channels = x.shape[0], x.shape[1], x.shape[2]
    s = source.shape[1]
    heads, dim = layer.nhead, layer.head_dim
    q = layer.q_proj(x).reshape(n, length, heads, dim).transpose(1, 2)
    k = layer.k_proj(source).reshape(n, s, heads, dim).transpose(1, 2)
    v = layer.v_proj(source).reshape(n, s, heads, dim).transpose(1, 2)
    eps = getattr(layer.attention, "eps", 1e-6)
    message = _attention(q, k, v, kind, eps).transpose(1, 2).reshape(n, length, channels)
    message = layer.norm1(layer.merge(message))
    message = layer.norm2(layer.mlp(torch.cat([x, message], dim=2)))
    return x + message


def _transformer(
    transformer: LocalFeatureTransformer, kind: str, feat0: torch.Tensor, feat1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    for layer, name in zip(transformer.layers, transformer.layer_names):
        if name == "self":
            feat0, feat1 = _layer(layer, feat0, feat0, kind), _layer(layer, feat1, feat1, kind)
        else:
            feat0 = _layer(layer, feat0, feat1, kind)
            feat1 = _layer(layer, feat1, feat0, kind)
    return feat0, feat1


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max-shifted logsumexp (explicit, so the graph never depends on a runtime's overflow handling)."""
    top = x.amax(dim=dim, keepdim=True)
    return (top + torch.log(torch.exp(x - top).sum(dim=dim, keepdim=True))).squeeze(dim)


class _SelectBranch(torch.autograd.Function):
    """``torch.where(cond, then, other)`` in torch; in the trace one placeholder node that :func:`branches_to_if`
    turns into an ``If``, so that onnxruntime computes only the chosen branch (a ``Where`` would compute both)."""

    @staticmethod
    def forward(ctx: Any, cond: torch.Tensor, then: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.where(cond, then, other)

    @staticmethod
    def symbolic(g: Any, cond: Any, then: Any, other: Any) -> Any:
        # typed like its inputs, every size dynamic (M varies), so the exporter's shape inference goes on
        node = g.op(f"{BRANCH_DOMAIN}::{BRANCH_OP}", cond, then, other)
        return node.setType(then.type().with_sizes([None, None, None]))  # (M, window^2, C_f)


def _size(x: torch.Tensor) -> torch.Tensor:
    """(ndim,) int64 shape of ``x`` as a graph tensor (a ``Shape`` node: bounds stay dynamic, never traced ints)."""
    return torch._shape_as_tensor(x)


def _align_corners(
    pos: torch.Tensor, size_out: torch.Tensor, size_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backbone._align_corners_grid`` of the 2x upsampling (cropped to ``size_out``) at positions ``pos``.

    The scale is divided in float64 and rounded to float32 like torch's Python-float division, so the sampling
    weights are the same bits.
    """
    last_in = size_in - 1
    pos = torch.minimum(pos.clamp(min=0), size_out - 1)
    scale = (last_in.to(torch.float64) / (2 * size_in - 1).to(torch.float64)).to(torch.float32)
    src = pos.to(torch.float32) * scale
    lower = torch.minimum(torch.floor(src).to(torch.int64), last_in)
    upper = torch.minimum(lower + 1, last_in)
    return lower, upper, src - lower.to(torch.float32)


def _crops(
    feat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backbone._patches`` with one flat ``Gather``: (M, C, s, s) crops of ``feat`` (1, C, H, W) at ``rows``,
    ``cols`` (M, s), zeros off the map, and the (M, 1, s, s) inside mask; ``size`` = (H, W) as a tensor."""
    count, side = rows.shape[0], rows.shape[1]
    height, width = size[0], size[1]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    rows = torch.minimum(rows.clamp(min=0), height - 1)
    cols = torch.minimum(cols.clamp(min=0), width - 1)
    index = (rows[:, :, None] * width + cols[:, None, :]).reshape(count * side * side)
    channels = feat.shape[1]
    flat = feat[0].flatten(1).transpose(0, 1)  # (H W, C)
    crop = torch.index_select(flat, 0, index).reshape(count, side, side, channels).permute(0, 3, 1, 2)
    inside = inside[:, None].to(feat.dtype)
    return crop * inside, inside


class OnnxLoFTR(nn.Module):
    """The exportable form of a :class:`LoFTR` (batch size 1, no masks); shares the model's modules (weights)."""

    def __init__(self, model: LoFTR, coarse_only: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config
        # a model without a fine stage exports coarse-only whatever was asked
        self.coarse_only = coarse_only or not self.config.fine.enabled
        self.stride = model.coarse_stride
        coarse = self.config.coarse
        self.register_buffer("pe_freq", frequencies(coarse.d_model, coarse.temp_bug_fix), persistent=False)
        window = self.config.fine.window
        axis = torch.linspace(-1.0, 1.0, window)
        grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer(
            "fine_grid", torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1), persistent=False
        )

    # -------------------------------------------------------------------------------------- per image
    def _position_encoding(self, feat: torch.Tensor) -> torch.Tensor:
        """The (1, C, h, w) sinusoid of :func:`~matchers.loftr.position_encoding.position_encoding`, in the graph."""
        height, width = feat.shape[2], feat.shape[3]
        ones = torch.ones_like(feat[0, 0])  # (h, w)
        ys = torch.cumsum(ones, dim=0)  # 1-based row positions
        xs = torch.cumsum(ones, dim=1)
        freq = self.pe_freq[:, None, None]
        x_angle, y_angle = xs[None] * freq, ys[None] * freq  # (C/4, h, w)
        pe = torch.stack([torch.sin(x_angle), torch.cos(x_angle), torch.sin(y_angle), torch.cos(y_angle)], dim=1)
        return pe.reshape(1, self.config.coarse.d_model, height, width)

    def _encode(self, image: torch.Tensor) -> tuple[torch.Tensor, FineInputs | None]:
        """Coarse map with the position encoding, and the fine branch's inputs (the fine map is left to
        :meth:`_fine_windows`, like :meth:`LoFTR.encode_lazy`)."""
        coarse, inputs = self.model.backbone.forward_coarse(image)
        return coarse + self._position_encoding(coarse), inputs

    # -------------------------------------------------------------------------------------- matching
    def _confidence(self, feat0: torch.Tensor, feat1: torch.Tensor) -> torch.Tensor:
        """(L, S) confidence of the transformed tokens (1, L, C), (1, S, C)."""
        cfg = self.config.matching
        scale = math.sqrt(feat0.shape[-1])
        sim = torch.matmul(feat0[0] / scale, (feat1[0] / scale).transpose(0, 1))  # (L, S)
        if cfg.match_type == "dual_softmax":
            sim = sim / cfg.dsmax_temperature
            row_lse = _logsumexp(sim, 1)
            col_lse = _logsumexp(sim, 0)
            return torch.exp(2 * sim - row_lse[:, None] - col_lse[None, :])
        # log-space Sinkhorn with the dustbin (SuperGlue's log_optimal_transport, no masks)
        bin_score = self.model.coarse_matching.bin_score
        ones_row, ones_col = torch.ones_like(sim[:, 0]), torch.ones_like(sim[0, :])
        m, n = ones_row.sum(), ones_col.sum()
        norm = -torch.log(m + n)
        couplings = torch.cat(
            [
                torch.cat([sim, (ones_row * bin_score)[:, None]], dim=1),
                torch.cat([ones_col * bin_score, bin_score.reshape(1)])[None, :],
            ],
            dim=0,
        )
        log_mu = torch.cat([ones_row * norm, (torch.log(n) + norm).reshape(1)])
        log_nu = torch.cat([ones_col * norm, (torch.log(m) + norm).reshape(1)])
        u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
        for _ in range(cfg.skh_iters):
            u = log_mu - _logsumexp(couplings + v[None, :], 1)
            v = log_nu - _logsumexp(couplings + u[:, None], 0)
        assign = torch.exp(couplings + u[:, None] + v[None, :] - norm)
        conf = assign[:-1, :-1]
        if cfg.skh_prefilter:
            # the row's (column's) best entry is the dustbin: argmax picks the first maximum, so strictly greater
            to_bin0 = assign[:-1, -1] > conf.amax(dim=1)
            to_bin1 = assign[-1, :-1] > conf.amax(dim=0)
            conf = conf * (~(to_bin0[:, None] | to_bin1[None, :])).to(conf.dtype)
        return conf

    def _off_border(self, height: Any, width: Any, ids: torch.Tensor) -> torch.Tensor:
        border = self.config.matching.border_rm
        rows, cols = ids // width, ids % width
        return (rows >= border) & (cols >= border) & (rows < height - border) & (cols < width - border)

    def _windows(self, fine: torch.Tensor, ids: torch.Tensor, coarse_width: Any) -> torch.Tensor:
        """(M, window^2, C_f) crops of ``fine`` (1, C_f, Hf, Wf) centred on coarse cells ``ids``, zeros off the map."""
        window = self.config.fine.window
        half, stride = window // 2, COARSE_STRIDE // FINE_STRIDE
        padded = F.pad(fine, (half, half, half, half))[0]  # (C_f, Hf + 2 half, Wf + 2 half)
        channels, padded_width = padded.shape[0], padded.shape[2]
        flat = padded.reshape(channels, padded.shape[1] * padded_width).transpose(0, 1)  # (P, C_f)
        offsets = torch.arange(window, device=fine.device)
        rows = (ids // coarse_width * stride)[:, None] + offsets  # padded rows: centre + half + (k - half)
        cols = (ids % coarse_width * stride)[:, None] + offsets
        index = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(ids.shape[0] * window * window)
        return torch.index_select(flat, 0, index).reshape(ids.shape[0], window * window, channels)

    def _receptive_windows(self, inputs: FineInputs, ids: torch.Tensor, coarse_width: Any) -> torch.Tensor:
        """The windows of :meth:`_windows` from their receptive field only: ``ResNetFPN_8_2.fine_windows`` for all
        M windows in one batch (no chunk loop), with flat gathers instead of advanced indexing."""
        backbone = self.model.backbone
        window = self.config.fine.window
        half, stride = window // 2, COARSE_STRIDE // FINE_STRIDE
        x1, lat2 = inputs.x1, inputs.lat2
        size2, size4 = _size(x1)[2:], _size(lat2)[2:]
        side1, side_mid = window + 4, _mid_patch_side(window)
        count = ids.shape[0]
        steps = torch.arange(side1, device=ids.device)
        pos_r = (ids // coarse_width * stride - half - 2)[:, None] + steps  # (M, side1) fine rows of the patch
        pos_c = (ids % coarse_width * stride - half - 2)[:, None] + steps
        r0, r1, wr = _align_corners(pos_r, size2[0], size4[0])
        c0, c1, wc = _align_corners(pos_c, size2[1], size4[1])
        mid_r, mid_c = r0[:, :1], c0[:, :1]  # first 1/4 row / column each patch samples
        # mid head (1/4) on a side_mid patch: its input with a 2-cell halo, zeros off the map
        halo = torch.arange(side_mid + 4, device=ids.device) - 2
        lat, inside4 = _crops(lat2, mid_r + halo, mid_c + halo, size4)
        head = backbone.layer2_outconv2
        x = head[2](head[1](_valid_conv(head[0], lat))) * inside4[:, :, 1:-1, 1:-1]
        mid = _valid_conv(head[3], x)  # (M, C, side_mid, side_mid)
        # its bilinear samples at the side1 x side1 fine positions (the four corners by one flat gather each)
        channels = mid.shape[1]
        flat = mid.permute(0, 2, 3, 1).reshape(count * side_mid * side_mid, channels)
        base = (torch.cumsum(torch.ones_like(ids), 0) - 1) * (side_mid * side_mid)  # patch m starts at m side^2

        def corner(rr: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
            index = base[:, None, None] + (rr - mid_r)[:, :, None] * side_mid + (cc - mid_c)[:, None, :]
            picked = torch.index_select(flat, 0, index.reshape(count * side1 * side1))
            return picked.reshape(count, side1, side1, channels)

        wr_, wc_ = wr[:, :, None, None], wc[:, None, :, None]
        up = (1 - wr_) * ((1 - wc_) * corner(r0, c0) + wc_ * corner(r0, c1)) + wr_ * (
            (1 - wc_) * corner(r1, c0) + wc_ * corner(r1, c1)
        )
        up = up.permute(0, 3, 1, 2)
        # fine head (1/2)
        skip, inside2 = _crops(x1, pos_r, pos_c, size2)
        x = (backbone.layer1_outconv(skip) + up) * inside2
        head = backbone.layer1_outconv2
        x = head[2](head[1](_valid_conv(head[0], x))) * inside2[:, :, 1:-1, 1:-1]
        x = _valid_conv(head[3], x) * inside2[:, :, 2:-2, 2:-2]  # (M, C_f, window, window)
        return x.permute(0, 2, 3, 1).reshape(count, window * window, head[3].out_channels)

    def _windows_cheaper(self, x1: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scalar bool: :meth:`LoFTR._windows`'s rule (windows when their multiply-adds are below
        ``lazy_fine_ratio`` of the whole map's), in float64 like its Python arithmetic."""
        per_window, per_cell = self.model.backbone.window_cost(self.config.fine.window)
        shape = _size(x1).to(torch.float64)
        full = per_cell * shape[0] * shape[2] * shape[3]
        count = _size(ids)[0].to(torch.float64)
        return count * per_window < self.model.lazy_fine_ratio * full

    def _fine_windows(self, inputs: FineInputs, ids: torch.Tensor, coarse_width: Any) -> torch.Tensor:
        """(M, window^2, C_f) windows around coarse cells ``ids``: from the receptive fields when that is cheaper,
        else from the whole fine map; chosen at run time (an ``If`` in the file, see :func:`branches_to_if`)."""
        lazy = self._receptive_windows(inputs, ids, coarse_width)
        full = self._windows(self.model.backbone.fine_full(inputs), ids, coarse_width)
        return _SelectBranch.apply(self._windows_cheaper(inputs.x1, ids), lazy, full)

    def forward(self, image0: torch.Tensor, image1: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, ...]:
        coarse0, inputs0 = self._encode(image0)
        coarse1, inputs1 = self._encode(image1)
        h0, w0 = coarse0.shape[2], coarse0.shape[3]
        h1, w1 = coarse1.shape[2], coarse1.shape[3]
        c = coarse0.shape[1]
        tokens0 = coarse0.reshape(1, c, h0 * w0).transpose(1, 2)
        tokens1 = coarse1.reshape(1, c, h1 * w1).transpose(1, 2)
        tokens0, tokens1 = _transformer(self.model.loftr_coarse, self.config.coarse.attention, tokens0, tokens1)

        conf = self._confidence(tokens0, tokens1)  # (L, S)
        row_max, j_best = conf.max(dim=1)
        col_max = conf.amax(dim=0)
        all0 = torch.arange(row_max.shape[0], device=conf.device)
        keep = (row_max > torch.clamp(threshold, min=0.0)) & (col_max[j_best] == row_max)
        keep = keep & self._off_border(h0, w0, all0) & self._off_border(h1, w1, j_best)
        i_ids = torch.nonzero(keep)[:, 0]
        j_ids = j_best[i_ids]
        confidence = row_max[i_ids]

        kpts0 = torch.stack([i_ids % w0, i_ids // w0], dim=1).to(torch.float32) * self.stride
        kpts1 = torch.stack([j_ids % w1, j_ids // w1], dim=1).to(torch.float32) * self.stride
        if not self.coarse_only and inputs0 is not None and inputs1 is not None:
            kpts1 = kpts1 + self._refine(inputs0, inputs1, tokens0, tokens1, i_ids, j_ids, w0, w1)
        return kpts0, kpts1, confidence, i_ids, j_ids

    def _refine(
        self,
        inputs0: FineInputs,
        inputs1: FineInputs,
        tokens0: torch.Tensor,
        tokens1: torch.Tensor,
        i_ids: torch.Tensor,
        j_ids: torch.Tensor,
        w0: Any,
        w1: Any,
    ) -> torch.Tensor:
        """(M, 2) pixel offsets of image 1's keypoints from the fine stage."""
        cfg = self.config.fine
        win0 = self._fine_windows(inputs0, i_ids, w0)
        win1 = self._fine_windows(inputs1, j_ids, w1)
        pre = self.model.fine_preprocess
        if cfg.concat_coarse_feat:
            count = i_ids.shape[0]
            coarse = pre.down_proj(torch.cat([tokens0[0][i_ids], tokens1[0][j_ids]], dim=0))  # (2M, C_f)
            weight = pre.merge_feat.weight
            coarse_term = F.linear(coarse, weight[:, cfg.d_model :], pre.merge_feat.bias)
            merged = F.linear(torch.cat([win0, win1], dim=0), weight[:, : cfg.d_model]) + coarse_term[:, None, :]
            win0, win1 = merged[:count], merged[count:]
        win0, win1 = _transformer(self.model.loftr_fine, cfg.attention, win0, win1)
        ww, channels = cfg.window * cfg.window, cfg.d_model
        centre = win0[:, ww // 2, :]  # (M, C_f)
        sim = torch.matmul(win1, centre[:, :, None])[:, :, 0]  # (M, ww)
        heatmap = torch.softmax(sim / math.sqrt(channels), dim=1)
        return torch.matmul(heatmap, self.fine_grid) * float(cfg.window // 2 * FINE_STRIDE)


# ------------------------------------------------------------------------------------------------ If rewrite
def _outer_names(graph: Any) -> set[str]:
    """Names a (sub)graph reads but does not produce itself: from the outer scope."""
    produced = {name for node in graph.node for name in node.output}
    produced |= {i.name for i in graph.input} | {i.name for i in graph.initializer}
    return {name for node in graph.node for name in _reads(node)} - produced


def _reads(node: Any) -> list[str]:
    """Every tensor ``node`` reads: its inputs and, for control flow, what its subgraphs take from outside."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            names.extend(sorted(_outer_names(sub)))
    return names


def _ancestors(nodes: list[Any], names: list[str], producer: dict[str, int], cut: int | None = None) -> set[int]:
    """Indices of the nodes that ``names`` depend on; node ``cut`` is entered by its first input (cond) only."""
    seen: set[int] = set()
    stack = [producer[name] for name in names if name in producer]
    while stack:
        index = stack.pop()
        if index in seen:
            continue
        seen.add(index)
        node = nodes[index]
        reads = [node.input[0]] if index == cut else _reads(node)
        stack.extend(producer[name] for name in reads if name in producer)
    return seen


def _branch_graph(body: list[Any], value: str, result: str, infos: dict[str, Any]) -> Any:
    """An ``If`` branch: the nodes ``body`` (in order) and an ``Identity`` of their ``value`` to the output."""
    from onnx import TensorProto, helper

    body = body + [helper.make_node("Identity", [value], [result])]
    produced = {name for node in body for name in node.output}
    return helper.make_graph(
        body,
        f"{result}_branch",
        [],
        [helper.make_tensor_value_info(result, TensorProto.FLOAT, None)],
        value_info=[infos[name] for name in sorted(produced) if name in infos],
    )


def _select_to_if(graph: Any) -> bool:
    """Replace the first placeholder of ``graph`` by an ``If`` (in place); False when there is none."""
    from onnx import helper

    nodes = list(graph.node)
    cut = next((k for k, n in enumerate(nodes) if n.domain == BRANCH_DOMAIN and n.op_type == BRANCH_OP), None)
    if cut is None:
        return False
    select = nodes[cut]
    cond, then_name, else_name = select.input
    producer = {name: k for k, node in enumerate(nodes) for name in node.output if name}
    # what the graph's outputs need other than through the two branch values stays in the main graph, and so
    # does what both branches need (computed either way)
    outside = _ancestors(nodes, [o.name for o in graph.output], producer, cut) - {cut}
    only_then = _ancestors(nodes, [then_name], producer) - outside
    only_else = _ancestors(nodes, [else_name], producer) - outside
    shared = only_then & only_else
    only_then, only_else = only_then - shared, only_else - shared
    infos = {info.name: info for info in graph.value_info}
    name = select.output[0]
    branch = helper.make_node(
        "If",
        [cond],
        list(select.output),
        name=f"{select.name or name}_if",
        then_branch=_branch_graph([nodes[k] for k in sorted(only_then)], then_name, f"{name}_windows", infos),
        else_branch=_branch_graph([nodes[k] for k in sorted(only_else)], else_name, f"{name}_full", infos),
    )
    moved = only_then | only_else
    moved_names = {out for k in moved for out in nodes[k].output}
    kept = [branch if k == cut else node for k, node in enumerate(nodes) if k not in moved]
    kept_infos = [info for info in graph.value_info if info.name not in moved_names]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]
    graph.value_info.extend(kept_infos)
    return True


def branches_to_if(proto: Any) -> int:
    """Replace every placeholder ``SelectBranch(cond, then, else)`` of ``proto`` by an ``If`` (in place).

    Each branch subgraph takes the nodes only that branch needs (kept in topological order); whatever the rest of
    the graph or both branches need stays in the main graph, which the subgraphs read from the outer scope (as they
    do the initializers). Returns the number of ``If`` nodes made.
    """
    made = 0
    while _select_to_if(proto.graph):
        made += 1
    kept = [op for op in proto.opset_import if op.domain != BRANCH_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return made


# ------------------------------------------------------------------------------------------------ export
def export(
    model: LoFTR,
    output: str | os.PathLike[str],
    coarse_only: bool = False,
    opset: int = DEFAULT_OPSET,
    weights_label: str | None = None,
) -> Path:
    """Write ``model`` as an ONNX file (checked with ``onnx.checker``, metadata set); returns the path.

    Written atomically: a failed export leaves no file behind.
    """
    import onnx

    if opset < 17:
        raise UserError(f"--opset must be at least 17 (LayerNorm is an ONNX operator from opset 17 on), got {opset}")
    model = model.to("cpu").eval()
    graph = OnnxLoFTR(model, coarse_only).eval()
    width, height = TRACE_SIZE
    generator = torch.Generator().manual_seed(0)
    image0 = torch.rand(1, 1, height, width, generator=generator)
    image1 = torch.rand(1, 1, height, width, generator=generator)
    threshold = torch.tensor(0.0)  # traced with matches (the model's default threshold is in the metadata)
    dynamic_axes = {"image0": {2: "height0", 3: "width0"}, "image1": {2: "height1", 3: "width1"}}
    dynamic_axes.update({name: {0: "matches"} for name in OUTPUT_NAMES})
    output = Path(output)
    with atomic_path(output) as temp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: the sizes stay dynamic
        torch.onnx.export(
            graph,
            (image0, image1, threshold),
            str(temp),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
        proto = onnx.load(str(temp))
        branches_to_if(proto)
        metadata = {
            FORMAT_KEY: FORMAT_VALUE,
            VERSION_KEY: FORMAT_VERSION,
            CONFIG_KEY: json.dumps(model.config.to_dict(), sort_keys=True),
            DIGEST_KEY: state_dict_digest(model),
            WEIGHTS_KEY: weights_label or str(getattr(model, "weights_name", "custom")),
            COARSE_ONLY_KEY: "true" if graph.coarse_only else "false",
            PRESET_KEY: preset_of(model.config) or "custom",
        }
        onnx.helper.set_model_props(proto, metadata)
        proto.producer_name = "loftr-sfm"
        proto.doc_string = (
            "LoFTR matcher exported by python -m matchers.loftr.export_onnx; inputs image0, image1 "
            "(1,1,H,W) float in [0,1], threshold (scalar); outputs keypoints0/1 (M,2), confidence "
            "(M,), coarse_index0/1 (M,)"
        )
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(temp))
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m matchers.loftr.export_onnx",
        description="Export LoFTR (any preset) to an ONNX file that make_matcher('loftr', weights='FILE.onnx') and "
        "every --weights option run with onnxruntime.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="LoFTR weights: a name (outdoor, indoor, indoor_ds_new, loftr-compact, loftr-student, ...) or a .ckpt path",
    )
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--coarse-only",
        action="store_true",
        help="leave out the fine stage: image-1 keypoints stay on the 1/8 grid (faster)",
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="architecture of a .ckpt path (default: stored in the file, else guessed from it)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="default coarse match threshold stored in the file (default: the preset's)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default {DEFAULT_OPSET})")
    return parser


def main(
    weights: str,
    output: str | Path,
    coarse_only: bool = False,
    preset: str | None = None,
    threshold: float | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export the LoFTR ``weights`` (a name or a .ckpt path) to ``output`` (.onnx) and print what was written."""
    output = str(output)
    if not output.endswith(".onnx"):
        raise UserError(f"--output {output} must end with .onnx (that is how --weights recognises ONNX files)")
    if weights.lower().endswith(".onnx"):
        raise UserError(
            f"--weights {weights} is already an ONNX export; pass the weights it came from (a name or a .ckpt path)"
        )
    check_output_file(output, "--output", example="model.onnx")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError(
            "the onnx package is not installed; pip install onnx onnxruntime (or pip install -e .)"
        ) from None
    from .weights import load_pretrained

    model = load_pretrained(weights, "cpu", preset=preset, threshold=threshold)
    path = export(model, output, coarse_only=coarse_only, opset=opset)
    size = path.stat().st_size / 2**20
    kind = "coarse-only " if coarse_only or not model.config.fine.enabled else ""
    print(
        f"wrote {path} ({kind}LoFTR, {preset_of(model.config) or 'custom config'}, {size:.1f} MB, "
        f"opset {opset}, weights sha256 {state_dict_digest(model)[:12]}...)"
    )
    return path


def main_cli(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    return main(args.weights, args.output, args.coarse_only, args.preset, args.threshold, args.opset)


if __name__ == "__main__":
    run_cli(main_cli)
