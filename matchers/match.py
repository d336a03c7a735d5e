"""Match two images and write a side-by-side visualisation.

    python -m matchers.match IMG0 IMG1 --matcher loftr|sift [--weights outdoor|PATH] [--resize 640]
                             [--device auto|cpu|cuda] [--out viz.png] [--sift-backend pycolmap|opencv ...]

Prints the number of matches and the matching time; problems the user can fix (missing image, weights
that cannot be downloaded offline, no GPU) end with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from core.cli import add_config_arguments, config_from_args
from core.errors import run_cli
from core.files import check_output_file
from core.geometry import fundamental_magsac
from core.image_io import read_rgb, to_gray

from .base import Matches
from .factory import MATCHERS, WEIGHTS_HELP, make_matcher
from .sift import SIFTOptions
from .viz import plot_matches


def main(
    image0_path: str | Path,
    image1_path: str | Path,
    matcher: str = "loftr",
    weights: str | None = None,
    resize: int | None = None,
    device: str = "auto",
    out: str | Path | None = "matches.png",
    sift: SIFTOptions = SIFTOptions(),
) -> Matches:
    """Match ``image0_path`` to ``image1_path`` with the named matcher; write the plot to ``out`` (if given).

    ``weights`` / ``resize`` / ``device`` are as in :func:`matchers.make_matcher` (None = the matcher's
    default); ``sift``: the SIFT matcher's options (its ``resize`` unless ``resize`` is given). Returns the
    matches in original pixel coordinates (hloc convention).
    """
    # Read the images first: a wrong path should fail before a checkpoint is downloaded or loaded.
    rgb0, rgb1 = read_rgb(image0_path), read_rgb(image1_path)
    if out is not None:
        check_output_file(out, "--out", example="matches.png")
    options = asdict(sift) if matcher.strip().lower() == "sift" else {}
    own_size = options.pop("resize", None)
    if options and resize is None:  # the SIFT options' size (None there is the original size, 0 here)
        resize = own_size or 0
    model = make_matcher(matcher, weights=weights, resize=resize, device=device, **options)
    start = time.perf_counter()
    matches = model.match(to_gray(rgb0), to_gray(rgb1))
    elapsed = time.perf_counter() - start
    used = model.describe().get("weights")
    label = model.name + (f" ({used})" if used else "")
    inliers = verify_epipolar(matches)
    verified = (
        f", {int(inliers.sum())} consistent with one fundamental matrix (MAGSAC++)" if inliers is not None else ""
    )
    print(f"{label}: {len(matches)} matches in {elapsed:.2f} s{verified}")
    if out is not None:
        title = f"{label} {Path(image0_path).name} - {Path(image1_path).name}"
        path = plot_matches(rgb0, rgb1, matches, out, title=title, inliers=inliers)
        print(f"wrote {path}")
    return matches


def verify_epipolar(matches: Matches, threshold: float = 1.0) -> np.ndarray | None:
    """Inlier mask of a MAGSAC++ fundamental matrix fit (None when there are too few matches to fit one)."""
    if len(matches) < 8:
        return None
    matrix, inliers = fundamental_magsac(matches.keypoints0, matches.keypoints1, threshold, confidence=0.9999)
    return None if matrix is None else inliers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matchers.match", description=__doc__.split("\n")[0])
    parser.add_argument("image0", type=Path)
    parser.add_argument("image1", type=Path)
    parser.add_argument("--matcher", choices=MATCHERS, default="loftr")
    parser.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    parser.add_argument(
        "--resize", type=int, default=None, help="longest side used for matching (default: matcher's own; 0 = original)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=Path("matches.png"), help="visualisation PNG (default matches.png)")
    sift = parser.add_argument_group("SIFT matcher (--matcher sift)")
    add_config_arguments(sift, SIFTOptions, prefix="sift_", exclude=("resize",))
    return parser


def main_cli(argv: list[str] | None = None) -> Matches:
    args = build_parser().parse_args(argv)
    sift = config_from_args(args, SIFTOptions, prefix="sift_", base=SIFTOptions())
    return main(args.image0, args.image1, args.matcher, args.weights, args.resize, args.device, args.out, sift)


if __name__ == "__main__":
    run_cli(main_cli)
