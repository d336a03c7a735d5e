"""Train or fine-tune LoFTR on a CPU or a GPU, resumable.

    python -m recipes.train_loftr --preset compact --data homography:photos/ --data synthetic:16 \
        --minutes 60 --out runs/compact.ckpt [--init official/outdoor_ds.ckpt]

``--data`` sources (repeatable; append ``@W`` to weight a source, e.g. ``synthetic:16@0.5``):

* ``homography:DIR`` random homographic pairs of the photos in DIR (crops, perspective, rotation, photometric
  augmentation); ``homography:skimage`` uses scikit-image's bundled public-domain / CC0 sample photos;
* ``synthetic:N`` pairs of views of N random synthetic worlds rendered with exact depth (datasets.synthetic);
* ``objects:N`` the same with object-centric views: no ground, dark background, textures of reduced contrast;
* ``megadepth:ROOT`` / ``scannet:ROOT`` the official training layouts (index npz files in ROOT/index).

Running the same command again resumes from ``--out`` exactly (model, optimiser, schedule, RNG, data position);
``--restart`` starts over. A CSV log of losses and validation metrics is written next to ``--out``.
``--export PATH`` additionally writes a small weights-only checkpoint (what ``--weights`` accepts; ``--export-half``
stores it in float16). ``--steps 0 --export PATH`` just exports an existing ``--out``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from core.cli import add_config_arguments, config_from_args
from core.device import resolve_device
from core.errors import UserError, run_cli
from matchers.loftr.config import PRESET_NAMES, LoFTRConfig
from recipes.training.data import (
    HomographyConfig,
    HomographyPairs,
    MegaDepthPairs,
    MixedPairs,
    PairSource,
    ScanNetPairs,
    SyntheticConfig,
    SyntheticPairs,
    load_photos,
    parse_size,
    skimage_photos,
)
from recipes.training.losses import LossConfig
from recipes.training.trainer import TrainConfig, TrainResult, export_weights, prepare_outputs, train

KINDS = ("homography", "synthetic", "objects", "megadepth", "scannet")


def parse_spec(spec: str) -> tuple[str, str, float]:
    """``kind:value[@weight]`` -> (kind, value, weight)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise UserError(
            f"bad --data {spec!r}; use one of homography:DIR, homography:skimage, synthetic:N, objects:N, "
            f"megadepth:ROOT, scannet:ROOT (optionally @WEIGHT)"
        )
    weight = 1.0
    value, at, w = rest.rpartition("@")
    if at and w:
        try:
            weight = float(w)
        except ValueError:
            value = rest
        else:
            rest = value
    if weight <= 0:
        raise UserError(f"bad --data {spec!r}: the weight must be positive")
    return kind, rest, weight


def build_source(
    spec: str,
    size: tuple[int, int],
    seed: int,
    trust_index: bool = False,
    augment: bool = True,
    max_rotation: float = HomographyConfig.max_rotation_deg,
) -> tuple[PairSource, float]:
    """One data source of a ``--data`` spec at image size (H, W); ``max_rotation``: homographies' in-plane range."""
    kind, value, weight = parse_spec(spec)
    h, w = size
    if kind == "homography":
        photos = skimage_photos() if value == "skimage" else load_photos(value)
        config = HomographyConfig(height=h, width=w, max_rotation_deg=max_rotation)
        return HomographyPairs(photos, config, seed=seed, augment=augment), weight
    if kind in ("synthetic", "objects"):
        try:
            n = int(value)
        except ValueError:
            raise UserError(f"bad --data {spec!r}: {kind}:N needs an integer number of worlds") from None
        if n < 1:
            raise UserError(f"bad --data {spec!r}: {kind}:N needs N >= 1 worlds")
        config = (
            SyntheticConfig.object_centric(h, w, n)
            if kind == "objects"
            else SyntheticConfig(height=h, width=w, num_worlds=n)
        )
        return SyntheticPairs(config, seed=seed, augment=augment), weight
    if kind == "megadepth":
        return MegaDepthPairs(value, long_side=max(size), seed=seed, allow_pickle=trust_index, augment=augment), weight
    return ScanNetPairs(value, seed=seed, augment=augment), weight


def build_mixture(
    specs: Sequence[str],
    size: tuple[int, int],
    seed: int,
    trust_index: bool = False,
    augment: bool = True,
    max_rotation: float = HomographyConfig.max_rotation_deg,
) -> MixedPairs:
    built = [build_source(s, size, seed, trust_index, augment, max_rotation) for s in specs]
    return MixedPairs([b[0] for b in built], [b[1] for b in built], seed=seed)


