"""LoFTR run by onnxruntime: the :class:`~matchers.base.Matcher` for ``.onnx`` files of
:mod:`matchers.loftr.export_onnx`.

``make_matcher("loftr", weights="model.onnx")`` (and ``--weights model.onnx`` on every CLI) builds an
:class:`OnnxLoFTRMatcher`. It behaves like :class:`~matchers.loftr.matcher.LoFTRMatcher` -- same resizing (longer
side ``resize``, sides multiples of 8), keypoints in original pixels (hloc convention), the coarse cells of every
match (``Matches.coarse0/1``) and :meth:`coarse_grid` -- and gives the torch model's matches (same match set,
keypoints within 1e-3 px; ``tests/test_onnx.py``). It needs neither torch nor the checkpoint: the weights, the
configuration and their digest are in the file. ``device`` "auto" uses onnxruntime's CUDA provider when the
installed onnxruntime has one (``onnxruntime-gpu``), else the CPU.

Per-image work is not cached (the graph takes both images), so ``prepare`` only resizes; pairs are matched one
at a time. A file that is not an ONNX model, an ONNX model that is not one of this project's LoFTR exports, or
an export of another architecture than asked for (``preset=``) is a :class:`~core.errors.UserError` with
one line naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.device import DEVICES
from core.errors import UserError

from ..base import CoarseGrid, Matcher, Matches, ResizedImage, resize_image
from .config import COARSE_STRIDE, PRESET_NAMES, LoFTRConfig
from .export_onnx import (
    COARSE_ONLY_KEY,
    CONFIG_KEY,
    DIGEST_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    FORMAT_VERSION,
    INPUT_NAMES,
    OUTPUT_NAMES,
    PRESET_KEY,
    VERSION_KEY,
    WEIGHTS_KEY,
)

EXPORT_HINT = "export one with python -m matchers.loftr.export_onnx --weights NAME|CKPT --output FILE.onnx"


def is_onnx_path(weights: Any) -> bool:
    """Whether a ``--weights`` value names an ONNX file (by its extension)."""
    return isinstance(weights, (str, os.PathLike)) and os.fspath(weights).lower().endswith(".onnx")


def _short(error: BaseException, limit: int = 140) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.split("] ", 1)[-1]  # onnxruntime's '[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : ' prefix
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "LoFTR .onnx weights need onnxruntime, which is not installed; pip install onnxruntime "
            "(or onnxruntime-gpu), or reinstall the project (pip install -e .)"
        ) from None
    return onnxruntime


def _providers(device: str) -> list[str]:
    ort = _onnxruntime()

    name = device.strip().lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if name == "cpu" or (name == "auto" and not has_cuda):
        return ["CPUExecutionProvider"]
    if not has_cuda:
        raise UserError(
            f"device {device!r} requested but this onnxruntime ({ort.__version__}) has no CUDA provider "
            f"(available: {', '.join(available)}); use --device cpu, or pip install onnxruntime-gpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


@dataclass(frozen=True)
class OnnxModelInfo:
    """What an export's metadata says."""

    path: Path
    config: LoFTRConfig
    digest: str
    weights: str
    coarse_only: bool
    preset: str


def read_metadata(path: Path, metadata: dict[str, str], inputs: list[str], outputs: list[str]) -> OnnxModelInfo:
    """Check an ONNX model's metadata and signature against what :mod:`export_onnx` writes; UserError if not."""
    if metadata.get(FORMAT_KEY) != FORMAT_VALUE or CONFIG_KEY not in metadata:
        raise UserError(
            f"{path} is an ONNX model but not a LoFTR export of this project (inputs {inputs}, "
            f"no '{FORMAT_KEY}' metadata); {EXPORT_HINT}"
        )
    version = metadata.get(VERSION_KEY)
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path} is a LoFTR export of format version {version}, this code reads version "
            f"{FORMAT_VERSION}; re-export it with this version: {EXPORT_HINT}"
        )
    if inputs != list(INPUT_NAMES) or outputs != list(OUTPUT_NAMES):
        raise UserError(
            f"{path} claims to be a LoFTR export but its inputs {inputs} / outputs {outputs} are not "
            f"{list(INPUT_NAMES)} / {list(OUTPUT_NAMES)} (edited file?); {EXPORT_HINT}"
        )
    try:
        config = LoFTRConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (TypeError, ValueError) as error:
        raise UserError(f"{path} stores an invalid LoFTR config ({_short(error)}); {EXPORT_HINT}") from None
    return OnnxModelInfo(
        path,
        config,
        metadata.get(DIGEST_KEY, ""),
        metadata.get(WEIGHTS_KEY, "unknown"),
        metadata.get(COARSE_ONLY_KEY) == "true",
        metadata.get(PRESET_KEY, "custom"),
    )


