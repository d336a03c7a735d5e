"""The COLMAP database step: cameras (with EXIF focal priors), images, keypoints, matches, verification.

hloc/COLMAP semantics:

* camera mode ``single``: one camera shared by every image (all images must have the same size);
  ``per-image``: one camera each; ``auto``: images share a camera when they have the same size and the
  same EXIF make / model / focal length (images without EXIF but of the same size share one camera).
* focal prior, as COLMAP's image reader computes it: from EXIF ``FocalLengthIn35mmFilm`` as
  ``f35 / 35 * max(W, H)``; else from ``FocalLength`` (mm) and the sensor width derived from
  ``FocalPlaneXResolution``; the camera is then flagged ``has_prior_focal_length``. Without EXIF the focal
  length is ``1.2 * max(W, H)`` and not flagged as a prior (COLMAP's default_focal_length_factor).
* keypoints are stored with COLMAP's origin: hloc's (0, 0) is the centre of the top-left pixel,
  COLMAP's is its top-left corner, so +0.5 on import.
* matches come from hloc's matches.h5; verification is pycolmap's two-view geometry estimation
  (:func:`pycolmap.verify_matches`, LO-RANSAC over E / F / H) run inside the database.

The database is built in a temporary file and renamed into place, so an interrupted run never leaves a
half-written database behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.cache import LRUCache
from core.errors import UserError
from core.geometry import fundamental_magsac
from core.io import find_pair, open_h5, resolve_image

CameraMode = Literal["auto", "single", "per-image"]
CAMERA_MODES: tuple[str, ...] = get_args(CameraMode)
COLMAP_MIN_NUM_INLIERS = 15  # COLMAP's TwoViewGeometryOptions.min_num_inliers
DEFAULT_FOCAL_LENGTH_FACTOR = 1.2  # COLMAP's ImageReaderOptions.default_focal_length_factor

# EXIF tags (main IFD and the Exif sub-IFD)
_EXIF_IFD = 0x8769
_MAKE, _MODEL = 0x010F, 0x0110
_FOCAL_LENGTH, _FOCAL_35MM = 0x920A, 0xA405
_FOCAL_PLANE_X_RES, _FOCAL_PLANE_UNIT = 0xA20E, 0xA210
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
_MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}  # inch, cm, mm, micrometre


@dataclass(frozen=True)
class CameraPrior:
    """What is known about an image's camera before reconstruction."""

    width: int
    height: int
    focal_length: float  # pixels
    prior_focal_length: bool  # True when the focal length came from EXIF
    exif_key: tuple  # (make, model, focal tag) used to group images in 'auto' mode; () without EXIF


@dataclass(frozen=True)
class VerificationConfig:
    """pycolmap two-view geometry options; the defaults are COLMAP's (hloc raises max_num_trials to
    20000 and lowers min_inlier_ratio to 0.1, which costs ~2x the time on pairs that do not overlap)."""

    max_error: float = 4.0  # pixels
    #: verified inliers a pair needs (none: COLMAP's 15; pipeline.reconstruct: 30 for a dense matcher alone)
    min_num_inliers: int | None = None
    min_inlier_ratio: float = 0.25  # bounds the number of RANSAC trials
    max_num_trials: int = 10000
    confidence: float = 0.999
    seed: int | None = 0  # RANSAC random seed (reproducible runs); None = random
    #: first fit a fundamental matrix with OpenCV's MAGSAC++ (same threshold, trials and confidence) and verify only
    #: pairs where it finds enough inliers: pycolmap runs its RANSAC to the trial cap on pairs of few, wrong matches
    precheck: bool = True

    def __post_init__(self) -> None:
        if self.min_num_inliers is not None and self.min_num_inliers < 1:
            raise UserError(f"--min-num-inliers must be >= 1, got {self.min_num_inliers}")

    @property
    def required_inliers(self) -> int:
        """The inliers a pair needs (``min_num_inliers``, COLMAP's minimum when not given)."""
        return self.min_num_inliers if self.min_num_inliers is not None else COLMAP_MIN_NUM_INLIERS

    def to_pycolmap(self):
        import pycolmap

        options = pycolmap.TwoViewGeometryOptions()
        options.min_num_inliers = self.required_inliers
        options.ransac.max_error = self.max_error
        options.ransac.min_inlier_ratio = self.min_inlier_ratio
        options.ransac.max_num_trials = self.max_num_trials
        options.ransac.confidence = self.confidence
        if self.seed is not None:
            options.ransac.random_seed = self.seed
        return options


