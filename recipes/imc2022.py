"""Image Matching Challenge 2022: a fundamental matrix per test pair -> Kaggle ``submission.csv``.

    python -m recipes.imc2022 --data DIR --output submission.csv [--matcher loftr|sift] \\
        [--weights outdoor] [--resize 840 1280] [--rotation none|best|union] [--both-directions] \\
        [--ransac-threshold 0.2 --ransac-confidence 0.99999 --ransac-max-iters 50000] \\
        [--time-budget SECONDS] [--cache DIR] [--score [--gt DIR/train]]

For every row of ``DIR/test.csv`` (``sample_id,batch_id,image_1_id,image_2_id``) the two images
``DIR/test_images/<batch_id>/<image_id>.png`` are matched (several ``--resize`` values are matched and
merged — multi-resolution LoFTR at 840/1280 beat flip TTA in the competition; ``--rotation`` adds the
quarter-turn trick of :mod:`pipeline.tta`), and F is estimated with OpenCV's MAGSAC++ using the winning
setting ``cv2.findFundamentalMat(k0, k1, cv2.USAC_MAGSAC, 0.2, 0.99999, 50000)`` (all exposed in
:class:`FundamentalOptions`). F satisfies ``x2^T F x1 = 0`` (image 1 -> image 2), written row-major,
space-separated; a pair with fewer than 8 matches, or whose estimation fails, gets zeros.

Kaggle realities: a tqdm bar; every finished pair is appended to a cache (``<output>.cache/<config
digest>/results.jsonl``) so a killed run resumes; ``--time-budget`` stops before a pair that would not
fit and still writes a complete, valid CSV (pairs not reached get zeros; the CSV is also rewritten every
minute, so a killed notebook leaves a valid file); missing columns, rows or
images are one-line errors naming the file.

``--score`` evaluates the written submission against training-layout ground truth (``calibration.csv``
per scene, ``scaling_factors.csv``; folder ``DIR/train`` unless ``--gt``), looking each pair up by its
``batch_id`` (the scene) and image ids, with the 2022 mAA of :mod:`datasets.imc_metrics`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np
from tqdm import tqdm

from core.cache import LRUCache
from core.cli import add_config_arguments, config_from_args
from core.errors import UserError, run_cli
from core.files import check_output_dir, check_output_file
from core.image_io import read_gray
from core.stamps import digest
from datasets.imc import (
    PairRow,
    image_path_2022,
    read_calibration_2022,
    read_scaling_factors,
    read_submission_2022,
    read_test_2022,
    write_submission_2022,
)
from datasets.imc_metrics import IMC2022_THRESHOLDS, fundamental_pose_errors, mean_average_accuracy, relative_pose
from matchers.base import Matcher, Matches
from matchers.factory import MatcherName
from pipeline.tta import (
    ROTATION_MODES,
    PreparedView,
    TTAConfig,
    View,
    first_views,
    match_pair,
    prepare_view,
    second_views,
    split_resize,
)

logger = logging.getLogger(__name__)

# "auto" needs orientation votes over a collection (pipeline.orientation); 2022 pairs are scored one by one.
PAIR_ROTATION_MODES = tuple(mode for mode in ROTATION_MODES if mode != "auto")

#: robust estimators accepted by ``FundamentalOptions.method`` (OpenCV flags)
FundamentalMethod = Literal["magsac", "usac_accurate", "usac_default", "ransac", "lmeds"]
FUNDAMENTAL_METHODS = dict(
    zip(
        get_args(FundamentalMethod),
        (cv2.USAC_MAGSAC, cv2.USAC_ACCURATE, cv2.USAC_DEFAULT, cv2.FM_RANSAC, cv2.FM_LMEDS),
        strict=True,
    )
)


@dataclass(frozen=True)
class FundamentalOptions:
    """``cv2.findFundamentalMat`` settings; defaults are the IMC 2022 winners' MAGSAC++ call."""

    method: FundamentalMethod = "magsac"  # robust estimator
    threshold: float = 0.2  # px, inlier threshold
    confidence: float = 0.99999  # of the robust estimator
    max_iters: int = 50000  # iterations of the robust estimator at most
    min_matches: int = 8  # fewer matches -> zeros (the 8-point minimum)

    def __post_init__(self) -> None:
        if self.method not in FUNDAMENTAL_METHODS:
            raise UserError(
                f"unknown fundamental-matrix method {self.method!r}; choose one of {', '.join(FUNDAMENTAL_METHODS)}"
            )
        if self.threshold <= 0 or not 0 < self.confidence < 1 or self.max_iters < 1:
            raise UserError("RANSAC threshold must be > 0, confidence in (0, 1) and max iterations >= 1")
        if self.min_matches < 8:
            raise UserError(f"min_matches must be >= 8 (F needs 8 points), got {self.min_matches}")


