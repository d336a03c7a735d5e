"""python -m recipes.train_loftr: tiny runs, exact resume, CSV log, checkpoints that load, CLI errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from recipes.train_loftr import main, main_cli, parse_spec
from recipes.training.trainer import TrainConfig, lr_factor

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 96)  # (H, W): 8 x 12 coarse cells keeps a step well under a second


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two textured 'photos' (blurred noise plus shapes) so homographic pairs have something to match."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k in range(2):
        noise = cv2.GaussianBlur(rng.random((200, 260)).astype(np.float32), (0, 0), 2.0)
        image = (noise - noise.min()) / (noise.max() - noise.min()) * 255
        for _ in range(25):
            centre = (int(rng.integers(0, 260)), int(rng.integers(0, 200)))
            cv2.circle(image, centre, int(rng.integers(4, 20)), float(rng.integers(0, 255)), -1)
        cv2.imwrite(str(folder / f"p{k}.png"), image.astype(np.uint8))
    return folder


def _config(**changes) -> TrainConfig:
    base = dict(
        lr=1e-3, warmup_steps=2, max_steps=1000, validate_every=2, checkpoint_minutes=100.0, max_fine_matches=32, seed=3
    )
    base.update(changes)
    return TrainConfig(**base)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_run_reproduces_the_next_loss(photos: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = [f"homography:{photos}", "synthetic:1"]
    straight = main(
        "compact",
        data,
        tmp_path / "a.ckpt",
        steps=3,
        size=SIZE,
        config=_config(),
        device="cpu",
        val_pairs=2,
        progress=False,
    )
    assert straight.end_step == 3
    main(
        "compact",
        data,
        tmp_path / "b.ckpt",
        steps=2,
        size=SIZE,
        config=_config(),
        device="cpu",
        val_pairs=2,
        progress=False,
    )
    resumed = main(
        "compact",
        data,
        tmp_path / "b.ckpt",
        steps=1,
        size=SIZE,
        config=_config(),
        device="cpu",
        val_pairs=2,
        progress=False,
    )
    assert (resumed.start_step, resumed.end_step) == (2, 3)
    a, b = _rows(tmp_path / "a.csv"), _rows(tmp_path / "b.csv")
    assert [r["step"] for r in b] == ["1", "2", "3"]
    assert a[2]["loss"] == b[2]["loss"] and a[2]["loss_c"] == b[2]["loss_c"]
    assert a[1]["val_precision"] != "" and a[0]["val_precision"] == ""  # validated every 2 steps
    sa = torch.load(tmp_path / "a.ckpt", weights_only=True)
    sb = torch.load(tmp_path / "b.ckpt", weights_only=True)
    for key, value in sa["state_dict"].items():
        assert torch.equal(value, sb["state_dict"][key]), key
    assert sa["step"] == sb["step"] == 3


def test_losses_decrease_on_a_small_problem(photos: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    main(
        "compact",
        [f"homography:{photos}"],
        tmp_path / "c.ckpt",
        steps=40,
        size=SIZE,
        config=_config(validate_every=0, lr=2e-3, warmup_steps=5),
        device="cpu",
        val_pairs=1,
        progress=False,
    )
    losses = [float(r["loss_c"]) for r in _rows(tmp_path / "c.csv")]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_checkpoint_loads_as_weights_and_exports(photos: Path, tmp_path: Path) -> None:
    from matchers.factory import make_matcher
    from matchers.loftr import load_pretrained

    torch.set_num_threads(1)
    out = tmp_path / "d.ckpt"
    main(
        "compact",
        [f"homography:{photos}"],
        out,
        steps=1,
        size=SIZE,
        config=_config(),
        device="cpu",
        val_pairs=1,
        export=tmp_path / "d_weights.ckpt",
        progress=False,
    )
    model = load_pretrained(out, "cpu")
    assert model.config.backbone.block_dims == (64, 96, 128)
    exported = tmp_path / "d_weights.ckpt"
    assert exported.stat().st_size < out.stat().st_size / 2  # no optimiser state
    matcher = make_matcher("loftr", weights=str(exported), device="cpu")
    image = cv2.imread(str(photos / "p0.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    matches = matcher.match(image[:96, :128], image[:96, :128])
    assert matches.keypoints0.shape[1] == 2
    assert load_pretrained(exported, "cpu").config.matching.thr == 0.2  # the preset's threshold
    # the threshold the shipped file stores is set on export, not by hand
    from recipes.training.trainer import export_weights

    export_weights(out, tmp_path / "thr.ckpt", half=True, threshold=0.1)
    assert load_pretrained(tmp_path / "thr.ckpt", "cpu").config.matching.thr == 0.1
    # a weights-only file cannot be resumed as a training state
    from core.errors import UserError

    with pytest.raises(UserError, match="weights only"):
        main(
            "compact",
            [f"homography:{photos}"],
            exported,
            steps=1,
            size=SIZE,
            config=_config(),
            device="cpu",
            val_pairs=1,
            progress=False,
        )


def test_init_fine_tunes_from_a_checkpoint(photos: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    first = tmp_path / "e.ckpt"
    main(
        "compact",
        [f"homography:{photos}"],
        first,
        steps=1,
        size=SIZE,
        config=_config(),
        device="cpu",
        val_pairs=1,
        progress=False,
    )
    second = tmp_path / "f.ckpt"
    main(
        "compact",
        [f"homography:{photos}"],
        second,
        steps=0,
        init=first,
        size=SIZE,
        config=_config(),
        device="cpu",
        val_pairs=1,
        progress=False,
    )
    a = torch.load(first, weights_only=True)["state_dict"]
    b = torch.load(second, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    from core.errors import UserError

    with pytest.raises(UserError, match="does not fit"):
        main(
            "outdoor_ds",
            [f"homography:{photos}"],
            tmp_path / "g.ckpt",
            steps=0,
            init=first,
            size=SIZE,
            config=_config(),
            device="cpu",
            val_pairs=1,
            progress=False,
        )


def test_schedule_warmup_and_cosine() -> None:
    config = TrainConfig(warmup_steps=10, warmup_ratio=0.1, max_steps=110, min_lr_ratio=0.0)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(5, config) == pytest.approx(0.55)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.5)
    assert lr_factor(110, config) == pytest.approx(0.0)
    step = TrainConfig(warmup_steps=0, schedule="step", step_milestones=(5, 8), step_gamma=0.5)
    assert [lr_factor(s, step) for s in (4, 5, 8)] == [1.0, 0.5, 0.25]


def test_parse_spec() -> None:
    assert parse_spec("homography:/a/b") == ("homography", "/a/b", 1.0)
    assert parse_spec("synthetic:8@0.5") == ("synthetic", "8", 0.5)
    assert parse_spec("megadepth:/x@y") == ("megadepth", "/x@y", 1.0)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    from core.errors import UserError

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.train_loftr",
            "--data",
            "bogus:1",
            "--out",
            str(tmp_path / "x.ckpt"),
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "bad --data" in proc.stderr and "Traceback" not in proc.stderr
    for args, needle in (
        (["--data", f"homography:{tmp_path / 'missing'}"], "does not exist"),
        (["--data", "synthetic:x"], "integer"),
        (["--data", "synthetic:2", "--size", "100x64"], "multiples of 8"),
        (["--data", f"megadepth:{tmp_path}"], "no MegaDepth index"),
    ):
        with pytest.raises(UserError, match=needle):
            main_cli([*args, "--out", str(tmp_path / "x.ckpt"), "--steps", "1", "--device", "cpu"])


def test_cli_runs_and_prints(photos: Path, tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    result = main_cli(
        [
            "--data",
            f"homography:{photos}",
            "--out",
            str(tmp_path / "h.ckpt"),
            "--steps",
            "2",
            "--size",
            "96x64",
            "--validate-every",
            "2",
            "--val-pairs",
            "1",
            "--device",
            "cpu",
            "--no-progress",
            "--max-fine",
            "16",
        ]
    )
    assert result.end_step == 2
    out = capsys.readouterr().out
    assert "trained steps 0 -> 2" in out and "validation:" in out


def test_sigterm_saves_the_last_step_and_resumes(photos: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "s.ckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recipes.train_loftr",
            "--data",
            f"homography:{photos}",
            "--out",
            str(out),
            "--steps",
            "500",
            "--size",
            "96x64",
            "--validate-every",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--no-progress",
            "--max-fine",
            "16",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out.with_suffix(".csv")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(_rows(log)) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by a signal" in stderr
    state = torch.load(out, weights_only=True)
    rows = _rows(log)
    assert 2 <= state["step"] < 500 and int(rows[-1]["step"]) == state["step"]


def test_max_rotation_reaches_the_homography_pairs(photos: Path) -> None:
    import math

    from core.errors import UserError
    from recipes.train_loftr import build_source

    def angles(max_rotation: float) -> list[float]:
        source, _ = build_source(f"homography:{photos}", SIZE, 0, max_rotation=max_rotation)
        out = []
        for k in range(24):
            H = source.sample(k)["H_0to1"].numpy()
            out.append(abs(math.degrees(math.atan2(H[1, 0] - H[0, 1], H[0, 0] + H[1, 1]))))
        return out

    assert max(angles(30.0)) < 45.0  # the default range (+-30 deg, plus a little from the perspective part)
    assert max(angles(180.0)) > 90.0  # the full range reaches upside-down pairs
    with pytest.raises(UserError, match="max-rotation"):
        main(
            "compact",
            [f"homography:{photos}"],
            Path("/tmp/never.ckpt"),
            steps=1,
            size=SIZE,
            config=_config(),
            device="cpu",
            progress=False,
            max_rotation=200.0,
        )


def test_cli_builds_the_training_config_under_the_old_and_new_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import recipes.train_loftr as train_loftr
    from recipes.training.losses import LossConfig

    calls = []

    def fake_main(*args, **kwargs):
        calls.append(args)
        return SimpleNamespace(start_step=0, end_step=0, checkpoint="c", log="l", last_validation=None)

    monkeypatch.setattr(train_loftr, "main", fake_main)
    base = ["--data", "synthetic:1", "--out", "x.ckpt"]
    main_cli([*base, "--warmup", "7", "--max-fine", "32", "--dense-coarse", "--schedule", "step", "--size", "64x48"])
    main_cli([*base, "--warmup-steps", "7", "--max-fine-matches", "32", "--loss-dense", "--schedule", "step"])
    main_cli(base)
    expected = TrainConfig(warmup_steps=7, max_fine_matches=32, schedule="step", loss=LossConfig(dense=True))
    (size, config), (_, same), (default_size, default) = [(args[8], args[9]) for args in calls]
    assert config == same == expected and size == (48, 64)
    assert default == TrainConfig() and default_size == (240, 320)
