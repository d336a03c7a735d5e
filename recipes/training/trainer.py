"""The LoFTR training loop: AdamW, warm-up + cosine/step/constant schedule, gradient clipping, periodic atomic
checkpoints with exact resume, a CSV log of losses and validation metrics.

Exact resume: data samples are a pure function of (seed, sample index) (see :mod:`.data`), the fine-stage
subsampling uses a generator seeded with (seed, step), and a checkpoint stores the model, optimiser and scheduler
states, the step and the torch RNG state. Restarting from a checkpoint therefore computes the same next loss as the
uninterrupted run (up to the nondeterminism of the device's kernels; none on CPU with a fixed thread count).

Training forward pass (composes the model's submodules, so the model itself needs no training hooks):
backbone on both images -> coarse transformer -> log dual-softmax (or log Sinkhorn) -> coarse focal loss;
fine stage on (a random subset of) the *GT* coarse matches -> L2/std fine loss.
"""

from __future__ import annotations

import csv
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError
from matchers.loftr.coarse_matching import CoarseMatches, log_optimal_transport
from matchers.loftr.config import COARSE_STRIDE, LoFTRConfig
from matchers.loftr.model import EncodedImage, LoFTR
from matchers.loftr.weights import check_state_dict, read_checkpoint

from .data import PairSource, Sample
from .losses import LossConfig, coarse_loss, dual_softmax_log_confidence, fine_loss
from .supervision import Supervision, depth_warp, homography_warp, supervise_samples

CSV_FIELDS = (
    "step",
    "samples",
    "elapsed_s",
    "lr",
    "loss",
    "loss_c",
    "loss_f",
    "gt_matches",
    "val_matches",
    "val_precision",
    "val_fine_error_px",
    "val_loss",
)


#: what a training batch stacks of its samples (the masks only where the images are padded)
BATCH_KEYS = ("image0", "image1", "mask0", "mask1")
#: the progress bar's name of each loss
_BAR_LOSSES = {"loss": "loss", "lc": "loss_c", "lf": "loss_f"}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults suit the compact preset on a CPU at 320x240, batch 1)."""

    lr: float = 4e-4  # base learning rate (AdamW)
    weight_decay: float = 0.1  # official AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 100  # steps of linear warm-up
    warmup_ratio: float = 0.1  # lr starts at warmup_ratio * lr and grows linearly (official linear warm-up)
    schedule: Literal["cosine", "step", "constant"] = "cosine"  # lr schedule after the warm-up
    max_steps: int = 4000  # cosine length; also a hard stop
    min_lr_ratio: float = 0.05  # cosine floor
    step_milestones: tuple[int, ...] = (2000, 3000, 3500)  # step schedule: steps where the lr drops
    step_gamma: float = 0.5  # step schedule: lr factor at each milestone
    grad_clip: float = 0.5  # official GRADIENT_CLIPPING (0: off)
    batch_size: int = 1  # pairs per step
    max_fine_matches: int = 256  # GT coarse matches refined per batch (official pads with up to 200 GT matches)
    seed: int = 0  # seeds the model, the data order and the fine-stage sampling
    checkpoint_minutes: float = 3.0  # minutes between checkpoints
    validate_every: int = 100  # steps between validations (0: never)
    log_every: int = 1  # steps between CSV log rows
    depth_tolerance: float = 0.2  # relative depth difference a depth-warped GT match may have (occlusion test)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["betas"] = list(self.betas)
        out["step_milestones"] = list(self.step_milestones)
        return out


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then the schedule."""
    if step < config.warmup_steps:
        return config.warmup_ratio + (1 - config.warmup_ratio) * step / max(1, config.warmup_steps)
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.step_gamma ** sum(step >= m for m in config.step_milestones)
    if config.schedule == "cosine":
        span = max(1, config.max_steps - config.warmup_steps)
        t = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    raise UserError(f"unknown schedule {config.schedule!r}; use cosine, step or constant")


# ---------------------------------------------------------------------------------------------- forward / loss
def _split(enc: EncodedImage, n: int) -> tuple[EncodedImage, EncodedImage]:
    mask0 = None if enc.mask is None else enc.mask[:n]
    mask1 = None if enc.mask is None else enc.mask[n:]
    return (
        EncodedImage(enc.coarse[:n], enc.fine[:n], enc.image_size, mask0),
        EncodedImage(enc.coarse[n:], enc.fine[n:], enc.image_size, mask1),
    )