def check_preset(info: OnnxModelInfo, preset: str) -> None:
    """UserError unless the export's architecture is that of ``preset`` (the threshold may differ)."""
    try:
        wanted = LoFTRConfig.preset(preset)
    except ValueError:
        raise UserError(f"unknown LoFTR preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}") from None
    if wanted.replace(matching={"thr": info.config.matching.thr}) != info.config:
        raise UserError(
            f"{info.path} was exported from LoFTR preset {info.preset}, not {preset}; use a file "
            f"exported from {preset} weights ({EXPORT_HINT}) or drop the preset"
        )


def open_session(
    path: str | os.PathLike[str], device: str = "auto", threads: int | None = None
) -> tuple[Any, OnnxModelInfo]:
    """(onnxruntime session, checked metadata) of a LoFTR export; every problem is one UserError line."""
    ort = _onnxruntime()

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"LoFTR ONNX file {path} does not exist; {EXPORT_HINT}")
    providers = _providers(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no provider warnings on stderr
    # Idle worker threads sleep rather than spin: spinning ones kept a core busy into whatever ran next (torch
    # took 0.066 s a student pair right after onnxruntime against 0.033 s alone) and slowed back-to-back student
    # pairs (0.048 s spinning, 0.031 s not); loftr-compact loses 5 % (0.67 -> 0.70 s a 640x480 pair)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own (pybind) exception types for unreadable models
        raise UserError(
            f"{path} is corrupt or not an ONNX model ({_short(error)}); check that the file was copied "
            f"completely, or {EXPORT_HINT}"
        ) from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    inputs = [item.name for item in session.get_inputs()]
    outputs = [item.name for item in session.get_outputs()]
    return session, read_metadata(path, metadata, inputs, outputs)


@dataclass(frozen=True)
class PreparedOnnxImage:
    """A resized image as the graph's (1, 1, h, w) input, and the mapping back to the original pixels."""

    resized: ResizedImage
    tensor: np.ndarray
    #: pixel stride of the model's coarse grid (8, or 16 for the coarse-only student)
    stride: int = COARSE_STRIDE

    @property
    def coarse_width(self) -> int:
        return -(-self.tensor.shape[3] // self.stride)

    @property
    def coarse_cells(self) -> int:
        return -(-self.tensor.shape[2] // self.stride) * self.coarse_width


def _cell_centres(cell_ids: np.ndarray, prepared: PreparedOnnxImage) -> np.ndarray:
    width = prepared.coarse_width
    ids = cell_ids.astype(np.int64)
    points = np.stack([ids % width, ids // width], axis=1).astype(np.float32) * prepared.stride
    return prepared.resized.to_original(points)


def merge_directions(
    forward: dict[str, np.ndarray], backward: dict[str, np.ndarray], cells0: int, cells1: int
) -> dict[str, np.ndarray]:
    """Union of (0, 1) and (1, 0) matches (``backward`` already swapped); a cell pair found both ways is kept once,
    with its higher confidence (ties keep the forward match), in forward-then-backward order, as
    ``matchers.loftr.model._merge_directions`` does."""
    merged = {key: np.concatenate([forward[key], backward[key]]) for key in forward}
    key = merged["coarse_index0"].astype(np.int64) * cells1 + merged["coarse_index1"].astype(np.int64)
    order = np.argsort(-merged["confidence"], kind="stable")
    _, first = np.unique(key[order], return_index=True)
    keep = np.sort(order[first])
    return {name: value[keep] for name, value in merged.items()}


class OnnxLoFTRMatcher(Matcher):
    """LoFTR through onnxruntime: ``OnnxLoFTRMatcher("model.onnx", resize=640)``.

    Options as :class:`~matchers.loftr.matcher.LoFTRMatcher`: ``resize`` (longer side; None: original size),
    ``device`` (auto, cpu, cuda), ``both_directions``, ``match_threshold`` (default: the exported model's);
    ``amp`` must be None (the graph is float32). ``preset``: when given, the file must have been exported from
    that architecture. ``threads``: onnxruntime's intra-op threads (default: its own choice, all cores).
    """

    name = "loftr"
    batches_pairs = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        resize: int | None = 640,
        device: str = "auto",
        both_directions: bool = False,
        match_threshold: float | None = None,
        amp: str | None = None,
        preset: str | None = None,
        threads: int | None = None,
    ) -> None:
        if amp is not None:
            raise UserError(
                f"--amp {amp} applies to LoFTR run by torch; an .onnx model runs in float32 "
                f"(drop --amp, or pass a .ckpt / weights name)"
            )
        self.session, self.info = open_session(path, device, threads)
        if preset is not None:
            check_preset(self.info, preset)
        self.path = Path(path)
        self.config = self.info.config
        self.stride = self.config.coarse_stride
        if resize is not None and resize < self.stride:
            raise UserError(
                f"resize must be at least {self.stride} pixels (or None for the original size), got {resize}"
            )
        self.resize = resize
        self.device = device
        self.both_directions = both_directions
        self.match_threshold = match_threshold
        self.providers = self.session.get_providers()

    @property
    def threshold(self) -> float:
        return float(self.config.matching.thr if self.match_threshold is None else self.match_threshold)

    def prepare(self, image: np.ndarray) -> PreparedOnnxImage:
        """Resize one grayscale float32 (H, W) image in [0, 1] (sides multiples of the coarse stride unless
        ``resize`` is None)."""
        if image.ndim != 2:
            raise ValueError(f"expected a grayscale (H, W) image, got shape {image.shape}")
        resized = resize_image(image, self.resize, multiple=self.stride) if self.resize else resize_image(image, None)
        tensor = np.ascontiguousarray(resized.image, dtype=np.float32)[None, None]
        return PreparedOnnxImage(resized, tensor, self.stride)

    def run(self, prepared0: PreparedOnnxImage, prepared1: PreparedOnnxImage) -> dict[str, np.ndarray]:
        """The graph's outputs for one pair, in the resized images' pixels."""
        values = self.session.run(
            None,
            {
                "image0": prepared0.tensor,
                "image1": prepared1.tensor,
                "threshold": np.asarray(self.threshold, dtype=np.float32),
            },
        )
        return dict(zip(OUTPUT_NAMES, values))

    def match_prepared(self, prepared0: PreparedOnnxImage, prepared1: PreparedOnnxImage) -> Matches:
        out = self.run(prepared0, prepared1)
        if self.both_directions:
            back = self.run(prepared1, prepared0)
            back = {
                "keypoints0": back["keypoints1"],
                "keypoints1": back["keypoints0"],
                "confidence": back["confidence"],
                "coarse_index0": back["coarse_index1"],
                "coarse_index1": back["coarse_index0"],
            }
            out = merge_directions(out, back, prepared0.coarse_cells, prepared1.coarse_cells)
        return Matches(
            prepared0.resized.to_original(out["keypoints0"].astype(np.float32)),
            prepared1.resized.to_original(out["keypoints1"].astype(np.float32)),
            out["confidence"].astype(np.float32),
            _cell_centres(out["coarse_index0"], prepared0),
            _cell_centres(out["coarse_index1"], prepared1),
        )

    def coarse_grid(self, size: tuple[int, int]) -> CoarseGrid:
        """The coarse grid of an image of ``size`` (W, H) after this matcher's resize, in original pixels (the same
        lattice as :meth:`LoFTRMatcher.coarse_grid <matchers.loftr.matcher.LoFTRMatcher.coarse_grid>`)."""
        return CoarseGrid.of_resized(size, self.resize, self.stride)

    def describe(self) -> dict[str, Any]:
        return {
            "matcher": self.name,
            "weights": str(self.path),
            "backend": "onnxruntime",
            "exported_weights": self.info.weights,
            "weights_sha256": self.info.digest,
            "preset": self.info.preset,
            "coarse_only": self.info.coarse_only,
            "resize": self.resize,
            "both_directions": self.both_directions,
            "match_threshold": self.threshold,
            "device": "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu",
            "amp": None,
        }
