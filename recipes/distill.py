"""Distil a small coarse-only LoFTR (the ``student`` preset) from a teacher's coarse confidence matrix, resumable.

    python -m recipes.distill --teacher loftr-compact --student student \
        --data homography:photos/ --data synthetic:24 --data objects:48 \
        --minutes 50 --out runs/student.ckpt [--steps N] [--export loftr_student.ckpt --export-half]

``--teacher``: LoFTR weights (a name such as ``loftr-compact`` or ``outdoor``, or a .ckpt path; loaded with
``weights_only=True`` by :func:`matchers.loftr.weights.load_pretrained`). The loss is the KL divergence between the
student's and the teacher's dual-softmax match distributions (:func:`recipes.training.distill.match_kl`, the
teacher's matrix pooled to the student's grid) plus the ground-truth coarse focal loss; ``--data`` takes the
sources of ``recipes.train_loftr`` that give GT: ``homography:DIR``, ``homography:skimage``, ``synthetic:N``,
``objects:N`` (``@W`` weights them). ``--size`` is the student's image size; the teacher sees it scaled by
``--teacher-scale``.

Running the same command again resumes from ``--out`` exactly (student, optimiser, schedule, RNG, data position);
``--restart`` starts over. A CSV log (losses, validation matches / precision) is written next to ``--out``.
``--export PATH`` also writes the weights-only file ``--weights`` accepts (``--export-half``: float16);
``--steps 0 --export PATH`` just exports an existing ``--out``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.cli import add_config_arguments, config_from_args
from core.device import resolve_device
from core.errors import UserError, run_cli
from matchers.loftr.config import PRESET_NAMES, LoFTRConfig
from matchers.loftr.model import LoFTR
from matchers.loftr.weights import load_pretrained
from recipes.train_loftr import build_mixture, parse_spec
from recipes.training.data import HomographyConfig, PairSource, Sample, parse_size
from recipes.training.distill import DistillConfig, distill_losses, pool_factor, teacher_confidence
from recipes.training.losses import LossConfig
from recipes.training.supervision import supervise_samples
from recipes.training.trainer import (
    BATCH_KEYS,
    TrainConfig,
    _append_csv,
    _GracefulStop,
    _gt_warp,
    _optimizer,
    _resume_or_start,
    export_weights,
    prepare_outputs,
    save_training_checkpoint,
)

#: sources that come with ground truth and need no padding (what distillation supports)
KINDS = ("homography", "synthetic", "objects")
CSV_FIELDS = (
    "step",
    "samples",
    "elapsed_s",
    "lr",
    "loss",
    "loss_kd",
    "loss_gt",
    "gt_matches",
    "val_matches",
    "val_precision",
    "val_loss_kd",
)
#: optimisation defaults of a student run (a tiny model takes a larger learning rate than the compact one)
STUDENT_TRAIN = TrainConfig(lr=1e-3, weight_decay=0.01, max_steps=3000, validate_every=250, checkpoint_minutes=3.0)


@dataclass
class DistillResult:
    """What a call to :func:`distill` did."""

    checkpoint: Path
    log: Path
    start_step: int
    end_step: int
    losses: list[float]
    last_validation: dict[str, float] | None


@torch.no_grad()
def validate_student(
    student: LoFTR,
    teacher: LoFTR,
    samples: Sequence[Sample],
    config: DistillConfig,
    k: int,
    device: torch.device,
) -> dict[str, float]:
    """Matches per pair, precision (keypoint 1 within one student cell of the GT position) and the mean KL."""
    was_training = student.training
    student.eval()
    counts, correct, total, kls = [], 0, 0, []
    threshold_px = float(student.coarse_stride)
    for sample in samples:
        batch = {key: sample[key][None].to(device) for key in BATCH_KEYS if key in sample}
        conf_t = teacher_confidence(teacher, batch, config.teacher_scale, k)
        kls.append(float(distill_losses(student, batch, conf_t, None, config)["loss_kd"]))
        out = student(batch["image0"], batch["image1"])
        k0, k1 = out["keypoints0"].cpu().double(), out["keypoints1"].cpu().double()
        counts.append(len(k0))
        if len(k0) == 0:
            continue
        warped, valid = _gt_warp(sample)(k0[None])
        err = (warped[0] - k1).norm(dim=1)[valid[0]]
        total += int(valid.sum())
        correct += int((err < threshold_px).sum())
    student.train(was_training)
    return {
        "val_matches": float(np.mean(counts)) if counts else 0.0,
        "val_precision": correct / total if total else 0.0,
        "val_loss_kd": float(np.mean(kls)) if kls else float("nan"),
    }


def distill(
    teacher: LoFTR,
    student_config: LoFTRConfig,
    source: PairSource,
    out: str | Path,
    config: TrainConfig = STUDENT_TRAIN,
    distill_config: DistillConfig = DistillConfig(),
    minutes: float | None = None,
    steps: int | None = None,
    val_samples: Sequence[Sample] = (),
    device: str | torch.device = "cpu",
    data_specs: Sequence[str] = (),
    restart: bool = False,
    progress: bool = True,
    teacher_label: str = "custom",
) -> DistillResult:
    """Distil (or resume distilling) a student of ``student_config`` from ``teacher`` into checkpoint ``out``.

    Stops after ``minutes``, after ``steps`` more steps or at ``config.max_steps``, whichever comes first, and
    always saves a final checkpoint (SIGINT / SIGTERM too). Exact resume: samples are a function of their index,
    the teacher is frozen and deterministic, and the checkpoint holds student, optimiser, schedule, step and RNG.
    """
    out = Path(out)
    log_path = out.with_suffix(".csv")
    device = torch.device(device)
    if student_config.matching.match_type != "dual_softmax":
        raise UserError("the student must use dual-softmax matching (the distillation target is its confidence)")
    teacher = teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    student = LoFTR(student_config).to(device)
    # channels-last convolution backward corrupts the heap for the student's 8-channel layers (torch 2.13 CPU,
    # oneDNN); the forward pass is fine, so only training uses the plain layout
    student.backbone.to(memory_format=torch.contiguous_format)
    k = pool_factor(teacher, student, distill_config.teacher_scale)
    optimizer, scheduler = _optimizer(student, config)
    extra = {"distill_config": asdict(distill_config), "teacher": teacher_label}
    if out.exists() and not restart:
        stored = torch.load(out, map_location="cpu", weights_only=True)
        if stored.get("distill_config") not in (None, extra["distill_config"]):
            raise UserError(f"{out} was distilled with other settings {stored['distill_config']}; use a new --out")
    step, samples_seen, elapsed_before = _resume_or_start(out, student, optimizer, scheduler, None, restart, CSV_FIELDS)
    start_step = step
    student.train()
    start = time.monotonic()
    last_ckpt = start
    losses: list[float] = []
    last_val: dict[str, float] | None = None
    stop_step = config.max_steps if steps is None else min(config.max_steps, step + steps)
    stride = student.coarse_stride
    bar = tqdm(total=stop_step, initial=step, desc="distil loftr", disable=not progress, dynamic_ncols=True)

    def save() -> None:
        elapsed = elapsed_before + time.monotonic() - start
        save_training_checkpoint(
            out, student, optimizer, scheduler, step, samples_seen, elapsed, config, data_specs, extra
        )

    def load(first: int) -> tuple[list[Sample], Any]:
        items = [source.sample(first + i) for i in range(config.batch_size)]
        return items, supervise_samples(items, config.depth_tolerance, stride)

    with _GracefulStop() as stop, ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(load, samples_seen)
        while step < stop_step and not stop.requested:
            if minutes is not None and time.monotonic() - start > minutes * 60:
                break
            items, sup = upcoming.result()
            upcoming = prefetch.submit(load, samples_seen + config.batch_size)
            batch = {key: torch.stack([s[key] for s in items]).to(device) for key in BATCH_KEYS if key in items[0]}
            conf_t = teacher_confidence(teacher, batch, distill_config.teacher_scale, k)
            result = distill_losses(student, batch, conf_t, sup, distill_config, config.loss)
            optimizer.zero_grad(set_to_none=True)
            result["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            samples_seen += config.batch_size
            losses.append(float(result["loss"].detach()))
            row: dict[str, Any] = {
                "step": step,
                "samples": samples_seen,
                "elapsed_s": round(elapsed_before + time.monotonic() - start, 1),
                "lr": f"{lr:.3g}",
                **{name: f"{float(result[name].detach()):.5f}" for name in ("loss", "loss_kd", "loss_gt")},
                "gt_matches": sup.num_matches,
            }
            if val_samples and config.validate_every and step % config.validate_every == 0:
                last_val = validate_student(student, teacher, val_samples, distill_config, k, device)
                row.update({name: f"{value:.4f}" for name, value in last_val.items()})
            if step % config.log_every == 0 or "val_matches" in row:
                _append_csv(log_path, row, CSV_FIELDS)
            bar.update(1)
            bar.set_postfix({name: f"{float(result[name].detach()):.3f}" for name in ("loss", "loss_kd", "loss_gt")})
            if time.monotonic() - last_ckpt > config.checkpoint_minutes * 60:
                save()
                last_ckpt = time.monotonic()
    bar.close()
    save()
    if stop.requested:
        print(f"stopped by a signal after step {step}; saved {out}; run the same command to resume", file=sys.stderr)
    return DistillResult(out, log_path, start_step, step, losses, last_val)


def main(
    teacher: str,
    data: Sequence[str],
    out: str | Path,
    student: str = "student",
    minutes: float | None = None,
    steps: int | None = None,
    val: Sequence[str] = (),
    val_pairs: int = 8,
    size: tuple[int, int] = (480, 640),
    config: TrainConfig = STUDENT_TRAIN,
    distill_config: DistillConfig = DistillConfig(),
    device: str = "auto",
    restart: bool = False,
    export: str | Path | None = None,
    export_half: bool = False,
    export_threshold: float | None = None,
    max_rotation: float = HomographyConfig.max_rotation_deg,
    progress: bool = True,
) -> DistillResult:
    """Load the teacher, build the data, distil (resuming ``out`` if it exists) and optionally export."""
    if student not in PRESET_NAMES:
        raise UserError(f"unknown student preset {student!r}; choose one of {', '.join(PRESET_NAMES)}")
    if not data:
        raise UserError("no training data: pass at least one --data SOURCE")
    for spec in list(data) + list(val):
        kind = parse_spec(spec)[0]
        if kind not in KINDS:
            raise UserError(
                f"--data {spec!r}: distillation takes {', '.join(KINDS)} sources (they give GT, no padding)"
            )
    student_config = LoFTRConfig.preset(student)
    stride = student_config.coarse_stride
    if size[0] % stride or size[1] % stride:
        raise UserError(f"--size {size[1]}x{size[0]}: both sides must be multiples of the student's stride {stride}")
    if not 0.0 < distill_config.teacher_scale <= 4.0:
        raise UserError(f"--teacher-scale must be in (0, 4], got {distill_config.teacher_scale}")
    device = resolve_device(device)
    prepare_outputs(out, export)
    teacher_model = load_pretrained(str(teacher), device)
    source = build_mixture(data, size, config.seed, max_rotation=max_rotation)
    val_source = build_mixture(val or data[:1], size, config.seed + 7777, augment=False)
    val_samples = [val_source.sample(i) for i in range(val_pairs)]
    result = distill(
        teacher_model,
        student_config,
        source,
        out,
        config,
        distill_config,
        minutes=minutes,
        steps=steps,
        val_samples=val_samples,
        device=device,
        data_specs=list(data),
        restart=restart,
        progress=progress,
        teacher_label=str(getattr(teacher_model, "weights_name", teacher)),
    )
    if export is not None:
        export_weights(result.checkpoint, export, half=export_half, threshold=export_threshold)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes.distill", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--teacher", required=True, help="teacher LoFTR weights: a name (loftr-compact, outdoor) or a path"
    )
    parser.add_argument("--student", default="student", choices=PRESET_NAMES, help="student preset")
    parser.add_argument("--data", action="append", default=[], metavar="KIND:VALUE[@W]", required=True)
    parser.add_argument(
        "--val", action="append", default=[], metavar="KIND:VALUE", help="validation source (default: first --data)"
    )
    parser.add_argument("--val-pairs", type=int, default=8)
    parser.add_argument("--out", required=True, help="training checkpoint (resumed when it exists)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget of this run")
    parser.add_argument("--steps", type=int, default=None, help="number of steps for this run")
    parser.add_argument("--size", type=parse_size, default=(480, 640), help="student image size WxH (640x480)")
    parser.add_argument(
        "--max-rotation",
        type=float,
        default=HomographyConfig.max_rotation_deg,
        help="in-plane rotation range of homography pairs, degrees",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--restart", action="store_true", help="ignore an existing --out and start over")
    parser.add_argument("--export", default=None, help="also write a weights-only checkpoint here")
    parser.add_argument("--export-half", action="store_true", help="store the exported weights as float16")
    parser.add_argument(
        "--export-threshold", type=float, default=None, help="coarse threshold stored in the export (default: preset's)"
    )
    parser.add_argument("--no-progress", action="store_true")
    add_config_arguments(parser.add_argument_group("distillation"), DistillConfig)
    add_config_arguments(
        parser.add_argument_group("optimisation"),
        TrainConfig,
        defaults=STUDENT_TRAIN,
        exclude=("max_fine_matches",),
        aliases={"warmup_steps": "--warmup"},
    )
    add_config_arguments(
        parser.add_argument_group("losses"), LossConfig, prefix="loss_", exclude=("fine_weight", "fine_correct_thr")
    )
    return parser


def main_cli(argv: Sequence[str] | None = None) -> DistillResult:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loss = config_from_args(args, LossConfig, prefix="loss_")
    config = config_from_args(args, TrainConfig, base=STUDENT_TRAIN, loss=loss)
    result = main(
        args.teacher,
        args.data,
        args.out,
        args.student,
        args.minutes,
        args.steps,
        args.val,
        args.val_pairs,
        args.size,
        config,
        config_from_args(args, DistillConfig),
        args.device,
        args.restart,
        args.export,
        args.export_half,
        args.export_threshold,
        args.max_rotation,
        progress=not args.no_progress and not os.environ.get("CI"),
    )
    print(f"distilled steps {result.start_step} -> {result.end_step}; checkpoint {result.checkpoint}; log {result.log}")
    if result.last_validation:
        print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in result.last_validation.items()))
    return result


if __name__ == "__main__":
    run_cli(main_cli)
