"""`make demo` (python -m recipes.demo): offline, announces its matcher, reconstructs the synthetic scene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recipes.demo import choose_matcher

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_choose_matcher_falls_back_with_the_loaders_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_weights.ckpt"
    matcher, weights, message = choose_matcher("auto", str(missing), "cpu")
    assert matcher == "sift" and weights is None
    assert message.startswith("LoFTR weights unavailable offline (")
    assert "no_such_weights.ckpt" in message and message.endswith("this demo uses the weight-free SIFT matcher")
    assert choose_matcher("sift", None, "cpu")[0] == "sift"


def test_auto_uses_the_shipped_compact_weights_when_official_ones_are_offline(tmp_path, monkeypatch) -> None:
    # An unreachable proxy makes the official download fail the same way with or without internet.
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("LOFTR_WEIGHTS", raising=False)
    matcher, weights, message = choose_matcher("auto", None, "cpu")
    assert (matcher, weights) == ("loftr", "loftr-compact")
    assert message.startswith("official LoFTR weights unavailable offline") and "loftr-compact" in message


def test_demo_runs_offline(tmp_path: Path) -> None:
    """The fallback path end to end, as on a fresh offline clone (no weights reachable)."""
    env = {**os.environ, "LOFTR_WEIGHTS": str(tmp_path / "empty_weights_dir"), "TORCH_HOME": str(tmp_path / "torch")}
    (tmp_path / "empty_weights_dir").mkdir()
    start = time.perf_counter()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.demo",
            "--outputs",
            str(tmp_path / "demo"),
            "--weights",
            str(tmp_path / "empty_weights_dir" / "loftr_outdoor.ckpt"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "LoFTR weights unavailable offline" in out and "weight-free SIFT matcher" in out
    assert "matcher used: sift, weights: none (weight-free)" in out
    accuracy = json.loads((tmp_path / "demo" / "accuracy.json").read_text())
    assert accuracy["num_registered"] >= 11 and accuracy["median_rotation_error"] < 0.5
    assert (tmp_path / "demo" / "sfm_run" / "reconstruction.png").is_file()
    viewer = (tmp_path / "demo" / "sfm_run" / "reconstruction.html").read_text()
    assert f'data-cameras="{accuracy["num_registered"]}"' in viewer and "reconstruction.html" in out
    assert seconds < 120