@dataclass(frozen=True)
class DatabaseStats:
    """What went into the database."""

    num_images: int
    num_cameras: int
    num_keypoints: int
    num_pairs: int  # pairs in the pairs file
    num_matched_pairs: int  # pairs imported (enough raw matches)
    num_matches: int
    num_verified_pairs: int  # pairs with a verified two-view geometry
    num_inlier_matches: int
    num_prechecked_out: int = 0  # imported pairs the MAGSAC++ pre-check left unverified (no geometry)


# ------------------------------------------------------------------------------------------- logging
@contextlib.contextmanager
def colmap_logging(verbose: bool) -> Iterator[None]:
    """Silence COLMAP's logging (it goes straight to stderr, through the progress bars) unless ``verbose``; its
    errors (e.g. "Failed to create any sparse model") are reported by the pipeline's own summary instead."""
    import pycolmap

    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 0 if verbose else 3
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous


# ------------------------------------------------------------------------------------------- cameras
def _rational(value: object) -> float | None:
    try:
        number = float(value)  # PIL's IFDRational and plain numbers
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def exif_focal_length(path: str | Path, size: tuple[int, int]) -> tuple[float | None, tuple]:
    """Focal length in pixels from EXIF (COLMAP's rules) and the (make, model, focal) grouping key.

    ``size`` is the (W, H) of the image as used for matching (EXIF orientation applied); the focal
    length depends only on ``max(W, H)`` so orientation does not matter. Returns (None, key) without
    usable focal information.
    """
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            sub = exif.get_ifd(_EXIF_IFD)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, ()
    make = str(exif.get(_MAKE, "")).strip("\x00 ")
    model = str(exif.get(_MODEL, "")).strip("\x00 ")
    focal_35 = _rational(sub.get(_FOCAL_35MM))
    focal_mm = _rational(sub.get(_FOCAL_LENGTH))
    key = (make, model, focal_35 or focal_mm) if (make or model or focal_35 or focal_mm) else ()
    max_size = float(max(size))
    if focal_35 is not None:
        return focal_35 / 35.0 * max_size, key
    if focal_mm is not None:
        resolution = _rational(sub.get(_FOCAL_PLANE_X_RES))
        unit = _MM_PER_UNIT.get(int(sub.get(_FOCAL_PLANE_UNIT, 2) or 2))
        pixels = [_rational(sub.get(tag)) for tag in (_PIXEL_X, _PIXEL_Y)]
        if resolution is not None and unit is not None:
            # Sensor's long side in mm from the EXIF pixel dimensions (the full-resolution capture), so
            # the focal length stays right for downscaled copies of the photo.
            full = max(p for p in pixels if p is not None) if any(p is not None for p in pixels) else max_size
            sensor_mm = full / resolution * unit
            if sensor_mm > 0:
                return focal_mm / sensor_mm * max_size, key
    return None, key


def camera_prior(path: str | Path, size: tuple[int, int]) -> CameraPrior:
    """The camera prior of one image: EXIF focal length, else COLMAP's 1.2 * max(W, H)."""
    focal, key = exif_focal_length(path, size)
    width, height = int(size[0]), int(size[1])
    if focal is None:
        return CameraPrior(width, height, DEFAULT_FOCAL_LENGTH_FACTOR * max(width, height), False, key)
    return CameraPrior(width, height, float(focal), True, key)


def group_cameras(priors: Mapping[str, CameraPrior], mode: str) -> dict[str, int]:
    """Camera index (0-based) of every image for a camera mode (see the module docstring)."""
    if mode not in CAMERA_MODES:
        raise UserError(f"unknown camera mode {mode!r}; choose one of {', '.join(CAMERA_MODES)}")
    names = list(priors)
    if mode == "per-image":
        return {name: index for index, name in enumerate(names)}
    if mode == "single":
        sizes = {(p.width, p.height) for p in priors.values()}
        if len(sizes) > 1:
            raise UserError(
                f"--camera-mode single needs images of one size, found {len(sizes)} sizes "
                f"({', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:4])}); use --camera-mode auto"
            )
        return {name: 0 for name in names}
    groups: dict[tuple, int] = {}
    assignment: dict[str, int] = {}
    for name in names:
        prior = priors[name]
        key = (prior.width, prior.height, prior.exif_key)
        assignment[name] = groups.setdefault(key, len(groups))
    return assignment


