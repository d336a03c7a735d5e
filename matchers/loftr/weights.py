"""LoFTR weights: names, download and cache, safe loading with strict key checks, saving.

``load_pretrained(name_or_path, device)`` accepts

* a name: ``outdoor`` / ``outdoor_ds``, ``indoor`` / ``indoor_ds``, ``indoor_ds_new`` (kornia's Hugging Face
  mirror, with the Czech Technical University server as fallback, downloaded on first use into
  ``torch.hub.get_dir()/checkpoints`` -- which honours ``TORCH_HOME`` -- and shared with kornia's cache),
  ``outdoor_ot`` / ``indoor_ot`` (official Google Drive only: fetch them by hand), or ``loftr-compact`` (the
  project's own small model, shipped as ``matchers/loftr/weights/loftr_compact.ckpt``), or ``loftr-student`` (the
  coarse-only model distilled from it, ``loftr_student.ckpt``, see ``MODEL_CARD_student.md``);
* a path to a checkpoint: official ``{'state_dict': {'matcher.<key>': ...}}`` files, kornia's (same keys, with or
  without the prefix), a bare state dict, or files written by :func:`save_checkpoint`.

The environment variable ``LOFTR_WEIGHTS`` (:data:`WEIGHTS_ENV`) helps offline machines: set it to a folder
holding the checkpoint files under their published names (``loftr_outdoor.ckpt``, ...) or to one such file; it is
searched before the cache and the network. ``load_pretrained(None)`` uses ``LOFTR_WEIGHTS`` when it names a
file (whatever its name), otherwise ``outdoor``.

Checkpoints are read with ``torch.load(weights_only=True)`` only. Every problem a user can fix (missing file,
corrupt or foreign file, weights of another architecture, no network) raises :class:`~core.errors.UserError`
with a one-line message naming the file and the fix.
"""

from __future__ import annotations

import os
import pickle
import re
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from core.device import resolve_device
from core.errors import UserError
from core.files import atomic_path

from .config import PRESET_NAMES, LoFTRConfig
from .model import OFFICIAL_PREFIX, LoFTR

#: environment variable: a checkpoint file, or a folder of checkpoints under their published names
WEIGHTS_ENV = "LOFTR_WEIGHTS"
#: where the shipped compact model lives
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: key under which :func:`save_checkpoint` records the model configuration (ignored by other loaders)
CONFIG_KEY = "loftr_config"
#: the official release folder (all five checkpoints, Google Drive)
OFFICIAL_DRIVE = "https://drive.google.com/drive/folders/1xu2Pq6mZT5hmFgiYMBT9Zt8h1yO-3SIp"
#: seconds a connection or a read may stall before a download attempt fails
DOWNLOAD_TIMEOUT = 30.0
_HF = "https://huggingface.co/kornia/loftr/resolve/main/"
_CMP = "https://cmp.felk.cvut.cz/~mishkdmy/models/"


@dataclass(frozen=True)
class PretrainedWeights:
    """A named checkpoint: its preset, file name and where to get it."""

    name: str
    preset: str
    filename: str
    urls: tuple[str, ...] = ()
    shipped: bool = False  # part of the package (matchers/loftr/weights/)


PRETRAINED: dict[str, PretrainedWeights] = {
    w.name: w
    for w in (
        PretrainedWeights(
            "outdoor_ds", "outdoor_ds", "loftr_outdoor.ckpt", (_HF + "loftr_outdoor.ckpt", _CMP + "loftr_outdoor.ckpt")
        ),
        PretrainedWeights(
            "indoor_ds", "indoor_ds", "loftr_indoor.ckpt", (_HF + "loftr_indoor.ckpt", _CMP + "loftr_indoor.ckpt")
        ),
        PretrainedWeights(
            "indoor_ds_new",
            "indoor_ds_new",
            "loftr_indoor_ds_new.ckpt",
            (_HF + "loftr_indoor_ds_new.ckpt", _CMP + "loftr_indoor_ds_new.ckpt"),
        ),
        PretrainedWeights("outdoor_ot", "outdoor_ot", "outdoor_ot.ckpt"),
        PretrainedWeights("indoor_ot", "indoor_ot", "indoor_ot.ckpt"),
        PretrainedWeights("loftr-compact", "compact", "loftr_compact.ckpt", shipped=True),
        PretrainedWeights("loftr-student", "student", "loftr_student.ckpt", shipped=True),
    )
}
ALIASES = {
    "outdoor": "outdoor_ds",
    "indoor": "indoor_ds",
    "indoor_new": "indoor_ds_new",
    "compact": "loftr-compact",
    "loftr_compact": "loftr-compact",
    "student": "loftr-student",
    "loftr_student": "loftr-student",
}


def weights_names() -> list[str]:
    """Every accepted name (canonical names and aliases)."""
    return sorted(set(PRETRAINED) | set(ALIASES))


