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
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from core.cli import add_config_arguments, config_from_args
from core.device import resolve_device
from core.errors import UserError, run_cli
from matchers.loftr.config import PRESET_NAMES, LoFTRConfig
from matchers.loftr.model import LoFTR
from matchers.loftr.weights import load_pretrained
from recipes.train_loftr import add_run_arguments, build_mixture, parse_spec, print_result
from recipes.training.data import HomographyConfig, PairSource, Sample
from recipes.training.distill import DistillConfig, distill_losses, pool_factor, teacher_confidence
from recipes.training.losses import LossConfig
from recipes.training.supervision import Supervision
from recipes.training.trainer import (
    BATCH_KEYS,
    TrainConfig,
    TrainingRun,
    TrainResult,
    export_weights,
    make_optimizer,
    match_errors,
    prepare_outputs,
    resume_or_start,
    run_steps,
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


#: what a call to :func:`distill` did (the training loop's result)
DistillResult = TrainResult
#: the losses of a distillation step (the CSV columns and the progress bar)
DISTILL_LOSSES = ("loss", "loss_kd", "loss_gt")


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
        count, err = match_errors(sample, out)
        counts.append(count)
        total += len(err)
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
    optimizer, scheduler = make_optimizer(student, config)
    extra = {"distill_config": asdict(distill_config), "teacher": teacher_label}
    if out.exists() and not restart:
        stored = torch.load(out, map_location="cpu", weights_only=True)
        if stored.get("distill_config") not in (None, extra["distill_config"]):
            raise UserError(f"{out} was distilled with other settings {stored['distill_config']}; use a new --out")
    resumed = resume_or_start(out, student, optimizer, scheduler, None, restart, CSV_FIELDS)

    def losses(batch: Sample, sup: Supervision, step: int) -> dict[str, torch.Tensor]:
        conf_t = teacher_confidence(teacher, batch, distill_config.teacher_scale, k)
        return distill_losses(student, batch, conf_t, sup, distill_config, config.loss)

    def validation() -> dict[str, float]:
        return validate_student(student, teacher, val_samples, distill_config, k, device)

    run = TrainingRun(
        student,
        optimizer,
        scheduler,
        source,
        out,
        config,
        losses,
        validation if val_samples else None,
        logged=DISTILL_LOSSES,
        bar={name: name for name in DISTILL_LOSSES},
        csv_fields=CSV_FIELDS,
        description="distil loftr",
        data_specs=data_specs,
        extra=extra,
    )
    return run_steps(run, resumed, device, minutes, steps, progress)


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
    add_run_arguments(parser, (480, 640), "student image size WxH, multiples of its stride (640x480)")
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
    print_result(result, "distilled")
    return result


if __name__ == "__main__":
    run_cli(main_cli)
