"""Image Matching Challenge layouts: CSV readers/writers with schema checks, and converters to mini datasets.

IMC 2022 (``--data DIR``)::

    DIR/test.csv                               sample_id,batch_id,image_1_id,image_2_id
    DIR/test_images/<batch_id>/<image_id>.png
    DIR/train/scaling_factors.csv              scene,scaling_factor          (local scoring only)
    DIR/train/<scene>/calibration.csv          image_id,camera_intrinsics,rotation_matrix,translation_vector
    DIR/train/<scene>/pair_covisibility.csv    pair,covisibility,fundamental_matrix
    submission.csv                             sample_id,fundamental_matrix  (9 numbers, ' '-separated, row-major)

IMC 2023 / 2024 (``--data DIR``)::

    DIR/train/<dataset>/<scene>/images/*       DIR/train/train_labels.csv:
                                               dataset,scene,image_path,rotation_matrix,translation_vector
    DIR/test/<dataset>/<scene>/images/*        DIR/sample_submission.csv (lists the test images)
    submission.csv                             image_path,dataset,scene,rotation_matrix,translation_vector
                                               (9 and 3 numbers, ';'-separated, row-major; nan if unregistered)

Poses are world-to-camera (``x_cam = R x_world + T``) as in COLMAP. Every reader raises
:class:`~core.errors.UserError` naming the file, the row and the column when something is missing.

Converters (``python -m datasets.imc ...``) build these layouts from ../shared/data so both recipes run
offline end to end: ``scannet2022`` (ScanNet sample pairs with GT) and ``middlebury2023`` (alias
``temple2023``: the Middlebury temple ring, or a synthetic scene of :mod:`datasets.synthetic`, with their
calibrated cameras; repeat it to add scenes).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core.cli import add_config_arguments, config_from_args
from core.errors import UserError, run_cli
from core.image_io import read_rgb
from core.io import atomic_path, check_relative_name, resolve_image

TEST_2022_COLUMNS = ("sample_id", "batch_id", "image_1_id", "image_2_id")
SUBMISSION_2022_COLUMNS = ("sample_id", "fundamental_matrix")
CALIBRATION_COLUMNS = ("image_id", "camera_intrinsics", "rotation_matrix", "translation_vector")
COVISIBILITY_COLUMNS = ("pair", "covisibility", "fundamental_matrix")
SCALING_COLUMNS = ("scene", "scaling_factor")
LABELS_2023_COLUMNS = ("dataset", "scene", "image_path", "rotation_matrix", "translation_vector")
SUBMISSION_2023_COLUMNS = ("image_path", "dataset", "scene", "rotation_matrix", "translation_vector")
#: extensions tried, in order, for an IMC 2022 image id (the competition ships .png)
IMAGE_EXTENSIONS_2022 = (".png", ".jpg", ".jpeg")

Pose = tuple[np.ndarray, np.ndarray]  # world-to-camera (R (3, 3), T (3,))


# ----------------------------------------------------------------------------------------- CSV basics
def read_table(path: str | Path, columns: Sequence[str], hint: str = "") -> pd.DataFrame:
    """Read a CSV as strings, checking that ``columns`` are present and non-empty (clear errors otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found{'; ' + hint if hint else ''}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a readable CSV ({error}); expected header {','.join(columns)}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; expected header {','.join(columns)}, "
            f"found {','.join(table.columns)}"
        )
    for column in columns:
        values = table[column].str.strip()
        empty = np.flatnonzero(values.to_numpy() == "")
        if len(empty):
            raise UserError(f"{path}: row {int(empty[0]) + 2}, column {column!r} is empty; fill it in")
        table[column] = values
    return table


def parse_numbers(text: str, count: int, separator: str, where: str) -> np.ndarray:
    """``count`` numbers separated by ``separator`` ('nan' allowed); a clear error names ``where``."""
    text = str(text).strip()
    parts = text.split() if separator == " " else [p.strip() for p in text.split(separator)]
    try:
        values = np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise UserError(f"{where}: expected {count} numbers separated by {separator!r}, got {text!r}") from None
    if values.size != count:
        raise UserError(f"{where}: expected {count} numbers separated by {separator!r}, got {values.size} in {text!r}")
    return values


