"""Listing the images of a folder as hloc names (paths relative to the root, '/'-separated)."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from core.image_io import is_image_file


def list_images(root: str | Path) -> list[str]:
    """Image names below ``root`` (recursive, sorted, hidden files skipped), relative to it."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found; pass a folder of images with --images")
    names = [
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file()
        and is_image_file(path)
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(names)
