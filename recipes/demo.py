"""`make demo`: render a synthetic scene, reconstruct it, and report accuracy against the known cameras.

Works offline on a fresh clone: the images come from :mod:`datasets.synthetic` (no downloads). The
matcher is LoFTR when its weights can be had (the loader is asked: ``--weights``, ``LOFTR_WEIGHTS``, the
cache, or a download); otherwise the demo says why and uses the project's shipped ``loftr-compact``
weights (or, when given weights are missing, the weight-free SIFT matcher). The choice is
the demo's own, announced on the terminal — ``python -m pipeline.reconstruct`` never switches matcher.

    python -m recipes.demo --outputs outputs/demo [--matcher auto|loftr|sift] [--weights W] [--views 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import UserError, run_cli
from core.files import check_output_dir
from matchers.factory import OFFLINE_WEIGHTS, WEIGHTS_HELP, unavailable_reason

MATCHER_CHOICES = ("auto", "loftr", "sift")
COMPACT_WEIGHTS = OFFLINE_WEIGHTS  # shipped with the project, trained on a CPU (weaker than the official ones)


@dataclass(frozen=True)
class DemoResult:
    matcher: str
    weights: str | None
    registered: int
    total: int
    summary: dict
    accuracy: dict
    seconds: float


def choose_matcher(requested: str, weights: str | None, device: str) -> tuple[str, str | None, str]:
    """(matcher, weights, message). 'auto': LoFTR when the loader can provide weights, else SIFT."""
    if requested == "sift":
        return "sift", None, "matcher: SIFT (weight-free), as requested"
    from matchers.factory import make_matcher

    try:
        matcher = make_matcher("loftr", weights=weights, resize=320, device=device, offline_fallback=False)
    except UserError as error:
        if requested == "loftr":
            raise
        if weights is None:  # no weights asked for: the project's own compact LoFTR, announced
            try:
                make_matcher("loftr", weights=COMPACT_WEIGHTS, resize=320, device=device)
            except UserError:
                pass
            else:
                return (
                    "loftr",
                    COMPACT_WEIGHTS,
                    (
                        f"official LoFTR weights unavailable offline ({unavailable_reason(error)});\n"
                        f"  this demo uses the project's {COMPACT_WEIGHTS} weights (see matchers/loftr/weights/MODEL_CARD.md)"
                    ),
                )
        return (
            "sift",
            None,
            (
                f"LoFTR weights unavailable offline ({str(error).split(';')[0]});\n  this demo uses the weight-free SIFT matcher"
            ),
        )
    name = matcher.describe().get("weights") or weights
    return "loftr", weights, f"matcher: LoFTR with weights {name}"


def main(
    outputs: Path,
    matcher: str = "auto",
    weights: str | None = None,
    views: int = 12,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
    device: str = "auto",
) -> DemoResult:
    """Render ``views`` views, reconstruct them under ``outputs``, evaluate; returns the figures."""
    from datasets.synthetic import SceneConfig, render_scene, write_scene
    from pipeline import reconstruct
    from pipeline.evaluate_model import evaluate

    if matcher not in MATCHER_CHOICES:
        raise UserError(f"unknown matcher {matcher!r}; choose one of {', '.join(MATCHER_CHOICES)}")
    start = time.perf_counter()
    outputs = Path(outputs)
    check_output_dir(outputs, "--outputs")
    scene_dir = outputs / "scene"
    config = SceneConfig(width=width, height=height, num_views=views, seed=seed)
    print(f"rendering a synthetic scene: {views} views of {width}x{height} (seed {seed}) -> {scene_dir}")
    previous = scene_dir / "scene.json"
    if previous.is_file() and json.loads(previous.read_text()) != json.loads(json.dumps(asdict(config))):
        # Another scene under the same names: earlier matches must not be resumed.
        shutil.rmtree(outputs / "sfm_run", ignore_errors=True)
    scene = render_scene(config)
    write_scene(scene, scene_dir)

    chosen, chosen_weights, message = choose_matcher(matcher, weights, device)
    print(message)
    result = reconstruct.main(
        scene_dir / "images",
        outputs / "sfm_run",
        config=reconstruct.ReconstructConfig(
            # LoFTR runs as the main job does by default: in the loftr+sift ensemble
            matcher="loftr+sift" if chosen == "loftr" else chosen,
            weights=chosen_weights,
            pairs="exhaustive",
            resize=(max(width, height),) if chosen == "loftr" else None,
            device=device,
        ),
    )
    accuracy = evaluate(result.reconstruction, scene.cameras())
    seconds = time.perf_counter() - start
    summary = result.summary
    from core.io import write_text_atomic

    write_text_atomic(outputs / "accuracy.json", json.dumps(accuracy.to_dict(), indent=2))
    print(reconstruct.format_summary(summary))
    print(f"accuracy against the known cameras: {accuracy.describe()}")
    print(f"matcher used: {summary['matcher']}, weights: {summary.get('weights') or 'none (weight-free)'}")
    print(
        f"demo finished in {seconds:.1f} s; model plot: {outputs / 'sfm_run' / 'reconstruction.png'}; "
        f"interactive viewer (opens offline in a browser): {outputs / 'sfm_run' / 'reconstruction.html'}"
    )
    return DemoResult(
        summary["matcher"],
        summary.get("weights"),
        summary["registered"],
        summary["total"],
        summary,
        accuracy.to_dict(),
        seconds,
    )


def main_cli(argv: list[str] | None = None) -> DemoResult:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.demo", description="Reconstruct a rendered synthetic scene and report accuracy."
    )
    parser.add_argument("--outputs", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--matcher",
        choices=MATCHER_CHOICES,
        default="auto",
        help="auto: LoFTR with official weights when available, else loftr-compact (announced)",
    )
    parser.add_argument("--weights", help=WEIGHTS_HELP)
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    return main(args.outputs, args.matcher, args.weights, args.views, args.width, args.height, args.seed, args.device)


if __name__ == "__main__":
    run_cli(main_cli)
