"""Fetch and check LoFTR weights, optionally converting them between the official and kornia layouts.

    python -m matchers.loftr.get_weights [NAME|PATH] [--output FILE --layout official|kornia] [--preset P]

Downloads named weights into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) so later runs work
offline, verifies that the file loads (strict keys and shapes) and prints a one-line summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from core.errors import run_cli

from .config import PRESET_NAMES
from .weights import PRETRAINED, WEIGHTS_ENV, load_pretrained, save_checkpoint


def main(
    weights: str | None = None,
    output: Path | None = None,
    layout: Literal["official", "kornia"] = "official",
    preset: str | None = None,
) -> dict[str, Any]:
    """Load (downloading if needed) and check the weights; write them to ``output`` in ``layout`` if given.

    Returns a summary: weights name, match type, position-encoding flag, parameter count and the written file.
    """
    model = load_pretrained(weights, device="cpu", preset=preset)
    written = save_checkpoint(model, output, layout=layout) if output is not None else None
    return {
        "weights": model.weights_name,
        "match_type": model.config.matching.match_type,
        "temp_bug_fix": model.config.coarse.temp_bug_fix,
        "parameters": sum(p.numel() for p in model.parameters()),
        "written": None if written is None else str(written),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matchers.loftr.get_weights", description=__doc__.splitlines()[0])
    parser.add_argument(
        "weights",
        nargs="?",
        default=None,
        help=f"name ({', '.join(sorted(PRETRAINED))}, or aliases outdoor/indoor) or a .ckpt path; "
        f"default ${WEIGHTS_ENV} or outdoor",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the checked weights to this file")
    parser.add_argument(
        "--layout",
        choices=("official", "kornia"),
        default="official",
        help="keys of the written file: official ('matcher.' prefix) or kornia (plain)",
    )
    parser.add_argument("--preset", choices=PRESET_NAMES, default=None, help="architecture of a path (else guessed)")
    return parser


def main_cli(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    summary = main(args.weights, args.output, args.layout, args.preset)
    print(" ".join(f"{key}={value}" for key, value in summary.items() if value is not None))
    return summary


if __name__ == "__main__":
    run_cli(main_cli)
