"""onnxruntime for the dense stages of an inference copy on the CPU: the backbone (its coarse pass, and the whole
fine map when an image is cached for many pairs) and the coarse transformer
(:class:`~matchers.loftr.optimize.InferenceOptions` ``onnxruntime``, on by default for models with a fine stage).

Everything else (lazy fine windows, coarse matching, refinement, masks, batching, per-image caching) stays in
torch: only the stages that hold most of a pair's multiply-adds are handed over, each as its own small graph
exported from this model's modules on first use (about 1 s once per process and weights). Measured on a 2-core
AMD EPYC (2026-11-30, outdoor_ds-shaped weights, 640x480): the backbone's coarse pass 0.81 s in onnxruntime
against 0.95 s for channels-last torch per image (onnxruntime fuses BatchNorm, ReLU and the residual sum into its
convolutions; torch makes one memory pass for each), the coarse transformer 0.62 against 0.71 s (fused
projections and normalisation); a cold pair 0.44-0.45 x kornia's time against 0.50 x for torch alone
(``recipes/benchmarks/benchmark_2026-11-30_ort.json``). Results equal the torch path up to float rounding (features
~2e-6 relative), the same class of difference as BatchNorm folding; the benchmark checks the matches against
kornia's.

Memory: onnxruntime's arena keeps what a run used for the next one, which is what makes it fast at 640x480. All
graphs share one arena (one per session held 1571 MB in a 16-image dense job, the shared one 1319 MB, torch alone
1137 MB), and images above :data:`LARGE_PIXELS` run in torch: at 1600x1200 the arena held 3.0-6.6 GB depending on
how it was emptied, against 2.2 GB for torch alone, which is only 7 % slower there (27.9 against 26.0 s a pair).

A stage falls back to the torch module whenever the graph does not apply: tensors off the CPU, autocast on,
autograd recording, masks (padded batches), or onnxruntime not installed. The exported graphs are cached per
process, keyed by the weights' digest and the thread count, so matchers built from the same weights share them;
sessions never travel with a pickled model (a Ray worker builds its own).
"""

from __future__ import annotations

import functools
import io
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attention import LinearAttention
from .backbone import FineInputs
from .transformer import LocalFeatureTransformer

#: image size (W, H) and token count the stages are traced with (all sizes stay dynamic in the graph)
TRACE_SIZE = (64, 48)
TRACE_TOKENS = 12
_OPSET = 17
#: images above this many pixels (1/8-grid tokens above 1/64 of it) run in torch (see the module docstring)
LARGE_PIXELS = 1024 * 768
#: exported sessions per process (four per model: two models' at a time; each holds its weights once more)
_CACHE_SIZE = 8
_cache: dict[tuple[str, str, int], Any] = {}
_cache_lock = threading.Lock()


@functools.cache
def _onnxruntime() -> Any | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    # one arena for every graph's session (see the module docstring): registered once per process
    cpu = onnxruntime.OrtMemoryInfo(
        "Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT
    )
    try:
        onnxruntime.create_and_register_allocator(cpu, onnxruntime.OrtArenaCfg(0, -1, -1, -1))  # its defaults
    except Exception:  # noqa: BLE001 - one is registered already (by its embedder): the sessions share that one
        pass
    return onnxruntime


def available() -> bool:
    """Whether onnxruntime (and onnx export) can be used in this environment."""
    return _onnxruntime() is not None


def _usable(tensors: Sequence[torch.Tensor | None], pixels: int) -> bool:
    """The graphs run float32 CPU tensors without autograd or autocast, of images up to :data:`LARGE_PIXELS`."""
    if pixels > LARGE_PIXELS or (
        torch.is_autocast_enabled("cpu")
        or torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
    ):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