@dataclass(frozen=True)
class IMC2022Config:
    """What the recipe runs: the matcher, its test-time augmentation, and the F estimation."""

    matcher: MatcherName = "loftr"
    weights: str | None = None  # LoFTR checkpoint name or path; None: outdoor (offline loftr-compact), or SIFT
    #: longest side(s) for matching; several are matched and merged (e.g. 840 1280); 0 = original;
    #: none given: the matcher's default size
    resize: tuple[int, ...] = ()
    rotation: str = "none"  # none | best | union (image 2 also matched at 90/180/270 degrees)
    both_directions: bool = False  # also match image 2 -> image 1 and merge
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    fundamental: FundamentalOptions = field(default_factory=FundamentalOptions)
    image_cache: int = 8  # prepared images kept in memory (pairs of a batch share images)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", tuple(int(s) for s in self.resize))
        if any(size < 0 for size in self.resize) or len(set(self.resize)) != len(self.resize):
            raise UserError(f"resize sizes must be distinct and >= 0 (0 = original size), got {self.resize}")
        if self.rotation not in PAIR_ROTATION_MODES:
            raise UserError(f"rotation must be one of {', '.join(PAIR_ROTATION_MODES)}, got {self.rotation!r}")

    def matcher_resize(self) -> int | None:
        """The size the matcher itself resizes to: one size -> the matcher's own way; several -> as given."""
        return split_resize(self.resize)[0]

    def tta_config(self) -> TTAConfig:
        views = split_resize(self.resize)[1]
        return TTAConfig(rotation=self.rotation, resize=views, both_directions=self.both_directions)


@dataclass(frozen=True)
class PairResult:
    """F of one pair (zeros on failure) and how it came about."""

    F: np.ndarray  # (3, 3)
    num_matches: int
    num_inliers: int


@dataclass(frozen=True)
class RunResult:
    """What :func:`main` did."""

    submission: Path
    num_pairs: int
    num_matched: int  # matched in this run
    num_reused: int  # taken from the cache
    num_skipped: int  # not reached within the time budget (zeros written)
    num_zero: int  # rows written as zeros (failures and skipped)
    seconds: float
    score: "Score2022 | None" = None


# ------------------------------------------------------------------------------------- estimation
def estimate_fundamental(matches: Matches, options: FundamentalOptions | None = None) -> PairResult:
    """F from matches with ``cv2.findFundamentalMat``; zeros when too few matches or it fails."""
    options = options if options is not None else FundamentalOptions()
    count = len(matches)
    if count < options.min_matches:
        return PairResult(np.zeros((3, 3)), count, 0)
    points0 = np.ascontiguousarray(matches.keypoints0, dtype=np.float64)
    points1 = np.ascontiguousarray(matches.keypoints1, dtype=np.float64)
    try:
        F, mask = cv2.findFundamentalMat(
            points0,
            points1,
            FUNDAMENTAL_METHODS[options.method],
            options.threshold,
            options.confidence,
            options.max_iters,
        )
    except cv2.error as error:  # degenerate configurations (all points equal, collinear...)
        logger.debug("findFundamentalMat failed: %s", error)
        return PairResult(np.zeros((3, 3)), count, 0)
    if F is None or F.shape[0] < 3 or F.shape[1] != 3 or not np.all(np.isfinite(F[:3])):
        return PairResult(np.zeros((3, 3)), count, 0)
    inliers = int(mask.sum()) if mask is not None else 0
    return PairResult(np.asarray(F[:3], dtype=np.float64), count, inliers)


