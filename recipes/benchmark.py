"""Speed and memory of this project's LoFTR against ``kornia.feature.LoFTR``, same inputs, same weights, one run.

    python -m recipes.benchmark [--quick] [--json OUT.json] [--data-root ../shared/data] [--no-large]

Both models get one seeded random state dict (kornia's initialisation with random BatchNorm statistics; no
download needed) and a low coarse threshold so that random weights still produce matches. Sections:

1. **Single pair** at each size (default 640x480 and 1024x768): a cold pair (nothing cached) per model, runs
   interleaved kornia / ours / kornia / ours ... so that load from other processes hits both alike; the median
   of the runs, plus process CPU time. Both results are checked to be the same matches (same set of image-0
   cells, keypoints within 1e-3 px).
2. **Peak RSS** of one cold pair, each model in its own fresh subprocess (``ru_maxrss``), also at 1600x1200; run
   after the timing sections (``--rss-in-background`` overlaps them, faster but the timings then run under load).
3. **Dense job**: 10 images, exhaustive (45 pairs), :func:`pipeline.match_dense.run` (per-image backbone reuse,
   quantization and HDF5 output included) against a loop calling kornia per pair (matching only); our raw
   per-pair matches are checked against kornia's (in the matched, resized image's pixels). Run as ours / kornia /
   ours; ours is their mean.
4. **Techniques**: the measured effect of each optimisation, toggled alone (interleaved, median).
5. **ONNX** (``--onnx``, not run by default): torch (the default matcher, a cold pair) against onnxruntime running
   the file of ``python -m matchers.loftr.export_onnx``, per pair at 640x480, interleaved in one process, for the
   shipped loftr-compact weights, the shipped coarse-only loftr-student and outdoor_ds-shaped random weights
   (``--onnx-models`` picks some); same-match check, pairs/s, export time, model sizes (parameters, checkpoint and
   .onnx bytes) and the peak RSS of one cold pair per backend in a fresh subprocess.

Prints a table (with the targets of issue 6) and writes everything as JSON (atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from core import io
from core.cli import add_config_arguments, config_from_args, config_from_options
from core.errors import UserError, run_cli
from core.resources import available_memory_mb, peak_rss_mb
from matchers.loftr import LoFTR, LoFTRConfig
from matchers.loftr.optimize import InferenceOptions, optimize_for_inference
from recipes.scale import ScaleConfig, format_scale, run_scale

Size = tuple[int, int]  # (W, H)
KEYPOINT_TOL = 1.0e-3  # px
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure. Sizes are (W, H)."""

    sizes: tuple[Size, ...] = ((640, 480), (1024, 768))
    runs: int = 3  # timed runs per model and size (median reported)
    threads: int = 2  # torch CPU threads
    seed: int = 3  # seeds the random weights both models get
    threshold: float = 0.0  # coarse threshold: low, so random weights give matches (mutual NN off the border)
    rss_sizes: tuple[Size, ...] = ((640, 480), (1024, 768), (1600, 1200))
    dense_images: int = 10
    dense_resize: int = 320  # longer side for the dense job (320x240 for the 640x480 temple images)
    technique_size: Size = (320, 240)  # one pair toggling each optimisation (kept small: the CPU is shared)
    technique_runs: int = 3
    compile_size: Size | None = (320, 240)  # torch.compile trial (None: skip)
    data_root: Path = DEFAULT_DATA  # folder with scannet_sample/, temple_ring/ (synthetic images without)

    @staticmethod
    def quick(data_root: Path = DEFAULT_DATA) -> "BenchmarkConfig":
        """A smoke-test configuration that runs in well under two minutes."""
        return BenchmarkConfig(
            sizes=((320, 240),),
            runs=3,
            rss_sizes=((320, 240),),
            dense_images=4,
            dense_resize=160,
            technique_size=(320, 240),
            technique_runs=2,
            compile_size=None,
            data_root=data_root,
        )


#: the fields :meth:`BenchmarkConfig.quick` sets (so they are not command-line options, which would override it)
QUICK_FIELDS = (
    "sizes",
    "rss_sizes",
    "dense_images",
    "dense_resize",
    "technique_size",
    "technique_runs",
    "compile_size",
)