def encode_pair(model: LoFTR, batch: Sample) -> tuple[EncodedImage, EncodedImage]:
    """Backbone features of both images (one pass when the sizes agree, as the official training does)."""
    image0, image1 = batch["image0"], batch["image1"]
    mask0, mask1 = batch.get("mask0"), batch.get("mask1")
    if image0.shape == image1.shape and (mask0 is None) == (mask1 is None):
        both = model.encode(torch.cat([image0, image1]), None if mask0 is None else torch.cat([mask0, mask1]))
        return _split(both, image0.shape[0])
    return model.encode(image0, mask0), model.encode(image1, mask1)


def coarse_log_confidence(
    model: LoFTR, tokens0: torch.Tensor, tokens1: torch.Tensor, mask0: torch.Tensor | None, mask1: torch.Tensor | None
) -> torch.Tensor:
    """log P_c (N, L, S) (dual-softmax) or the (N, L+1, S+1) log Sinkhorn assignment, in float32."""
    cfg = model.config.matching
    scale = tokens0.shape[-1] ** 0.5
    sim = torch.bmm(tokens0.float() / scale, (tokens1.float() / scale).transpose(1, 2))
    if cfg.match_type == "dual_softmax":
        return dual_softmax_log_confidence(sim / cfg.dsmax_temperature, mask0, mask1)
    return log_optimal_transport(sim, model.coarse_matching.bin_score.float(), cfg.skh_iters, mask0, mask1)