# ------------------------------------------------------------------------------------------- cache
class ResultCache:
    """Append-only JSON-lines store of finished pairs; a torn last line (killed run) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, PairResult] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    F = np.asarray(record["F"], dtype=np.float64).reshape(3, 3)
                    self.results[str(record["sample_id"])] = PairResult(
                        F, int(record["matches"]), int(record["inliers"])
                    )
                except (ValueError, KeyError, TypeError):
                    continue
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, sample_id: str, result: PairResult) -> None:
        record = {
            "sample_id": sample_id,
            "F": result.F.reshape(-1).tolist(),
            "matches": result.num_matches,
            "inliers": result.num_inliers,
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        self.results[sample_id] = result


def config_digest(matcher: Matcher, config: IMC2022Config) -> str:
    """Cache key: everything that changes the F of a pair (matcher, TTA, estimation)."""
    payload = {
        "matcher": matcher.describe(),
        "tta": asdict(config.tta_config()),
        "fundamental": asdict(config.fundamental),
    }
    return digest(payload)


# ------------------------------------------------------------------------------------------ matching
class PreparedImages:
    """Prepared views of recently used images (LRU): pairs of a batch share their images."""

    def __init__(self, matcher: Matcher, tta: TTAConfig, capacity: int) -> None:
        self.matcher, self.tta = matcher, tta
        self.cache: LRUCache[dict[View, PreparedView]] = LRUCache(max_items=max(2, capacity))

    def get(self, path: Path, second: bool) -> dict[View, PreparedView]:
        return self.cache.get_or_create((path, second), lambda: self._prepare(path, second))

    def _prepare(self, path: Path, second: bool) -> dict[View, PreparedView]:
        image = read_gray(path)
        views = second_views(self.tta) if second else first_views(self.tta)
        return {view: prepare_view(self.matcher, image, view) for view in views}


def check_images(data_dir: Path, rows: Sequence[PairRow]) -> dict[tuple[str, str], Path]:
    """Every image of test.csv, resolved; the first missing one is a clear error."""
    paths: dict[tuple[str, str], Path] = {}
    for number, row in enumerate(rows, start=2):
        for column, image_id in (("image_1_id", row.image_1_id), ("image_2_id", row.image_2_id)):
            key = (row.batch_id, image_id)
            if key in paths:
                continue
            path = image_path_2022(data_dir, row.batch_id, image_id)
            if path is None:
                raise UserError(
                    f"{data_dir / 'test.csv'}: row {number}, column {column!r}: image "
                    f"{data_dir / 'test_images' / row.batch_id / (image_id + '.png')} not found"
                )
            paths[key] = path
    return paths


def match_pairs(
    todo: Sequence[PairRow],
    paths: dict[tuple[str, str], Path],
    matcher: Matcher,
    config: IMC2022Config,
    cache: ResultCache,
    save: Callable[[], None],
    deadline: float | None = None,
    progress: bool = True,
) -> tuple[int, int]:
    """Match the ``todo`` pairs in order and add their F to ``cache``, calling ``save()`` every minute (a killed
    notebook still leaves a recent, valid CSV); stop before a pair expected to end after ``deadline``
    (``time.monotonic()``). Returns (matched, not reached)."""
    tta = config.tta_config()
    images = PreparedImages(matcher, tta, config.image_cache)
    pair_seconds: list[float] = []
    last_save = time.monotonic()
    for index, row in enumerate(tqdm(todo, desc="IMC 2022 pairs", unit="pair", disable=not progress)):
        expected = float(np.mean(pair_seconds)) if pair_seconds else 0.0
        if deadline is not None and time.monotonic() + expected > deadline:
            logger.warning("time budget reached: %d pairs not matched get zeros", len(todo) - index)
            return index, len(todo) - index
        pair_start = time.monotonic()
        views0 = images.get(paths[(row.batch_id, row.image_1_id)], second=False)
        views1 = images.get(paths[(row.batch_id, row.image_2_id)], second=True)
        cache.add(
            row.sample_id, estimate_fundamental(match_pair(matcher, views0, views1, tta).matches, config.fundamental)
        )
        pair_seconds.append(time.monotonic() - pair_start)
        if time.monotonic() - last_save > 60.0:
            save()
            last_save = time.monotonic()
    return len(todo), 0


def main(
    data: Path,
    output: Path,
    config: IMC2022Config = IMC2022Config(),
    matcher: Matcher | None = None,
    time_budget: float | None = None,
    cache_dir: Path | None = None,
    score: bool = False,
    gt_dir: Path | None = None,
    progress: bool = True,
) -> RunResult:
    """Write a 2022 submission for ``data`` (the competition folder); optionally score it.

    ``matcher`` overrides the one ``config`` describes (handy in tests and notebooks). ``time_budget``
    (seconds, whole run) stops matching before a pair that would not fit; the CSV is always complete.
    """
    start = time.monotonic()
    data, output = Path(data), Path(output)
    check_output_file(output, "--output", example="submission.csv")  # fail now, not after matching
    if cache_dir is not None:
        check_output_dir(cache_dir, "--cache")
    rows = read_test_2022(data / "test.csv")
    paths = check_images(data, rows)
    if score:  # fail on missing ground truth now, not after matching
        load_ground_truth(gt_dir if gt_dir is not None else data / "train", rows)
    if matcher is None:
        from matchers.factory import make_matcher

        matcher = make_matcher(
            config.matcher,
            weights=config.weights,
            resize=config.matcher_resize(),
            device=config.device,
            sift_backend="opencv",  # the SIFT figures and cached results were made with OpenCV's
        )
    cache_root = Path(cache_dir) if cache_dir is not None else output.with_name(output.name + ".cache")
    cache = ResultCache(cache_root / config_digest(matcher, config) / "results.jsonl")
    reused = sum(row.sample_id in cache.results for row in rows)
    if reused:
        logger.info("reusing %d/%d pairs from %s", reused, len(rows), cache.path)

    # Batches together so that images shared by pairs stay prepared.
    batch_order = {batch: i for i, batch in enumerate(dict.fromkeys(row.batch_id for row in rows))}
    todo = sorted((row for row in rows if row.sample_id not in cache.results), key=lambda r: batch_order[r.batch_id])
    zeros = np.zeros((3, 3))

    def current() -> list[tuple[str, np.ndarray]]:
        return [
            (row.sample_id, cache.results[row.sample_id].F if row.sample_id in cache.results else zeros) for row in rows
        ]

    write_submission_2022(output, current())  # a valid CSV exists from the start
    deadline = None if time_budget is None else start + time_budget
    matched, skipped = match_pairs(
        todo, paths, matcher, config, cache, lambda: write_submission_2022(output, current()), deadline, progress
    )
    fundamentals = current()
    write_submission_2022(output, fundamentals)
    num_zero = sum(not np.any(F) for _, F in fundamentals)
    result = RunResult(output, len(rows), matched, reused, skipped, num_zero, time.monotonic() - start)
    if score:
        result = RunResult(
            **{**result.__dict__, "score": score_submission(output, data / "test.csv", gt_dir or data / "train")}
        )
    return result


# ------------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class Score2022:
    """Local 2022 score: mAA averaged over scenes, per scene, and per-pair errors."""

    maa: float
    per_scene: dict[str, float]
    errors: dict[str, tuple[float, float]]  # sample_id -> (rotation deg, translation m)


def load_ground_truth(gt_dir: Path, rows: Sequence[PairRow]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Calibrations of the scenes (batch ids) of ``rows`` and their scaling factors; clear errors if absent."""
    gt_dir = Path(gt_dir)
    scales = read_scaling_factors(gt_dir / "scaling_factors.csv")
    calibrations: dict[str, dict[str, Any]] = {}
    for row in rows:
        scene = row.batch_id
        if scene not in calibrations:
            if scene not in scales:
                raise UserError(f"{gt_dir / 'scaling_factors.csv'}: no scaling factor for scene {scene!r}")
            calibrations[scene] = read_calibration_2022(gt_dir / scene / "calibration.csv")
        for image_id in (row.image_1_id, row.image_2_id):
            if image_id not in calibrations[scene]:
                raise UserError(
                    f"{gt_dir / scene / 'calibration.csv'}: no row for image_id {image_id!r} (pair {row.sample_id})"
                )
    return calibrations, scales


