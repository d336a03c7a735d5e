"""COLMAP models on disk: one reader with a clear error, one atomic writer that checks what it wrote.

pycolmap's writers say nothing when the disk fills up (a file is cut short), so every written model is
read back and its counts compared before it replaces the old one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from core.errors import UserError

MODEL_FILES = ("cameras", "images", "points3D")


def is_model_dir(path: str | Path) -> bool:
    """True when ``path`` holds a COLMAP model (images.bin or images.txt)."""
    path = Path(path)
    return path.is_dir() and any((path / f"images{ext}").is_file() for ext in (".bin", ".txt"))


def read_model(path: str | Path, what: str = "the model folder") -> Any:
    """The ``pycolmap.Reconstruction`` in ``path``; a UserError naming ``what`` when there is none or it is broken."""
    import pycolmap

    path = Path(path)
    if not is_model_dir(path):
        raise UserError(f"{path}: no COLMAP model (cameras/images/points3D .bin or .txt) found; give {what}")
    try:
        return pycolmap.Reconstruction(str(path))
    except Exception as error:  # pycolmap raises ValueError / RuntimeError on cut or foreign files
        raise UserError(
            f"{path}: the COLMAP model does not read ({' '.join(str(error).split())[:200]}); "
            f"write it again or give another model"
        ) from None


def incomplete_write(path: Path, detail: str) -> UserError:
    return UserError(
        f"{path}: COLMAP wrote an incomplete file ({detail}); most likely no space left on device or "
        f"the disk quota is used up: free some space (finished work is kept: run the same command "
        f"again to resume) or write the outputs to another disk"
    )


def _counts(model: Any) -> tuple[int, ...]:
    return (model.num_cameras(), model.num_reg_images(), model.num_points3D(), model.compute_num_observations())


def check_model_written(reconstruction: Any, folder: Path, target: Path, kinds: tuple[str, ...] = ("binary",)) -> None:
    """Read the model in ``folder`` back (``kinds``: binary, text) and compare its counts with
    ``reconstruction``'s; a UserError naming ``target`` when they differ or it does not parse."""
    import pycolmap

    for kind in kinds:
        model = pycolmap.Reconstruction()
        try:
            getattr(model, f"read_{kind}")(str(folder))
            found = _counts(model)
        except Exception as error:  # a cut file fails to parse (ValueError, IndexError, ...)
            raise incomplete_write(
                target, f"the {kind} model does not read back: {' '.join(str(error).split())[:200]}"
            ) from None
        if found != _counts(reconstruction):
            raise incomplete_write(target, f"the {kind} model reads back as {found}, not {_counts(reconstruction)}")


def write_model(reconstruction: Any, folder: str | Path, kinds: tuple[str, ...] = ("binary", "text")) -> None:
    """Write the model into ``folder`` (COLMAP ``kinds``: binary, text), replacing it atomically."""
    folder = Path(folder)
    temp = folder.with_name(f".{folder.name}.tmp")
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    try:
        for kind in kinds:
            getattr(reconstruction, f"write_{kind}")(str(temp))
        check_model_written(reconstruction, temp, folder, kinds)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    temp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