def format_numbers(values: Iterable[float], separator: str) -> str:
    """Numbers joined by ``separator`` with full precision (``nan`` for non-finite values)."""
    return separator.join("nan" if not math.isfinite(float(v)) else repr(float(v)) for v in values)


def _write_rows(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------ IMC 2022
@dataclass(frozen=True)
class PairRow:
    """One row of IMC 2022's test.csv."""

    sample_id: str
    batch_id: str
    image_1_id: str
    image_2_id: str


@dataclass(frozen=True)
class Calibration:
    """GT of one image in IMC 2022's calibration.csv (K, world-to-camera R and T)."""

    K: np.ndarray
    R: np.ndarray
    T: np.ndarray


def read_test_2022(path: str | Path) -> list[PairRow]:
    """Rows of test.csv; duplicate sample ids or ids that would escape the image folder are errors."""
    table = read_table(path, TEST_2022_COLUMNS, "the IMC 2022 folder must contain test.csv")
    rows = [PairRow(*(str(r[c]) for c in TEST_2022_COLUMNS)) for r in table.to_dict("records")]
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):
        if row.sample_id in seen:
            raise UserError(f"{path}: row {number}, column 'sample_id': duplicate id {row.sample_id!r}")
        seen.add(row.sample_id)
        for column in ("batch_id", "image_1_id", "image_2_id"):
            check_relative_name(getattr(row, column), f"{path}: row {number}, column {column!r}")
    return rows


def image_path_2022(data_dir: str | Path, batch_id: str, image_id: str) -> Path | None:
    """The file of an image id under ``test_images/<batch_id>/`` (.png, else .jpg/.jpeg), or None."""
    root = Path(data_dir) / "test_images"
    for extension in IMAGE_EXTENSIONS_2022:
        path = resolve_image(root, f"{batch_id}/{image_id}{extension}")
        if path.is_file():
            return path
    return None


def write_submission_2022(path: str | Path, fundamentals: Sequence[tuple[str, np.ndarray]]) -> None:
    """Write ``sample_id,fundamental_matrix`` (9 numbers, space-separated, row-major), atomically."""
    rows = []
    for sample_id, F in fundamentals:
        F = np.asarray(F, dtype=np.float64).reshape(9)
        if not np.all(np.isfinite(F)):
            F = np.zeros(9)  # the scorer cannot parse nan in F; zeros are the documented failure value
        rows.append((sample_id, format_numbers(F, " ")))
    _write_rows(path, SUBMISSION_2022_COLUMNS, rows)


def read_submission_2022(path: str | Path) -> dict[str, np.ndarray]:
    """``{sample_id: F (3, 3)}`` from a 2022 submission."""
    table = read_table(path, SUBMISSION_2022_COLUMNS)
    out: dict[str, np.ndarray] = {}
    for number, row in enumerate(table.to_dict("records"), start=2):
        where = f"{path}: row {number}, column 'fundamental_matrix'"
        out[str(row["sample_id"])] = parse_numbers(row["fundamental_matrix"], 9, " ", where).reshape(3, 3)
    return out


def read_calibration_2022(path: str | Path) -> dict[str, Calibration]:
    """``{image_id: Calibration}`` from a scene's calibration.csv."""
    table = read_table(path, CALIBRATION_COLUMNS, "local scoring needs the training layout's calibration.csv")
    out: dict[str, Calibration] = {}
    for number, row in enumerate(table.to_dict("records"), start=2):
        where = f"{path}: row {number}, column"
        out[str(row["image_id"])] = Calibration(
            K=parse_numbers(row["camera_intrinsics"], 9, " ", f"{where} 'camera_intrinsics'").reshape(3, 3),
            R=parse_numbers(row["rotation_matrix"], 9, " ", f"{where} 'rotation_matrix'").reshape(3, 3),
            T=parse_numbers(row["translation_vector"], 3, " ", f"{where} 'translation_vector'"),
        )
    return out


def read_scaling_factors(path: str | Path) -> dict[str, float]:
    """``{scene: metres per scene unit}`` from scaling_factors.csv."""
    table = read_table(path, SCALING_COLUMNS)
    return {
        str(row["scene"]): float(
            parse_numbers(row["scaling_factor"], 1, " ", f"{path}: row {n}, column 'scaling_factor'")[0]
        )
        for n, row in enumerate(table.to_dict("records"), start=2)
    }