def score_submission(submission: Path, test_csv: Path, gt_dir: Path) -> Score2022:
    """2022 mAA of ``submission`` on the pairs of ``test_csv`` (GT by batch id = scene)."""
    rows = read_test_2022(test_csv)
    predictions = read_submission_2022(submission)
    calibrations, scales = load_ground_truth(Path(gt_dir), rows)
    errors: dict[str, tuple[float, float]] = {}
    by_scene: dict[str, list[str]] = {}
    for row in rows:
        if row.sample_id not in predictions:
            raise UserError(f"{submission}: no row for sample_id {row.sample_id!r} of {test_csv}")
        gt0 = calibrations[row.batch_id][row.image_1_id]
        gt1 = calibrations[row.batch_id][row.image_2_id]
        d_rotation, d_translation = relative_pose(gt0.R, gt0.T, gt1.R, gt1.T)
        errors[row.sample_id] = fundamental_pose_errors(
            predictions[row.sample_id], gt0.K, gt1.K, d_rotation, d_translation, scales[row.batch_id]
        )
        by_scene.setdefault(row.batch_id, []).append(row.sample_id)
    per_scene = {
        scene: mean_average_accuracy(
            [errors[s][0] for s in ids], [errors[s][1] for s in ids], IMC2022_THRESHOLDS, inclusive=False
        )
        for scene, ids in by_scene.items()
    }
    maa = float(np.mean(list(per_scene.values()))) if per_scene else 0.0
    return Score2022(maa, per_scene, errors)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from matchers.factory import WEIGHTS_HELP

    parser = argparse.ArgumentParser(prog="python -m recipes.imc2022", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="competition folder with test.csv and test_images/")
    parser.add_argument("--output", type=Path, default=Path("submission.csv"))
    add_config_arguments(parser, IMC2022Config, helps={"weights": WEIGHTS_HELP})
    add_config_arguments(
        parser.add_argument_group("fundamental matrix (cv2.findFundamentalMat)"),
        FundamentalOptions,
        prefix="ransac_",
        aliases={"min_matches": "--min-matches"},
    )
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds; stop cleanly and still write a valid CSV"
    )
    parser.add_argument("--cache", type=Path, default=None, help="resume cache folder (default <output>.cache)")
    parser.add_argument("--score", action="store_true", help="score the submission with training-layout ground truth")
    parser.add_argument("--gt", type=Path, default=None, help="ground-truth folder (default DATA/train)")
    return parser


def main_cli(argv: Sequence[str] | None = None) -> RunResult:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fundamental = config_from_args(args, FundamentalOptions, prefix="ransac_")
    config = config_from_args(args, IMC2022Config, fundamental=fundamental)
    result = main(
        args.data,
        args.output,
        config,
        time_budget=args.time_budget,
        cache_dir=args.cache,
        score=args.score,
        gt_dir=args.gt,
    )
    print(
        f"wrote {result.submission}: {result.num_pairs} pairs ({result.num_matched} matched, {result.num_reused} "
        f"reused, {result.num_skipped} not reached) in {result.seconds:.1f} s; {result.num_zero} rows are zeros"
    )
    if result.score is not None:
        for scene, value in sorted(result.score.per_scene.items()):
            print(f"  {scene}: mAA {value:.4f}")
        print(f"mAA (IMC 2022, mean over {len(result.score.per_scene)} scenes): {result.score.maa:.4f}")
    return result


if __name__ == "__main__":
    run_cli(main_cli)
