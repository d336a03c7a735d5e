"""Validate an image folder before matching: which images are usable, which are skipped and why.

Every file under the folder (recursively, hidden files and folders ignored) is classified:

* not an image (by extension): skipped, listed;
* empty (0 bytes), truncated or otherwise undecodable: skipped, listed with the decoder's reason;
* symbolic links are followed (a folder of links to images elsewhere works);
* a name with whitespace (pairs.txt is whitespace-separated, so it could not be written): skipped;
* a byte-for-byte copy of an earlier image (a zero-baseline pair helps nothing): skipped;
* names that would share one hloc pair key (``a/b.jpg`` and ``a-b.jpg``, because ``/`` becomes ``-``):
  the later one is skipped;
* names equal up to letter case (``a.jpg``, ``a.JPG``) are both kept (they are distinct files here) but
  noted, since the outputs would collide on a case-insensitive file system;
* grayscale, RGBA, palette, 16-bit and EXIF-rotated images are fine (the readers convert them); sizes
  are reported upright (EXIF orientation applied); huge images are noted (matchers resize them).

Fewer than ``min_images`` usable images is a :class:`UserError`. :func:`check_h5` turns a truncated or
corrupt HDF5 file (left by a crash of an older run or another tool) into a clear message.

CLI: ``python -m pipeline.image_check --images DIR`` prints the report (exit 2 when unusable).
"""

from __future__ import annotations

import argparse
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.errors import UserError, run_cli
from core.image_io import MAX_IMAGE_PIXELS, bomb_pixels, is_image_file, pixel_limit_reason
from core.io import resolve_image
from core.stamps import file_digest
from pipeline.images import list_images

HUGE_PIXELS = 40_000_000  # above this an image is noted as huge (the matcher resizes it anyway)


@dataclass
class ImageCheck:
    """Result of :func:`check_images`."""

    root: Path
    names: list[str]  # usable images, sorted, relative to root with '/'
    sizes: dict[str, tuple[int, int]]  # (W, H) as displayed (EXIF orientation applied)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was skipped
    notes: dict[str, str] = field(default_factory=dict)  # name -> remarks on usable images

    def report(self) -> str:
        """Human-readable lines: counts, then every skipped file and every note."""
        head = f"{len(self.names)} usable images in {self.root}"
        lines = [head + (f", {len(self.skipped)} skipped" if self.skipped else "")]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        lines += [f"  note {name}: {note}" for name, note in self.notes.items()]
        return "\n".join(lines)


def list_files(root: Path) -> list[str]:
    """All regular files under ``root`` (recursive, hidden entries ignored), as sorted relative names."""
    names = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        names.append(relative.as_posix())
    return sorted(names)


def inspect_image(path: Path, huge_pixels: int = HUGE_PIXELS) -> tuple[tuple[int, int], list[str]]:
    """Decode an image fully (so truncation is caught); returns (upright (W, H), remarks).

    Raises ValueError with a one-line reason when the image cannot be used.
    """
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    remarks: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
                mode = image.mode
                if width * height <= MAX_IMAGE_PIXELS:  # larger: refused below, without decoding
                    if width * height > huge_pixels:
                        remarks.append(f"huge ({width}x{height}); the matcher resizes it")
                        if image.format == "JPEG":  # decode at reduced scale: same truncation check, less memory
                            image.draft("L", (max(1, width // 8), max(1, height // 8)))
                    image.load()
    except Image.DecompressionBombError as error:  # PIL refuses at the same limit, before the size is known
        raise ValueError(f"too large: {pixel_limit_reason(pixels=bomb_pixels(error))}; downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot be decoded ({error})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"too large: {pixel_limit_reason(width, height)}; downscale it")
    size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # rotated by 90/270 degrees
    if orientation not in (1, None):
        remarks.append(f"EXIF orientation {orientation} applied")
    if mode not in ("RGB", "L"):
        remarks.append(f"mode {mode} converted to grayscale")
    return size, remarks


def check_images(
    root: str | Path, names: Sequence[str] | None = None, min_images: int = 2, huge_pixels: int = HUGE_PIXELS
) -> ImageCheck:
    """Classify the files of ``root`` (or only ``names``) into usable images and skipped files."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found; give the folder that holds the images")
    candidates = list_files(root) if names is None else sorted(names)
    image_names = set(list_images(root))  # the project's one rule for what counts as an image
    result = ImageCheck(root=root, names=[], sizes={})
    digests: dict[str, str] = {}
    pair_keys: dict[str, str] = {}
    folded: dict[str, str] = {}
    for name in tqdm(candidates, desc="check images", leave=False, disable=len(candidates) < 200):
        path = root / name
        if not path.is_file():
            result.skipped[name] = "no such file"
            continue
        if name not in image_names and not is_image_file(path):
            result.skipped[name] = "not an image file (by extension)"
            continue
        try:
            resolve_image(root, name)  # the rule every later step applies to image names
        except UserError:
            result.skipped[name] = "the name leaves the image folder; move the file inside it"
            continue
        if any(c.isspace() for c in name):
            result.skipped[name] = "the name contains whitespace, which pairs.txt cannot hold; rename the file"
            continue
        try:
            size, remarks = inspect_image(path, huge_pixels)
        except ValueError as error:
            result.skipped[name] = str(error)
            continue
        digest = file_digest(path)
        if digest in digests:
            result.skipped[name] = f"byte-for-byte copy of {digests[digest]}"
            continue
        key = name.replace("/", "-")
        if key in pair_keys:
            result.skipped[name] = f"would share hloc's match key with {pair_keys[key]} ('/' becomes '-'); rename it"
            continue
        if name.lower() in folded:
            remarks.append(
                f"differs from {folded[name.lower()]} only in letter case "
                "(outputs collide on case-insensitive file systems)"
            )
        digests[digest] = name
        pair_keys[key] = name
        folded.setdefault(name.lower(), name)
        result.names.append(name)
        result.sizes[name] = size
        if remarks:
            result.notes[name] = "; ".join(remarks)
    if len(result.names) < min_images:
        if not candidates:
            raise UserError(f"{root}: the folder is empty; put at least {min_images} images in it")
        examples = "; ".join(f"{n}: {r}" for n, r in list(result.skipped.items())[:3])
        raise UserError(
            f"{root}: only {len(result.names)} usable image(s), at least {min_images} needed"
            + (f" ({len(result.skipped)} skipped — {examples})" if result.skipped else "")
        )
    return result


def check_h5(path: str | Path) -> bool:
    """True when ``path`` exists and is a complete HDF5 file; False when absent.

    A truncated or corrupt file raises :class:`UserError` saying to delete it.
    """
    path = Path(path)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as file:
            file.visit(lambda _: None)  # walks every group: catches files truncated after the header
    except (OSError, RuntimeError, KeyError) as error:
        raise UserError(
            f"{path}: damaged HDF5 file (truncated by a crash?: {error}); delete it and run the command again"
        ) from None
    return True


def main(images: Path, min_images: int = 2) -> ImageCheck:
    """Check ``images`` and return the classification (UserError when too few images are usable)."""
    return check_images(images, min_images=min_images)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.image_check",
        description="Check an image folder: usable images, skipped files and why.",
    )
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument(
        "--min-images",
        type=int,
        default=inspect.signature(main).parameters["min_images"].default,
        help="fewer usable images is an error",
    )
    return parser


def main_cli(argv: list[str] | None = None) -> ImageCheck:
    args = build_parser().parse_args(argv)
    checked = main(args.images, args.min_images)
    print(checked.report())
    return checked


if __name__ == "__main__":
    run_cli(main_cli)