def lookup(name: str) -> PretrainedWeights | None:
    """The named checkpoint, or None when ``name`` is not a known name."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return PRETRAINED.get(key)


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict without the ``matcher.`` prefix, stored config dict or None) of a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"LoFTR weights file {path} does not exist; pass an existing .ckpt path or one of the names "
            f"{', '.join(weights_names())}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        if found:
            raise UserError(
                f"{path} holds pickled Python objects besides tensors ({found.group(1)}), so it cannot be loaded "
                f"safely (weights_only=True); in an environment you trust, re-save just its weights with "
                f"torch.save({{'state_dict': torch.load(path)['state_dict']}}, 'clean.ckpt') and use that"
            ) from None
        raise UserError(
            f"{path} is corrupt or not a PyTorch checkpoint ({_first_line(error)}); {_corrupt_fix(path)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, IndexError, KeyError) as error:
        raise UserError(
            f"{path} is corrupt or not a PyTorch checkpoint ({_first_line(error)}); {_corrupt_fix(path)}"
        ) from None
    state_dict = _extract_state_dict(obj)
    if state_dict is None:
        raise UserError(
            f"{path} is not a LoFTR checkpoint: expected {{'state_dict': {{name: tensor}}}} or a state "
            f"dict of tensors, found {_describe(obj)}"
        )
    config = obj.get(CONFIG_KEY) if isinstance(obj, dict) and isinstance(obj.get(CONFIG_KEY), dict) else None
    return state_dict, config


def _corrupt_fix(path: Path) -> str:
    """What to do about an unreadable checkpoint: depends on who made the file."""
    resolved = Path(os.path.abspath(path))
    if resolved.parent == Path(os.path.abspath(PACKAGE_WEIGHTS_DIR)):
        return "the file shipped with the project is damaged; reinstall the project (pip install -e .)"
    downloadable = {spec.filename for spec in PRETRAINED.values() if spec.urls}
    if resolved.parent == Path(os.path.abspath(cache_dir())) and resolved.name in downloadable:
        return "it is a damaged download: delete it and it is downloaded again on the next run"
    return (
        "check that it is the right file and copied completely, or re-save the weights with "
        "torch.save({'state_dict': model.state_dict()}, PATH)"
    )


def _first_line(error: BaseException) -> str:
    """The first sentence of an error message, short enough for a one-line report."""
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return first.split(". ")[0].rstrip(".")[:160]


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:5]
        return f"a dict with keys {keys}{'...' if len(obj) > 5 else ''}"
    return f"a {type(obj).__name__}"


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return None
    return {k[len(OFFICIAL_PREFIX) :] if k.startswith(OFFICIAL_PREFIX) else k: v for k, v in obj.items()}


def guess_preset(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The preset whose architecture fits a state dict (by keys and shapes), or None if it is not LoFTR."""
    stem = state_dict.get("backbone.conv1.weight")
    if stem is None or stem.dim() != 4:
        return None
    if "coarse_matching.bin_score" in state_dict:
        return "outdoor_ot"
    if stem.shape[0] == 64:
        return "compact"
    if stem.shape[0] == 8:
        return "student"
    return "outdoor_ds"


def _fits_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    guess = guess_preset(state_dict)
    if guess is None:
        return "it does not look like a LoFTR checkpoint at all"
    if guess == "outdoor_ot":
        return "it looks like an optimal-transport checkpoint: use preset outdoor_ot or indoor_ot"
    if guess == "compact":
        return "it looks like the compact model: use preset compact (weights loftr-compact)"
    if guess == "student":
        return "it looks like the coarse-only student: use preset student (weights loftr-student)"
    return "it looks like a dual-softmax checkpoint: use preset outdoor_ds, indoor_ds or indoor_ds_new"


def check_state_dict(model: LoFTR, state_dict: Mapping[str, torch.Tensor], source: str, preset: str) -> None:
    """Strict comparison of keys and shapes; a mismatch is a UserError naming the keys and the fitting preset."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong_shape):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if wrong_shape:
        parts.append(f"shape mismatches: {show(wrong_shape)}")
    raise UserError(f"{source} does not fit LoFTR preset {preset}: {'; '.join(parts)}; {_fits_hint(state_dict)}")


# ---------------------------------------------------------------------------------------------- files
def cache_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints`` (follows ``TORCH_HOME``), the cache kornia uses too."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, destination: Path) -> None:
    """Fetch ``url`` into ``destination`` via a temporary file; stalls longer than the timeout fail."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "loftr-sfm"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response, atomic_path(destination) as temp:
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            open(temp, "wb") as handle,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {destination.name}") as bar,
        ):
            while chunk := response.read(1 << 20):
                handle.write(chunk)
                bar.update(len(chunk))


def _env_candidate(spec: PretrainedWeights) -> Path | None:
    value = os.environ.get(WEIGHTS_ENV)
    if not value:
        return None
    env = Path(value).expanduser()
    if env.is_dir():
        return env / spec.filename if (env / spec.filename).is_file() else None
    if env.is_file() and env.name == spec.filename:
        return env
    return None


