"""Build a matcher by name, as the CLIs and the pipeline do: ``make_matcher("loftr", weights="outdoor")``.

Heavy modules (torch, the LoFTR model) are imported only when a matcher that needs them is built, so
``import matchers`` stays fast and the SIFT path never loads torch.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal, get_args

from core.device import DEVICES, resolve_device
from core.errors import UserError

from .base import Matcher

__all__ = [
    "AMP_MODES",
    "DEVICES",
    "MATCHERS",
    "MatcherName",
    "OFFLINE_WEIGHTS",
    "WEIGHTS_HELP",
    "make_matcher",
    "resolve_device",
]

#: matcher names accepted by :func:`make_matcher` (and the ``--matcher`` flags)
MatcherName = Literal["loftr", "sift"]
MATCHERS: tuple[str, ...] = get_args(MatcherName)
#: LoFTR autocast precisions (``--amp``); float32 when not given
AMP_MODES = ("bf16", "fp16")
#: what LoFTR falls back to when no weights are named and the official ones cannot be had (shipped in the package)
OFFLINE_WEIGHTS = "loftr-compact"
#: ``--weights`` help of every CLI whose default is "no weights named"
WEIGHTS_HELP = (
    "LoFTR weights: a name (outdoor, indoor, indoor_ds_new, loftr-compact, loftr-student, ...), a .ckpt path or an "
    ".onnx export (run by onnxruntime); "
    "default: $LOFTR_WEIGHTS, else outdoor (downloaded once), else offline the shipped, "
    "weaker loftr-compact"
)


def _default_loftr(device: str):
    """The default LoFTR weights, or offline the shipped compact ones, said on stderr in three short lines
    (a named file is never swapped)."""
    from .loftr import load_pretrained

    try:
        return load_pretrained(None, device)
    except UserError as error:
        if os.environ.get("LOFTR_WEIGHTS"):  # the user pointed at weights: the problem with them is the answer
            raise
        try:
            model = load_pretrained(OFFLINE_WEIGHTS, device)
        except UserError:
            raise error from None
        print(
            f"warning: official LoFTR weights unavailable ({unavailable_reason(error)});\n"
            f"  using the shipped {OFFLINE_WEIGHTS} weights, much weaker (matchers/loftr/weights/MODEL_CARD.md);\n"
            f"  for the official ones pass --weights PATH or set LOFTR_WEIGHTS",
            file=sys.stderr,
        )
        return model


def _onnx_weights(weights: str | None) -> str | None:
    """The .onnx file LoFTR should run from: ``weights`` when it names one, else ``$LOFTR_WEIGHTS`` when no weights
    are named and it is an .onnx file; None for checkpoints and names."""
    if weights is None:
        env = os.environ.get("LOFTR_WEIGHTS", "")
        return env if env.lower().endswith(".onnx") and os.path.isfile(os.path.expanduser(env)) else None
    return weights if os.fspath(weights).lower().endswith(".onnx") else None


def unavailable_reason(error: BaseException, limit: int = 52) -> str:
    """The short reason in a weights loader's message ('download failed, no internet? (...)'), for one line."""
    text = str(error).split(";")[0]
    text = text.split("are not available: ", 1)[-1].strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def make_matcher(
    name: str,
    weights: str | None = None,
    resize: int | None = None,
    device: str = "auto",
    offline_fallback: bool = True,
    sift_backend: str | None = None,
    **options: Any,
) -> Matcher:
    """The matcher called ``name`` ('loftr' or 'sift').

    ``weights``: LoFTR checkpoint name ('outdoor', 'indoor', ...) or path (default: ``$LOFTR_WEIGHTS``, else the
    official 'outdoor' weights; when those cannot be downloaded and ``offline_fallback``, the shipped, weaker
    ``loftr-compact``, with a warning on stderr); SIFT has none. ``sift_backend``: the SIFT implementation when
    ``name`` is sift ('pycolmap' or 'opencv'; None: :class:`~matchers.sift.SIFTOptions`' default), ignored by
    LoFTR, so a caller that takes either matcher can pin it. ``resize``: longest image side used for
    matching; None keeps the matcher's default (LoFTR 640, SIFT 1600), 0 matches at the original size.
    ``options`` go to the matcher (``SIFTOptions`` fields for SIFT, keyword arguments of ``LoFTRMatcher`` for
    LoFTR; ``amp=None`` is accepted by both). A ``weights`` path ending in ``.onnx`` (or such a ``$LOFTR_WEIGHTS``
    when no weights are named) is an export of :mod:`matchers.loftr.export_onnx`, run by onnxruntime
    (:class:`~matchers.loftr.onnx_backend.OnnxLoFTRMatcher`; its options: ``preset``, ``threads``,
    ``both_directions``, ``match_threshold``).
    """
    key = name.strip().lower()
    if resize is not None and resize < 0:
        raise UserError(f"resize must be a positive number of pixels (or 0 for the original size), got {resize}")
    size_option: dict[str, Any] = {} if resize is None else {"resize": resize or None}
    if key == "sift":
        if weights is not None:
            raise UserError(f"the sift matcher has no weights, but weights {weights!r} were given; drop --weights")
        if options.pop("amp", None) is not None:
            raise UserError("--amp applies to the loftr matcher only, not sift; drop --amp")
        from .sift import SIFTMatcher, SIFTOptions

        if sift_backend is not None:
            options["backend"] = sift_backend
        try:
            sift_options = SIFTOptions(**size_option, **options)
        except TypeError as error:
            raise UserError(f"bad option for the sift matcher: {error}") from None
        return SIFTMatcher(sift_options)
    if key == "loftr":
        onnx_file = _onnx_weights(weights)
        if onnx_file is not None:  # an export of matchers.loftr.export_onnx: run by onnxruntime, no checkpoint
            from .loftr.onnx_backend import OnnxLoFTRMatcher

            return OnnxLoFTRMatcher(onnx_file, device=device, **size_option, **options)
        resolved = resolve_device(device)
        from .loftr import LoFTRMatcher, load_pretrained  # lazy: pulls in torch and the model

        if weights is None and offline_fallback:
            model = _default_loftr(resolved)
        else:
            model = load_pretrained(weights, resolved)  # None: $LOFTR_WEIGHTS, else the outdoor default
        return LoFTRMatcher(model, device=resolved, **size_option, **options)
    raise UserError(f"unknown matcher {name!r}; choose one of {', '.join(MATCHERS)}")
