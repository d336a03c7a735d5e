"""LoFTR behind the project's :class:`~matchers.base.Matcher` interface.

``prepare`` resizes an image (longer side ``resize``, sides multiples of 8, aspect kept up to that rounding) and
runs the backbone once, so the result can be cached and reused for every pair the image takes part in;
``match_prepared`` runs the transformer and matching and maps keypoints back to the original image
(hloc convention: (0, 0) is the centre of the top-left pixel; see :mod:`matchers.loftr.model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from core.device import resolve_device
from core.errors import UserError

from ..base import CoarseGrid, Matcher, Matches, ResizedImage, resize_image
from .model import EncodedImage, LoFTR
from .optimize import InferenceOptions, optimize_for_inference
from .weights import load_pretrained

Precision = Literal["fp16", "bf16"]


def _cell_centres(cell_ids: torch.Tensor, prepared: "PreparedImage", stride: int) -> np.ndarray:
    """Row-major coarse cell indices -> cell centres in the original image's pixels (``stride``: of the grid)."""
    width = prepared.encoded.coarse_shape[1]
    ids = cell_ids.cpu().numpy()
    points = np.stack([ids % width, ids // width], axis=1).astype(np.float32) * stride
    return prepared.resized.to_original(points)


def _to_matches(
    out: dict[str, torch.Tensor], prepared0: "PreparedImage", prepared1: "PreparedImage", stride: int
) -> Matches:
    """Model outputs of one pair -> :class:`Matches` in each original image's pixels, with the coarse cells."""
    kpts0 = out["keypoints0"].float().cpu().numpy()
    kpts1 = out["keypoints1"].float().cpu().numpy()
    scores = out["confidence"].float().cpu().numpy().astype(np.float32)
    return Matches(
        prepared0.resized.to_original(kpts0),
        prepared1.resized.to_original(kpts1),
        scores,
        _cell_centres(out["coarse_index0"], prepared0, stride),
        _cell_centres(out["coarse_index1"], prepared1, stride),
    )


@dataclass(frozen=True)
class PreparedImage:
    """A resized image's LoFTR features, and the mapping back to the original pixels."""

    resized: ResizedImage
    encoded: EncodedImage


class LoFTRMatcher(Matcher):
    """LoFTR matcher: ``LoFTRMatcher(load_pretrained("outdoor"), resize=640)``.

    ``model``: a :class:`LoFTR` or a weights name/path for :func:`load_pretrained`. ``resize``: longer side in
    pixels (None: original size, any size works). ``both_directions``: also match image 1 -> image 0 and merge.
    ``match_threshold``: overrides the model's coarse threshold. ``amp``: autocast precision ("fp16"/"bf16",
    meant for CUDA; the model keeps overflow-prone steps in float32). ``optimize`` (default): run an inference copy
    with channels_last convolutions and fused transformers, whose backbone and coarse transformer run in
    onnxruntime on the CPU (:func:`~matchers.loftr.optimize.optimize_for_inference`; the same matches, keypoints
    within ~1e-3 px); pass an :class:`~matchers.loftr.optimize.InferenceOptions` to
    choose the techniques, or False for the plain model. ``self.model`` stays the unmodified model; after changing
    its weights, call :meth:`refresh`.
    """

    name = "loftr"
    batches_pairs = True
    #: most coarse-score entries (pairs x cells0 x cells1) one batched call may hold: 8 pairs at 320x240,
    #: single pairs from about 640x480 up (larger matrices gain little from batching and cost memory)
    batch_cells: int = 8 * 1200 * 1200

    def __init__(
        self,
        model: LoFTR | str = "outdoor",
        resize: int | None = 640,
        device: str | torch.device = "auto",
        both_directions: bool = False,
        match_threshold: float | None = None,
        amp: Precision | None = None,
        optimize: bool | InferenceOptions = True,
    ) -> None:
        if amp not in (None, "fp16", "bf16"):
            raise UserError(f"amp must be fp16, bf16 or None, got {amp!r}")
        self.device = torch.device(resolve_device(device))
        self.model = (load_pretrained(model, self.device) if isinstance(model, str) else model).to(self.device).eval()
        self.weights_name = getattr(self.model, "weights_name", "custom")
        stride = self.model.coarse_stride
        if resize is not None and resize < stride:
            raise UserError(f"resize must be at least {stride} pixels (or None for the original size), got {resize}")
        self.resize = resize
        self.both_directions = both_directions
        self.match_threshold = match_threshold
        self.amp = amp
        self.optimize = optimize
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the inference copy from ``self.model`` (after its weights changed)."""
        if not self.optimize:
            self._inference = self.model
        else:
            options = self.optimize if isinstance(self.optimize, InferenceOptions) else None
            self._inference = optimize_for_inference(self.model, options)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp is None:
            return nullcontext()
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """Resize and encode one grayscale float32 (H, W) image in [0, 1], for many pairs: the whole fine map and
        the first transformer layer are computed once."""
        resized, tensor = self._resized(image)
        with torch.inference_mode(), self._autocast():
            encoded = self._inference.pre_attend(self._inference.encode(tensor))
        return PreparedImage(resized, encoded)

    def _resized(self, image: np.ndarray) -> tuple[ResizedImage, torch.Tensor]:
        if image.ndim != 2:
            raise ValueError(f"expected a grayscale (H, W) image, got shape {image.shape}")
        resized = (
            resize_image(image, self.resize, multiple=self.model.coarse_stride)
            if self.resize
            else resize_image(image, None)
        )
        return resized, torch.from_numpy(resized.image).to(self.device)[None, None]

    def match(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        """Match one pair, nothing cached: the fine map is computed only where refinement reads it."""
        (resized0, tensor0), (resized1, tensor1) = self._resized(image0), self._resized(image1)
        with torch.inference_mode(), self._autocast():
            encoded0, encoded1 = self._inference.encode_lazy_pair(tensor0, tensor1)
        return self.match_prepared(PreparedImage(resized0, encoded0), PreparedImage(resized1, encoded1))

    def match_prepared(self, prepared0: PreparedImage, prepared1: PreparedImage) -> Matches:
        with torch.inference_mode(), self._autocast():
            out = self._inference.match_encoded(
                prepared0.encoded,
                prepared1.encoded,
                threshold=self.match_threshold,
                both_directions=self.both_directions,
            )
        return _to_matches(out, prepared0, prepared1, self.model.coarse_stride)

    def match_prepared_batch(self, pairs: Sequence[tuple[PreparedImage, PreparedImage]]) -> list[Matches]:
        """Match prepared pairs, several at once where the images have equal sizes.

        One batched transformer / matching call costs less than its pairs one by one on a CPU (fewer, larger
        matrix products); results equal :meth:`match_prepared` up to float rounding. A call holds at most
        ``batch_cells`` coarse-score entries (pairs x cells0 x cells1), so large images are matched singly.
        """
        results: list[Matches | None] = [None] * len(pairs)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, (prepared0, prepared1) in enumerate(pairs):
            enc0, enc1 = prepared0.encoded, prepared1.encoded
            batchable = (
                enc0.mask is None
                and enc1.mask is None
                and enc0.fine_inputs is None
                and enc1.fine_inputs is None
                and enc0.batch_size == 1
                and enc1.batch_size == 1
            )
            key = (
                (tuple(enc0.coarse.shape), tuple(enc1.coarse.shape), tuple(enc0.fine.shape), tuple(enc1.fine.shape))
                if batchable
                else ("single", index)
            )
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            cells = pairs[indices[0]][0].encoded.coarse_shape
            other = pairs[indices[0]][1].encoded.coarse_shape
            per_call = max(1, self.batch_cells // max(1, cells[0] * cells[1] * other[0] * other[1]))
            for start in range(0, len(indices), per_call):
                chunk = indices[start : start + per_call]
                if len(chunk) == 1:
                    results[chunk[0]] = self.match_prepared(*pairs[chunk[0]])
                    continue
                with torch.inference_mode(), self._autocast():
                    outs = self._inference.match_batch(
                        [(pairs[k][0].encoded, pairs[k][1].encoded) for k in chunk],
                        threshold=self.match_threshold,
                        both_directions=self.both_directions,
                    )
                for k, out in zip(chunk, outs):
                    results[k] = _to_matches(out, *pairs[k], self.model.coarse_stride)
        return [r for r in results if r is not None]

    def coarse_grid(self, size: tuple[int, int]) -> CoarseGrid:
        """The coarse (1/8 or 1/16) grid of an image of ``size`` (W, H) after this matcher's resize, in original
        pixels."""
        return CoarseGrid.of_resized(size, self.resize, self.model.coarse_stride)

    def describe(self) -> dict[str, Any]:
        threshold = self.match_threshold if self.match_threshold is not None else self.model.config.matching.thr
        return {
            "matcher": self.name,
            "weights": self.weights_name,
            "resize": self.resize,
            "both_directions": self.both_directions,
            "match_threshold": threshold,
            "device": str(self.device),
            "amp": self.amp,
        }