class OrtGraph:
    """One traced torch module run by onnxruntime; exported and opened on first use, never pickled."""

    def __init__(
        self,
        kind: str,
        module: nn.Module,
        example_shapes: Sequence[tuple[int, ...]],
        input_names: Sequence[str],
        output_names: Sequence[str],
        dynamic_axes: dict[str, dict[int, str]],
    ) -> None:
        self.kind, self.module, self.example_shapes = kind, module, [tuple(shape) for shape in example_shapes]
        self.input_names, self.output_names, self.dynamic_axes = list(input_names), list(output_names), dynamic_axes
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> "OrtGraph":
        import copy

        state = copy.deepcopy({**self.__dict__, "_session": None}, memo)
        clone = OrtGraph.__new__(OrtGraph)
        clone.__dict__.update(state)
        return clone

    def _example(self) -> tuple[torch.Tensor, ...]:
        """Random inputs to trace with (every size is a dynamic axis afterwards)."""
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.rand(shape, generator=generator) for shape in self.example_shapes)

    def _export(self) -> bytes:
        buffer = io.BytesIO()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: the sizes stay dynamic
            torch.onnx.export(
                self.module.eval(),
                self._example(),
                buffer,
                input_names=self.input_names,
                output_names=self.output_names,
                dynamic_axes=self.dynamic_axes,
                opset_version=_OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
        return buffer.getvalue()

    def session(self) -> Any:
        if self._session is None:
            from .export_onnx import state_dict_digest  # not at import: see _Layers.forward

            ort = _onnxruntime()
            threads = torch.get_num_threads()
            key = (self.kind, state_dict_digest(self.module), threads)
            with _cache_lock:
                session = _cache.get(key)
                if session is None:
                    options = ort.SessionOptions()
                    options.intra_op_num_threads = threads
                    options.log_severity_level = 3
                    # idle onnxruntime threads must not spin: torch runs the next op on the same cores
                    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    options.add_session_config_entry("session.use_env_allocators", "1")
                    session = ort.InferenceSession(
                        self._export(), sess_options=options, providers=["CPUExecutionProvider"]
                    )
                    while len(_cache) >= _CACHE_SIZE:
                        _cache.pop(next(iter(_cache)))
                    _cache[key] = session
            self._session = session
        return self._session

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: t.detach().contiguous().numpy() for name, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(out) for out in self.session().run(self.output_names, feeds)]


# ------------------------------------------------------------------------------------------------ backbone
def _torch_coarse_pass(backbone: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, FineInputs | None]:
    """The backbone class's own ``forward_coarse`` (the instance attribute may be an :class:`OrtCoarsePass`)."""
    return type(backbone).forward_coarse(backbone, image)