def compute_losses(
    model: LoFTR, batch: Sample, sup: Supervision, config: TrainConfig, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Forward pass and losses of one batch: ``loss``, ``loss_c``, ``loss_f`` (tensors)."""
    enc0, enc1 = encode_pair(model, batch)
    tokens0, tokens1, mask0, mask1 = model.transform_coarse(enc0, enc1)
    log_conf = coarse_log_confidence(model, tokens0, tokens1, mask0, mask1)
    sinkhorn = model.config.matching.match_type == "sinkhorn"
    loss_c = coarse_loss(log_conf, sup.conf_gt.to(log_conf.device), config.loss, sinkhorn, mask0, mask1)
    # fine stage on GT coarse matches (the official training pads predictions with GT matches for the same reason:
    # early predictions are wrong, and the fine loss needs windows that contain the true match)
    m = sup.num_matches
    if m > config.max_fine_matches:
        keep = torch.randperm(m, generator=generator)[: config.max_fine_matches]
    else:
        keep = torch.arange(m)
    device = tokens0.device
    b, i, j = sup.b_ids[keep].to(device), sup.i_ids[keep].to(device), sup.j_ids[keep].to(device)
    matches = CoarseMatches(b, i, j, torch.ones(len(keep), device=device))
    offsets, std = model.refine(enc0, enc1, tokens0, tokens1, matches)
    loss_f = fine_loss(offsets, std, sup.offsets[keep].to(device), config.loss) if len(keep) else log_conf.sum() * 0
    loss = config.loss.coarse_weight * loss_c + config.loss.fine_weight * loss_f
    return {"loss": loss, "loss_c": loss_c.detach(), "loss_f": loss_f.detach()}


# ---------------------------------------------------------------------------------------------- validation
def match_errors(sample: Sample, out: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor]:
    """The number of matches of a model's output on ``sample`` and, for those with ground truth, the distance (px)
    of keypoint 1 from keypoint 0 warped by the ground truth."""
    k0, k1 = out["keypoints0"].cpu().double(), out["keypoints1"].cpu().double()
    if len(k0) == 0:
        return 0, torch.zeros(0, dtype=torch.float64)
    warped, valid = gt_warp(sample)(k0[None])
    return len(k0), (warped[0] - k1).norm(dim=1)[valid[0]]


def gt_warp(sample: Sample) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    if "H_0to1" in sample:
        return homography_warp(sample["H_0to1"][None].double())
    return depth_warp(
        sample["depth0"][None],
        sample["depth1"][None],
        sample["K0"][None],
        sample["K1"][None],
        sample["T_0to1"][None].double(),
    )


@torch.no_grad()
def validate(
    model: LoFTR,
    samples: Sequence[Sample],
    device: torch.device,
    threshold_px: float = float(COARSE_STRIDE),
    config: TrainConfig | None = None,
) -> dict[str, float]:
    """Match each pair with the model (eval mode) and score against the GT warp.

    ``val_matches``: mean matches per pair; ``val_precision``: fraction of matches whose keypoint 1 lies within
    ``threshold_px`` of the true position (matches without a valid GT, e.g. off the depth map, are not counted);
    ``val_fine_error_px``: median error of the correct ones; ``val_loss``: mean training loss (eval mode).
    """
    was_training = model.training
    model.eval()
    config = config if config is not None else TrainConfig()
    counts, correct, total, errors, losses = [], 0, 0, [], []
    for index, sample in enumerate(samples):
        sup = supervise_samples([sample], config.depth_tolerance)
        batch = {k: sample[k][None].to(device) for k in BATCH_KEYS if k in sample}
        generator = torch.Generator().manual_seed(index)
        losses.append(float(compute_losses(model, batch, sup, config, generator)["loss"]))
        mask0 = sample.get("mask0")
        mask1 = sample.get("mask1")
        out = model(
            sample["image0"][None].to(device),
            sample["image1"][None].to(device),
            None if mask0 is None else mask0[None].to(device),
            None if mask1 is None else mask1[None].to(device),
        )
        count, err = match_errors(sample, out)
        counts.append(count)
        total += len(err)
        ok = err < threshold_px
        correct += int(ok.sum())
        errors.extend(err[ok].tolist())
    model.train(was_training)
    return {
        "val_matches": float(np.mean(counts)) if counts else 0.0,
        "val_precision": correct / total if total else 0.0,
        "val_fine_error_px": float(np.median(errors)) if errors else float("nan"),
        "val_loss": float(np.mean(losses)) if losses else float("nan"),
    }


# ---------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_training_checkpoint(
    path: Path,
    model: LoFTR,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    samples: int,
    elapsed: float,
    config: TrainConfig,
    data_specs: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Everything needed to resume, readable with ``torch.load(weights_only=True)`` and by ``load_pretrained``.

    ``extra``: further plain entries (e.g. the distillation settings of ``recipes.distill``)."""
    from core.io import atomic_path

    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "loftr_config": model.config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "samples": samples,
        "elapsed_s": elapsed,
        "rng": _rng_state(),
        "train_config": config.to_dict(),
        "data": list(data_specs),
        **(extra or {}),
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files come in many types
        raise UserError(
            f"{path} is not a readable training checkpoint ({str(error).splitlines()[0][:200]}); "
            f"delete it to start over"
        ) from None


def export_weights(checkpoint: str | Path, out: str | Path, half: bool = False, threshold: float | None = None) -> Path:
    """Write just the weights and config of a training checkpoint (the small file that ships).

    ``half`` stores floating-point tensors as float16 (half the size; ``load_state_dict`` casts them back to the
    model's float32 parameters). ``threshold`` sets the coarse matching threshold stored in the config (the one
    the model uses unless a caller overrides it).
    """
    import copy

    from core.io import atomic_path

    data = load_training_checkpoint(Path(checkpoint))
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in data["state_dict"].items()}
    config = copy.deepcopy(data["loftr_config"])
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"the coarse threshold must be in [0, 1], got {threshold}")
        config["matching"]["thr"] = float(threshold)
    payload = {"state_dict": state, "loftr_config": config}
    meta = {k: data[k] for k in ("step", "samples", "elapsed_s") if k in data}
    payload["training"] = meta
    with atomic_path(Path(out)) as temp:
        torch.save(payload, temp)
    return Path(out)


