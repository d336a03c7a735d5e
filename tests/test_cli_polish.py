"""Small things a new user sees (issue 16, item 4): program names in usage lines, the --weights help,
one pixel limit everywhere, the offline warning's length, and what a broken checkpoint message advises."""

from __future__ import annotations

import importlib
import re
import struct
import zlib
from pathlib import Path

import pytest

from core.errors import UserError
from tests.conftest import PROJECT_ROOT

PACKAGES = ("matchers", "pipeline", "localization", "recipes", "datasets")


def cli_modules() -> list[str]:
    """Every module of the project that builds an argparse parser in a ``main_cli``."""
    found = []
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            text = path.read_text()
            if "ArgumentParser(" in text and "def main_cli" in text:
                found.append(".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts))
    return found


def test_the_cli_list_is_complete():
    assert {"pipeline.reconstruct", "localization.aachen", "pipeline.pairs", "pipeline.viz"} <= set(cli_modules())


@pytest.mark.parametrize("module", cli_modules())
def test_usage_names_the_module_as_users_run_it(module, capsys):
    main_cli = importlib.import_module(module).main_cli
    with pytest.raises(SystemExit) as exited:
        main_cli(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


@pytest.mark.parametrize(
    "module", ["matchers.match", "recipes.imc2022", "recipes.imc2023", "recipes.demo", "localization.aachen"]
)
def test_weights_help_says_what_happens_offline(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main_cli(["--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "loftr-compact" in help_text and "default outdoor" not in help_text and "outdoor (default)" not in help_text


# ---------------------------------------------------------------------------------------- pixel limit
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: enough for the size checks)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_one_pixel_limit_for_matching_and_reconstruction(tmp_path):
    from core.image_io import MAX_IMAGE_PIXELS, read_rgb
    from pipeline.image_check import inspect_image

    side = int(MAX_IMAGE_PIXELS**0.5) + 100  # just above the limit
    big = png_header_only(tmp_path / "big.png", side, side)
    expected = f"{side * side / 1e6:.0f} megapixels, more than the {MAX_IMAGE_PIXELS / 1e6:.0f} that are decoded safely"
    with pytest.raises(UserError) as raised:
        read_rgb(big)
    assert expected in str(raised.value) and "downscale it" in str(raised.value)
    with pytest.raises(ValueError) as raised:
        inspect_image(big)
    assert expected in str(raised.value)
    # between PIL's warning level and the limit: no refusal for size (this header-only file then fails to decode)
    below = png_header_only(tmp_path / "below.png", 12_000, 12_000)
    with pytest.raises(UserError, match="cannot be read as an image"):
        read_rgb(below)
    with pytest.raises(ValueError, match="cannot be decoded"):
        inspect_image(below)


def test_no_other_pixel_limit_in_the_code():
    text = "\n".join(p.read_text() for package in PACKAGES for p in (PROJECT_ROOT / package).rglob("*.py"))
    assert "Image.MAX_IMAGE_PIXELS" not in text.replace("``Image.MAX_IMAGE_PIXELS``", "")


# --------------------------------------------------------------------------------- checkpoint messages
def test_corrupt_checkpoint_advice_depends_on_who_made_the_file(tmp_path, monkeypatch):
    from matchers.loftr import weights

    user_file = tmp_path / "my_training.ckpt"
    user_file.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError) as raised:
        weights.read_checkpoint(user_file)
    assert "download it again" not in str(raised.value) and "re-save" in str(raised.value)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = weights.cache_dir() / "loftr_outdoor.ckpt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>404</html>" * 10)
    with pytest.raises(UserError) as raised:
        weights.read_checkpoint(cached)
    assert "damaged download: delete it and it is downloaded again" in str(raised.value)


def test_unavailable_reason_is_short():
    from matchers.factory import unavailable_reason

    error = UserError(
        "LoFTR weights outdoor (loftr_outdoor.ckpt) are not available: download failed, no internet? "
        "(<urlopen error [Errno -2] Name or service not known>); download https://example/x and pass "
        "--weights /path/to/loftr_outdoor.ckpt, or set LOFTR_WEIGHTS to that file or its folder"
    )
    reason = unavailable_reason(error)
    assert reason.startswith("download failed, no internet?") and len(reason) <= 64
