"""Reading images for matching: any common format, EXIF-rotated, 8/16-bit, gray/RGB/RGBA.

Images are returned as float32 grayscale arrays in [0, 1] with shape (H, W), upright as a viewer
shows them (EXIF orientation applied). Unreadable files raise :class:`~core.errors.UserError`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")

#: The largest image (width x height) any step decodes: PIL's own hard limit (twice its
#: ``Image.MAX_IMAGE_PIXELS`` warning level, ~13,400 x 13,400); larger files may be decompression bombs.
MAX_IMAGE_PIXELS = 178_956_970


def pixel_limit_reason(width: int | None = None, height: int | None = None, pixels: int | None = None) -> str:
    """'W x H = N megapixels, more than the 179 that are decoded safely' (for any step that refuses an image)."""
    size = f"{width}x{height} = " if width and height else ""
    count = pixels if pixels is not None else (width or 0) * (height or 0)
    amount = f"{count / 1e6:.0f} megapixels" if count else "too many pixels"
    return f"{size}{amount}, more than the {MAX_IMAGE_PIXELS / 1e6:.0f} that are decoded safely"


def bomb_pixels(error: Exception) -> int | None:
    """The pixel count in PIL's DecompressionBombError message."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return int(found.group(1)) if found else None


def too_many_pixels(
    path: str | Path, width: int | None = None, height: int | None = None, pixels: int | None = None
) -> str:
    """The one-line message for an image above :data:`MAX_IMAGE_PIXELS`."""
    return (
        f"{path}: the image has {pixel_limit_reason(width, height, pixels)}; downscale it (matchers work at "
        f"a few megapixels) or remove it"
    )


def is_image_file(path: Path) -> bool:
    """True when the file name has an image extension (the content is not checked)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_gray(path: str | Path) -> np.ndarray:
    """Read an image as float32 grayscale (H, W) in [0, 1], with EXIF orientation applied."""
    return to_gray(read_rgb(path))


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as float32 RGB (H, W, 3) in [0, 1], with EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file; check the path")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); remove it or copy it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the one
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise UserError(too_many_pixels(path, image.width, image.height))
                image = ImageOps.exif_transpose(image)
                array = _to_float_rgb(image)
    except Image.DecompressionBombError as error:
        raise UserError(too_many_pixels(path, pixels=bomb_pixels(error))) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: cannot be read as an image ({error}); remove it or re-export it") from None
    return array


def _to_float_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if data.max() > 255 or image.mode.startswith("I;16") else 255.0
        gray = np.clip(data / peak, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        data = np.asarray(image, dtype=np.float32)
        span = float(data.max() - data.min()) or 1.0
        gray = (data - data.min()) / span
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency onto white so transparent regions are flat, not black noise.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as OpenCV and kornia compute grayscale."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.ascontiguousarray(rgb @ weights, dtype=np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image in [0, 1] as uint8 0-255, rounded half up (OpenCV detectors and trackers want 8 bits);
    uint8 input is returned as is."""
    if image.dtype == np.uint8:
        return image
    return np.ascontiguousarray(np.clip(np.asarray(image, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: cannot be read as an image ({error}); remove it or re-export it") from None
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    return width, height
