"""The LoFTR model: backbone -> position encoding -> coarse transformer -> coarse matching -> fine refinement.

Usage::

    model = LoFTR(LoFTRConfig.preset("outdoor_ds")).eval()
    model.load_state_dict(state_dict)            # kornia's or the official keys ('matcher.' prefix stripped)
    out = model.match(image0, image1)            # (1, 1, H, W) float tensors in [0, 1], any H, W
    out["keypoints0"], out["keypoints1"], out["confidence"]

Per-image work is separable so it can be cached across pairs::

    e0, e1 = model.encode(image0), model.encode(image1)      # backbone + position encoding
    out = model.match_encoded(e0, e1)                        # == model.match(image0, image1)

Coordinate convention
---------------------
Keypoints are (x, y) pixel coordinates of the input image, (0, 0) being the centre of the top-left pixel (hloc's
convention). Every strided convolution of the backbone has a centred kernel, so coarse cell (cx, cy) is computed
at pixel (8 cx, 8 cy), for any image size (maps have ceil(H/8) x ceil(W/8) cells; nothing is padded or resized):

* ``keypoints0 = 8 * (cx, cy)`` of the matched cell of image 0 (image 0 is not refined);
* ``keypoints1 = 8 * (cx', cy') + offset``, the fine offset being at most (window // 2) * 2 = 4 px per axis.

These are exactly the numbers ``kornia.feature.LoFTR`` and the official code return (no shift is applied). Note
that kornia's documentation argues the released models were trained with ground truth in which pixel centres sit
at +0.5, i.e. that subtracting 0.5 from both keypoints would be marginally more accurate; hloc, like this module,
uses the raw values.

Batches
-------
:meth:`forward` takes (N, 1, H, W) batches with optional (N, H, W) validity masks (True/1 = real pixel), as kornia
does; a coarse cell takes the mask value of the pixel it sits on. :meth:`match_batch` matches pairs of different
sizes in one batch: each image is encoded alone (so results equal per-pair matching), then the feature maps are
zero-padded to a common size and the padded cells are masked out of attention, matching and border removal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FineInputs, ResNetFPN_8_2
from .coarse_matching import CoarseMatches, CoarseMatching
from .config import COARSE_STRIDE, FINE_STRIDE, LoFTRConfig
from .fine_matching import FineMatching
from .fine_preprocess import FinePreprocess, gather_windows
from .position_encoding import PositionEncodingSine
from .transformer import LocalFeatureTransformer

#: prefix of the model's keys in the official (PyTorch Lightning) checkpoints
OFFICIAL_PREFIX = "matcher."


@dataclass(frozen=True)
class EncodedImage:
    """Per-image features that do not depend on the other image of a pair.

    ``coarse``: (N, C_c, h, w) 1/8 map with the position encoding added; ``fine``: (N, C_f, h_f, w_f) 1/2 map;
    ``image_size``: (H, W) of the encoded images; ``mask``: (N, h, w) bool, True for real coarse cells (None = all).
    """

    coarse: torch.Tensor
    fine: torch.Tensor
    image_size: tuple[int, int]
    mask: torch.Tensor | None = None
    #: set (and ``fine`` empty) only in the lazy encodings :meth:`LoFTR.match` makes internally: the fine map is
    #: then computed only at the windows refinement reads (see ``ResNetFPN_8_2.fine_windows``)
    fine_inputs: FineInputs | None = None
    #: (N, L, C) coarse tokens after the transformer's first layer when that is a 'self' layer: it depends on this
    #: image only, so :meth:`LoFTR.pre_attend` computes it once for an image matched in many pairs
    tokens: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.coarse.shape[0])

    @property
    def coarse_shape(self) -> tuple[int, int]:
        return int(self.coarse.shape[2]), int(self.coarse.shape[3])

    def to(self, device: torch.device | str) -> "EncodedImage":
        return replace(
            self,
            coarse=self.coarse.to(device),
            fine=self.fine.to(device),
            mask=None if self.mask is None else self.mask.to(device),
            tokens=None if self.tokens is None else self.tokens.to(device),
        )

    def __getitem__(self, index: int | slice) -> "EncodedImage":
        """Item ``index`` of the batch as a batch of one, or the items of a slice (views, nothing copied)."""
        sl = index if isinstance(index, slice) else slice(index, index + 1)
        inputs = self.fine_inputs
        return replace(
            self,
            coarse=self.coarse[sl],
            fine=self.fine[sl],
            mask=None if self.mask is None else self.mask[sl],
            fine_inputs=None if inputs is None else FineInputs(inputs.x1[sl], inputs.lat2[sl]),
            tokens=None if self.tokens is None else self.tokens[sl],
        )


def collate(encoded: Sequence[EncodedImage]) -> EncodedImage:
    """Stack encoded images of different sizes into one batch: maps zero-padded at the bottom/right, masked.

    Zero padding of the fine map reproduces the zeros a window gets off the map, and masked coarse cells are
    excluded from attention, matching and border removal, so matching the batch equals matching each item alone.
    """
    if not encoded:
        raise ValueError("collate needs at least one encoded image")
    if all(
        e.mask is None and e.coarse.shape == encoded[0].coarse.shape and e.fine.shape == encoded[0].fine.shape
        for e in encoded
    ):
        # equal sizes: a plain stack, no padding and no masks (the unmasked attention path is cheaper)
        tokens = torch.cat([e.tokens for e in encoded]) if all(e.tokens is not None for e in encoded) else None
        return EncodedImage(
            torch.cat([e.coarse for e in encoded]),
            torch.cat([e.fine for e in encoded]),
            encoded[0].image_size,
            tokens=tokens,
        )
    hc = max(e.coarse.shape[2] for e in encoded)
    wc = max(e.coarse.shape[3] for e in encoded)
    hf = max(e.fine.shape[2] for e in encoded)
    wf = max(e.fine.shape[3] for e in encoded)
    coarse, fine, masks = [], [], []
    for e in encoded:
        coarse.append(F.pad(e.coarse, (0, wc - e.coarse.shape[3], 0, hc - e.coarse.shape[2])))
        fine.append(F.pad(e.fine, (0, wf - e.fine.shape[3], 0, hf - e.fine.shape[2])))
        own = (
            e.mask
            if e.mask is not None
            else torch.ones(e.batch_size, *e.coarse_shape, dtype=torch.bool, device=e.coarse.device)
        )
        masks.append(F.pad(own, (0, wc - own.shape[2], 0, hc - own.shape[1]), value=False))
    size = (max(e.image_size[0] for e in encoded), max(e.image_size[1] for e in encoded))
    return EncodedImage(torch.cat(coarse), torch.cat(fine), size, torch.cat(masks))


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    """Accept (H, W), (1, H, W) or (N, 1, H, W) float tensors; return (N, 1, H, W)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image, got {type(image).__name__}")
    if image.dim() == 2:
        image = image[None, None]
    elif image.dim() == 3 and image.shape[0] == 1:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 1:
        raise ValueError(f"expected a grayscale image (N, 1, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    return image


class LoFTR(nn.Module):
    """LoFTR (Sun et al., CVPR 2021). State-dict keys equal the official / kornia ones."""

    def __init__(self, config: LoFTRConfig | None = None) -> None:
        super().__init__()
        config = LoFTRConfig.preset("outdoor_ds") if config is None else config
        self.config = config
        # channels-last convolutions are ~25 % faster on CPU (oneDNN) and suit tensor cores on GPU
        self.backbone = ResNetFPN_8_2(config.backbone, with_fine=config.fine.enabled).to(
            memory_format=torch.channels_last
        )
        #: pixel stride of the coarse grid (8, or 16 for a 4-stage coarse-only backbone)
        self.coarse_stride = config.coarse_stride
        self.pos_encoding = PositionEncodingSine(config.coarse.d_model, config.coarse.temp_bug_fix)
        self.loftr_coarse = LocalFeatureTransformer(
            config.coarse.d_model, config.coarse.nhead, config.coarse.layer_names, config.coarse.attention
        )
        self.coarse_matching = CoarseMatching(config.matching)
        if config.fine.enabled:
            self.fine_preprocess = FinePreprocess(
                config.coarse.d_model,
                config.fine.d_model,
                config.fine.window,
                config.fine.concat_coarse_feat,
                COARSE_STRIDE // FINE_STRIDE,
            )
            self.loftr_fine = LocalFeatureTransformer(
                config.fine.d_model, config.fine.nhead, config.fine.layer_names, config.fine.attention
            )
            self.fine_matching = FineMatching()

    # ------------------------------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load kornia's keys or the official ones (the Lightning ``matcher.`` prefix is stripped)."""
        state_dict = {
            k[len(OFFICIAL_PREFIX) :] if k.startswith(OFFICIAL_PREFIX) else k: v for k, v in state_dict.items()
        }
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------------------------------ per image
    def encode(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> EncodedImage:
        """Backbone features of (N, 1, H, W) images in [0, 1]; ``mask`` (N, H, W), nonzero = real pixel."""
        image = _as_batch(image)
        coarse, fine = self.backbone(image)
        coarse = self.pos_encoding(coarse)
        coarse_mask = None
        if mask is not None:
            if mask.shape != (image.shape[0], image.shape[2], image.shape[3]):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match image {tuple(image.shape)}")
            coarse_mask = mask[:, :: self.coarse_stride, :: self.coarse_stride].bool()
        return EncodedImage(coarse, fine, (int(image.shape[2]), int(image.shape[3])), coarse_mask)

    def encode_lazy(self, image: torch.Tensor) -> EncodedImage:
        """Like :meth:`encode` (no mask), but the fine map is left to :meth:`refine` (inference, one pair).

        Refinement then computes only the matched windows when that is cheaper than the whole map
        (:attr:`lazy_fine_ratio`), else the whole map; results equal :meth:`encode`'s up to float rounding.
        """
        image = _as_batch(image)
        coarse, inputs = self.backbone.forward_coarse(image)
        coarse = self.pos_encoding(coarse)
        empty = coarse.new_zeros(coarse.shape[0], 0, 0, 0)
        return EncodedImage(coarse, empty, (int(image.shape[2]), int(image.shape[3])), None, inputs)

    def encode_lazy_pair(self, image0: torch.Tensor, image1: torch.Tensor) -> tuple[EncodedImage, EncodedImage]:
        """:meth:`encode_lazy` of both images of a pair; equal sizes go through the backbone as one batch when
        they have at most :attr:`batch_pair_pixels` pixels each (as kornia does; BatchNorm in eval mode keeps each
        image's own features)."""
        image0, image1 = _as_batch(image0), _as_batch(image1)
        if image0.shape != image1.shape or image0.shape[2] * image0.shape[3] > self.batch_pair_pixels:
            return self.encode_lazy(image0), self.encode_lazy(image1)
        both, n = self.encode_lazy(torch.cat([image0, image1])), image0.shape[0]
        return both[:n], both[n:]

    @torch.no_grad()
    def pre_attend(self, enc: EncodedImage) -> EncodedImage:
        """``enc`` with :attr:`EncodedImage.tokens` set: its coarse tokens through the transformer's first layer.

        That layer is a 'self' layer in every preset, so it depends on the image alone; an image matched in many
        pairs (``pipeline.match_dense``) pays it once instead of once per pair (1/8 of the coarse transformer).
        Only the inference transformer of :func:`~matchers.loftr.optimize.optimize_for_inference` can resume
        after its first layer; for other models, masked or lazy encodings ``enc`` is returned unchanged.
        """
        transformer = self.loftr_coarse
        if (
            enc.mask is not None
            or enc.fine_inputs is not None
            or not hasattr(transformer, "first_self_layer")
            or transformer.layer_names[0] != "self"
        ):
            return enc
        tokens = enc.coarse.flatten(2).transpose(1, 2).contiguous()
        return replace(enc, tokens=transformer.first_self_layer(tokens))

    #: :meth:`encode_lazy_pair` runs an equal-size pair's images through the backbone as one batch up to this many
    #: pixels each: set by :func:`~matchers.loftr.ort_stages.to_onnxruntime`, as onnxruntime's pass is 4 % faster
    #: so at 640x480 on 2 threads, while channels-last torch is 10 % slower (its 1/2-resolution maps outgrow the
    #: caches); larger images go one at a time (and run in torch: see :mod:`~matchers.loftr.ort_stages`)
    batch_pair_pixels = 0

    #: windows are computed one by one when their multiply-adds are below this fraction of the whole fine map's
    #: (small patch convolutions run at roughly half the throughput of the full-map ones)
    lazy_fine_ratio = 0.5

    def _windows(self, enc: EncodedImage, b_ids: torch.Tensor, cell_ids: torch.Tensor) -> torch.Tensor:
        """(M, window^2, C_f) fine windows around coarse cells of ``enc`` (computed lazily if it is lazy)."""
        window, stride = self.config.fine.window, COARSE_STRIDE // FINE_STRIDE
        width = enc.coarse_shape[1]
        if enc.fine_inputs is None:
            return gather_windows(enc.fine, b_ids, cell_ids, width, window, stride)
        per_window, per_cell = self.backbone.window_cost(window)
        x1 = enc.fine_inputs.x1
        full = per_cell * x1.shape[0] * x1.shape[2] * x1.shape[3]
        if b_ids.shape[0] * per_window < self.lazy_fine_ratio * full:
            return self.backbone.fine_windows(
                enc.fine_inputs, b_ids, cell_ids // width * stride, cell_ids % width * stride, window
            )
        fine = self.backbone.fine_full(enc.fine_inputs)
        return gather_windows(fine, b_ids, cell_ids, width, window, stride)

    # ------------------------------------------------------------------------------------------ pair stages
    def transform_coarse(
        self, enc0: EncodedImage, enc1: EncodedImage
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Coarse transformer on both token sets: (N, L, C), (N, S, C) and the flat masks (N, L), (N, S)."""
        if enc0.batch_size != enc1.batch_size:
            raise ValueError(f"batch sizes differ: {enc0.batch_size} and {enc1.batch_size}")
        mask0 = None if enc0.mask is None else enc0.mask.flatten(1)
        mask1 = None if enc1.mask is None else enc1.mask.flatten(1)
        if enc0.tokens is not None and enc1.tokens is not None and mask0 is None and mask1 is None:
            # both images already went through the first (self) layer: run the rest
            tokens0, tokens1 = self.loftr_coarse(enc0.tokens, enc1.tokens, None, None, start=1)
            return tokens0, tokens1, mask0, mask1
        tokens0 = enc0.coarse.flatten(2).transpose(1, 2).contiguous()
        tokens1 = enc1.coarse.flatten(2).transpose(1, 2).contiguous()
        tokens0, tokens1 = self.loftr_coarse(tokens0, tokens1, mask0, mask1)
        return tokens0, tokens1, mask0, mask1

    def refine(
        self,
        enc0: EncodedImage,
        enc1: EncodedImage,
        tokens0: torch.Tensor,
        tokens1: torch.Tensor,
        matches: CoarseMatches,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine offsets (M, 2) in [-1, 1] window units for image 1, and their std (M,) (zeros for a coarse-only
        model: its matches stay on the cell centres)."""
        if not self.config.fine.enabled:
            zeros = tokens0.new_zeros(matches.b_ids.shape[0], 2)
            return zeros, zeros[:, 0]
        if enc0.fine_inputs is None and enc1.fine_inputs is None:
            win0, win1 = self.fine_preprocess(
                enc0.fine,
                enc1.fine,
                tokens0,
                tokens1,
                matches.b_ids,
                matches.i_ids,
                matches.j_ids,
                enc0.coarse_shape[1],
                enc1.coarse_shape[1],
            )
        elif matches.b_ids.numel() == 0:
            win0 = win1 = tokens0.new_zeros(0, self.config.fine.window**2, self.config.fine.d_model)
        else:
            win0 = self._windows(enc0, matches.b_ids, matches.i_ids)
            win1 = self._windows(enc1, matches.b_ids, matches.j_ids)
            win0, win1 = self.fine_preprocess.merge(
                win0, win1, tokens0, tokens1, matches.b_ids, matches.i_ids, matches.j_ids
            )
        if win0.shape[0] > 0:
            win0, win1 = self.loftr_fine(win0, win1)
        return self.fine_matching(win0, win1)

    def _match_one_direction(
        self, enc0: EncodedImage, enc1: EncodedImage, threshold: float | None
    ) -> dict[str, torch.Tensor]:
        tokens0, tokens1, _, _ = self.transform_coarse(enc0, enc1)
        matches = self.coarse_matching(
            tokens0, tokens1, enc0.coarse_shape, enc1.coarse_shape, enc0.mask, enc1.mask, threshold
        )
        offsets, std = self.refine(enc0, enc1, tokens0, tokens1, matches)
        w0, w1 = enc0.coarse_shape[1], enc1.coarse_shape[1]
        i_ids, j_ids = matches.i_ids, matches.j_ids
        kpts0 = torch.stack([i_ids % w0, i_ids // w0], dim=1).to(offsets.dtype) * self.coarse_stride
        kpts1 = torch.stack([j_ids % w1, j_ids // w1], dim=1).to(offsets.dtype) * self.coarse_stride
        kpts1 = kpts1 + offsets * float(self.config.fine.window // 2 * FINE_STRIDE)
        return {
            "keypoints0": kpts0,
            "keypoints1": kpts1,
            "confidence": matches.confidence,
            "batch_indexes": matches.b_ids,
            "std": std,
            "coarse_index0": i_ids,
            "coarse_index1": j_ids,
        }

    @torch.no_grad()
    def match_encoded(
        self, enc0: EncodedImage, enc1: EncodedImage, threshold: float | None = None, both_directions: bool = False
    ) -> dict[str, torch.Tensor]:
        """Match encoded images (same batch size). Returns a dict of flat tensors over all matches:

        ``keypoints0`` (M, 2), ``keypoints1`` (M, 2), ``confidence`` (M,), ``batch_indexes`` (M,), ``std`` (M,)
        (fine uncertainty, window units), ``coarse_index0`` / ``coarse_index1`` (M,) (row-major cell indices).
        ``threshold`` overrides the config's coarse threshold. ``both_directions`` also matches (enc1, enc0) and
        merges: LoFTR is order dependent; a coarse cell pair found both ways is kept once, with its higher
        confidence (in the reverse matches image 1's keypoint is on the grid and image 0's is refined).
        Runs without autograd (like :meth:`match` and :meth:`match_batch`); for training use :meth:`encode`,
        :meth:`transform_coarse`, ``coarse_matching.confidence`` and :meth:`refine`.
        """
        forward = self._match_one_direction(enc0, enc1, threshold)
        if not both_directions:
            return forward
        backward = self._match_one_direction(enc1, enc0, threshold)
        backward = {
            "keypoints0": backward["keypoints1"],
            "keypoints1": backward["keypoints0"],
            "confidence": backward["confidence"],
            "batch_indexes": backward["batch_indexes"],
            "std": backward["std"],
            "coarse_index0": backward["coarse_index1"],
            "coarse_index1": backward["coarse_index0"],
        }
        return _merge_directions(forward, backward, enc0.coarse_shape, enc1.coarse_shape)

    # ------------------------------------------------------------------------------------------ entry points
    @torch.no_grad()
    def match(
        self, image0: torch.Tensor, image1: torch.Tensor, threshold: float | None = None, both_directions: bool = False
    ) -> dict[str, torch.Tensor]:
        """Match two images (1, 1, H, W) of any sizes; see :meth:`match_encoded` for the outputs."""
        return self.match_encoded(*self.encode_lazy_pair(image0, image1), threshold, both_directions)

    def forward(
        self,
        image0: torch.Tensor,
        image1: torch.Tensor,
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
        threshold: float | None = None,
        both_directions: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Match a batch of pairs (N, 1, H0, W0) / (N, 1, H1, W1), optionally padded with (N, H, W) masks."""
        image0, image1 = _as_batch(image0), _as_batch(image1)
        if image0.shape == image1.shape and (mask0 is None) == (mask1 is None):
            # one backbone pass for both sides; BatchNorm in eval mode makes this equal to two passes
            both = self.encode(torch.cat([image0, image1]), None if mask0 is None else torch.cat([mask0, mask1]))
            n = image0.shape[0]
            enc0 = EncodedImage(
                both.coarse[:n], both.fine[:n], both.image_size, None if both.mask is None else both.mask[:n]
            )
            enc1 = EncodedImage(
                both.coarse[n:], both.fine[n:], both.image_size, None if both.mask is None else both.mask[n:]
            )
        else:
            enc0, enc1 = self.encode(image0, mask0), self.encode(image1, mask1)
        return self.match_encoded(enc0, enc1, threshold, both_directions)

    @torch.no_grad()
    def match_batch(
        self,
        pairs: Sequence[tuple[torch.Tensor | EncodedImage, torch.Tensor | EncodedImage]],
        threshold: float | None = None,
        both_directions: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """Match several pairs of possibly different sizes in one padded batch; one output dict per pair.

        Items are images (1, 1, H, W) or :class:`EncodedImage` of batch size 1. The results equal
        ``match(image0, image1)`` for each pair (up to float rounding).
        """
        if not pairs:
            return []
        side0 = [p[0] if isinstance(p[0], EncodedImage) else self.encode(p[0]) for p in pairs]
        side1 = [p[1] if isinstance(p[1], EncodedImage) else self.encode(p[1]) for p in pairs]
        batch0, batch1 = collate(side0), collate(side1)
        out = self.match_encoded(batch0, batch1, threshold, both_directions)
        results = []
        for index in range(len(pairs)):
            keep = out["batch_indexes"] == index
            item = {key: value[keep] for key, value in out.items()}
            item["batch_indexes"] = torch.zeros_like(item["batch_indexes"])
            # cell indices of the padded grid -> the pair's own grid
            for key, padded, own in (("coarse_index0", batch0, side0[index]), ("coarse_index1", batch1, side1[index])):
                padded_width, own_width = padded.coarse_shape[1], own.coarse_shape[1]
                item[key] = item[key] // padded_width * own_width + item[key] % padded_width
            results.append(item)
        return results


def _merge_directions(
    forward: dict[str, torch.Tensor],
    backward: dict[str, torch.Tensor],
    shape0: tuple[int, int],
    shape1: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Union of both directions' matches; duplicates (same batch item and coarse cell pair) keep the best one."""
    merged = {key: torch.cat([forward[key], backward[key]]) for key in forward}
    cells0 = shape0[0] * shape0[1]
    cells1 = shape1[0] * shape1[1]
    key = (merged["batch_indexes"] * cells0 + merged["coarse_index0"]) * cells1 + merged["coarse_index1"]
    # best confidence first (stable, so ties keep the forward match), then the first occurrence of every key
    order = torch.sort(merged["confidence"], descending=True, stable=True).indices
    sorted_key = key[order]
    unique, inverse = torch.unique(sorted_key, return_inverse=True)
    positions = torch.arange(sorted_key.shape[0], device=key.device)
    first = torch.full((unique.shape[0],), sorted_key.shape[0], dtype=positions.dtype, device=key.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    keep = order[first].sort().values  # back to forward-then-backward order
    return {name: value[keep] for name, value in merged.items()}
