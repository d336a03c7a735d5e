"""NetVLAD: architecture shapes on random weights, the .mat loader on a small synthetic export, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from pipeline import netvlad

SMALL = netvlad.NetVLADConfig(widths=(4, 4, 8, 8, 6), num_clusters=3, whiten_dim=5)


def test_vgg16_layout_and_shapes_random_weights() -> None:
    torch.manual_seed(0)
    backbone = netvlad.vgg16_features()
    convs = [m for m in backbone if isinstance(m, torch.nn.Conv2d)]
    assert len(backbone) == 29 and len(convs) == 13  # conv1_1 .. conv5_3, no final ReLU / pool
    assert isinstance(backbone[28], torch.nn.Conv2d) and backbone[28].out_channels == 512
    model = netvlad.NetVLAD(netvlad.NetVLADConfig(whiten_dim=None)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 48))
    assert out.shape == (2, 512 * 64) == (2, model.output_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def _synthetic_mat(path: Path, config: netvlad.NetVLADConfig, rng: np.random.Generator) -> dict:
    """A MATLAB struct ``net`` laid out as hloc's *_struct.mat, with random weights."""
    from scipy.io import savemat

    def cell(*arrays: np.ndarray) -> np.ndarray:
        out = np.empty(len(arrays), dtype=object)
        for i, array in enumerate(arrays):
            out[i] = array
        return out

    layers = [{"weights": cell()} for _ in range(34)]
    raw: dict = {}
    channels = 3
    for index, module in enumerate(netvlad.vgg16_features(config.widths)):
        if isinstance(module, torch.nn.Conv2d):
            w = rng.normal(size=(3, 3, channels, module.out_channels)).astype(np.float32)  # S x S x IN x OUT
            b = rng.normal(size=module.out_channels).astype(np.float32)
            layers[index] = {"weights": cell(w, b)}
            raw[index] = (w, b)
            channels = module.out_channels
    dim, k = config.widths[-1], config.num_clusters
    assign, centres = rng.normal(size=(dim, k)).astype(np.float32), rng.normal(size=(dim, k)).astype(np.float32)
    layers[30] = {"weights": cell(assign, -centres)}  # centres stored negated
    white_w = rng.normal(size=(1, 1, dim * k, config.whiten_dim)).astype(np.float32)
    white_b = rng.normal(size=config.whiten_dim).astype(np.float32)
    layers[33] = {"weights": cell(white_w, white_b)}
    mean = np.array([[[120.0, 110.0, 100.0]]], np.float32)
    layer_cell = np.empty(34, dtype=object)
    for i, layer in enumerate(layers):
        layer_cell[i] = layer
    savemat(str(path), {"net": {"layers": layer_cell, "meta": {"normalization": {"averageImage": mean}}}})
    return {"convs": raw, "assign": assign, "centres": centres, "white": (white_w, white_b), "mean": mean}


def test_mat_loader_matches_independent_forward(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = _synthetic_mat(tmp_path / "net.mat", SMALL, rng)
    model = netvlad.load_mat_weights(netvlad.NetVLAD(SMALL), tmp_path / "net.mat").eval()
    w0, b0 = raw["convs"][0]
    np.testing.assert_allclose(model.backbone[0].weight[1, 2].detach().numpy(), w0[:, :, 2, 1])  # OUT x IN x S x S
    np.testing.assert_allclose(model.backbone[0].bias.detach().numpy(), b0)

    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = model(image)[0].numpy()
        features = model.backbone(image * 255 - torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1))
    # Independent NetVLAD + whitening in numpy from the raw .mat arrays.
    x = features[0].flatten(1).numpy().astype(np.float64)  # (D, N)
    x /= np.linalg.norm(x, axis=0, keepdims=True)
    logits = raw["assign"].T.astype(np.float64) @ x  # (K, N)
    soft = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    vlad = np.stack([(soft[k] * (x - raw["centres"][:, k : k + 1])).sum(1) for k in range(SMALL.num_clusters)], 1)
    vlad /= np.linalg.norm(vlad, axis=0, keepdims=True)
    vlad = vlad.reshape(-1)  # D-major
    vlad /= np.linalg.norm(vlad)
    white_w, white_b = raw["white"]
    expected = vlad @ white_w.reshape(-1, SMALL.whiten_dim) + white_b
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected), rtol=1e-4, atol=1e-5)


def test_loader_rejects_wrong_architecture(tmp_path: Path) -> None:
    _synthetic_mat(tmp_path / "net.mat", SMALL, np.random.default_rng(1))
    other = netvlad.NetVLADConfig(widths=(4, 4, 8, 8, 6), num_clusters=4, whiten_dim=5)
    with pytest.raises(UserError, match="NetVLAD layer"):
        netvlad.load_mat_weights(netvlad.NetVLAD(other), tmp_path / "net.mat")
    (tmp_path / "bad.mat").write_bytes(b"not a mat file")
    with pytest.raises(UserError):
        netvlad.load_mat_weights(netvlad.NetVLAD(SMALL), tmp_path / "bad.mat")


def test_weights_path_override_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "w.mat"
    local.write_bytes(b"x")
    assert netvlad.weights_path(local) == local
    monkeypatch.setenv("NETVLAD_WEIGHTS", str(local))
    assert netvlad.weights_path() == local
    with pytest.raises(UserError, match="not found"):
        netvlad.weights_path(tmp_path / "missing.mat")
    monkeypatch.delenv("NETVLAD_WEIGHTS")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match="not cached"):
        netvlad.weights_path(download=False)


def test_offline_download_is_one_actionable_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NETVLAD_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(netvlad, "WEIGHTS_URL", "http://127.0.0.1:9/Pitts30K_struct.mat")  # nothing listens
    assert netvlad.find_local_weights() is None
    with pytest.raises(UserError) as error:
        netvlad.weights_path()
    message = str(error.value)
    assert "\n" not in message and "cannot download" in message
    assert str(netvlad.cache_path()) in message and "--netvlad-weights" in message and "rootsift-vlad" in message
    assert not netvlad.cache_path().exists()
    assert not [p for p in (tmp_path / "hub" / "netvlad").iterdir()]  # no partial file left behind