# ---------------------------------------------------------------------------------------------- loop
class _GracefulStop:
    """Within the block, SIGINT and SIGTERM only set ``requested`` (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> "_GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    checkpoint: Path
    log: Path
    start_step: int
    end_step: int
    losses: list[float]
    last_validation: dict[str, float] | None


def prepare_outputs(out: str | Path, export: str | Path | None = None) -> None:
    """Before any training: the checkpoint (its log goes next to it) and the export can be written; their folders
    are created. A bad path is one :class:`UserError`, not a traceback after the first steps."""
    from core.files import check_output_file

    for path, option in ((out, "--out"), (export, "--export")):
        if path is not None:
            check_output_file(path, option, example="run.ckpt")
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def _append_csv(path: Path, row: dict[str, Any], fields: Sequence[str] = CSV_FIELDS) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def _truncate_csv(path: Path, step: int, fields: Sequence[str] = CSV_FIELDS) -> None:
    """Drop log rows after ``step`` (written by a run that did not reach its next checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    from core.io import atomic_path

    with atomic_path(path) as temp, open(temp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def make_optimizer(
    model: LoFTR, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with weight decay on weights only (not biases and norms), and the warm-up + schedule."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


def resume_or_start(
    out: Path,
    model: LoFTR,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    init: str | Path | None,
    restart: bool,
    fields: Sequence[str] = CSV_FIELDS,
) -> tuple[int, int, float]:
    """Load the training state of ``out`` (unless ``restart``), else ``init``'s weights (if given):
    (step, samples seen, seconds trained). ``fields``: the columns of the CSV log next to ``out``."""
    log_path = out.with_suffix(".csv")
    if out.exists() and not restart:
        state = load_training_checkpoint(out)
        if "optimizer" not in state:
            raise UserError(f"{out} holds weights only, not a training state; pass --init {out} with another --out")
        stored = LoFTRConfig.from_dict(state["loftr_config"])
        # the coarse threshold does not enter training (a preset may re-tune it after a run): architecture only
        if stored.replace(matching={"thr": model.config.matching.thr}) != model.config:
            raise UserError(f"{out} was trained with another model configuration; use the same --preset or a new --out")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        _truncate_csv(log_path, int(state["step"]), fields)
        return int(state["step"]), int(state["samples"]), float(state["elapsed_s"])
    if restart and log_path.exists():
        log_path.unlink()
    if init is not None:
        state_dict, _ = read_checkpoint(init)
        check_state_dict(model, state_dict, str(init), "the chosen preset")
        model.load_state_dict(state_dict)
    return 0, 0, 0.0


#: the losses a training step logs to its CSV row and shows on its progress bar (bar name -> loss key)
TRAIN_LOSSES = ("loss", "loss_c", "loss_f")


def _log_row(
    step: int,
    samples: int,
    elapsed: float,
    lr: float,
    losses: dict[str, torch.Tensor],
    sup: Supervision,
    names: Sequence[str] = TRAIN_LOSSES,
) -> dict[str, Any]:
    """The CSV log row of a step (validation metrics are added to it on validation steps)."""
    return {
        "step": step,
        "samples": samples,
        "elapsed_s": round(elapsed, 1),
        "lr": f"{lr:.3g}",
        **{name: f"{float(losses[name].detach()):.5f}" for name in names},
        "gt_matches": sup.num_matches,
    }


def _optimisation_step(
    model: LoFTR,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    result: dict[str, torch.Tensor],
    config: TrainConfig,
) -> float:
    """Back-propagate ``result["loss"]``, clip, step the optimiser and the schedule; the lr it used."""
    optimizer.zero_grad(set_to_none=True)
    result["loss"].backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return lr


@dataclass(frozen=True)
class TrainingRun:
    """What a loop of :func:`run_steps` trains and how it logs: the part that training and distilling share.

    ``losses(batch, sup, step)`` gives the step's loss tensors (``"loss"`` is optimised); ``validate()`` the
    validation metrics (None: no validation); ``logged`` the loss keys of the CSV log; ``bar`` the progress bar's
    names of the losses shown.
    """

    model: LoFTR
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    source: PairSource
    out: Path
    config: TrainConfig
    losses: Callable[[Sample, Supervision, int], dict[str, torch.Tensor]]
    validate: Callable[[], dict[str, float]] | None
    logged: Sequence[str] = TRAIN_LOSSES
    bar: dict[str, str] = field(default_factory=lambda: dict(_BAR_LOSSES))
    csv_fields: Sequence[str] = CSV_FIELDS
    description: str = "train loftr"
    data_specs: Sequence[str] = ()
    extra: dict[str, Any] | None = None  # further checkpoint entries (save_training_checkpoint)


def run_steps(
    run: TrainingRun,
    resumed: tuple[int, int, float],
    device: torch.device,
    minutes: float | None = None,
    steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """The loop from the resumed (step, samples seen, seconds trained) state: until ``minutes`` of wall time,
    ``steps`` more steps or ``config.max_steps``; checkpoints every ``checkpoint_minutes`` and at the end.

    SIGINT / SIGTERM finish the current step, then save and return: the same command resumes exactly. The next
    batch is rendered / warped in a worker thread while this one trains (samples are a function of their index,
    so prefetching changes nothing but the wall time)."""
    config, model, log_path = run.config, run.model, run.out.with_suffix(".csv")
    step, samples_seen, elapsed_before = resumed
    start_step = step
    model.train()
    start = last_ckpt = time.monotonic()
    losses: list[float] = []
    last_val: dict[str, float] | None = None
    stop_step = config.max_steps if steps is None else min(config.max_steps, step + steps)
    bar = tqdm(total=stop_step, initial=step, desc=run.description, disable=not progress, dynamic_ncols=True)

    def save() -> None:
        elapsed = elapsed_before + time.monotonic() - start
        save_training_checkpoint(
            run.out, model, run.optimizer, run.scheduler, step, samples_seen, elapsed, config, run.data_specs, run.extra
        )

    def load(first: int) -> tuple[list[Sample], Supervision]:
        items = [run.source.sample(first + k) for k in range(config.batch_size)]
        return items, supervise_samples(items, config.depth_tolerance, model.coarse_stride)

    with _GracefulStop() as stop, ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(load, samples_seen)
        while step < stop_step and not stop.requested:
            if minutes is not None and time.monotonic() - start > minutes * 60:
                break
            items, sup = upcoming.result()
            upcoming = prefetch.submit(load, samples_seen + config.batch_size)
            batch = {k: torch.stack([s[k] for s in items]).to(device) for k in BATCH_KEYS if k in items[0]}
            result = run.losses(batch, sup, step)
            lr = _optimisation_step(model, run.optimizer, run.scheduler, result, config)
            step += 1
            samples_seen += config.batch_size
            losses.append(float(result["loss"].detach()))
            row = _log_row(step, samples_seen, elapsed_before + time.monotonic() - start, lr, result, sup, run.logged)
            if run.validate is not None and config.validate_every and step % config.validate_every == 0:
                last_val = run.validate()
                row.update({k: f"{v:.4f}" for k, v in last_val.items()})
            if step % config.log_every == 0 or "val_matches" in row:
                _append_csv(log_path, row, run.csv_fields)
            bar.update(1)
            bar.set_postfix({name: f"{float(result[key].detach()):.3f}" for name, key in run.bar.items()})
            if time.monotonic() - last_ckpt > config.checkpoint_minutes * 60:
                save()
                last_ckpt = time.monotonic()
    bar.close()
    save()
    if stop.requested:
        print(
            f"stopped by a signal after step {step}; saved {run.out}; run the same command to resume", file=sys.stderr
        )
    return TrainResult(run.out, log_path, start_step, step, losses, last_val)


def train(
    model_config: LoFTRConfig,
    source: PairSource,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    minutes: float | None = None,
    steps: int | None = None,
    init: str | Path | None = None,
    val_samples: Sequence[Sample] = (),
    device: str | torch.device = "cpu",
    data_specs: Sequence[str] = (),
    restart: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume training of) LoFTR; checkpoint ``out`` and a CSV log ``out`` with suffix ``.csv``.

    Stops after ``minutes`` of wall time, after ``steps`` more steps, or at ``config.max_steps``, whichever comes
    first, and always writes a final checkpoint. An existing ``out`` is resumed unless ``restart``. ``init``: a
    checkpoint (official, kornia or this project's) to fine-tune from, used only when not resuming.
    """
    out = Path(out)
    device = torch.device(device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = LoFTR(model_config).to(device)
    optimizer, scheduler = make_optimizer(model, config)
    resumed = resume_or_start(out, model, optimizer, scheduler, init, restart)

    def losses(batch: Sample, sup: Supervision, step: int) -> dict[str, torch.Tensor]:
        # The fine-stage subsampling is seeded by (seed, step), so a resumed run draws the same.
        return compute_losses(model, batch, sup, config, torch.Generator().manual_seed(config.seed * 1_000_003 + step))

    def validation() -> dict[str, float]:
        return validate(model, val_samples, device, config=config)

    run = TrainingRun(
        model,
        optimizer,
        scheduler,
        source,
        out,
        config,
        losses,
        validation if val_samples else None,
        data_specs=data_specs,
    )
    return run_steps(run, resumed, device, minutes, steps, progress)
