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
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.errors import UserError, run_cli
from core.io import check_output_dir, check_output_file, write_text_atomic
from datasets.imc import (
    Pose,
    SceneImages,
    list_scenes_2023,
    read_labels_2023,
    read_submission_2023,
    write_submission_2023,
)
from datasets.imc_metrics import average_over_datasets, scene_maa_2023, thresholds_2023
from pipeline.reconstruct import ENSEMBLES, ReconstructConfig, ensemble_parts

logger = logging.getLogger(__name__)

ROTATION_MODES = ("none", "best", "union")


@dataclass(frozen=True)
class IMC2023Config:
    """What the recipe runs per scene."""

    matcher: str = ReconstructConfig.matcher  # the main job's default: the loftr+sift ensemble
    weights: str | None = None  # LoFTR checkpoint name or path; None: outdoor (offline loftr-compact), or SIFT
    resize: tuple[int, ...] | None = None  # longest side(s) for matching; None = matcher default
    rotation: str | None = None  # none | auto | best | union (see pipeline.tta); None = reconstruct's default
    camera_mode: str = "auto"  # auto | single | per-image
    device: str = "auto"
    exhaustive_max: int = 50  # scenes with at most this many images match all pairs
    num_pairs: int = 20  # retrieval top-k for larger scenes
    seed: int = 0  # COLMAP's random seed
    num_threads: int = -1  # mapper threads (-1 = all cores); 1 makes the mapping bit-for-bit reproducible

    def __post_init__(self) -> None:
        if self.resize is not None:
            object.__setattr__(self, "resize", tuple(int(s) for s in self.resize))
        if self.rotation is not None and self.rotation not in ROTATION_MODES:
            raise UserError(f"rotation must be one of {', '.join(ROTATION_MODES)}, got {self.rotation!r}")
        if self.exhaustive_max < 2 or self.num_pairs < 1:
            raise UserError("--exhaustive-max must be >= 2 and --num-pairs >= 1")

    def pair_strategy(self, num_images: int) -> str:
        """'exhaustive' for small scenes; 'retrieval' for large ones."""
        return "exhaustive" if num_images <= self.exhaustive_max else "retrieval"

    def num_pairs_estimate(self, num_images: int) -> int:
        if self.pair_strategy(num_images) == "exhaustive":
            return num_images * (num_images - 1) // 2
        return num_images * self.num_pairs


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
    payload = {"names": list(scene.names), "image_dir": str(scene.image_dir), "config": asdict(config)}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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

    strategy = config.pair_strategy(len(scene.names))
    reconstruct_config = reconstruct.ReconstructConfig(
        matcher=config.matcher,
        weights=config.weights,
        pairs=strategy,
        num_pairs=config.num_pairs if strategy == "retrieval" else None,
        resize=config.resize,
        rotation=config.rotation,
        camera_mode=config.camera_mode,
        device=config.device,
        seed=config.seed,
        num_threads=config.num_threads,
    )
    result = reconstruct.main(scene.image_dir, outputs, config=reconstruct_config)
    poses = poses_from_reconstruction(result.reconstruction)
    return poses, f"{len(poses)}/{len(scene.names)} registered ({strategy} pairs)"


def submission_rows(
    scenes: Sequence[SceneImages], poses: dict[tuple[str, str], dict[str, Pose]]
) -> list[tuple[str, str, str, Pose | None]]:
    rows = []
    for scene in scenes:
        scene_poses = poses.get((scene.dataset, scene.scene), {})
        for image_path, name in zip(scene.image_paths, scene.names):
            rows.append((image_path, scene.dataset, scene.scene, scene_poses.get(name)))
    return rows