# ------------------------------------------------------------------------------------------ IMC 2023
@dataclass(frozen=True)
class SceneImages:
    """The images of one 2023 scene: CSV paths (kept verbatim for the submission) and files."""

    dataset: str
    scene: str
    image_dir: Path  # DIR/<split>/<dataset>/<scene>/images
    image_paths: tuple[str, ...]  # as written in the CSV, e.g. 'haiper/bike/images/image_000.jpeg'
    names: tuple[str, ...]  # paths relative to image_dir (what the pipeline calls image names)


def write_submission_2023(path: str | Path, rows: Sequence[tuple[str, str, str, Pose | None]]) -> None:
    """Write ``image_path,dataset,scene,rotation_matrix,translation_vector``; None poses become nan."""
    out = []
    for image_path, dataset, scene, pose in rows:
        if pose is None:
            rotation, translation = np.full(9, np.nan), np.full(3, np.nan)
        else:
            rotation, translation = np.asarray(pose[0]).reshape(9), np.asarray(pose[1]).reshape(3)
        out.append((image_path, dataset, scene, format_numbers(rotation, ";"), format_numbers(translation, ";")))
    _write_rows(path, SUBMISSION_2023_COLUMNS, out)


def _read_poses(path: Path, columns: Sequence[str], hint: str) -> dict[tuple[str, str], dict[str, Pose]]:
    table = read_table(path, columns, hint)
    out: dict[tuple[str, str], dict[str, Pose]] = {}
    for number, row in enumerate(table.to_dict("records"), start=2):
        where = f"{path}: row {number}, column"
        rotation = parse_numbers(row["rotation_matrix"], 9, ";", f"{where} 'rotation_matrix'").reshape(3, 3)
        translation = parse_numbers(row["translation_vector"], 3, ";", f"{where} 'translation_vector'")
        scene = out.setdefault((str(row["dataset"]), str(row["scene"])), {})
        if row["image_path"] in scene:
            raise UserError(f"{where} 'image_path': duplicate image {row['image_path']!r}")
        scene[str(row["image_path"])] = (rotation, translation)
    return out


def read_labels_2023(path: str | Path) -> dict[tuple[str, str], dict[str, Pose]]:
    """GT ``{(dataset, scene): {image_path: (R, T)}}`` from train_labels.csv (file order kept)."""
    return _read_poses(Path(path), LABELS_2023_COLUMNS, "local scoring needs train/train_labels.csv")


def read_submission_2023(path: str | Path) -> dict[tuple[str, str], dict[str, Pose]]:
    """``{(dataset, scene): {image_path: (R, T)}}`` from a 2023/2024 submission (nan for unregistered)."""
    return _read_poses(Path(path), SUBMISSION_2023_COLUMNS, "")