def _get_message(spec: PretrainedWeights, reason: str) -> str:
    if spec.urls:
        where = f"download {spec.urls[0]} (or {spec.urls[1]})" if len(spec.urls) > 1 else f"download {spec.urls[0]}"
    else:
        where = f"download {spec.filename} from the official LoFTR release {OFFICIAL_DRIVE}"
    return (
        f"LoFTR weights {spec.name} ({spec.filename}) are not available: {reason}; {where} and pass "
        f"--weights /path/to/{spec.filename}, or set {WEIGHTS_ENV} to that file or its folder "
        f"(or put it in {cache_dir()})"
    )


def fetch(spec: PretrainedWeights) -> Path:
    """Local path of a named checkpoint: LOFTR_WEIGHTS, the package, the cache, then a download."""
    candidate = _env_candidate(spec)
    if candidate is not None:
        return candidate
    if spec.shipped:
        path = PACKAGE_WEIGHTS_DIR / spec.filename
        if path.is_file():
            return path
        raise UserError(
            f"the {spec.name} weights {path} are not installed (train the compact model, or pass "
            f"--weights PATH / set {WEIGHTS_ENV} to its .ckpt file)"
        )
    cached = cache_dir() / spec.filename
    if cached.is_file():
        return cached
    if not spec.urls:
        raise UserError(_get_message(spec, "they are only distributed by hand"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    failure = ""
    for url in spec.urls:
        try:
            _download(url, cached)
            read_checkpoint(cached)  # a truncated or HTML download must not poison the cache
            return cached
        except UserError:
            failure = "the downloaded file is not a valid checkpoint"
        except Exception as error:  # network errors come in many types (URLError, HTTPError, timeouts, ssl)
            failure = _first_line(error)
        if cached.exists():
            cached.unlink()
    raise UserError(_get_message(spec, f"download failed, no internet? ({failure})"))


# ---------------------------------------------------------------------------------------------- public
def load_pretrained(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    preset: str | None = None,
    threshold: float | None = None,
) -> LoFTR:
    """A LoFTR model in eval mode on ``device`` with the named (or given) weights.

    ``preset`` forces the architecture for a path (default: the config stored by :func:`save_checkpoint`, else
    guessed from the keys and shapes, with ``temp_bug_fix`` on when the file name contains ``ds_new``).
    ``threshold`` overrides the coarse match threshold. The model gets an attribute ``weights_name``.
    """
    if name_or_path is None:
        env = os.environ.get(WEIGHTS_ENV)
        name_or_path = env if env and Path(env).expanduser().is_file() else "outdoor"
    text = os.fspath(name_or_path)
    spec = lookup(text)
    stored_config = None
    if spec is not None:
        path = fetch(spec)
        state_dict, stored_config = read_checkpoint(path)
        if not spec.shipped:
            stored_config = None  # an official name fixes the architecture and the position-encoding flag
        preset_name = preset or spec.preset
        label = spec.name
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(
                f"LoFTR weights {text!r} are neither a file nor a known name; use a .ckpt path or one of "
                f"{', '.join(weights_names())}"
            )
        state_dict, stored_config = read_checkpoint(path)
        guessed = guess_preset(state_dict)
        if preset is None and stored_config is None and guessed is None:
            raise UserError(f"{path} is not a LoFTR checkpoint (no backbone.conv1.weight); {_fits_hint(state_dict)}")
        preset_name = preset or guessed or "outdoor_ds"
        if preset is None and preset_name == "outdoor_ds" and "ds_new" in path.name:
            preset_name = "indoor_ds_new"
        label = str(path)
    if preset is not None and preset not in PRESET_NAMES:
        raise UserError(f"unknown LoFTR preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    if stored_config is not None and preset is None:
        try:
            config = LoFTRConfig.from_dict(stored_config)
        except (TypeError, ValueError) as error:
            raise UserError(f"{path} stores an invalid LoFTR config ({_first_line(error)}); pass a preset") from None
        preset_name = "(config stored in the file)"
    else:
        config = LoFTRConfig.preset(preset_name)
    if threshold is not None:
        config = config.replace(matching={"thr": float(threshold)})
    model = LoFTR(config)
    check_state_dict(model, state_dict, str(path), preset_name)
    model.load_state_dict(state_dict)
    model.weights_name = label  # type: ignore[assignment]
    return model.eval().to(torch.device(resolve_device(device)))


def save_checkpoint(
    model: LoFTR,
    path: str | os.PathLike[str],
    layout: Literal["official", "kornia"] = "official",
    include_config: bool = True,
) -> Path:
    """Write the model's weights as an official (``matcher.`` prefix) or kornia (plain keys) checkpoint.

    Both are ``{'state_dict': {...}}``; ``include_config`` adds the model config under ``loftr_config`` so
    :func:`load_pretrained` rebuilds the same architecture (other loaders ignore the entry). Written atomically.
    """
    if layout not in ("official", "kornia"):
        raise ValueError(f"layout must be 'official' or 'kornia', got {layout!r}")
    prefix = OFFICIAL_PREFIX if layout == "official" else ""
    # plain contiguous CPU copies (the backbone runs channels-last), as every other tool expects
    state = {
        prefix + k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for k, v in model.state_dict().items()
    }
    payload: dict[str, Any] = {"state_dict": state}
    if include_config:
        payload[CONFIG_KEY] = model.config.to_dict()
    path = Path(path)
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return path