def main(
    data: Path,
    output: Path,
    config: IMC2023Config | None = None,
    split: str = "auto",
    work_dir: Path | None = None,
    time_budget: float | None = None,
    score: bool = False,
    progress: bool = True,
) -> RunResult:
    """Reconstruct every scene of ``data`` and write the submission; optionally score it (train split)."""
    start = time.monotonic()
    config = config if config is not None else IMC2023Config()
    data, output = Path(data), Path(output)
    check_output_file(output, "--output", example="submission.csv")  # fail now, not after mapping
    if work_dir is not None:
        check_output_dir(work_dir, "--work")
    if score:
        if split == "test":
            raise UserError("--score needs the train split (ground truth is only in train/train_labels.csv)")
        split = "train"
    split, scenes = list_scenes_2023(data, split)
    labels_path = data / "train" / "train_labels.csv"
    if score:
        read_labels_2023(labels_path)  # fail on malformed labels now, not after hours of mapping
    work = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".work")
    from matchers.factory import make_matcher

    for name in ensemble_parts(config.matcher):  # bad weights/device: fail now
        make_matcher(name, weights=config.weights if name != "sift" else None, device=config.device)

    poses: dict[tuple[str, str], dict[str, Pose]] = {}
    results: list[SceneResult] = []
    rate: list[tuple[int, float]] = []  # (pairs, seconds) of scenes computed in this run
    write_submission_2023(output, submission_rows(scenes, poses))  # valid from the start
    for scene in tqdm(scenes, desc="IMC 2023 scenes", unit="scene", disable=not progress):
        key = (scene.dataset, scene.scene)
        scene_dir = work / scene.dataset / scene.scene
        stamp = scene_stamp(scene, config)
        cached = load_cached_poses(scene_dir / "poses.json", stamp)
        if cached is not None:
            poses[key] = {
                name: (np.asarray(p["R"]).reshape(3, 3), np.asarray(p["t"]).reshape(3))
                for name, p in cached["poses"].items()
            }
            results.append(
                SceneResult(
                    *key, len(scene.names), len(poses[key]), cached["status"], 0.0, True, cached.get("message", "")
                )
            )
            continue
        elapsed = time.monotonic() - start
        if time_budget is not None:
            pairs = config.num_pairs_estimate(len(scene.names))
            per_pair = sum(s for _, s in rate) / max(1, sum(p for p, _ in rate)) if rate else 0.0
            if elapsed + per_pair * pairs > time_budget:
                logger.warning("time budget: skipping %s/%s (%d images get nan)", *key, len(scene.names))
                results.append(SceneResult(*key, len(scene.names), 0, "skipped", 0.0, False, "time budget"))
                continue
        scene_start = time.monotonic()
        try:
            scene_poses, message = reconstruct_scene(scene, config, scene_dir)
            status = "reconstructed"
        except UserError as error:  # e.g. nothing could be reconstructed: every image of the scene gets nan
            scene_poses, message, status = {}, str(error), "failed"
            logger.warning("%s/%s: %s", *key, error)
        seconds = time.monotonic() - scene_start
        rate.append((config.num_pairs_estimate(len(scene.names)), seconds))
        listed = set(scene.names)
        poses[key] = {name: pose for name, pose in scene_poses.items() if name in listed}
        record = {
            "stamp": stamp,
            "status": status,
            "message": message,
            "poses": {
                name: {"R": R.reshape(-1).tolist(), "t": t.reshape(-1).tolist()} for name, (R, t) in poses[key].items()
            },
        }
        write_text_atomic(scene_dir / "poses.json", json.dumps(record))
        results.append(SceneResult(*key, len(scene.names), len(poses[key]), status, seconds, False, message))
        write_submission_2023(output, submission_rows(scenes, poses))
    write_submission_2023(output, submission_rows(scenes, poses))
    result = RunResult(output, split, results, time.monotonic() - start)
    if score:
        result = RunResult(output, split, results, result.seconds, score_submission(output, labels_path))
    return result


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
    from matchers.factory import DEVICES, MATCHERS, WEIGHTS_HELP

    defaults = IMC2023Config()
    parser = argparse.ArgumentParser(prog="python -m recipes.imc2023", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="competition folder (sample_submission.csv + test/, or train/)"
    )
    parser.add_argument("--output", type=Path, default=Path("submission.csv"))
    parser.add_argument(
        "--split",
        choices=("auto", "train", "test"),
        default="auto",
        help="auto: test when sample_submission.csv exists (train with --score)",
    )
    parser.add_argument("--matcher", choices=MATCHERS + ENSEMBLES, default=defaults.matcher)
    parser.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    parser.add_argument(
        "--resize", type=int, nargs="+", default=None, help="longest side(s) for matching; 0 = original"
    )
    parser.add_argument("--rotation", choices=ROTATION_MODES, default=defaults.rotation)
    parser.add_argument("--camera-mode", choices=("auto", "single", "per-image"), default=defaults.camera_mode)
    parser.add_argument("--device", choices=DEVICES, default=defaults.device)
    parser.add_argument(
        "--exhaustive-max",
        type=int,
        default=defaults.exhaustive_max,
        help="scenes with at most this many images match all pairs; larger ones use retrieval",
    )
    parser.add_argument("--num-pairs", type=int, default=defaults.num_pairs, help="retrieval pairs per image")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=defaults.num_threads,
        help="mapper threads (-1 = all cores; 1 = reproducible: multi-threaded bundle adjustment is not)",
    )
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; scenes that would not fit get nan")
    parser.add_argument("--work", type=Path, default=None, help="per-scene outputs and cache (default <output>.work)")
    parser.add_argument("--score", action="store_true", help="score against train/train_labels.csv (IMC 2023 mAA)")
    return parser


def main_cli(argv: Sequence[str] | None = None) -> RunResult:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = IMC2023Config(
        matcher=args.matcher,
        weights=args.weights,
        resize=tuple(args.resize) if args.resize else None,
        rotation=args.rotation,
        camera_mode=args.camera_mode,
        device=args.device,
        exhaustive_max=args.exhaustive_max,
        num_pairs=args.num_pairs,
        num_threads=args.num_threads,
    )
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
