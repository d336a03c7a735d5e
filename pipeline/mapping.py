"""Incremental mapping with robust self-calibration, then geometry refinement (pycolmap).

**Self-calibration in stages.** COLMAP refines every camera's focal length and distortion from the first
bundle adjustment on. With dense keypoints on a telephoto ring (48 views, focal 5x the width) that drove
the shared SIMPLE_RADIAL camera's distortion to k = -4.2; COLMAP then calls the camera bogus and refuses
every further image ("registered 3/48"). The same database mapped with the distortion held registers
48/48. So, by default (``calibration="staged"``):

1. map with focal lengths refined and distortion held at zero (a poorly supported parameter cannot run
   away while few images constrain it);
2. if that leaves images unregistered, map again with COLMAP's own options and keep the model that
   registers more (ties: the staged one), so no scene that COLMAP maps is lost;
3. free the distortion in the geometry refinement only for cameras seen by at least
   ``min_images_for_distortion`` registered images, and keep it only when it stays sane
   (``|k| <= max_distortion``, focal within COLMAP's bounds); otherwise the camera is restored and held.

Every decision (attempt, held parameter and why, final cameras) is reported in :class:`MappingResult`.

**Geometry refinement** (after Detector-Free SfM's iterations): ``refine_iterations`` rounds of:
register left-over images, re-triangulate, complete and merge tracks, global bundle adjustment, filter
observations whose reprojection error exceeds the round's threshold (3 px, then 2 px), bundle adjustment
again. The mean reprojection error is recorded per round.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from tqdm import tqdm

from core.colmap_model import check_model_written
from core.errors import UserError
from pipeline.colmap_db import COLMAP_MIN_NUM_INLIERS, colmap_logging, full_disk_error

logger = logging.getLogger(__name__)

CalibrationMode = Literal["staged", "colmap"]
CALIBRATION_MODES: tuple[str, ...] = get_args(CalibrationMode)


@dataclass(frozen=True)
class MappingConfig:
    """Options of the mapping step (see the module docstring)."""

    #: verified inliers a pair needs to be used by the mapper; none: the two-view verification's minimum
    #: (COLMAP's 15; pipeline.reconstruct passes its own)
    min_num_matches: int | None = None
    #: staged: focal first, distortion only once enough images support it; colmap: COLMAP's options
    calibration: CalibrationMode = "staged"
    min_images_for_distortion: int = 10  # registered images a camera needs before its distortion is refined
    max_distortion: float = 0.5  # |radial coefficient| a refined distortion may reach (COLMAP's bogus bound is 1)
    refine_iterations: int = (
        2  # geometry refinement rounds after mapping (bundle adjustment, filtering, re-triangulation)
    )
    filter_errors: tuple[float, ...] = (3.0, 2.0)  # px, observation filter of each round (the last repeats)
    num_threads: int = -1  # mapper threads; -1 = all cores
    seed: int | None = 0  # COLMAP's random seed (reproducible runs); none = random
    verbose: bool = False  # show COLMAP's log

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_MODES:
            raise UserError(f"unknown calibration {self.calibration!r}; choose one of {', '.join(CALIBRATION_MODES)}")
        if self.refine_iterations < 0:
            raise UserError(f"--refine-iterations must be >= 0, got {self.refine_iterations}")
        if not self.filter_errors or min(self.filter_errors) <= 0:
            raise UserError(f"the observation filter thresholds must be positive, got {self.filter_errors}")
        if self.min_num_matches is not None and self.min_num_matches < 1:
            raise UserError(f"min_num_matches must be >= 1, got {self.min_num_matches}")

    @property
    def required_matches(self) -> int:
        """The inliers a pair needs (``min_num_matches``, COLMAP's minimum when not given)."""
        return self.min_num_matches if self.min_num_matches is not None else COLMAP_MIN_NUM_INLIERS


@dataclass
class MappingResult:
    """The models the mapper made, the chosen (largest) one, and what was decided on the way."""

    models: dict[int, Any]
    reconstruction: Any | None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # per mapping attempt: options and outcome
    calibration: list[str] = field(default_factory=list)  # held / freed parameters and why, in words
    refinement: list[dict[str, Any]] = field(default_factory=list)  # per refinement round

    def cameras(self) -> list[dict[str, Any]]:
        """The final cameras (model, size, parameters, images) for summaries."""
        if self.reconstruction is None:
            return []
        counts = images_per_camera(self.reconstruction)
        return [
            {
                "camera_id": int(camera_id),
                "model": camera.model.name,
                "width": int(camera.width),
                "height": int(camera.height),
                "params": [round(float(v), 6) for v in camera.params],
                "registered_images": counts.get(camera_id, 0),
            }
            for camera_id, camera in sorted(self.reconstruction.cameras.items())
        ]


def images_per_camera(reconstruction) -> dict[int, int]:
    """Registered images per camera id (cameras without any are absent)."""
    counts: dict[int, int] = {}
    for image_id in reconstruction.reg_image_ids():
        camera_id = reconstruction.images[image_id].camera_id
        counts[camera_id] = counts.get(camera_id, 0) + 1
    return counts


def _pipeline_options(config: MappingConfig, hold_distortion: bool):
    import pycolmap

    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = config.num_threads
    options.min_num_matches = config.required_matches
    options.ba_refine_extra_params = not hold_distortion
    options.mapper.abs_pose_refine_extra_params = not hold_distortion
    if config.seed is not None:
        options.random_seed = config.seed
        options.mapper.random_seed = config.seed
        options.triangulation.random_seed = config.seed
    return options


def _incremental(
    database: Path, image_dir: Path, models_dir: Path, options, num_images: int, verbose: bool
) -> dict[int, Any]:
    import pycolmap

    if models_dir.exists():
        shutil.rmtree(models_dir)
    models_dir.mkdir(parents=True)
    progress = tqdm(total=num_images, desc="mapping (registered images)", leave=False)

    def initial_pair() -> None:
        progress.update(min(2, progress.total - progress.n))

    def next_image() -> None:
        progress.update(min(1, progress.total - progress.n))

    try:
        with colmap_logging(verbose):
            models = pycolmap.incremental_mapping(
                str(database),
                str(image_dir),
                str(models_dir),
                options,
                initial_image_pair_callback=initial_pair,
                next_image_callback=next_image,
            )
    except RuntimeError as error:  # the mapper writes into the database: a full disk is one line, not a traceback
        problem = full_disk_error(error, database)
        if problem is None:
            raise
        raise problem from error
    finally:
        progress.close()
    models = dict(models)
    try:
        for index, model in models.items():
            if (models_dir / str(index)).is_dir():
                check_model_written(model, models_dir / str(index), models_dir / str(index))
    except UserError:
        shutil.rmtree(models_dir, ignore_errors=True)  # no cut-short model is left behind
        raise
    return models


def _largest(models: dict[int, Any]) -> Any | None:
    if not models:
        return None
    return max(models.values(), key=lambda m: (m.num_reg_images(), m.num_points3D()))


def _registered(models: dict[int, Any]) -> int:
    best = _largest(models)
    return 0 if best is None else best.num_reg_images()


def camera_problem(camera, max_distortion: float) -> str | None:
    """Why a camera's parameters are not plausible (COLMAP's bogus test, tighter on distortion), or None."""
    size = max(camera.width, camera.height)
    for index in camera.focal_length_idxs():
        ratio = camera.params[index] / size
        if not 0.1 <= ratio <= 10.0:
            return f"focal length {camera.params[index]:.0f} px is {ratio:.2f}x the image size"
    for index in camera.extra_params_idxs():
        if abs(camera.params[index]) > max_distortion:
            return f"distortion {camera.params[index]:+.3f} exceeds +-{max_distortion}"
    return None


def run_mapping(
    database: Path, image_dir: Path, models_dir: Path, config: MappingConfig, num_images: int
) -> MappingResult:
    """Incremental mapping with staged self-calibration, then geometry refinement of the largest model."""
    staged = config.calibration == "staged"
    models = _incremental(
        database, image_dir, models_dir, _pipeline_options(config, staged), num_images, config.verbose
    )
    result = MappingResult(models, _largest(models))
    result.attempts.append(
        {
            "calibration": config.calibration,
            "distortion_held": staged,
            "registered": _registered(models),
            "models": len(models),
        }
    )
    if staged and _registered(models) < num_images and _registered(models) > 0:
        # Some images left out: COLMAP's own options may register them (e.g. a strongly distorted lens).
        other_dir = models_dir.with_name(models_dir.name + ".colmap")
        other = _incremental(
            database, image_dir, other_dir, _pipeline_options(config, False), num_images, config.verbose
        )
        result.attempts.append(
            {"calibration": "colmap", "distortion_held": False, "registered": _registered(other), "models": len(other)}
        )
        if _registered(other) > _registered(models):
            shutil.rmtree(models_dir)
            other_dir.rename(models_dir)
            result.models, result.reconstruction = other, _largest(other)
            result.calibration.append(
                "COLMAP's options registered more images than the staged calibration; their model is used"
            )
        else:
            shutil.rmtree(other_dir, ignore_errors=True)
    elif staged and _registered(models) == 0:
        logger.info("no model with the distortion held; COLMAP's options cannot do better on the same pairs")
    if result.reconstruction is not None:
        if staged and not result.calibration:  # the staged model was kept
            result.calibration.append("distortion held at zero during incremental mapping (focal lengths refined)")
        result.refinement = refine_geometry(
            database, result.reconstruction, config, result.calibration, free_distortion=staged
        )
    return result


def refine_geometry(
    database: Path, reconstruction, config: MappingConfig, calibration: list[str], free_distortion: bool = True
) -> list[dict[str, Any]]:
    """Geometry refinement rounds on ``reconstruction`` in place (see the module docstring); returns per round
    the registered images, points and mean reprojection error."""
    import pycolmap

    if config.refine_iterations == 0:
        return []
    rounds: list[dict[str, Any]] = [_state(reconstruction, "mapping")]
    with colmap_logging(config.verbose):
        cache_options = pycolmap.DatabaseCacheOptions()
        cache_options.min_num_matches = config.required_matches
        cache = pycolmap.DatabaseCache.create(pycolmap.Database.open(str(database)), cache_options)
        options = _pipeline_options(config, hold_distortion=True)
        mapper_options = options.get_mapper()
        tri_options = options.get_triangulation()
        cameras_before = {camera_id: list(camera.params) for camera_id, camera in reconstruction.cameras.items()}
        counts = images_per_camera(reconstruction)
        with_distortion = {camera_id for camera_id in counts if reconstruction.cameras[camera_id].extra_params_idxs()}
        freeable = (
            {camera_id for camera_id in with_distortion if counts[camera_id] >= config.min_images_for_distortion}
            if free_distortion
            else set()
        )
        # pycolmap refines the distortion of all cameras or of none: free it only when every camera qualifies.
        refine_distortion = bool(with_distortion) and with_distortion <= freeable
        mapper = pycolmap.IncrementalMapper(cache)
        mapper.begin_reconstruction(reconstruction)
        for iteration in range(config.refine_iterations):
            max_error = config.filter_errors[min(iteration, len(config.filter_errors) - 1)]
            mapper_options.filter_max_reproj_error = max_error
            _register_left_over(mapper, mapper_options, tri_options, reconstruction)
            mapper.retriangulate(tri_options)
            mapper.complete_and_merge_tracks(tri_options)
            ba_options = options.get_global_bundle_adjustment()
            ba_options.refine_extra_params = refine_distortion
            mapper.adjust_global_bundle(mapper_options, ba_options)
            mapper.observation_manager.filter_all_points3D(max_error, mapper_options.filter_min_tri_angle)
            mapper.adjust_global_bundle(mapper_options, ba_options)
            if refine_distortion and _reset_bad_distortion(reconstruction, config, calibration):
                refine_distortion = False  # held from now on; the next adjustment re-fits without it
                ba_options.refine_extra_params = False
                mapper.adjust_global_bundle(mapper_options, ba_options)
            rounds.append(_state(reconstruction, f"round {iteration + 1} (filter {max_error:g} px)"))
        mapper.end_reconstruction(False)
    _describe_distortion(
        reconstruction, sorted(with_distortion), refine_distortion, free_distortion, cameras_before, config, calibration
    )
    return rounds


def _reset_bad_distortion(reconstruction, config: MappingConfig, calibration: list[str]) -> bool:
    """Zero the distortion of cameras whose refined parameters are implausible; True if any was reset."""
    import numpy as np

    reset = False
    for camera_id, camera in reconstruction.cameras.items():
        problem = camera_problem(camera, config.max_distortion)
        if problem is not None and camera.extra_params_idxs():
            params = np.array(camera.params)
            params[list(camera.extra_params_idxs())] = 0.0
            camera.params = params
            calibration.append(f"camera {camera_id}: refined {problem}; distortion held at zero instead")
            reset = True
    return reset


def _describe_distortion(
    reconstruction,
    camera_ids: list[int],
    refined: bool,
    staged: bool,
    before: dict[int, list[float]],
    config: MappingConfig,
    calibration: list[str],
) -> None:
    for camera_id in camera_ids:
        camera = reconstruction.cameras[camera_id]
        extras = ", ".join(f"{camera.params[i]:+.4f}" for i in camera.extra_params_idxs())
        if refined:
            calibration.append(f"camera {camera_id}: distortion refined in the geometry refinement ({extras})")
        elif not staged:
            calibration.append(f"camera {camera_id}: distortion as COLMAP's mapping refined it ({extras})")
        elif all(camera.params[i] == before[camera_id][i] for i in camera.extra_params_idxs()):
            calibration.append(
                f"camera {camera_id}: distortion kept at {extras} (cameras need "
                f"{config.min_images_for_distortion} registered images each to refine it)"
            )


def _register_left_over(mapper, mapper_options, tri_options, reconstruction) -> int:
    registered = 0
    for _ in range(3):
        found = False
        for image_id in mapper.find_next_images(mapper_options, False):
            if reconstruction.images[image_id].has_pose:
                continue
            if mapper.register_next_image(mapper_options, image_id):
                mapper.triangulate_image(tri_options, image_id)
                registered += 1
                found = True
        if not found:
            break
    return registered


def _state(reconstruction, stage: str) -> dict[str, Any]:
    reconstruction.update_point_3d_errors()
    return {
        "stage": stage,
        "registered": int(reconstruction.num_reg_images()),
        "points": int(reconstruction.num_points3D()),
        "mean_reprojection_error": round(float(reconstruction.compute_mean_reprojection_error()), 4),
        "mean_track_length": round(float(reconstruction.compute_mean_track_length()), 3),
    }


__all__ = ["CALIBRATION_MODES", "MappingConfig", "MappingResult", "camera_problem", "run_mapping", "refine_geometry"]