# ------------------------------------------------------------------------------------------------- models
def random_state_dict(seed: int, threshold: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """kornia's seeded random initialisation, with random BatchNorm statistics (so BN folding is exercised)."""
    from kornia.feature.loftr import loftr as kornia_loftr

    cfg = copy.deepcopy(kornia_loftr.default_cfg)
    cfg["match_coarse"]["thr"] = threshold
    torch.manual_seed(seed)
    model = kornia_loftr.LoFTR(pretrained=None, config=cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("running_mean"):
            value = 0.05 * torch.randn(value.shape, generator=gen)
        elif key.endswith("running_var"):
            value = 0.8 + 0.4 * torch.rand(value.shape, generator=gen)
        state[key] = value.clone()
    return state, cfg


def build_kornia(seed: int, threshold: float) -> torch.nn.Module:
    from kornia.feature.loftr import loftr as kornia_loftr

    state, cfg = random_state_dict(seed, threshold)
    model = kornia_loftr.LoFTR(pretrained=None, config=cfg)
    model.load_state_dict(state)
    return model.eval()


def build_ours(seed: int, threshold: float, options: InferenceOptions | None = None) -> LoFTR:
    """This project's model with the same weights, optimised for inference (default options)."""
    state, _ = random_state_dict(seed, threshold)
    model = LoFTR(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": threshold}))
    model.load_state_dict(state)
    return optimize_for_inference(model.eval(), options)


def run_kornia(model: torch.nn.Module, image0: torch.Tensor, image1: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model({"image0": image0, "image1": image1})


def run_ours(model: LoFTR, image0: torch.Tensor, image1: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model.match(image0, image1)


# ------------------------------------------------------------------------------------------------- images
def _synthetic(seed: int, size: Size) -> np.ndarray:
    """Fallback texture when the shared data is absent (blobs on smooth noise)."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = cv2.resize(rng.random((height // 16 + 1, width // 16 + 1)).astype(np.float32), (width, height))
    for _ in range(80):
        cv2.circle(
            image,
            (int(rng.integers(0, width)), int(rng.integers(0, height))),
            int(rng.integers(3, 30)),
            float(rng.random()),
            -1,
        )
    return cv2.GaussianBlur(image, (0, 0), 1.0)


def pair_images(data_root: Path, size: Size) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ScanNet sample pair (or two temple views, or synthetic images) resized to ``size``."""
    from core.image_io import read_gray

    scannet = data_root / "scannet_sample"
    if (scannet / "pairs_with_gt.txt").is_file():
        name0, name1 = (scannet / "pairs_with_gt.txt").read_text().split()[:2]
        images = [read_gray(scannet / "images" / name) for name in (name0, name1)]
        source = f"scannet_sample {name0} {name1}"
    else:
        images = [_synthetic(1, size), _synthetic(1, size)]
        images[1] = np.roll(images[1], (5, 9), axis=(0, 1))
        source = "synthetic"
    out = []
    for image in images:
        interpolation = cv2.INTER_AREA if image.shape[1] > size[0] else cv2.INTER_LINEAR
        out.append(np.ascontiguousarray(cv2.resize(image, size, interpolation=interpolation), np.float32))
    return out[0], out[1], source


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image)[None, None]


# ------------------------------------------------------------------------------------------------- checks
def compare_matches(
    reference: dict[str, torch.Tensor] | dict[str, np.ndarray], ours: dict[str, torch.Tensor] | dict[str, np.ndarray]
) -> dict[str, Any]:
    """Same match set (keyed by image-0 keypoint) and the largest keypoint difference (px)."""

    def keyed(out: Any) -> dict[tuple[int, int], int]:
        kpts0 = np.asarray(out["keypoints0"], dtype=np.float64)
        return {(int(round(x * 4)), int(round(y * 4))): n for n, (x, y) in enumerate(kpts0)}

    ref_keys, our_keys = keyed(reference), keyed(ours)
    common = sorted(set(ref_keys) & set(our_keys))
    diff = 0.0
    if common:
        ia = [ref_keys[k] for k in common]
        ib = [our_keys[k] for k in common]
        for name in ("keypoints0", "keypoints1"):
            a = np.asarray(reference[name], dtype=np.float64)[ia]
            b = np.asarray(ours[name], dtype=np.float64)[ib]
            diff = max(diff, float(np.abs(a - b).max()))
    same = set(ref_keys) == set(our_keys) and diff <= KEYPOINT_TOL
    return {
        "same": same,
        "matches_kornia": len(ref_keys),
        "matches_ours": len(our_keys),
        "only_kornia": len(set(ref_keys) - set(our_keys)),
        "only_ours": len(set(our_keys) - set(ref_keys)),
        "max_keypoint_diff_px": diff,
    }


# ------------------------------------------------------------------------------------------------- timing
def interleaved(
    functions: dict[str, Callable[[], Any]], runs: int, warmup: bool = True, first_outputs: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the functions in turn (A B A B ...), ``runs`` times each; wall and CPU seconds per run.

    ``first_outputs``, if given, receives each function's output of its first timed run.
    """
    if warmup:
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    for run in range(runs):
        for name, function in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            output = function()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if run == 0 and first_outputs is not None:
                first_outputs[name] = output
    return {
        name: {
            "median_s": statistics.median(times[name]),
            "runs_s": times[name],
            "cpu_median_s": statistics.median(cpu[name]),
        }
        for name in functions
    }


def single_pair(config: BenchmarkConfig, kornia_model: torch.nn.Module, ours: LoFTR, size: Size) -> dict[str, Any]:
    image0, image1, source = pair_images(config.data_root, size)
    t0, t1 = as_tensor(image0), as_tensor(image1)
    outputs: dict[str, Any] = {}
    # no warm-up run: the first run of each model pays one-off costs alike; the median drops it
    timing = interleaved(
        {"kornia": lambda: run_kornia(kornia_model, t0, t1), "ours": lambda: run_ours(ours, t0, t1)},
        config.runs,
        warmup=False,
        first_outputs=outputs,
    )
    check = compare_matches(outputs["kornia"], outputs["ours"])
    return {
        "size": list(size),
        "images": source,
        "check": check,
        "kornia": timing["kornia"],
        "ours": timing["ours"],
        "ratio": timing["ours"]["median_s"] / timing["kornia"]["median_s"],
    }


# ------------------------------------------------------------------------------------------------- memory
def expected_kornia_mb(size: Size) -> float:
    """Rough peak of kornia's coarse matching: four float32 L x S matrices (sim, two softmaxes, product)."""
    cells = (size[0] // 8) * (size[1] // 8)
    return 4 * 4 * cells * cells / 2**20 + 1500


def peak_rss_all(config: BenchmarkConfig, sizes: Sequence[Size], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Peak RSS of ours and kornia at every size, one fresh subprocess each, one after the other."""
    results = []
    for size in sizes:
        item: dict[str, Any] = {"size": list(size), "ours": peak_rss_child("ours", size, config)}
        available = available_memory_mb()
        need = expected_kornia_mb(size)
        if available is not None and available < need * 1.05:
            item["kornia"] = {
                "ok": False,
                "error": f"skipped: kornia needs about {need:.0f} MB at this size, {available:.0f} MB available",
            }
        else:
            item["kornia"] = peak_rss_child("kornia", size, config)
        log(
            f"peak RSS {size[0]}x{size[1]}: ours {item['ours'].get('peak_rss_mb', float('nan')):.0f} MB, "
            f"kornia {item['kornia'].get('peak_rss_mb', float('nan')):.0f} MB"
        )
        results.append(item)
    return results


def peak_rss_child(impl: str, size: Size, config: BenchmarkConfig) -> dict[str, Any]:
    """Run one cold pair of ``impl`` at ``size`` in a fresh interpreter; its peak RSS and time."""
    args = _child_command(config, size, "--rss-child", impl)
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(ok=True, seconds=seconds)
    return result


def _rss_child_main(impl: str, size: Size, threads: int, seed: int, threshold: float, data_root: Path) -> None:
    torch.set_num_threads(threads)
    image0, image1, _ = pair_images(data_root, size)
    t0, t1 = as_tensor(image0), as_tensor(image1)
    model = build_kornia(seed, threshold) if impl == "kornia" else build_ours(seed, threshold)
    before = peak_rss_mb()
    start = time.perf_counter()
    out = run_kornia(model, t0, t1) if impl == "kornia" else run_ours(model, t0, t1)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "impl": impl,
                "size": list(size),
                "peak_rss_mb": peak_rss_mb(),
                "rss_before_match_mb": before,
                "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "match_seconds": seconds,
                "matches": int(out["keypoints0"].shape[0]),
            }
        )
    )


# ------------------------------------------------------------------------------------------------- dense
def dense_images(config: BenchmarkConfig, workdir: Path) -> tuple[Path, list[str]]:
    """The first ``dense_images`` temple_ring views, or as many shifted synthetic images written to ``workdir``."""
    image_dir = config.data_root / "temple_ring" / "images"
    if image_dir.is_dir():
        return image_dir, sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() == ".png")[
            : config.dense_images
        ]
    image_dir = workdir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(config.dense_images):
        names.append(f"synthetic{k:02d}.png")
        image = np.roll(_synthetic(1, (640, 480)), (3 * k, 5 * k), axis=(0, 1))
        cv2.imwrite(str(image_dir / names[-1]), (image / image.max() * 255).astype(np.uint8))
    return image_dir, names


def dense_job(config: BenchmarkConfig, kornia_model: torch.nn.Module, workdir: Path) -> dict[str, Any]:
    """10 images, exhaustive pairs: match_dense with this project's matcher vs kornia called per pair."""
    from core.image_io import read_gray
    from matchers.base import resize_image
    from matchers.loftr import LoFTRMatcher
    from pipeline.match_dense import DenseMatchConfig, RawMatchStore, describe_matching, run

    image_dir, names = dense_images(config, workdir)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    pairs_path = workdir / "pairs.txt"
    io.write_pairs(pairs_path, pairs)

    # the matcher wraps an unoptimised model: LoFTRMatcher builds its own inference copy
    state, _ = random_state_dict(config.seed, config.threshold)
    base = LoFTR(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": config.threshold}))
    base.load_state_dict(state)
    matcher = LoFTRMatcher(base.eval(), resize=config.dense_resize, device="cpu", optimize=True)
    dense_config = DenseMatchConfig(num_workers=1)

    def ours(tag: str) -> tuple[float, Any]:
        out = workdir / tag
        start = time.perf_counter()
        result = run(pairs_path, image_dir, out / "features.h5", out / "matches.h5", matcher, dense_config)
        return time.perf_counter() - start, result

    def kornia_loop() -> tuple[float, dict[tuple[str, str], dict[str, np.ndarray]]]:
        results = {}
        start = time.perf_counter()
        for a, b in pairs:
            r0 = resize_image(read_gray(image_dir / a), config.dense_resize, multiple=8)
            r1 = resize_image(read_gray(image_dir / b), config.dense_resize, multiple=8)
            out = run_kornia(kornia_model, as_tensor(r0.image), as_tensor(r1.image))
            results[(a, b)] = {"keypoints0": out["keypoints0"].numpy(), "keypoints1": out["keypoints1"].numpy()}
        return time.perf_counter() - start, results

    def to_resized(points: np.ndarray, name: str) -> np.ndarray:
        """Our raw matches (original pixels) back into the matched (resized) image, where kornia's live."""
        resized = resize_image(read_gray(image_dir / name), config.dense_resize, multiple=8)
        return (points + 0.5) / np.asarray(resized.scale, np.float64) - 0.5

    seconds_a, result = ours("ours_a")
    seconds_kornia, kornia_results = kornia_loop()
    seconds_b, _ = ours("ours_b")
    # our raw (pre-quantization) matches of every pair, as match_dense stored them
    store = RawMatchStore(workdir / "ours_a" / "matches.h5", describe_matching(matcher, dense_config), image_dir)
    checks = []
    for pair in pairs:
        raw = store.load(pair, False)
        if raw is None:
            raise RuntimeError(
                f"raw matches of {pair} not found in {store.root}: pipeline.match_dense changed its store"
            )
        ours_resized = {
            "keypoints0": to_resized(raw.keypoints0, pair[0]),
            "keypoints1": to_resized(raw.keypoints1, pair[1]),
        }
        checks.append(compare_matches(kornia_results[pair], ours_resized))
    seconds_ours = (seconds_a + seconds_b) / 2
    size = resize_image(read_gray(image_dir / names[0]), config.dense_resize, multiple=8).image.shape
    return {
        "images": len(names),
        "pairs": len(pairs),
        "size": [int(size[1]), int(size[0])],
        "source": str(image_dir),
        "ours_seconds": seconds_ours,
        "ours_runs_s": [seconds_a, seconds_b],
        "ours_matching_seconds": result.seconds_matching,
        "ours_prepare_calls": result.prepare_calls,
        "kornia_seconds": seconds_kornia,
        "kornia_backbone_passes": 2 * len(pairs),
        "speedup": seconds_kornia / seconds_ours,
        "pairs_same": sum(c["same"] for c in checks),
        "max_keypoint_diff_px": max(c["max_keypoint_diff_px"] for c in checks),
        "matches_total": sum(c["matches_kornia"] for c in checks),
    }


# ------------------------------------------------------------------------------------------------- techniques
def techniques(config: BenchmarkConfig, ours_plain: LoFTR) -> dict[str, Any]:
    """Each optimisation toggled alone on one pair of ``technique_size`` (interleaved runs, medians)."""
    image0, image1, _ = pair_images(config.data_root, config.technique_size)
    t0, t1 = as_tensor(image0), as_tensor(image1)
    runs = config.technique_runs
    results: dict[str, Any] = {"size": list(config.technique_size)}
    torch_only = InferenceOptions(onnxruntime=False)
    variants = {
        "nchw": optimize_for_inference(ours_plain, replace(torch_only, channels_last=False)),
        "channels_last": optimize_for_inference(ours_plain, torch_only),
        "channels_last+bn_folded": optimize_for_inference(ours_plain, replace(torch_only, fold_bn=True)),
        "onnxruntime (default)": optimize_for_inference(ours_plain),
    }
    with torch.inference_mode():
        backbone = interleaved({name: (lambda m=m: m.backbone(t0)) for name, m in variants.items()}, runs)
        results["backbone_one_image"] = backbone
        best = variants["channels_last+bn_folded"]
        results["fine_map"] = interleaved(
            {
                "whole_map (encode)": lambda: best.match_encoded(best.encode(t0), best.encode(t1)),
                "matched_windows_only (encode_lazy)": lambda: best.match_encoded(
                    best.encode_lazy(t0), best.encode_lazy(t1)
                ),
            },
            runs,
        )
        e0, e1 = best.encode(t0), best.encode(t1)
        unfused = optimize_for_inference(ours_plain, replace(torch_only, fuse_transformer=False))
        default = variants["onnxruntime (default)"]
        results["coarse_transformer"] = interleaved(
            {
                "plain": lambda: unfused.transform_coarse(e0, e1),
                "fused": lambda: best.transform_coarse(e0, e1),
                "onnxruntime (default)": lambda: default.transform_coarse(e0, e1),
            },
            runs,
        )
        results["coarse_matching"] = _coarse_matching_variants(best, e0, e1, config.threshold, runs)
        # batching pairs of equal size through the transformer + matching
        pairs = [(e0, e1)] * 4
        results["batching_4_pairs"] = interleaved(
            {
                "one by one": lambda: [best.match_encoded(x, y) for x, y in pairs],
                "one batch (match_batch)": lambda: best.match_batch(pairs),
            },
            runs,
        )
        results["autocast_bf16"] = _autocast_bf16(ours_plain, t0, t1, runs)
    if config.compile_size is not None:
        results["torch_compile"] = compile_trial_child(config)
    return results


def _coarse_matching_variants(model: LoFTR, e0: Any, e1: Any, threshold: float, runs: int) -> dict[str, Any]:
    """The coarse matching of one pair: plain (whole confidence matrix), and blocked with the similarity
    stored or recomputed per block (chunked mutual nearest neighbours); the last two must give the same matches."""
    from matchers.loftr.coarse_matching import select_matches

    tokens0, tokens1, _, _ = model.transform_coarse(e0, e1)
    cm = model.coarse_matching
    shape0, shape1 = e0.coarse_shape, e1.coarse_shape

    def plain() -> Any:
        return select_matches(cm.confidence(tokens0, tokens1), shape0, shape1, threshold, cm.config.border_rm)

    def blocked(budget: int | None) -> Callable[[], Any]:
        def run() -> Any:
            cm.max_matrix_bytes = budget
            try:
                return cm(tokens0, tokens1, shape0, shape1, threshold=threshold)
            finally:
                cm.max_matrix_bytes = None

        return run

    result = interleaved(
        {
            "confidence matrix + select (plain)": plain,
            "blocked, similarity stored": blocked(1 << 40),
            "blocked, similarity recomputed (chunked MNN)": blocked(0),
        },
        runs,
    )
    a, b = plain(), blocked(0)()
    result["same_matches"] = bool(torch.equal(a.i_ids, b.i_ids) and torch.equal(a.j_ids, b.j_ids))
    return result


def _autocast_bf16(ours_plain: LoFTR, t0: torch.Tensor, t1: torch.Tensor, runs: int) -> dict[str, Any]:
    """float32 against bf16 autocast (opt-in, --amp bf16: AMX / AVX-512-BF16 CPUs and GPUs). Not the same matches,
    so the targets are measured in float32 (random weights make its match differences look larger than they are)."""
    default = optimize_for_inference(ours_plain)

    def bf16() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_ours(default, t0, t1)

    outputs: dict[str, Any] = {}
    result = interleaved({"float32": lambda: run_ours(default, t0, t1), "bf16": bf16}, runs, first_outputs=outputs)
    result["check"] = compare_matches(outputs["float32"], outputs["bf16"])
    return result


def compile_trial_child(config: BenchmarkConfig, timeout: float = 420.0) -> dict[str, Any]:
    """:func:`compile_trial` in a subprocess, so a slow or failing compiler cannot stall the benchmark."""
    size = config.compile_size
    args = _child_command(config, size, "--compile-child", "--runs", str(config.technique_runs))
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1]
        )
    except subprocess.TimeoutExpired:
        return {"size": list(size), "error": f"compilation + runs did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"size": list(size), "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_trial(config: BenchmarkConfig, model: LoFTR) -> dict[str, Any]:
    """torch.compile (inductor) on the backbone and on the coarse transformer at ``compile_size``: compile time
    (first call) and steady-state time against eager. The transformer is what a dense job pays per pair."""
    image0, image1, _ = pair_images(config.data_root, config.compile_size)
    t0, t1 = as_tensor(image0), as_tensor(image1)
    out: dict[str, Any] = {"size": list(config.compile_size)}
    try:
        with torch.inference_mode():
            e0, e1 = model.encode(t0), model.encode(t1)
            tokens = [e.coarse.flatten(2).transpose(1, 2).contiguous() for e in (e0, e1)]
            parts = {
                "backbone": (model.backbone, (t0,)),
                "coarse_transformer": (model.loftr_coarse, (tokens[0], tokens[1], None, None)),
            }
            for name, (module, inputs) in parts.items():
                compiled = torch.compile(module, dynamic=False)
                start = time.perf_counter()
                compiled(*inputs)
                first = time.perf_counter() - start
                timing = interleaved(
                    {
                        "eager": lambda: module(*inputs),
                        "compiled": lambda: compiled(*inputs),
                    },
                    config.technique_runs,
                )
                diff = max((a - b).abs().max().item() for a, b in zip(module(*inputs), compiled(*inputs)))
                out[name] = {"first_call_s": first, **timing, "max_abs_diff": diff}
    except Exception as error:  # a missing compiler is a result too
        out["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return out


# ------------------------------------------------------------------------------------------------- report
# ------------------------------------------------------------------------------------------------- onnx
ONNX_SIZE: Size = (640, 480)
#: issue 17: the default matcher's cold 640x480 pair against kornia's, with the same matches
DEFAULT_RATIO_TARGET = 0.45
ONNX_MODELS = ("loftr-compact", "loftr-student", "outdoor_ds-random")
#: the coarse-only student's speed target (issue 17, part 3): onnxruntime pairs/s at 640x480 on a 2-core CPU
STUDENT_PAIRS_PER_S = 10.0


def _onnx_torch_model(name: str, config: BenchmarkConfig) -> LoFTR:
    """The plain torch model of an ONNX row: shipped weights (compact, student), or seeded random outdoor_ds ones."""
    if name in ("loftr-compact", "loftr-student"):
        from matchers.loftr import load_pretrained

        return load_pretrained(name, "cpu")
    state, _ = random_state_dict(config.seed, config.threshold)
    model = LoFTR(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": config.threshold}))
    model.load_state_dict(state)
    return model.eval()


def _matches_dict(matches: Any) -> dict[str, np.ndarray]:
    return {"keypoints0": matches.keypoints0, "keypoints1": matches.keypoints1}


def onnx_rows(
    config: BenchmarkConfig, workdir: Path, log: Callable[[str], None], models: Sequence[str] = ONNX_MODELS
) -> dict[str, Any]:
    """Torch vs onnxruntime, one cold 640x480 pair, interleaved; sizes and peak RSS per model."""
    import onnxruntime

    from matchers.loftr import LoFTRMatcher
    from matchers.loftr.export_onnx import export
    from matchers.loftr.onnx_backend import OnnxLoFTRMatcher
    from matchers.loftr.weights import save_checkpoint

    image0, image1, source = pair_images(config.data_root, ONNX_SIZE)
    result: dict[str, Any] = {
        "size": list(ONNX_SIZE),
        "images": source,
        "onnxruntime": onnxruntime.__version__,
        "threads": config.threads,
        "rows": [],
    }
    for name in models:
        model = _onnx_torch_model(name, config)
        onnx_path, ckpt_path = workdir / f"{name}.onnx", workdir / f"{name}.ckpt"
        start = time.perf_counter()
        export(model, onnx_path, weights_label=name)
        export_s = time.perf_counter() - start
        save_checkpoint(model, ckpt_path)
        torch_matcher = LoFTRMatcher(model, resize=None, device="cpu")
        torch_only = LoFTRMatcher(model, resize=None, device="cpu", optimize=InferenceOptions(onnxruntime=False))
        onnx_matcher = OnnxLoFTRMatcher(onnx_path, resize=None, device="cpu", threads=config.threads)
        outputs: dict[str, Any] = {}
        timing = interleaved(
            {
                "torch": lambda: torch_matcher.match(image0, image1),
                "torch_only": lambda: torch_only.match(image0, image1),
                "onnxruntime": lambda: onnx_matcher.match(image0, image1),
            },
            config.runs,
            warmup=False,
            first_outputs=outputs,
        )
        check = compare_matches(_matches_dict(outputs["torch"]), _matches_dict(outputs["onnxruntime"]))
        row = {
            "model": name,
            "threshold": model.config.matching.thr,
            "export_s": export_s,
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_mb": ckpt_path.stat().st_size / 2**20,
            "onnx_mb": onnx_path.stat().st_size / 2**20,
            "torch": timing["torch"],
            "torch_only": timing["torch_only"],
            "onnxruntime": timing["onnxruntime"],
            "ratio": timing["onnxruntime"]["median_s"] / timing["torch"]["median_s"],
            "ratio_torch_only": timing["onnxruntime"]["median_s"] / timing["torch_only"]["median_s"],
            "pairs_per_s": {
                "torch": 1.0 / timing["torch"]["median_s"],
                "onnxruntime": 1.0 / timing["onnxruntime"]["median_s"],
            },
            "check": check,
        }
        row["check_torch_only"] = compare_matches(
            _matches_dict(outputs["torch_only"]), _matches_dict(outputs["onnxruntime"])
        )
        del torch_matcher, torch_only, onnx_matcher
        row["peak_rss"] = {
            backend: onnx_rss_child(backend, name, onnx_path, config) for backend in ("torch", "onnxruntime")
        }
        log(
            f"  {name}: torch {row['torch']['median_s']:.3f} s (torch alone {row['torch_only']['median_s']:.3f} s), "
            f"onnxruntime {row['onnxruntime']['median_s']:.3f} s, ratio {row['ratio']:.2f} "
            f"({row['ratio_torch_only']:.2f} against torch alone), same matches: {check['same']} ({check['matches_kornia']}, max dkp "
            f"{check['max_keypoint_diff_px']:.1e} px)"
        )
        result["rows"].append(row)
    return result


def onnx_rss_child(backend: str, name: str, onnx_path: Path, config: BenchmarkConfig) -> dict[str, Any]:
    """One cold 640x480 pair of ``backend`` for model ``name`` in a fresh interpreter: its peak RSS and time."""
    args = [
        sys.executable,
        "-m",
        "recipes.benchmark",
        "--onnx-child",
        backend,
        "--onnx-model",
        name,
        "--onnx-file",
        str(onnx_path),
        "--threads",
        str(config.threads),
        "--seed",
        str(config.seed),
        "--threshold",
        str(config.threshold),
        "--data-root",
        str(config.data_root),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _onnx_child_main(backend: str, name: str, onnx_path: Path, config: BenchmarkConfig) -> None:
    torch.set_num_threads(config.threads)
    image0, image1, _ = pair_images(config.data_root, ONNX_SIZE)
    if backend == "torch":
        from matchers.loftr import LoFTRMatcher

        matcher: Any = LoFTRMatcher(_onnx_torch_model(name, config), resize=None, device="cpu")
    else:
        from matchers.loftr.onnx_backend import OnnxLoFTRMatcher

        matcher = OnnxLoFTRMatcher(onnx_path, resize=None, device="cpu", threads=config.threads)
    before = peak_rss_mb()
    start = time.perf_counter()
    matches = matcher.match(image0, image1)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "backend": backend,
                "model": name,
                "peak_rss_mb": peak_rss_mb(),
                "rss_before_match_mb": before,
                "match_seconds": seconds,
                "matches": len(matches),
            }
        )
    )


def variant_of(model: LoFTR) -> dict[str, Any]:
    """Which inference techniques ``model`` (an inference copy) runs, and a short label for the tables."""
    from matchers.loftr.ort_stages import OrtCoarsePass, OrtTransformer

    options = getattr(model, "inference_options", None)
    in_ort = [
        name
        for name, used in (
            ("backbone coarse pass + fine map", isinstance(vars(model.backbone).get("forward_coarse"), OrtCoarsePass)),
            ("coarse transformer", isinstance(model.loftr_coarse, OrtTransformer)),
        )
        if used
    ]
    label = "torch" + (f" + onnxruntime for the {' and the '.join(in_ort)}" if in_ort else " only")
    return {"options": asdict(options) if options is not None else None, "onnxruntime_stages": in_ort, "label": label}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import kornia

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "kornia": kornia.__version__,
        "onnxruntime": _onnxruntime_version(),
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def _onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary, targets included."""
    m = report["machine"]
    lines = [
        f"LoFTR benchmark: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, kornia {m['kornia']}, "
        f"{report['config']['threads']} threads, load average at start {m['load_average'][0]:.1f}",
        "Runs of ours and kornia are interleaved (A B A B ...) because the CPU is shared; compare ratios.",
        f"ours: {report.get('ours_variant', {}).get('label', '?')}",
        "",
        *_single_pair_lines(report["single_pair"]),
        "",
        *_peak_rss_lines(report["peak_rss"]),
    ]
    for key, section in (("dense", _dense_lines), ("techniques", _technique_lines), ("onnx", _onnx_lines)):
        if report.get(key):
            lines += ["", *section(report[key])]
    lines += ["", "targets (issue 6):"]
    for target in report["targets"]:
        verdict = "PASS" if target["pass"] else "FAIL" if target["pass"] is False else "n/a "
        lines.append(f"  [{verdict}] {target['name']}: {target['value']}")
    return "\n".join(lines)


def _single_pair_lines(items: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'single cold pair':<22}{'kornia s':>10}{'ours s':>9}{'ratio':>8}{'matches':>9}{'same':>6}{'max dkp px':>12}"
    ]
    for item in items:
        c = item["check"]
        lines.append(
            f"{item['size'][0]}x{item['size'][1]:<18}{item['kornia']['median_s']:>10.2f}"
            f"{item['ours']['median_s']:>9.2f}{item['ratio']:>8.2f}{c['matches_kornia']:>9}"
            f"{'yes' if c['same'] else 'NO':>6}{c['max_keypoint_diff_px']:>12.1e}"
        )
    return lines


def _peak_rss_lines(items: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'peak RSS (own process)':<24}{'kornia MB':>10}{'ours MB':>9}{'ratio':>8}{'kornia s':>10}{'ours s':>8}"]
    for item in items:
        k, o = item["kornia"], item["ours"]
        if k.get("ok") and o.get("ok"):
            lines.append(
                f"{item['size'][0]}x{item['size'][1]:<20}{k['peak_rss_mb']:>10.0f}{o['peak_rss_mb']:>9.0f}"
                f"{o['peak_rss_mb'] / k['peak_rss_mb']:>8.2f}{k['match_seconds']:>10.1f}{o['match_seconds']:>8.1f}"
            )
        else:
            lines.append(
                f"{item['size'][0]}x{item['size'][1]:<20} kornia: {k.get('error', 'ok')}; ours: {o.get('error', 'ok')}"
            )
    return lines


def _dense_lines(d: dict[str, Any]) -> list[str]:
    return [
        f"dense job: {d['images']} images, {d['pairs']} pairs at {d['size'][0]}x{d['size'][1]}: "
        f"kornia per pair {d['kornia_seconds']:.1f} s ({d['kornia_backbone_passes']} backbone passes), "
        f"match_dense {d['ours_seconds']:.1f} s ({d['ours_prepare_calls']} backbone passes, "
        f"quantization + HDF5 included) -> {d['speedup']:.1f}x; "
        f"{d['pairs_same']}/{d['pairs']} pairs same matches (max dkp {d['max_keypoint_diff_px']:.1e} px)"
    ]


TECHNIQUE_SECTIONS = (
    "backbone_one_image",
    "fine_map",
    "coarse_transformer",
    "coarse_matching",
    "batching_4_pairs",
    "autocast_bf16",
    "torch_compile",
)


def _technique_lines(t: dict[str, Any]) -> list[str]:
    lines = [f"techniques at {t['size'][0]}x{t['size'][1]} (median s, interleaved):"]
    for section in (name for name in TECHNIQUE_SECTIONS if name in t):
        entries = t[section]
        if section == "torch_compile" and "error" not in entries:
            for part in (part for part in ("backbone", "coarse_transformer") if part in entries):
                e = entries[part]
                lines.append(
                    f"  torch.compile {part}: eager {e['eager']['median_s']:.3f}; compiled "
                    f"{e['compiled']['median_s']:.3f} (first call incl. compile "
                    f"{e['first_call_s']:.1f} s; max diff {e['max_abs_diff']:.1e})"
                )
            continue
        if "error" in entries:
            lines.append(f"  {section}: {entries['error']}")
            continue
        parts = [
            f"{name} {value['median_s']:.3f}"
            for name, value in entries.items()
            if isinstance(value, dict) and "median_s" in value
        ]
        if isinstance(entries.get("check"), dict):
            check = entries["check"]
            parts.append(
                f"{check['matches_kornia'] - check['only_kornia']}/{check['matches_kornia']} matches kept (random weights)"
            )
        extra = f" (first call incl. compile {entries['first_call_s']:.1f} s)" if "first_call_s" in entries else ""
        lines.append(f"  {section}: " + "; ".join(parts) + extra)
    return lines


def _onnx_lines(o: dict[str, Any]) -> list[str]:
    lines = [
        f"ONNX: torch vs onnxruntime {o['onnxruntime']}, cold {o['size'][0]}x{o['size'][1]} pair "
        f"({o['threads']} threads, interleaved, median s; peak RSS of one pair in a fresh process)",
        "torch: the default matcher (two stages in onnxruntime); torch alone: InferenceOptions(onnxruntime=False); "
        "ratio: the .onnx file's time over each",
        f"{'model':<20}{'torch s':>9}{'alone s':>9}{'ort s':>8}{'ratio':>7}{'r alone':>8}{'pairs/s t':>10}"
        f"{'pairs/s o':>10}{'matches':>9}"
        f"{'same':>6}{'max dkp px':>12}"
        f"{'params':>11}{'ckpt MB':>9}{'onnx MB':>9}{'export s':>10}{'RSS torch':>11}{'RSS ort':>9}",
    ]
    for row in o["rows"]:
        c, rss = row["check"], row["peak_rss"]
        rss_text = [f"{rss[b]['peak_rss_mb']:.0f}" if rss[b].get("ok") else "fail" for b in ("torch", "onnxruntime")]
        lines.append(
            f"{row['model']:<20}{row['torch']['median_s']:>9.3f}{row['torch_only']['median_s']:>9.3f}"
            f"{row['onnxruntime']['median_s']:>8.3f}{row['ratio']:>7.2f}{row['ratio_torch_only']:>8.2f}"
            f"{1 / row['torch']['median_s']:>10.1f}{1 / row['onnxruntime']['median_s']:>10.1f}"
            f"{c['matches_kornia']:>9}{'yes' if c['same'] else 'NO':>6}"
            f"{c['max_keypoint_diff_px']:>12.1e}{row['parameters']:>11,}{row['checkpoint_mb']:>9.1f}"
            f"{row['onnx_mb']:>9.1f}{row['export_s']:>10.1f}{rss_text[0]:>11}{rss_text[1]:>9}"
        )
    return lines


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    by_size = {tuple(item["size"]): item for item in report["single_pair"]}
    item = by_size.get((640, 480))
    if item:
        targets.append(
            {
                "name": "cold 640x480 pair <= 0.5 x kornia, same matches",
                "value": f"{item['ratio']:.2f} x, same={item['check']['same']}",
                "pass": item["ratio"] <= 0.5 and item["check"]["same"],
            }
        )
        targets.append(
            {
                "name": f"default matcher's cold 640x480 pair <= {DEFAULT_RATIO_TARGET:g} x kornia, same matches "
                f"(issue 17; variant: {report.get('ours_variant', {}).get('label', '?')})",
                "value": f"{item['ratio']:.3f} x, same={item['check']['same']}",
                "pass": item["ratio"] <= DEFAULT_RATIO_TARGET and item["check"]["same"],
            }
        )
    d = report.get("dense")
    if d:
        targets.append(
            {
                "name": "10-image exhaustive dense job >= 5 x faster than kornia per pair",
                "value": f"{d['speedup']:.1f} x at {d['size'][0]}x{d['size'][1]}, "
                f"{d['pairs_same']}/{d['pairs']} pairs same",
                "pass": d["speedup"] >= 5 and d["pairs_same"] == d["pairs"],
            }
        )
    for item in report["peak_rss"]:
        if tuple(item["size"]) == (1600, 1200):
            k, o = item["kornia"], item["ours"]
            ok = k.get("ok") and o.get("ok")
            targets.append(
                {
                    "name": "1600x1200 pair peak RSS <= 0.5 x kornia",
                    "value": f"{o['peak_rss_mb']:.0f} MB vs {k['peak_rss_mb']:.0f} MB" if ok else "not measured",
                    "pass": (o["peak_rss_mb"] <= 0.5 * k["peak_rss_mb"]) if ok else None,
                }
            )
    for row in (report.get("onnx") or {}).get("rows", []):
        if row["model"] == "loftr-compact":
            targets.append(
                {
                    "name": "onnxruntime per pair <= torch's for loftr-compact (issue 17), same matches",
                    "value": f"{row['ratio_torch_only']:.2f} x torch alone ({row['ratio']:.2f} x the default "
                    f"matcher, which runs two stages in onnxruntime), same={row['check']['same']}",
                    "pass": row["ratio_torch_only"] <= 1.0 and row["check"]["same"],
                }
            )
        if row["model"] == "loftr-student":
            rate = 1.0 / row["onnxruntime"]["median_s"]
            targets.append(
                {
                    "name": f"loftr-student onnxruntime >= {STUDENT_PAIRS_PER_S:g} pairs/s at 640x480 (issue 17)",
                    "value": f"{rate:.1f} pairs/s ({(report.get('onnx') or {}).get('threads')} threads), "
                    f"same={row['check']['same']}",
                    "pass": rate >= STUDENT_PAIRS_PER_S and row["check"]["same"],
                }
            )
    return targets


def main(
    config: BenchmarkConfig = BenchmarkConfig(),
    json_path: Path | None = None,
    large: bool = True,
    sections: Sequence[str] = ("single", "rss", "dense", "techniques"),
    log: Callable[[str], None] = print,
    rss_in_background: bool = False,
    onnx_models: Sequence[str] = ONNX_MODELS,
) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to ``json_path`` if given)."""
    try:
        import kornia.feature  # noqa: F401
    except ImportError:
        raise UserError("kornia is not installed; `pip install kornia` to benchmark against it") from None
    torch.set_num_threads(config.threads)
    rss_sizes = tuple(s for s in config.rss_sizes if large or s[0] * s[1] < 1600 * 1200)
    report: dict[str, Any] = {
        "machine": machine(),
        "config": {**asdict(config), "data_root": str(config.data_root)},
        "single_pair": [],
        "peak_rss": [],
    }
    kornia_model = build_kornia(config.seed, config.threshold)
    state, _ = random_state_dict(config.seed, config.threshold)
    plain = LoFTR(LoFTRConfig.preset("outdoor_ds").replace(matching={"thr": config.threshold}))
    plain.load_state_dict(state)
    plain.eval()
    ours = optimize_for_inference(plain)
    report["ours_variant"] = variant_of(ours)
    rss_thread = None
    if "rss" in sections and rss_in_background:
        # Optionally measured while the timing sections run (the peak RSS of a process does not depend on CPU
        # load, and the large kornia pair takes minutes), at the price of timings taken under that load.
        log(f"peak RSS at {', '.join(f'{w}x{h}' for w, h in rss_sizes)}: subprocesses in the background ...")
        rss_result: dict[str, Any] = {}
        rss_thread = threading.Thread(
            target=lambda: rss_result.update(items=peak_rss_all(config, rss_sizes, log)), daemon=True
        )
        rss_thread.start()
    if "single" in sections:
        for size in config.sizes:
            log(f"single pair {size[0]}x{size[1]} ...")
            item = single_pair(config, kornia_model, ours, size)
            log(
                f"  kornia {item['kornia']['median_s']:.2f} s, ours {item['ours']['median_s']:.2f} s, "
                f"ratio {item['ratio']:.2f}, same matches: {item['check']['same']} ({item['check']['matches_kornia']})"
            )
            report["single_pair"].append(item)
    if "dense" in sections:
        log("dense job ...")
        with tempfile.TemporaryDirectory(prefix="loftr_bench_") as tmp:
            report["dense"] = dense_job(config, kornia_model, Path(tmp))
        d = report["dense"]
        log(
            f"  kornia {d['kornia_seconds']:.1f} s, ours {d['ours_seconds']:.1f} s, {d['speedup']:.1f}x, "
            f"{d['pairs_same']}/{d['pairs']} pairs same"
        )
    if "techniques" in sections:
        log("techniques ...")
        report["techniques"] = techniques(config, plain)
        log(json.dumps(report["techniques"], default=str))
    if "onnx" in sections:
        log(f"onnx: torch vs onnxruntime at {ONNX_SIZE[0]}x{ONNX_SIZE[1]} ...")
        with tempfile.TemporaryDirectory(prefix="loftr_bench_onnx_") as tmp:
            report["onnx"] = onnx_rows(config, Path(tmp), log, onnx_models)
    if rss_thread is not None:
        log("waiting for the peak-RSS subprocesses ...")
        rss_thread.join()
        report["peak_rss"] = rss_result.get("items", [])
    elif "rss" in sections:
        log(f"peak RSS at {', '.join(f'{w}x{h}' for w, h in rss_sizes)}: one subprocess each, after the timings ...")
        report["peak_rss"] = peak_rss_all(config, rss_sizes, log)
    report["targets"] = evaluate_targets(report)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    if json_path is not None:
        with io.atomic_path(json_path) as temp:
            Path(temp).write_text(json.dumps(report, indent=2, default=str))
    log(format_table(report))
    return report


def _parse_size(text: str) -> Size:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return width, height


def _child_command(config: BenchmarkConfig, size: tuple[int, int], *extra: str) -> list[str]:
    """The command line of one measurement in a fresh process of this module (peak RSS, torch.compile)."""
    common = ["--size", f"{size[0]}x{size[1]}", "--threads", str(config.threads), "--seed", str(config.seed)]
    common += ["--threshold", str(config.threshold), "--data-root", str(config.data_root)]
    return [sys.executable, "-m", "recipes.benchmark", *extra, *common]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, < 2 minutes")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (atomically)")
    parser.add_argument("--no-large", action="store_true", help="skip the 1600x1200 peak-RSS pair (minutes for kornia)")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["single", "rss", "dense", "techniques"],
        choices=["single", "rss", "dense", "techniques", "onnx"],
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also compare torch with onnxruntime (section 'onnx'; alone: --sections onnx)",
    )
    parser.add_argument(
        "--onnx-models", nargs="+", default=list(ONNX_MODELS), choices=ONNX_MODELS, help="models of section 'onnx'"
    )
    # what --quick leaves alone (the sizes and counts it sets are not options)
    add_config_arguments(parser, BenchmarkConfig, exclude=QUICK_FIELDS)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile trial")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead: the cost curve of reconstructions of 50..400 rendered images (recipes.scale)",
    )
    parser.add_argument("--output", type=Path, default=None, help="--scale: write the curve here (JSON)")
    add_config_arguments(parser, ScaleConfig, prefix="scale_")
    parser.add_argument(
        "--rss-in-background",
        action="store_true",
        help="measure peak RSS while the timings run (faster, but the timings are taken under load)",
    )
    # internal: one peak-RSS measurement / the torch.compile trial in this (fresh) process
    parser.add_argument("--rss-child", choices=["ours", "kornia"], help=argparse.SUPPRESS)
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=_parse_size, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-child", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    parser.add_argument("--onnx-model", choices=ONNX_MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-file", type=Path, help=argparse.SUPPRESS)
    return parser


def main_cli(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scale:
        report = run_scale(config_from_options(parser, args, ScaleConfig), args.output)
        print(format_scale(report))
        return report
    if args.rss_child:
        _rss_child_main(args.rss_child, args.size, args.threads, args.seed, args.threshold, args.data_root)
        return None
    if args.onnx_child:
        _onnx_child_main(args.onnx_child, args.onnx_model, args.onnx_file, config_from_args(args, BenchmarkConfig))
        return None
    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    if args.compile_child:
        torch.set_num_threads(args.threads)
        config = BenchmarkConfig(compile_size=args.size, technique_runs=args.runs, data_root=args.data_root)
        torch_only = build_ours(args.seed, args.threshold, InferenceOptions(onnxruntime=False))  # what it compiles
        print(json.dumps(compile_trial(config, torch_only), default=str))
        return None
    preset = BenchmarkConfig.quick() if args.quick else BenchmarkConfig()
    config = config_from_args(args, BenchmarkConfig, base=preset)
    if args.no_compile:
        config = replace(config, compile_size=None)
    sections = list(args.sections) + (["onnx"] if args.onnx and "onnx" not in args.sections else [])
    return main(
        config,
        args.json,
        large=not args.no_large,
        sections=sections,
        rss_in_background=args.rss_in_background,
        onnx_models=args.onnx_models,
    )


if __name__ == "__main__":
    run_cli(main_cli)
