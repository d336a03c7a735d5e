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
import inspect
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from core.cli import add_config_arguments, config_from_options
from core.errors import UserError, run_cli
from core.files import check_output_dir, write_text_atomic
from matchers.factory import OFFLINE_WEIGHTS, WEIGHTS_HELP, unavailable_reason
from pipeline.match_dense import Device, MatcherSpec
from pipeline.pairs import PairsConfig
from pipeline.reconstruct import ReconstructConfig

DemoMatcher = Literal["auto", "loftr", "sift"]
MATCHER_CHOICES: tuple[str, ...] = get_args(DemoMatcher)
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


@dataclass(frozen=True)
class DemoConfig:
    """The demo's scene and matcher."""

    #: auto: LoFTR with official weights when available, else loftr-compact (announced)
    matcher: DemoMatcher = "auto"
    weights: str | None = None  # LoFTR weights (see --help of pipeline.reconstruct)
    views: int = 12  # rendered views
    width: int = 320  # image width (px)
    height: int = 240  # image height (px)
    seed: int = 0  # random seed of the scene
    device: Device = "auto"

    def __post_init__(self) -> None:
        if self.matcher not in MATCHER_CHOICES:
            raise UserError(f"unknown matcher {self.matcher!r}; choose one of {', '.join(MATCHER_CHOICES)}")

    def reconstruct_config(self, matcher: str, weights: str | None) -> ReconstructConfig:
        """The reconstruction of the scene with the chosen matcher: LoFTR runs as the main job does by default,
        in the loftr+sift ensemble, at the rendered size."""
        loftr = matcher == "loftr"
        spec = MatcherSpec(
            "loftr+sift" if loftr else matcher,
            weights=weights,
            device=self.device,
            resize=(max(self.width, self.height),) if loftr else None,
        )
        return ReconstructConfig(matcher=spec, pairs=PairsConfig("exhaustive"))


def main(outputs: Path = Path("outputs/demo"), config: DemoConfig = DemoConfig()) -> DemoResult:
    """Render ``config.views`` views, reconstruct them under ``outputs``, evaluate; returns the figures."""
    from datasets.synthetic import SceneConfig, render_scene, write_scene
    from pipeline import reconstruct
    from pipeline.evaluate_model import evaluate

    start = time.perf_counter()
    outputs = Path(outputs)
    check_output_dir(outputs, "--outputs")
    scene_dir = outputs / "scene"
    scene_config = SceneConfig(width=config.width, height=config.height, num_views=config.views, seed=config.seed)
    print(
        f"rendering a synthetic scene: {config.views} views of {config.width}x{config.height} "
        f"(seed {config.seed}) -> {scene_dir}"
    )
    previous = scene_dir / "scene.json"
    if previous.is_file() and json.loads(previous.read_text()) != json.loads(json.dumps(asdict(scene_config))):
        # Another scene under the same names: earlier matches must not be resumed.
        shutil.rmtree(outputs / "sfm_run", ignore_errors=True)
    scene = render_scene(scene_config)
    write_scene(scene, scene_dir)

    chosen, chosen_weights, message = choose_matcher(config.matcher, config.weights, config.device)
    print(message)
    result = reconstruct.main(
        scene_dir / "images", outputs / "sfm_run", config.reconstruct_config(chosen, chosen_weights)
    )
    accuracy = evaluate(result.reconstruction, scene.cameras())
    seconds = time.perf_counter() - start
    summary = result.summary
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.demo", description="Reconstruct a rendered synthetic scene and report accuracy."
    )
    parser.add_argument(
        "--outputs", type=Path, default=inspect.signature(main).parameters["outputs"].default, help="output folder"
    )
    add_config_arguments(parser, DemoConfig, helps={"weights": WEIGHTS_HELP})
    return parser


def main_cli(argv: list[str] | None = None) -> DemoResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    return main(args.outputs, config_from_options(parser, args, DemoConfig))


if __name__ == "__main__":
    run_cli(main_cli)