def list_scenes_2023(data_dir: str | Path, split: str = "auto") -> tuple[str, list[SceneImages]]:
    """The scenes to reconstruct and the split used.

    ``split``: 'test' reads DIR/sample_submission.csv (images under DIR/test, or DIR when the CSV's paths
    already start there); 'train' reads DIR/train/train_labels.csv (images under DIR/train); 'auto' picks
    'test' when sample_submission.csv exists, else 'train'. Every listed image must exist.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder; pass the competition folder with --data")
    if split == "auto":
        split = "test" if (data_dir / "sample_submission.csv").is_file() else "train"
    if split == "test":
        csv_path = data_dir / "sample_submission.csv"
        table = read_table(
            csv_path, ("image_path", "dataset", "scene"), "a test run needs the competition's sample_submission.csv"
        )
        roots = [data_dir / "test", data_dir]
    elif split == "train":
        csv_path = data_dir / "train" / "train_labels.csv"
        table = read_table(csv_path, ("dataset", "scene", "image_path"), "a train run needs train/train_labels.csv")
        roots = [data_dir / "train", data_dir]
    else:
        raise UserError(f"unknown split {split!r}; choose auto, train or test")
    grouped: dict[tuple[str, str], list[tuple[str, Path]]] = {}
    for number, row in enumerate(table.to_dict("records"), start=2):
        image_path = str(row["image_path"])
        where = f"{csv_path}: row {number}, column 'image_path'"
        check_relative_name(image_path, where)
        for column in ("dataset", "scene"):  # they name output folders: keep them plain
            value = str(row[column])
            if "/" in value or "\\" in value or value in (".", ".."):
                raise UserError(f"{csv_path}: row {number}, column {column!r}: {value!r} is not a plain name")
        found = next(
            (resolve_image(root, image_path) for root in roots if resolve_image(root, image_path).is_file()), None
        )
        if found is None:
            raise UserError(f"{where}: image {image_path!r} not found under {roots[0]} or {roots[1]}")
        grouped.setdefault((str(row["dataset"]), str(row["scene"])), []).append((image_path, found))
    scenes = []
    for (dataset, scene), items in grouped.items():
        image_dir = _common_parent([p for _, p in items])
        scenes.append(
            SceneImages(
                dataset=dataset,
                scene=scene,
                image_dir=image_dir,
                image_paths=tuple(p for p, _ in items),
                names=tuple(f.relative_to(image_dir).as_posix() for _, f in items),
            )
        )
    return split, scenes


def _common_parent(paths: Sequence[Path]) -> Path:
    """The deepest folder containing every path (a scene's image root)."""
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


# ------------------------------------------------------------------------------------------ converters
def _save_image(source: Path, target: Path, max_size: int | None) -> tuple[float, float]:
    """Copy an image as PNG, downscaled so its longer side is <= max_size; returns (sx, sy) new/old."""
    rgb = read_rgb(source)
    height, width = rgb.shape[:2]
    sx = sy = 1.0
    if max_size is not None and max(height, width) > max_size:
        factor = max_size / max(height, width)
        new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
        sx, sy = new_w / width, new_h / height
    bgr = cv2.cvtColor(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise UserError(f"{source}: could not be encoded as PNG")
    with atomic_path(target) as temp:
        temp.write_bytes(encoded.tobytes())
    return sx, sy


def _scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K of an image resized by (sx, sy), keeping pixel centres aligned (x' = (x + 0.5) s - 0.5)."""
    K = np.asarray(K, dtype=np.float64).copy()
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 1] *= sx
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


def read_scannet_pairs(path: str | Path) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(name0, name1, K0, K1, T_0to1 (4, 4))`` per line of a SuperGlue/LoFTR ``pairs_with_gt.txt``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; expected the ScanNet sample's pairs_with_gt.txt")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 38:
            raise UserError(
                f"{path}:{number}: expected 'name0 name1 rot0 rot1 K0(9) K1(9) T_0to1(16)' (38 fields), got {len(parts)}"
            )
        try:
            numbers = np.array([float(v) for v in parts[4:]])
        except ValueError:
            raise UserError(f"{path}:{number}: non-numeric calibration values") from None
        if int(parts[2]) != 0 or int(parts[3]) != 0:
            raise UserError(f"{path}:{number}: EXIF rotations are not supported by this converter")
        out.append(
            (parts[0], parts[1], numbers[:9].reshape(3, 3), numbers[9:18].reshape(3, 3), numbers[18:].reshape(4, 4))
        )
    return out


def _image_id(name: str) -> str:
    """An IMC 2022 image id: the file stem without '-' (pair keys are 'id1-id2')."""
    return Path(name).stem.replace("-", "_")


@dataclass(frozen=True)
class ScanNet2022Config:
    """Options of :func:`convert_scannet_2022`."""

    max_size: int | None = None  # downscale images to this longer side (K follows)


def convert_scannet_2022(
    source: str | Path, output: str | Path, config: ScanNet2022Config = ScanNet2022Config()
) -> dict[str, int]:
    """Build an IMC 2022 test folder (+ training-style GT) from the ScanNet sample pairs.

    Each pair is its own batch/scene (the pairs come from different ScanNet scenes, and each scene's GT
    is only the relative pose): camera 0 sits at the origin (R = I, T = 0), camera 1 at ``T_0to1``.
    ScanNet is metric, so scaling factors are 1. Covisibility is unknown without depth: 1.0 is written.
    """
    source, output = Path(source), Path(output)
    pairs = read_scannet_pairs(source / "pairs_with_gt.txt")
    test_rows, scales = [], []
    for name0, name1, K0, K1, T01 in pairs:
        scene = "_".join(Path(name0).stem.split("_")[:2]) if name0.startswith("scene") else _image_id(name0)
        if scene in {s for s, _ in scales}:
            scene = f"{scene}_{len(scales)}"
        id0, id1 = _image_id(name0), _image_id(name1)
        calibration = []
        for name, image_id, K, R, T in (
            (name0, id0, K0, np.eye(3), np.zeros(3)),
            (name1, id1, K1, T01[:3, :3], T01[:3, 3]),
        ):
            image = source / "images" / name
            sx, sy = _save_image(image, output / "test_images" / scene / f"{image_id}.png", config.max_size)
            calibration.append((image_id, _scale_intrinsics(K, sx, sy), R, T))
        (_, Ka, Ra, Ta), (_, Kb, Rb, Tb) = calibration
        from datasets.imc_metrics import (  # local: datasets must not need recipes at import
            fundamental_from_pose,
            relative_pose,
        )

        F = fundamental_from_pose(Ka, Kb, *relative_pose(Ra, Ta, Rb, Tb))
        _write_rows(
            output / "train" / scene / "calibration.csv",
            CALIBRATION_COLUMNS,
            [
                (i, format_numbers(K.reshape(9), " "), format_numbers(R.reshape(9), " "), format_numbers(T, " "))
                for i, K, R, T in calibration
            ],
        )
        _write_rows(
            output / "train" / scene / "pair_covisibility.csv",
            COVISIBILITY_COLUMNS,
            [(f"{id0}-{id1}", "1.0", format_numbers(F.reshape(9), " "))],
        )
        test_rows.append((f"scannet;{scene};{id0}-{id1}", scene, id0, id1))
        scales.append((scene, "1.0"))
    _write_rows(output / "test.csv", TEST_2022_COLUMNS, test_rows)
    _write_rows(output / "train" / "scaling_factors.csv", SCALING_COLUMNS, scales)
    return {"pairs": len(test_rows), "images": 2 * len(test_rows)}


def find_par_file(source: Path) -> Path:
    """The camera file of a Middlebury-style folder: ``*_par.txt`` (Middlebury) or ``cameras.txt``
    (scenes written by :func:`datasets.synthetic.write_scene`)."""
    candidates = sorted(source.glob("*_par.txt")) or [p for p in (source / "cameras.txt",) if p.is_file()]
    if not candidates:
        raise UserError(f"{source}: no camera file ('*_par.txt' or 'cameras.txt'); pass a Middlebury-style folder")
    return candidates[0]


@dataclass(frozen=True)
class Middlebury2023Config:
    """Options of :func:`convert_middlebury_2023`: the scene's names and which views are kept."""

    dataset: str = "middlebury"  # dataset name in the IMC 2023 layout
    scene: str = "temple_ring"  # scene name in the IMC 2023 layout
    start: int = 0  # first view kept (0-based, file order)
    every: int = 1  # keep every k-th view
    limit: int | None = None  # keep at most this many views
    max_size: int | None = None  # downscale images to this longer side

    def __post_init__(self) -> None:
        if self.every < 1 or self.start < 0:
            raise UserError(f"--every must be >= 1 and --start >= 0, got {self.every} and {self.start}")
        for name, value in (("dataset", self.dataset), ("scene", self.scene)):
            if not value or "/" in value or "," in value or value in (".", ".."):
                raise UserError(f"--{name} {value!r}: use a plain folder name (no '/' or ',')")


def convert_middlebury_2023(
    source: str | Path, output: str | Path, config: Middlebury2023Config = Middlebury2023Config()
) -> dict[str, int]:
    """Add a Middlebury-style scene (images/ + par-format cameras) to an IMC 2023 training folder.

    Works for the temple ring (``templeR_par.txt``) and for synthetic scenes (``cameras.txt``).
    ``train_labels.csv`` keeps the rows of other scenes already in ``output``, so several calls build
    a multi-scene dataset. ``start``/``every``/``limit`` subsample the views (from view ``start``, 0-based,
    every k-th view, at most ``limit``) for quick tests; ``max_size`` downscales the images (poses are
    unchanged; the 2023 labels carry no intrinsics).
    """
    from core.par_files import read_par_file

    source, output = Path(source), Path(output)
    dataset, scene = config.dataset, config.scene
    par_file = find_par_file(source)
    cameras = list(read_par_file(par_file).values())[config.start :: config.every]
    if config.limit is not None:
        cameras = cameras[: config.limit]
    labels = output / "train" / "train_labels.csv"
    rows: list[tuple[str, ...]] = []
    if labels.is_file():  # keep the other scenes
        table = read_table(labels, LABELS_2023_COLUMNS)
        rows = [
            tuple(str(r[c]) for c in LABELS_2023_COLUMNS)
            for r in table.to_dict("records")
            if (r["dataset"], r["scene"]) != (dataset, scene)
        ]
    image_dir = output / "train" / dataset / scene / "images"
    keep = {f"{Path(camera.name).stem}.png" for camera in cameras}
    if image_dir.is_dir():  # a re-conversion with other views must not leave stale images behind
        for stale in image_dir.iterdir():
            if stale.is_file() and stale.name not in keep:
                stale.unlink()
    for camera in cameras:
        image = resolve_image(source / "images", camera.name)
        if not image.is_file():
            raise UserError(f"{par_file}: image {camera.name!r} listed but {image} does not exist")
        target = f"{Path(camera.name).stem}.png"
        _save_image(image, image_dir / target, config.max_size)
        rows.append(
            (
                dataset,
                scene,
                f"{dataset}/{scene}/images/{target}",
                format_numbers(camera.R.reshape(9), ";"),
                format_numbers(camera.t, ";"),
            )
        )
    _write_rows(labels, LABELS_2023_COLUMNS, rows)
    return {"images": len(cameras)}


#: the temple ring is the Middlebury-style scene of ../shared/data
convert_temple_2023 = convert_middlebury_2023


# ------------------------------------------------------------------------------------------------- CLI
#: converter name -> (function, its config class); temple2023 is the old name of middlebury2023
CONVERTERS = {
    "scannet2022": (convert_scannet_2022, ScanNet2022Config),
    "middlebury2023": (convert_middlebury_2023, Middlebury2023Config),
    "temple2023": (convert_middlebury_2023, Middlebury2023Config),
}


def main(
    command: str, source: str | Path, output: str | Path, config: ScanNet2022Config | Middlebury2023Config | None = None
) -> dict[str, int]:
    """Run the converter ``command`` (a key of :data:`CONVERTERS`) with ``config`` (default: its class's)."""
    if command not in CONVERTERS:
        raise UserError(f"unknown converter {command!r}; choose one of {', '.join(CONVERTERS)}")
    convert, config_class = CONVERTERS[command]
    return convert(source, output, config if config is not None else config_class())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.imc", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scannet = commands.add_parser("scannet2022", help="ScanNet sample pairs -> IMC 2022 test folder with local GT")
    scannet.add_argument("--source", type=Path, required=True, help="folder with images/ and pairs_with_gt.txt")
    scannet.add_argument("--output", type=Path, required=True)
    add_config_arguments(scannet, ScanNet2022Config)
    temple = commands.add_parser(
        "middlebury2023",
        aliases=["temple2023"],
        help="add a Middlebury-style scene (temple ring, synthetic scenes) to an IMC 2023 training folder",
    )
    temple.add_argument("--source", type=Path, required=True, help="folder with images/ and *_par.txt (or cameras.txt)")
    temple.add_argument("--output", type=Path, required=True)
    add_config_arguments(temple, Middlebury2023Config)
    return parser


def main_cli(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(args, CONVERTERS[args.command][1])
    summary = main(args.command, args.source, args.output, config)
    if args.command == "scannet2022":
        print(f"wrote {summary['pairs']} pairs ({summary['images']} images) to {args.output} (IMC 2022 layout)")
    else:
        print(
            f"wrote {summary['images']} images of {config.dataset}/{config.scene} to {args.output / 'train'} "
            "(IMC 2023 layout)"
        )


if __name__ == "__main__":
    run_cli(main_cli)
