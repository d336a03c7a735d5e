"""LoFTR checkpoints: official / kornia layouts round-trip, clear errors for bad files, offline behaviour."""

from __future__ import annotations

import argparse
import urllib.error
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from matchers.loftr import LoFTR, LoFTRConfig, get_weights, load_pretrained, save_checkpoint
from matchers.loftr import weights as weights_module

REAL_DOWNLOAD = weights_module._download  # kept before the autouse fixture disables the network


@pytest.fixture(scope="module")
def model() -> LoFTR:
    torch.manual_seed(0)
    return LoFTR(LoFTRConfig.preset("outdoor_ds")).eval()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may touch the user's cache or the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(weights_module.WEIGHTS_ENV, raising=False)

    def no_network(url: str, destination: Path) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(weights_module, "_download", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_official_layout_round_trip(model: LoFTR, tmp_path: Path) -> None:
    path = save_checkpoint(model, tmp_path / "official.ckpt", layout="official")
    raw = torch.load(path, weights_only=True)
    assert all(key.startswith("matcher.") for key in raw["state_dict"])
    assert len(raw["state_dict"]) == 211
    loaded = load_pretrained(path, device="cpu")
    assert_same_weights(model.state_dict(), loaded.state_dict())
    assert not loaded.training and loaded.weights_name == str(path)
    # and back out again: byte-for-byte the same tensors
    again = save_checkpoint(loaded, tmp_path / "again.ckpt", layout="official")
    assert_same_weights(raw["state_dict"], torch.load(again, weights_only=True)["state_dict"])


def test_kornia_layout_round_trip(model: LoFTR, tmp_path: Path) -> None:
    from kornia.feature import LoFTR as KorniaLoFTR

    path = save_checkpoint(model, tmp_path / "kornia.ckpt", layout="kornia")
    raw = torch.load(path, weights_only=True)
    reference = KorniaLoFTR(pretrained=None)
    reference.load_state_dict(raw["state_dict"])  # kornia's strict loader accepts the file
    assert_same_weights(model.state_dict(), reference.state_dict())
    # a file written from kornia's model (plain keys, no stored config) loads into ours
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "from_kornia.ckpt")
    assert_same_weights(model.state_dict(), load_pretrained(tmp_path / "from_kornia.ckpt", "cpu").state_dict())


def test_bare_official_file_and_preset_guess(model: LoFTR, tmp_path: Path) -> None:
    """Files as released (no stored config): the preset comes from the keys, temp_bug_fix from the name."""
    state = {"matcher." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 29}, tmp_path / "outdoor_ds.ckpt")
    torch.save({"state_dict": state}, tmp_path / "indoor_ds_new.ckpt")
    torch.save(model.state_dict(), tmp_path / "bare.pth")  # a bare state dict works too
    assert not load_pretrained(tmp_path / "outdoor_ds.ckpt", "cpu").config.coarse.temp_bug_fix
    assert load_pretrained(tmp_path / "indoor_ds_new.ckpt", "cpu").config.coarse.temp_bug_fix
    assert_same_weights(model.state_dict(), load_pretrained(tmp_path / "bare.pth", "cpu").state_dict())
    forced = load_pretrained(tmp_path / "outdoor_ds.ckpt", "cpu", preset="indoor_ds_new", threshold=0.1)
    assert forced.config.coarse.temp_bug_fix and forced.config.matching.thr == 0.1


def test_ot_checkpoint_round_trip_and_detection(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ot = LoFTR(LoFTRConfig.preset("indoor_ot"))
    state = {"matcher." + k: v for k, v in ot.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "indoor_ot.ckpt")
    loaded = load_pretrained(tmp_path / "indoor_ot.ckpt", "cpu")
    assert loaded.config.matching.match_type == "sinkhorn"
    assert_same_weights(ot.state_dict(), loaded.state_dict())
    with pytest.raises(UserError, match=r"unexpected keys: coarse_matching\.bin_score.*outdoor_ot or indoor_ot"):
        load_pretrained(tmp_path / "indoor_ot.ckpt", "cpu", preset="outdoor_ds")


def test_checkpoint_of_another_preset(tmp_path: Path) -> None:
    torch.manual_seed(2)
    compact = LoFTR(LoFTRConfig.preset("compact"))
    save_checkpoint(compact, tmp_path / "compact.ckpt", include_config=False)
    assert load_pretrained(tmp_path / "compact.ckpt", "cpu").config == LoFTRConfig.preset("compact")
    with pytest.raises(UserError) as info:
        load_pretrained(tmp_path / "compact.ckpt", "cpu", preset="outdoor_ds")
    message = str(info.value)
    assert "does not fit LoFTR preset outdoor_ds" in message and "shape mismatches" in message
    assert "missing keys" in message and "compact" in message and "\n" not in message


def test_corrupt_file(model: LoFTR, tmp_path: Path) -> None:
    good = save_checkpoint(model, tmp_path / "good.ckpt")
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(b"<html>404 not found</html>" * 10)
    for name in ("truncated.ckpt", "garbage.ckpt"):
        with pytest.raises(UserError, match="corrupt or not a PyTorch checkpoint") as info:
            load_pretrained(tmp_path / name, "cpu")
        assert name in str(info.value) and "\n" not in str(info.value)


def test_wrong_files(tmp_path: Path) -> None:
    torch.save({"foo": 1, "bar": [1, 2]}, tmp_path / "random_dict.ckpt")
    with pytest.raises(UserError, match="is not a LoFTR checkpoint"):
        load_pretrained(tmp_path / "random_dict.ckpt", "cpu")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, tmp_path / "other_net.ckpt")
    with pytest.raises(UserError, match="does not look like a LoFTR checkpoint"):
        load_pretrained(tmp_path / "other_net.ckpt", "cpu")
    # a pickle that is not weights-only (holds an arbitrary Python object) is refused, never executed
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_pretrained(tmp_path / "pickled.ckpt", "cpu")
    with pytest.raises(UserError, match="neither a file nor a known name"):
        load_pretrained(tmp_path / "missing.ckpt", "cpu")


