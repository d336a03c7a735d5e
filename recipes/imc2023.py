"""Image Matching Challenge 2023 / 2024: one COLMAP reconstruction per scene -> Kaggle ``submission.csv``.

    python -m recipes.imc2023 --data DIR --output submission.csv [--split auto|train|test] \\
        [--matcher loftr+sift|loftr|sift] [--weights outdoor] [--resize 840 [1280 ...]] [--rotation none|auto|best|union] \\
        [--exhaustive-max 50] [--num-pairs 20] [--camera-mode auto|single|per-image] \\
        [--time-budget SECONDS] [--work DIR] [--score]

The scenes come from ``DIR/sample_submission.csv`` (test split: images under ``DIR/test``) or from
``DIR/train/train_labels.csv`` (train split, for local scoring); see :mod:`datasets.imc`. For every
``(dataset, scene)`` the recipe picks pairs — all pairs when the scene has at most ``--exhaustive-max``
images, retrieval top-``--num-pairs`` otherwise — then runs dense matching and incremental mapping
(:mod:`pipeline.reconstruct`, i.e. :mod:`pipeline.match_dense` + pycolmap) and writes, for every listed
image, ``image_path,dataset,scene,rotation_matrix,translation_vector`` (world-to-camera R and T from
the largest model, ``;``-separated, row-major; nan when the image is not registered). The 2024 CSV has
the same columns.

Kaggle realities: a tqdm bar over scenes; each finished scene's poses are cached in
``<work>/<dataset>/<scene>/poses.json`` (and matching resumes pair by pair inside a scene), so a killed
run resumes; the CSV is rewritten after every scene, so it is always complete and valid;
``--time-budget`` skips scenes that would not fit (their images get nan).

``--score`` evaluates the written CSV against ``DIR/train/train_labels.csv`` with the IMC 2023 mAA
(:mod:`datasets.imc_metrics`: all image pairs of a scene, per-scene thresholds published by the
organisers; scenes outside the competition use the object-scale 'haiper' lists).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.cli import add_config_arguments, config_from_options
from core.distributed import DistributedConfig
from core.errors import UserError, run_cli
from core.io import check_output_dir, check_output_file, write_text_atomic
from core.stamps import digest
from datasets.imc import (
    Pose,
    SceneImages,
    list_scenes_2023,
    read_labels_2023,
    read_submission_2023,
    write_submission_2023,
)
from datasets.imc_metrics import average_over_datasets, scene_maa_2023, thresholds_2023
from pipeline.colmap_db import CameraMode
from pipeline.mapping import MappingConfig
from pipeline.match_dense import DenseOverrides, MatcherSpec, dense_defaults
from pipeline.pairs import PairsConfig
from pipeline.reconstruct import ReconstructConfig
from pipeline.tta import RotationMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IMC2023Config:
    """What the recipe runs per scene."""

    matcher: MatcherSpec = MatcherSpec()  # the main job's default: the loftr+sift ensemble
    #: in-plane rotation handling (see pipeline.tta); none = pipeline.reconstruct's (auto for loftr, none for sift)
    rotation: RotationMode | None = None
    camera_mode: CameraMode = "auto"  # images sharing a camera: auto (same size and EXIF), single or per-image
    exhaustive_max: int = 50  # scenes with at most this many images match all pairs; larger ones use retrieval
    num_pairs: int = 20  # retrieval pairs per image (larger scenes)
    seed: int = 0  # COLMAP's random seed
    num_threads: int = -1  # mapper threads (-1 = all cores; 1 = reproducible: multi-threaded bundle adjustment is not)
    distributed: DistributedConfig = DistributedConfig()  # each scene's matching over Ray workers (--distributed ray)

    def __post_init__(self) -> None:
        if self.exhaustive_max < 2 or self.num_pairs < 1:
            raise UserError("--exhaustive-max must be >= 2 and --num-pairs >= 1")
        self.reconstruct_config(self.exhaustive_max + 1)  # options that cannot run together fail now

    def pair_strategy(self, num_images: int) -> str:
        """'exhaustive' for small scenes; 'retrieval' for large ones."""
        return "exhaustive" if num_images <= self.exhaustive_max else "retrieval"

    def num_pairs_estimate(self, num_images: int) -> int:
        if self.pair_strategy(num_images) == "exhaustive":
            return num_images * (num_images - 1) // 2
        return num_images * self.num_pairs

    def reconstruct_config(self, num_images: int) -> ReconstructConfig:
        """The pipeline.reconstruct run of a scene of ``num_images`` images."""
        spec = self.matcher
        overrides = DenseOverrides(rotation=self.rotation)
        return ReconstructConfig(
            matcher=spec,
            pairs=PairsConfig(self.pair_strategy(num_images), num_matched=self.num_pairs),
            dense=None if self.rotation is None else dense_defaults(spec.matcher, spec.resize, overrides),
            mapping=MappingConfig(seed=self.seed, num_threads=self.num_threads),
            camera_mode=self.camera_mode,
            distributed=self.distributed,
        )


@dataclass(frozen=True)
class SceneResult:
    """The outcome of one scene."""

    dataset: str
    scene: str
    num_images: int
    registered: int
    status: str  # 'reconstructed' | 'failed' | 'skipped' (time budget)
    seconds: float
    reused: bool  # taken from the poses cache
    message: str = ""


@dataclass(frozen=True)
class Score2023:
    """Local 2023 score: mean over datasets of the mean over their scenes."""

    maa: float
    per_dataset: dict[str, float]
    per_scene: dict[tuple[str, str], float]


@dataclass(frozen=True)
class RunResult:
    """What :func:`main` did."""

    submission: Path
    split: str
    scenes: list[SceneResult]
    seconds: float
    score: Score2023 | None = None


# ------------------------------------------------------------------------------------------ scenes
def scene_stamp(scene: SceneImages, config: IMC2023Config) -> str:
    """Cache key of a scene's poses: its images and every option that changes the reconstruction."""
    options = asdict(config)
    options.pop("distributed")  # where the matching ran does not change the poses
    return digest({"names": list(scene.names), "image_dir": str(scene.image_dir), "config": options})


