"""Bad and unusual input folders: what is kept, what is skipped and why, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from core.image_io import read_gray
from pipeline.image_check import check_h5, check_images, main_cli

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _textured(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save_rgb(path: Path, width: int = 64, height: int = 48, seed: int = 0, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_textured(width, height, seed)).save(path, **kwargs)
    return path


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A folder with every kind of good and bad file the checker must classify."""
    root = tmp_path / "images"
    _save_rgb(root / "plain.png", seed=1)
    _save_rgb(root / "photo.jpg", seed=2)
    Image.fromarray(_textured(seed=3)[..., 0]).save(root / "gray.png")  # mode L
    rgba = np.dstack([_textured(seed=4), np.full((48, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    deep = (np.random.default_rng(5).integers(0, 65536, (48, 64))).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")  # 16-bit grayscale
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed size is 48 x 64
    Image.fromarray(_textured(seed=6)).save(root / "rotated.jpg", exif=exif.tobytes())
    _save_rgb(root / "sub" / "nested.png", seed=7)
    _save_rgb(root / "big.png", width=300, height=200, seed=8)
    # bad files
    (root / "notes.txt").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    full = (root / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    (root / "zcopy.png").write_bytes((root / "plain.png").read_bytes())
    _save_rgb(root / "with space.png", seed=9)
    _save_rgb(root / "sub-nested.png", seed=10)  # same hloc pair key as sub/nested.png ('/' -> '-')
    _save_rgb(root / "PLAIN.png", seed=11)  # differs from plain.png only in case
    _save_rgb(root / ".hidden.png", seed=12)
    _save_rgb(tmp_path / "elsewhere.png", seed=13)
    (root / "link.png").symlink_to(tmp_path / "elsewhere.png")
    return root


def test_classification(messy_folder: Path) -> None:
    result = check_images(messy_folder, huge_pixels=50_000)
    assert result.names == sorted(
        [
            "PLAIN.png",
            "alpha.png",
            "big.png",
            "deep16.png",
            "gray.png",
            "link.png",
            "photo.jpg",
            "plain.png",
            "rotated.jpg",
            "sub-nested.png",
        ]
    )
    skipped = result.skipped
    assert set(skipped) == {
        "notes.txt",
        "empty.jpg",
        "truncated.jpg",
        "garbage.png",
        "zcopy.png",
        "with space.png",
        "sub/nested.png",
    }
    assert "not an image" in skipped["notes.txt"]
    assert "0 bytes" in skipped["empty.jpg"]
    assert "cannot be decoded" in skipped["truncated.jpg"] and "truncated" in skipped["truncated.jpg"]
    assert "cannot be decoded" in skipped["garbage.png"]
    assert skipped["zcopy.png"] == "byte-for-byte copy of plain.png"
    assert "whitespace" in skipped["with space.png"]
    # '-' sorts before '/', so the nested one is the later duplicate key
    assert "sub-nested.png" in skipped["sub/nested.png"] and "match key" in skipped["sub/nested.png"]
    # hidden files are not even listed
    assert ".hidden.png" not in skipped and ".hidden.png" not in result.names
    # EXIF orientation 6: displayed size is the raw size transposed
    assert result.sizes["rotated.jpg"] == (48, 64)
    assert result.sizes["big.png"] == (300, 200)
    assert "EXIF orientation 6" in result.notes["rotated.jpg"]
    assert "huge" in result.notes["big.png"]
    assert "letter case" in result.notes["plain.png"]
    assert "mode RGBA" in result.notes["alpha.png"]
    report = result.report()
    assert "10 usable images" in report and "skipped truncated.jpg" in report


def test_duplicate_keeps_first_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _save_rgb(root / "b.png", seed=1)
    (root / "a.png").write_bytes((root / "b.png").read_bytes())
    _save_rgb(root / "c.png", seed=2)
    result = check_images(root)
    assert result.names == ["a.png", "c.png"]
    assert result.skipped == {"b.png": "byte-for-byte copy of a.png"}


def test_unusual_images_are_readable_upright(messy_folder: Path) -> None:
    """The usable images really decode, as grayscale float in [0, 1], upright (EXIF applied)."""
    result = check_images(messy_folder)
    for name in result.names:
        image = read_gray(messy_folder / name)
        width, height = result.sizes[name]
        assert image.shape == (height, width) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.01
    # 16-bit data is scaled by 65535, not clipped at 255
    deep = read_gray(messy_folder / "deep16.png")
    raw = np.asarray(Image.open(messy_folder / "deep16.png"), dtype=np.float64)
    assert np.allclose(deep, raw / 65535.0, atol=1e-3)


def test_too_few_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="folder is empty"):
        check_images(empty)
    one = tmp_path / "one"
    _save_rgb(one / "a.png")
    (one / "b.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"only 1 usable image.*b\.jpg: empty file"):
        check_images(one)
    with pytest.raises(UserError, match="not found"):
        check_images(tmp_path / "missing")


def test_check_h5(tmp_path: Path) -> None:
    good = tmp_path / "good.h5"
    with h5py.File(good, "w") as file:
        file.create_group("a.png").create_dataset("keypoints", data=np.zeros((5, 2), np.float32))
    assert check_h5(good) is True
    assert check_h5(tmp_path / "absent.h5") is False
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="damaged HDF5 file.*delete it"):
        check_h5(truncated)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"no hdf5 here" * 10)
    with pytest.raises(UserError, match="damaged HDF5"):
        check_h5(garbage)


def test_cli(messy_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main_cli(["--images", str(messy_folder)])
    out = capsys.readouterr().out
    assert out.startswith("10 usable images") and "skipped empty.jpg: empty file (0 bytes)" in out
    empty = tmp_path / "nothing"
    empty.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.image_check", "--images", str(empty)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty" in lines[0]