def make_camera(prior: CameraPrior, camera_id: int, model: str):
    """A pycolmap Camera of ``model`` with the prior's focal length and the centre as principal point."""
    import pycolmap

    try:
        camera = pycolmap.Camera.create_from_model_name(camera_id, model, prior.focal_length, prior.width, prior.height)
    except Exception as error:  # pycolmap raises a plain ValueError/RuntimeError for unknown models
        raise UserError(f"unknown COLMAP camera model {model!r} ({error}); use e.g. SIMPLE_RADIAL or OPENCV") from None
    camera.has_prior_focal_length = prior.prior_focal_length
    return camera


# ------------------------------------------------------------------------------------------- features
def read_feature_sizes(features_path: Path, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``image_size`` (W, H) of every image in features.h5 (missing images are an error)."""
    sizes: dict[str, tuple[int, int]] = {}
    with open_h5(features_path) as file:
        for name in names:
            if name not in file or "keypoints" not in file[name]:
                raise UserError(f"{features_path}: no keypoints for image {name!r}; re-run the matching step")
            if "image_size" in file[name]:
                width, height = (int(v) for v in file[name]["image_size"][()])
                sizes[name] = (width, height)
    return sizes


def import_features(db, image_ids: Mapping[str, int], features_path: Path) -> int:
    """Write keypoints (+0.5: COLMAP's pixel origin) of every image; returns the total count."""
    total = 0
    with open_h5(features_path) as file:
        for name, image_id in tqdm(image_ids.items(), desc="import keypoints", leave=False):
            if name not in file or "keypoints" not in file[name]:
                raise UserError(f"{features_path}: no keypoints for image {name!r}; re-run the matching step")
            keypoints = file[name]["keypoints"][()].astype(np.float32).reshape(-1, 2) + 0.5
            db.write_keypoints(image_id, keypoints)
            total += len(keypoints)
    return total


@contextlib.contextmanager
def geometry_precheck(
    features_path: Path, config: VerificationConfig
) -> Iterator[Callable[[str, str, np.ndarray], bool]]:
    """Whether a pair can pass verification: OpenCV's MAGSAC++ fundamental matrix at the verification's threshold
    finds ``required_inliers``. pycolmap's LO-RANSAC estimates E, F and H to its trial cap on pairs of few, wrong
    matches; SIFT temple_ring exhaustive (1,041 imported pairs, 363 verified): verification 294.5 s -> 10.7 s
    (the pre-check, 2.7 s, keeps 374 pairs), the same 363 verified pairs with the same inlier counts."""
    with open_h5(features_path) as file:
        keypoints: LRUCache[np.ndarray] = LRUCache(max_items=256)

        def read(name: str) -> np.ndarray:
            return keypoints.get_or_create(name, lambda: file[name]["keypoints"][()].reshape(-1, 2))

        def plausible(name0: str, name1: str, indices: np.ndarray) -> bool:
            points0, points1 = read(name0)[indices[:, 0]], read(name1)[indices[:, 1]]
            _, inliers = fundamental_magsac(
                points0, points1, config.max_error, config.confidence, config.max_num_trials
            )
            return int(inliers.sum()) >= config.required_inliers

        yield plausible


def import_matches(
    db,
    image_ids: Mapping[str, int],
    pairs: Sequence[tuple[str, str]],
    matches_path: Path,
    min_match_score: float | None = None,
    min_num_matches: int = COLMAP_MIN_NUM_INLIERS,
    plausible: Callable[[str, str, np.ndarray], bool] | None = None,
) -> tuple[list[tuple[str, str]], int, list[tuple[str, str]]]:
    """Write raw matches of each pair once; pairs with fewer than ``min_num_matches`` are left out
    (they could never pass verification). Returns (imported pairs, total matches, the imported pairs worth
    verifying: all, or those ``plausible(name0, name1, (N, 2) keypoint indices)`` accepts)."""
    done: set[tuple[int, int]] = set()
    imported: list[tuple[str, str]] = []
    worth_verifying: list[tuple[str, str]] = []
    num_matches = 0
    with open_h5(matches_path) as file:
        for name0, name1 in tqdm(pairs, desc="import matches", leave=False):
            id0, id1 = image_ids[name0], image_ids[name1]
            if id0 == id1 or (min(id0, id1), max(id0, id1)) in done:
                continue
            done.add((min(id0, id1), max(id0, id1)))
            try:
                key, reverse = find_pair(file, name0, name1)
            except KeyError:
                raise UserError(
                    f"{matches_path}: no matches for pair ({name0}, {name1}); re-run the matching step"
                ) from None
            matches0 = file[key]["matches0"][()].astype(np.int64)
            scores0 = file[key]["matching_scores0"][()] if "matching_scores0" in file[key] else np.ones(len(matches0))
            valid = matches0 > -1
            if min_match_score is not None:
                valid &= scores0 > min_match_score
            indices = np.stack([np.nonzero(valid)[0], matches0[valid]], axis=1)
            if reverse:
                indices = indices[:, ::-1]
            if len(indices) < min_num_matches:
                continue
            db.write_matches(image_ids[name0], image_ids[name1], np.ascontiguousarray(indices, dtype=np.uint32))
            imported.append((name0, name1))
            num_matches += len(indices)
            if plausible is None or plausible(name0, name1, indices):
                worth_verifying.append((name0, name1))
    return imported, num_matches, worth_verifying


# ------------------------------------------------------------------------------------------- database
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


def remove_database(path: Path, side_files_only: bool = False) -> None:
    """Delete an SQLite database and its journal / write-ahead-log files (a stale WAL left by a crash
    would otherwise be replayed into a new database of the same name)."""
    for suffix in SQLITE_SIDE_FILES + (() if side_files_only else ("",)):
        candidate = path.with_name(path.name + suffix)
        if candidate.exists():
            candidate.unlink()


def create_database(
    database_path: Path,
    image_dir: Path,
    names: Sequence[str],
    sizes: Mapping[str, tuple[int, int]],
    camera_mode: str = "auto",
    camera_model: str = "SIMPLE_RADIAL",
) -> tuple[dict[str, int], int]:
    """A new database with cameras and images (no keypoints yet); returns ({name: image_id}, #cameras)."""
    import pycolmap

    priors = {name: camera_prior(resolve_image(image_dir, name), sizes[name]) for name in names}
    groups = group_cameras(priors, camera_mode)
    remove_database(database_path)
    image_ids: dict[str, int] = {}
    with pycolmap.Database.open(str(database_path)) as db:
        camera_ids: dict[int, int] = {}
        for name in names:
            group = groups[name]
            if group not in camera_ids:
                camera_ids[group] = db.write_camera(make_camera(priors[name], len(camera_ids) + 1, camera_model))
            image_ids[name] = db.write_image(pycolmap.Image(name=name, camera_id=camera_ids[group]))
    return image_ids, len(camera_ids)


def verify(
    database_path: Path,
    pairs: Sequence[tuple[str, str]],
    config: VerificationConfig,
    verbose: bool = False,
    chunk_size: int = 50,
) -> tuple[int, int]:
    """pycolmap geometric verification of ``pairs`` (their matches must be in the database), in chunks
    so that progress can be shown; returns (verified pairs, inlier matches)."""
    import pycolmap

    options = config.to_pycolmap()
    pairs_file = database_path.with_name(f".{database_path.name}.pairs.txt")
    try:
        bar = tqdm(total=len(pairs), desc="geometric verification", unit="pair", leave=False)
        with colmap_logging(verbose), bar:
            for start in range(0, len(pairs), chunk_size):
                chunk = pairs[start : start + chunk_size]
                pairs_file.write_text("".join(f"{a} {b}\n" for a, b in chunk))
                pycolmap.verify_matches(str(database_path), str(pairs_file), options=options)
                bar.update(len(chunk))
    finally:
        if pairs_file.exists():
            pairs_file.unlink()
    with pycolmap.Database.open(str(database_path)) as db:
        _, inliers = db.read_two_view_geometry_num_inliers()
    inliers = [n for n in inliers if n >= config.required_inliers]
    return len(inliers), int(sum(inliers))


def build_database(
    database_path: Path,
    image_dir: Path,
    names: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    features_path: Path,
    matches_path: Path,
    camera_mode: str = "auto",
    camera_model: str = "SIMPLE_RADIAL",
    verification: VerificationConfig | None = None,
    min_match_score: float | None = None,
    verbose: bool = False,
) -> tuple[dict[str, int], DatabaseStats]:
    """Cameras, images, keypoints, matches and verified geometries in a new database, atomically.

    With ``verification=None`` the default :class:`VerificationConfig` is used.
    """
    import pycolmap

    verification = verification if verification is not None else VerificationConfig()
    database_path = Path(database_path)
    database_path.parent.mkdir(parents=True, exist_ok=True)
    temp = database_path.with_name(f".{database_path.name}.tmp")
    remove_database(temp)
    try:
        sizes = read_feature_sizes(features_path, names)
        for name in names:
            if name not in sizes:  # older files without image_size: read it from the image header
                from core.image_io import image_size

                sizes[name] = image_size(resolve_image(image_dir, name))
        image_ids, num_cameras = create_database(temp, image_dir, names, sizes, camera_mode, camera_model)
        with pycolmap.Database.open(str(temp)) as db, contextlib.ExitStack() as stack:
            num_keypoints = import_features(db, image_ids, features_path)
            precheck = verification.precheck
            plausible = stack.enter_context(geometry_precheck(features_path, verification)) if precheck else None
            imported, num_matches, to_verify = import_matches(
                db, image_ids, pairs, matches_path, min_match_score, verification.required_inliers, plausible
            )
        num_verified, num_inliers = verify(temp, to_verify, verification, verbose) if to_verify else (0, 0)
        remove_database(database_path, side_files_only=True)
        os.replace(temp, database_path)
    except (OSError, RuntimeError) as error:
        problem = full_disk_error(error, database_path)
        if problem is None:
            raise
        raise problem from error
    finally:
        remove_database(temp)
    stats = DatabaseStats(
        num_images=len(image_ids),
        num_cameras=num_cameras,
        num_keypoints=num_keypoints,
        num_pairs=len(pairs),
        num_matched_pairs=len(imported),
        num_matches=num_matches,
        num_verified_pairs=num_verified,
        num_inlier_matches=num_inliers,
        num_prechecked_out=len(imported) - len(to_verify),
    )
    return image_ids, stats


def full_disk_error(error: Exception, path: Path) -> OSError | None:
    """A full disk as SQLite reports it through pycolmap (``RuntimeError: ... database or disk is full``, or
    ``No registered database factory succeeded`` when not even the journal fits) or as a ``write()`` that names
    no file: an OSError naming ``path``, which run_cli prints as one line; None for any other error."""
    code = error.errno if isinstance(error, OSError) and error.filename is None else None
    if code not in (errno.ENOSPC, errno.EDQUOT):
        code = None
        if isinstance(error, RuntimeError):
            try:
                stat = os.statvfs(path.parent)
                low = stat.f_bavail * stat.f_frsize < (1 << 20)
            except OSError:
                low = False
            if "disk is full" in str(error) or ("database" in str(error).lower() and low):
                code = errno.ENOSPC
    return None if code is None else OSError(code, os.strerror(code), str(path))


def pair_counts(database_path: Path) -> dict[str, dict[str, int]]:
    """Per image name: pairs with imported matches (``matched``) and pairs with a verified geometry
    (``verified``), read from the database (sqlite, as COLMAP's own tools do)."""
    import sqlite3

    import pycolmap

    connection = sqlite3.connect(f"file:{database_path}?mode=ro", uri=True)
    try:
        names = dict(connection.execute("SELECT image_id, name FROM images"))
        counts = {name: {"matched": 0, "verified": 0} for name in names.values()}
        for table, column, key in (("matches", "rows", "matched"), ("two_view_geometries", "rows", "verified")):
            for pair_id, rows in connection.execute(f"SELECT pair_id, {column} FROM {table}"):
                if not rows:
                    continue
                for image_id in pycolmap.pair_id_to_image_pair(pair_id):
                    if image_id in names:
                        counts[names[image_id]][key] += 1
    finally:
        connection.close()
    return counts