class _CoarsePass(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        coarse, inputs = _torch_coarse_pass(self.backbone, image)
        return coarse, inputs.x1, inputs.lat2


class OrtCoarsePass:
    """Stands in for ``backbone.forward_coarse`` (an instance attribute, so ``backbone.forward`` uses it too) of a
    backbone with a fine branch (coarse-only models stay in torch: see :func:`to_onnxruntime`)."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        width, height = TRACE_SIZE
        self.graph = OrtGraph(
            "backbone",
            _CoarsePass(backbone),
            [(1, 1, height, width)],
            ["image"],
            ["coarse", "x1", "lat2"],
            {"image": {0: "batch", 2: "height", 3: "width"}},
        )

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, FineInputs | None]:
        if not _usable([image], image.shape[2] * image.shape[3]):
            return _torch_coarse_pass(self.backbone, image)
        coarse, x1, lat2 = self.graph(image)
        return coarse, FineInputs(x1, lat2)


class _FineMap(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x1: torch.Tensor, lat2: torch.Tensor) -> torch.Tensor:
        return type(self.backbone).fine_full(self.backbone, FineInputs(x1, lat2))


class OrtFineMap:
    """Stands in for ``backbone.fine_full``: the whole fine map, as per-image caching (``LoFTR.encode``) needs."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        width, height = TRACE_SIZE
        self.graph = OrtGraph(
            "backbone.fine",
            _FineMap(backbone),
            [
                (1, backbone.layer1_outconv.in_channels, height // 2, width // 2),
                (1, backbone.layer2_outconv.out_channels, height // 4, width // 4),
            ],
            ["x1", "lat2"],
            ["fine"],
            {"x1": {0: "batch", 2: "height2", 3: "width2"}, "lat2": {0: "batch", 2: "height4", 3: "width4"}},
        )

    def __call__(self, inputs: FineInputs) -> torch.Tensor:
        if not _usable([inputs.x1, inputs.lat2], 4 * inputs.x1.shape[2] * inputs.x1.shape[3]):
            return type(self.backbone).fine_full(self.backbone, inputs)
        return self.graph(inputs.x1, inputs.lat2)[0]


# ------------------------------------------------------------------------------------------------ transformer
class _Layers(nn.Module):
    """Layers ``start`` on of a transformer on two token sets; ``pair=False``: the first (self) layer on one."""

    def __init__(self, transformer: LocalFeatureTransformer, start: int, pair: bool) -> None:
        super().__init__()
        self.layers = transformer.layers
        self.names = transformer.layer_names
        self.kind = "linear" if isinstance(transformer.layers[0].attention, LinearAttention) else "full"
        self.start, self.pair = start, pair

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # imported here: the package imports this module, and ``python -m matchers.loftr.export_onnx`` must
        # find export_onnx not yet imported
        from .export_onnx import _layer

        if not self.pair:
            return (_layer(self.layers[0], feats[0], feats[0], self.kind),)
        feat0, feat1 = feats
        for layer, name in list(zip(self.layers, self.names))[self.start :]:
            if name == "self":
                feat0, feat1 = _layer(layer, feat0, feat0, self.kind), _layer(layer, feat1, feat1, self.kind)
            else:
                feat0 = _layer(layer, feat0, feat1, self.kind)
                feat1 = _layer(layer, feat1, feat0, self.kind)
        return feat0, feat1


def _pixels(*feats: torch.Tensor) -> int:
    """Pixels of the largest image of these (N, L, C) 1/8-grid tokens."""
    return max(int(f.shape[1]) for f in feats) * 64


class OrtTransformer(nn.Module):
    """The coarse transformer in onnxruntime, with the API of
    :class:`~matchers.loftr.optimize.FusedLocalFeatureTransformer` (its torch fallback, for masked batches)."""

    def __init__(self, transformer: LocalFeatureTransformer, fallback: nn.Module) -> None:
        super().__init__()
        self.fallback = fallback
        self.d_model = transformer.d_model
        self.layer_names = transformer.layer_names
        channels = transformer.d_model

        self.first = OrtGraph(
            "transformer.first",
            _Layers(transformer, 0, pair=False),
            [(1, TRACE_TOKENS, channels)],
            ["feat"],
            ["out"],
            {"feat": {0: "batch", 1: "tokens"}},
        )
        self.rest = OrtGraph(
            "transformer.rest",
            _Layers(transformer, 1, pair=True),
            [(1, TRACE_TOKENS, channels), (1, TRACE_TOKENS + 1, channels)],  # unequal counts: both stay dynamic
            ["feat0", "feat1"],
            ["out0", "out1"],
            {"feat0": {0: "batch", 1: "tokens0"}, "feat1": {0: "batch", 1: "tokens1"}},
        )

    @staticmethod
    def supports(transformer: nn.Module) -> bool:
        return (
            isinstance(transformer, LocalFeatureTransformer)
            and len(transformer.layer_names) > 0
            and transformer.layer_names[0] == "self"
        )

    def first_self_layer(self, feat: torch.Tensor) -> torch.Tensor:
        """Layer 0 on one image's unmasked tokens: resume with ``forward(..., start=1)``."""
        if not _usable([feat], _pixels(feat)):
            return self.fallback.first_self_layer(feat)
        return self.first(feat)[0]

    def forward(
        self,
        feat0: torch.Tensor,
        feat1: torch.Tensor,
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers ``start`` (0 or 1) onwards; masked batches run the torch fallback."""
        if (
            mask0 is not None
            or mask1 is not None
            or start not in (0, 1)
            or not _usable([feat0, feat1], _pixels(feat0, feat1))
        ):
            return self.fallback(feat0, feat1, mask0, mask1, start)
        if start == 0 and feat0.shape == feat1.shape:  # both images' first layer in one call
            feat0, feat1 = self.first(torch.cat([feat0, feat1]))[0].split(feat0.shape[0])
        elif start == 0:
            feat0, feat1 = self.first(feat0)[0], self.first(feat1)[0]
        out0, out1 = self.rest(feat0, feat1)
        return out0, out1


def to_onnxruntime(model: nn.Module, plain_transformer: nn.Module) -> None:
    """Hand an inference copy's coarse pass and coarse transformer to onnxruntime, in place (no-op without it).

    ``plain_transformer``: the copy's coarse transformer before fusion; the graphs are traced from its layers and
    the fused one (``model.loftr_coarse``) stays the fallback. The transformer is handed over only when that
    fallback can resume after the first layer (``first_self_layer``), as per-image caching needs.
    """
    if not available() or not model.config.fine.enabled:
        # coarse-only models (the student: ~30 ms a 640x480 pair) lose more to onnxruntime's per-call overhead
        # than its kernels gain: 0.037 against 0.031 s a pair; their .onnx export is the way to run them there
        return
    model.backbone.forward_coarse = OrtCoarsePass(model.backbone)
    model.batch_pair_pixels = LARGE_PIXELS
    model.backbone.fine_full = OrtFineMap(model.backbone)
    fused = model.loftr_coarse
    if OrtTransformer.supports(plain_transformer) and hasattr(fused, "first_self_layer"):
        model.loftr_coarse = OrtTransformer(plain_transformer, fused)