def load_cached_poses(path: Path, stamp: str) -> dict[str, Any] | None:
    """The cached record of a scene (poses by image name, status) when it was made with ``stamp``."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("stamp") == stamp else None


def poses_from_reconstruction(reconstruction: Any) -> dict[str, Pose]:
    """World-to-camera (R, T) of every registered image, by image name."""
    poses: dict[str, Pose] = {}
    for image_id in reconstruction.reg_image_ids():
        image = reconstruction.images[image_id]
        rigid = image.cam_from_world()
        poses[image.name] = (
            np.asarray(rigid.rotation.matrix(), dtype=np.float64),
            np.asarray(rigid.translation, dtype=np.float64),
        )
    return poses


def reconstruct_scene(scene: SceneImages, config: IMC2023Config, outputs: Path) -> tuple[dict[str, Pose], str]:
    """Run pipeline.reconstruct on one scene; returns (poses by image name, status message)."""
    from pipeline import reconstruct

    run = config.reconstruct_config(len(scene.names))
    result = reconstruct.main(scene.image_dir, outputs, run)
    poses = poses_from_reconstruction(result.reconstruction)
    return poses, f"{len(poses)}/{len(scene.names)} registered ({run.pairs.method} pairs)"


def submission_rows(
    scenes: Sequence[SceneImages], poses: dict[tuple[str, str], dict[str, Pose]]
) -> list[tuple[str, str, str, Pose | None]]:
    rows = []
    for scene in scenes:
        scene_poses = poses.get((scene.dataset, scene.scene), {})
        for image_path, name in zip(scene.image_paths, scene.names):
            rows.append((image_path, scene.dataset, scene.scene, scene_poses.get(name)))
    return rows


def cached_scene(scene: SceneImages, record: dict[str, Any]) -> tuple[dict[str, Pose], SceneResult]:
    """The poses and result of a scene from its cached record."""
    poses = {
        name: (np.asarray(p["R"]).reshape(3, 3), np.asarray(p["t"]).reshape(3)) for name, p in record["poses"].items()
    }
    result = SceneResult(
        scene.dataset, scene.scene, len(scene.names), len(poses), record["status"], 0.0, True, record.get("message", "")
    )
    return poses, result


def run_scene(
    scene: SceneImages, config: IMC2023Config, scene_dir: Path, stamp: str
) -> tuple[dict[str, Pose], SceneResult]:
    """Reconstruct one scene and cache its poses (a scene that fails gets none: its images get nan)."""
    start = time.monotonic()
    try:
        scene_poses, message = reconstruct_scene(scene, config, scene_dir)
        status = "reconstructed"
    except UserError as error:  # e.g. nothing could be reconstructed: every image of the scene gets nan
        scene_poses, message, status = {}, str(error), "failed"
        logger.warning("%s/%s: %s", scene.dataset, scene.scene, error)
    seconds = time.monotonic() - start
    listed = set(scene.names)
    poses = {name: pose for name, pose in scene_poses.items() if name in listed}
    record = {
        "stamp": stamp,
        "status": status,
        "message": message,
        "poses": {name: {"R": R.reshape(-1).tolist(), "t": t.reshape(-1).tolist()} for name, (R, t) in poses.items()},
    }
    write_text_atomic(scene_dir / "poses.json", json.dumps(record))
    result = SceneResult(scene.dataset, scene.scene, len(scene.names), len(poses), status, seconds, False, message)
    return poses, result


class _Budget:
    """Skips scenes that would not fit in ``seconds``, at the pace (seconds per pair) of the scenes computed so far."""

    def __init__(self, seconds: float | None, start: float) -> None:
        self.seconds, self.start = seconds, start
        self.done: list[tuple[int, float]] = []  # (pairs, seconds) of scenes computed in this run

    def allows(self, pairs: int) -> bool:
        if self.seconds is None:
            return True
        per_pair = sum(s for _, s in self.done) / max(1, sum(p for p, _ in self.done)) if self.done else 0.0
        return time.monotonic() - self.start + per_pair * pairs <= self.seconds


def _check_run(
    data: Path, output: Path, config: IMC2023Config, split: str, work_dir: Path | None, score: bool
) -> tuple[str, list[SceneImages]]:
    """Everything that can fail before hours of mapping: output places, the split, the labels, the matcher."""
    check_output_file(output, "--output", example="submission.csv")
    if work_dir is not None:
        check_output_dir(work_dir, "--work")
    if score and split == "test":
        raise UserError("--score needs the train split (ground truth is only in train/train_labels.csv)")
    split, scenes = list_scenes_2023(data, "train" if score else split)
    if score:
        read_labels_2023(data / "train" / "train_labels.csv")  # malformed labels fail now
    for name in config.matcher.parts:  # bad weights/device: fail now
        config.matcher.make(name)
    return split, scenes


def main(
    data: Path,
    output: Path,
    config: IMC2023Config = IMC2023Config(),
    split: str = "auto",
    work_dir: Path | None = None,
    time_budget: float | None = None,
    score: bool = False,
    progress: bool = True,
) -> RunResult:
    """Reconstruct every scene of ``data`` and write the submission; optionally score it (train split)."""
    start = time.monotonic()
    data, output = Path(data), Path(output)
    split, scenes = _check_run(data, output, config, split, work_dir, score)
    work = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".work")
    poses: dict[tuple[str, str], dict[str, Pose]] = {}
    results: list[SceneResult] = []
    budget = _Budget(time_budget, start)
    write_submission_2023(output, submission_rows(scenes, poses))  # valid from the start
    for scene in tqdm(scenes, desc="IMC 2023 scenes", unit="scene", disable=not progress):
        key = (scene.dataset, scene.scene)
        scene_dir = work / scene.dataset / scene.scene
        stamp = scene_stamp(scene, config)
        cached = load_cached_poses(scene_dir / "poses.json", stamp)
        pairs = config.num_pairs_estimate(len(scene.names))
        if cached is not None:
            poses[key], result = cached_scene(scene, cached)
        elif not budget.allows(pairs):
            logger.warning("time budget: skipping %s/%s (%d images get nan)", *key, len(scene.names))
            result = SceneResult(*key, len(scene.names), 0, "skipped", 0.0, False, "time budget")
        else:
            poses[key], result = run_scene(scene, config, scene_dir, stamp)
            budget.done.append((pairs, result.seconds))
            write_submission_2023(output, submission_rows(scenes, poses))
        results.append(result)
    write_submission_2023(output, submission_rows(scenes, poses))
    seconds = time.monotonic() - start
    scored = score_submission(output, data / "train" / "train_labels.csv") if score else None
    return RunResult(output, split, results, seconds, scored)


# ------------------------------------------------------------------------------------------ scoring
def score_submission(submission: Path, labels: Path) -> Score2023:
    """IMC 2023 mAA of ``submission`` against ``labels`` (train_labels.csv): per scene, then per dataset."""
    ground_truth = read_labels_2023(labels)
    predictions = read_submission_2023(submission)
    per_scene: dict[tuple[str, str], float] = {}
    for key, gt_poses in ground_truth.items():
        predicted = predictions.get(key, {})
        missing = [image for image in gt_poses if image not in predicted]
        if missing:
            raise UserError(
                f"{submission}: no row for image {missing[0]!r} of scene {key[0]}/{key[1]} "
                f"({len(missing)} missing); every image of {labels} needs a row"
            )
        per_scene[key] = scene_maa_2023(gt_poses, predicted, thresholds_2023(*key))
    per_dataset: dict[str, list[float]] = {}
    for (dataset, _), value in per_scene.items():
        per_dataset.setdefault(dataset, []).append(value)
    return Score2023(
        average_over_datasets(per_scene),
        {dataset: float(np.mean(values)) for dataset, values in per_dataset.items()},
        per_scene,
    )


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import WEIGHTS_HELP

    parser = argparse.ArgumentParser(prog="python -m recipes.imc2023", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="competition folder (sample_submission.csv + test/, or train/)"
    )
    parser.add_argument("--output", type=Path, default=Path("submission.csv"))
    parser.add_argument(
        "--split",
        choices=("auto", "train", "test"),
        default=_parameter_default("split"),
        help="auto: test when sample_submission.csv exists (train with --score)",
    )
    defaults = _parameter_default("config")
    add_config_arguments(parser, MatcherSpec, defaults=defaults.matcher, helps={"weights": WEIGHTS_HELP})
    add_config_arguments(parser, IMC2023Config, defaults=defaults)
    add_config_arguments(parser, DistributedConfig, defaults=defaults.distributed)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; scenes that would not fit get nan")
    parser.add_argument("--work", type=Path, default=None, help="per-scene outputs and cache (default <output>.work)")
    parser.add_argument("--score", action="store_true", help="score against train/train_labels.csv (IMC 2023 mAA)")
    return parser


def _parameter_default(name: str) -> Any:
    """The default of :func:`main`'s parameter ``name`` (the CLI does not restate it)."""
    import inspect

    return inspect.signature(main).parameters[name].default


def main_cli(argv: Sequence[str] | None = None) -> RunResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    matcher = config_from_options(parser, args, MatcherSpec)
    distributed = config_from_options(parser, args, DistributedConfig)
    config = config_from_options(parser, args, IMC2023Config, matcher=matcher, distributed=distributed)
    result = main(
        args.data,
        args.output,
        config,
        split=args.split,
        work_dir=args.work,
        time_budget=args.time_budget,
        score=args.score,
    )
    for scene in result.scenes:
        note = " (cached)" if scene.reused else f" in {scene.seconds:.1f} s"
        print(
            f"  {scene.dataset}/{scene.scene}: {scene.status}, {scene.registered}/{scene.num_images} registered{note}"
        )
    print(
        f"wrote {result.submission} ({sum(s.num_images for s in result.scenes)} images, {result.split} split) in {result.seconds:.1f} s"
    )
    if result.score is not None:
        for (dataset, scene), value in sorted(result.score.per_scene.items()):
            print(f"  {dataset}/{scene}: mAA {value:.4f}")
        print(f"mAA (IMC 2023, mean over {len(result.score.per_dataset)} datasets): {result.score.maa:.4f}")
    return result


if __name__ == "__main__":
    run_cli(main_cli)