def main(
    preset: str,
    data: Sequence[str],
    out: str | Path,
    minutes: float | None = None,
    steps: int | None = None,
    init: str | Path | None = None,
    val: Sequence[str] = (),
    val_pairs: int = 8,
    size: tuple[int, int] = (240, 320),
    config: TrainConfig = TrainConfig(),
    device: str = "auto",
    restart: bool = False,
    trust_index: bool = False,
    export: str | Path | None = None,
    export_half: bool = False,
    progress: bool = True,
    export_threshold: float | None = None,
    max_rotation: float = HomographyConfig.max_rotation_deg,
) -> TrainResult:
    """Build the data, train (resuming ``out`` if it exists) and optionally export the weights."""
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    if not data:
        raise UserError("no training data: pass at least one --data SOURCE")
    if size[0] % 8 or size[1] % 8:
        raise UserError(f"--size {size[1]}x{size[0]}: both sides must be multiples of 8")
    device = resolve_device(device)
    if not 0.0 <= max_rotation <= 180.0:
        raise UserError(f"--max-rotation must be within [0, 180] degrees, got {max_rotation}")
    prepare_outputs(out, export)
    source = build_mixture(data, size, config.seed, trust_index, max_rotation=max_rotation)
    # validation pairs: a separate seed (different crops, homographies, views), no augmentation
    val_source = build_mixture(val or data[:1], size, config.seed + 7777, trust_index, augment=False)
    val_samples = [val_source.sample(k) for k in range(val_pairs)]
    result = train(
        LoFTRConfig.preset(preset),
        source,
        out,
        config,
        minutes=minutes,
        steps=steps,
        init=init,
        val_samples=val_samples,
        device=device,
        data_specs=list(data),
        restart=restart,
        progress=progress,
    )
    if export is not None:
        export_weights(result.checkpoint, export, half=export_half, threshold=export_threshold)
    return result


def add_run_arguments(parser: argparse.ArgumentParser, size: tuple[int, int], size_help: str) -> None:
    """The options of a training run that ``recipes.distill`` shares: data, output, budget, device, export."""
    parser.add_argument("--data", action="append", default=[], metavar="KIND:VALUE[@W]", required=True)
    parser.add_argument(
        "--val",
        action="append",
        default=[],
        metavar="KIND:VALUE",
        help="validation source (default: the first --data source with another seed)",
    )
    parser.add_argument("--val-pairs", type=int, default=8)
    parser.add_argument("--out", required=True, help="training checkpoint (resumed when it exists)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget of this run")
    parser.add_argument("--steps", type=int, default=None, help="number of steps for this run")
    parser.add_argument("--size", type=parse_size, default=size, help=size_help)
    parser.add_argument(
        "--max-rotation",
        type=float,
        default=HomographyConfig.max_rotation_deg,
        help="in-plane rotation range of homography pairs, degrees (180: any rotation)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--restart", action="store_true", help="ignore an existing --out and start over")
    parser.add_argument("--export", default=None, help="also write a weights-only checkpoint here")
    parser.add_argument("--export-half", action="store_true", help="store the exported weights as float16")
    parser.add_argument(
        "--export-threshold",
        type=float,
        default=None,
        help="coarse matching threshold stored in the exported weights (default: the preset's)",
    )
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes.train_loftr", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="compact", choices=PRESET_NAMES)
    add_run_arguments(parser, (240, 320), "image size WxH, multiples of 8 (320x240)")
    parser.add_argument("--init", default=None, help="checkpoint to fine-tune from (official, kornia or ours)")
    parser.add_argument(
        "--trust-index",
        action="store_true",
        help="allow unpickling the official MegaDepth index files (only for files you trust)",
    )
    add_config_arguments(
        parser.add_argument_group("optimisation"),
        TrainConfig,
        aliases={"warmup_steps": "--warmup", "max_fine_matches": "--max-fine"},
    )
    add_config_arguments(
        parser.add_argument_group("losses"), LossConfig, prefix="loss_", aliases={"dense": "--dense-coarse"}
    )
    return parser


def main_cli(argv: Sequence[str] | None = None) -> TrainResult:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args, TrainConfig, loss=config_from_args(args, LossConfig, prefix="loss_"))
    result = main(
        args.preset,
        args.data,
        args.out,
        args.minutes,
        args.steps,
        args.init,
        args.val,
        args.val_pairs,
        args.size,
        config,
        args.device,
        args.restart,
        args.trust_index,
        args.export,
        args.export_half,
        progress=not args.no_progress and not os.environ.get("CI"),
        export_threshold=args.export_threshold,
        max_rotation=args.max_rotation,
    )
    print_result(result, "trained")
    return result


def print_result(result: TrainResult, verb: str) -> None:
    """What a run did, on stdout: its steps, files and last validation."""
    print(f"{verb} steps {result.start_step} -> {result.end_step}; checkpoint {result.checkpoint}; log {result.log}")
    if result.last_validation:
        print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in result.last_validation.items()))


if __name__ == "__main__":
    run_cli(main_cli)