def test_offline_download_message(isolated_cache: Path) -> None:
    with pytest.raises(UserError) as info:
        load_pretrained("outdoor", "cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "loftr_outdoor.ckpt" in message and "https://huggingface.co/kornia/loftr" in message
    assert "--weights" in message and weights_module.WEIGHTS_ENV in message
    assert not (isolated_cache / "loftr_outdoor.ckpt").exists()  # no partial file left in the cache
    with pytest.raises(UserError, match="drive.google.com"):
        load_pretrained("outdoor_ot", "cpu")  # OT weights are only on the official Google Drive


def test_download_into_torch_hub_cache(
    model: LoFTR, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = save_checkpoint(model, tmp_path / "served.ckpt", include_config=False)
    calls = []

    def fake_download(url: str, destination: Path) -> None:
        calls.append(url)
        if len(calls) == 1:
            raise urllib.error.URLError("first mirror down")  # falls back to the second URL
        destination.write_bytes(source.read_bytes())

    monkeypatch.setattr(weights_module, "_download", fake_download)
    loaded = load_pretrained("indoor_ds_new", "cpu")
    assert calls[0].startswith("https://huggingface.co/kornia/loftr/") and "cmp.felk.cvut.cz" in calls[1]
    assert (isolated_cache / "loftr_indoor_ds_new.ckpt").is_file()
    assert loaded.config.coarse.temp_bug_fix and loaded.weights_name == "indoor_ds_new"
    assert_same_weights(model.state_dict(), loaded.state_dict())
    load_pretrained("indoor_ds_new", "cpu")
    assert len(calls) == 2  # served from the cache the second time


def test_real_downloader_writes_the_file(model: LoFTR, tmp_path: Path) -> None:
    """The downloader itself, on a file:// URL (no network): content copied, no temporary file left."""
    source = save_checkpoint(model, tmp_path / "source.ckpt")
    destination = tmp_path / "cache" / "loftr_outdoor.ckpt"
    destination.parent.mkdir()
    REAL_DOWNLOAD(source.resolve().as_uri(), destination)
    assert destination.read_bytes() == source.read_bytes()
    assert [p.name for p in destination.parent.iterdir()] == ["loftr_outdoor.ckpt"]


def test_weights_env_folder_and_file(model: LoFTR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offline"
    path = save_checkpoint(model, folder / "loftr_outdoor.ckpt")
    monkeypatch.setenv(weights_module.WEIGHTS_ENV, str(folder))
    assert_same_weights(model.state_dict(), load_pretrained("outdoor", "cpu").state_dict())
    monkeypatch.setenv(weights_module.WEIGHTS_ENV, str(path))
    assert_same_weights(model.state_dict(), load_pretrained("outdoor_ds", "cpu").state_dict())
    assert_same_weights(model.state_dict(), load_pretrained(None, "cpu").state_dict())
    with pytest.raises(UserError, match="loftr_indoor.ckpt"):
        load_pretrained("indoor", "cpu")  # the env file has another name: not used for other weights


def test_compact_weights_missing_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(weights_module, "PACKAGE_WEIGHTS_DIR", tmp_path / "no_weights_here")
    with pytest.raises(UserError, match="loftr_compact.ckpt are not installed"):
        load_pretrained("loftr-compact", "cpu")


def test_cli_converts_and_reports_errors(model: LoFTR, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    source = save_checkpoint(model, tmp_path / "src.ckpt", layout="official")
    get_weights.main_cli([str(source), "--output", str(tmp_path / "k.ckpt"), "--layout", "kornia"])
    printed = capsys.readouterr().out
    assert "parameters=11561456" in printed and "temp_bug_fix=False" in printed
    raw = torch.load(tmp_path / "k.ckpt", weights_only=True)["state_dict"]
    assert_same_weights(model.state_dict(), raw)
    # a user error through the real entry point: one line on stderr, exit code 2, no traceback
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    run = subprocess.run(
        [sys.executable, "-m", "matchers.loftr.get_weights", str(tmp_path / "bad.ckpt")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "bad.ckpt" in run.stderr


def test_every_device_argument_goes_through_the_one_resolver(model: LoFTR, tmp_path: Path) -> None:
    """Weights, the LoFTR matcher, the factory and training accept and refuse the same device names."""
    import matchers
    from core.device import resolve_device
    from matchers.factory import make_matcher
    from matchers.loftr import LoFTRMatcher
    from recipes import train_loftr

    assert matchers.resolve_device is resolve_device
    refusals = [
        lambda: load_pretrained("loftr-compact", device="gpu"),
        lambda: LoFTRMatcher(model, device="gpu"),
        lambda: make_matcher("loftr", weights="loftr-compact", device="gpu"),
        lambda: train_loftr.main("compact", ["synthetic:1"], tmp_path / "run.ckpt", device="gpu"),
    ]
    for refuse in refusals:
        with pytest.raises(UserError, match=r"unknown device 'gpu'; choose one of auto, cpu, cuda \(or cuda:N\)"):
            refuse()
    assert LoFTRMatcher(model, device="cpu").device == torch.device("cpu")
    compact = load_pretrained("loftr-compact", device="auto")
    assert next(compact.parameters()).device.type == resolve_device("auto")
