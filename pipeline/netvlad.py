"""NetVLAD (Arandjelovic et al., CVPR 2016): VGG16 conv5_3 + NetVLAD pooling + PCA whitening, in plain torch.

Weights: the MATLAB ``*_struct.mat`` files hloc publishes (exported from the official MatConvNet models),
by default VGG16-NetVLAD-Pitts30K from ``https://cvg-data.inf.ethz.ch/hloc/netvlad/Pitts30K_struct.mat``.
Layout of ``net.layers`` (MATLAB structs, ``weights`` a cell per layer):

* layers 0..28: VGG16 ``features`` up to conv5_3 (conv, relu, pool in torchvision's order); a conv's
  ``weights`` are ``{S x S x IN x OUT, OUT}``;
* layer 30: NetVLAD, ``{assignment D x K, -centres D x K}`` (centres are stored negated);
* layer 33: whitening, ``{1 x 1 x (D*K) x 4096, 4096}``; the VLAD vector is flattened D-major (d * K + k);
* ``net.meta.normalization.averageImage``: the RGB mean subtracted from 0-255 images.

Forward: RGB [0,1] -> x255 - mean -> conv5_3 (no ReLU) -> L2 over channels per location -> soft
assignment (1x1 conv, softmax over clusters) -> residual sums -> intra-normalise -> L2 -> whitening -> L2.

The file is cached as ``$TORCH_HOME/hub/netvlad/VGG16-NetVLAD-Pitts30K.mat``; pass ``weights=`` or set
``NETVLAD_WEIGHTS`` to use a local copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import io
from core.errors import UserError

WEIGHTS_URL = "https://cvg-data.inf.ethz.ch/hloc/netvlad/Pitts30K_struct.mat"
WEIGHTS_NAME = "VGG16-NetVLAD-Pitts30K.mat"
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
NETVLAD_LAYER, WHITEN_LAYER = 30, 33


@dataclass(frozen=True)
class NetVLADConfig:
    """Architecture; the defaults are the published VGG16-NetVLAD-Pitts30K model."""

    widths: tuple[int, ...] = VGG16_WIDTHS
    num_clusters: int = 64
    whiten_dim: int | None = 4096  # None: no whitening (output num_clusters * widths[-1])


def vgg16_features(widths: Sequence[int] = VGG16_WIDTHS) -> nn.Sequential:
    """VGG16 ``features`` up to conv5_3 (last ReLU and max-pool removed), torchvision's layer order."""
    layers: list[nn.Module] = []
    channels = 3
    for block, (width, convs) in enumerate(zip(widths, VGG16_CONVS_PER_BLOCK)):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        if block < len(widths) - 1:
            layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers[:-1])  # conv5_3 without its ReLU


class NetVLADPooling(nn.Module):
    """Soft-assignment VLAD over L2-normalised local features (B, D, N) -> (B, D * K), D-major."""

    def __init__(self, dim: int, num_clusters: int) -> None:
        super().__init__()
        self.assignment = nn.Conv1d(dim, num_clusters, 1, bias=False)
        self.centres = nn.Parameter(torch.randn(dim, num_clusters) * 0.1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        soft = F.softmax(self.assignment(features), dim=1)  # (B, K, N)
        # sum_n a_kn (x_n - c_k) = x a^T - c * sum_n a_kn
        vlad = features @ soft.transpose(1, 2) - self.centres[None] * soft.sum(-1)[:, None]  # (B, D, K)
        vlad = F.normalize(vlad, dim=1)  # intra-normalisation, as in the official MATLAB code
        return F.normalize(vlad.flatten(1), dim=1)


class NetVLAD(nn.Module):
    """VGG16 + NetVLAD (+ whitening); input RGB (B, 3, H, W) in [0, 1]; output L2-normalised (B, dim)."""

    def __init__(self, config: NetVLADConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetVLADConfig()
        self.backbone = vgg16_features(self.config.widths)
        dim = self.config.widths[-1]
        self.pooling = NetVLADPooling(dim, self.config.num_clusters)
        self.whiten = (
            nn.Linear(dim * self.config.num_clusters, self.config.whiten_dim) if self.config.whiten_dim else None
        )
        self.register_buffer("mean", torch.zeros(3))  # RGB mean of 0-255 images

    @property
    def output_dim(self) -> int:
        return self.config.whiten_dim or self.config.widths[-1] * self.config.num_clusters

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = image.clamp(0.0, 1.0) * 255.0 - self.mean.view(1, 3, 1, 1)
        features = self.backbone(image).flatten(2)
        descriptor = self.pooling(F.normalize(features, dim=1))
        if self.whiten is not None:
            descriptor = F.normalize(self.whiten(descriptor), dim=1)
        return descriptor


# ------------------------------------------------------------------------------------------ weights
def _cell(weights: object) -> list[np.ndarray]:
    """A MATLAB cell of arrays as a list (squeeze_me turns a 1-cell into a bare array)."""
    if isinstance(weights, np.ndarray) and weights.dtype == object:
        return [np.asarray(w) for w in weights.reshape(-1)]
    return [np.asarray(weights)] if weights is not None else []


def _param(target: torch.Tensor, value: np.ndarray, where: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if tensor.shape != target.shape:
        raise UserError(
            f"{where}: weights of shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}; "
            "the .mat file is not a VGG16-NetVLAD struct export"
        )
    return tensor


def load_mat_weights(model: NetVLAD, path: str | Path) -> NetVLAD:
    """Load hloc's ``*_struct.mat`` NetVLAD weights into ``model`` (layout in the module docstring)."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: NetVLAD weights not found; download {WEIGHTS_URL} there")
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
        layers = list(np.atleast_1d(mat["net"].layers))
        mean = np.asarray(mat["net"].meta.normalization.averageImage, np.float32).reshape(-1)[:3]
    except Exception as error:  # scipy raises several types (MatReadError, ValueError, ...) on bad files
        raise UserError(f"{path}: not a NetVLAD .mat struct export ({error}); delete it and download again") from None
    with torch.no_grad():
        for index, layer in enumerate(model.backbone):
            if isinstance(layer, nn.Conv2d):
                weights = _cell(layers[index].weights)
                where = f"{path} layer {index}"
                layer.weight.copy_(_param(layer.weight, np.transpose(weights[0], (3, 2, 0, 1)), where))
                layer.bias.copy_(_param(layer.bias, weights[1].reshape(-1), where))
        weights = _cell(layers[NETVLAD_LAYER].weights)
        where = f"{path} NetVLAD layer"
        model.pooling.assignment.weight.copy_(_param(model.pooling.assignment.weight, weights[0].T[:, :, None], where))
        model.pooling.centres.copy_(_param(model.pooling.centres, -weights[1], where))  # stored negated
        if model.whiten is not None:
            weights = _cell(layers[WHITEN_LAYER].weights)
            where = f"{path} whitening layer"
            matrix = weights[0].reshape(-1, weights[0].shape[-1]).T  # (OUT, IN)
            model.whiten.weight.copy_(_param(model.whiten.weight, matrix, where))
            model.whiten.bias.copy_(_param(model.whiten.bias, weights[1].reshape(-1), where))
        model.mean.copy_(torch.from_numpy(mean))
    return model


def _override(weights: str | Path | None) -> Path | None:
    """The weights file the user named (argument, else ``$NETVLAD_WEIGHTS``); it must exist."""
    if weights is None and not os.environ.get("NETVLAD_WEIGHTS"):
        return None
    path = Path(weights if weights is not None else os.environ["NETVLAD_WEIGHTS"])
    if not path.is_file():
        raise UserError(f"{path}: NetVLAD weights not found; download {WEIGHTS_URL} to that path")
    return path


def cache_path() -> Path:
    """Where the weights are cached: ``$TORCH_HOME/hub/netvlad/VGG16-NetVLAD-Pitts30K.mat`` (hloc's path,
    so a copy hloc already downloaded is reused)."""
    return Path(torch.hub.get_dir()) / "netvlad" / WEIGHTS_NAME


def find_local_weights(weights: str | Path | None = None) -> Path | None:
    """The local weights file (``weights``, ``$NETVLAD_WEIGHTS`` or the cache) without downloading, or None."""
    path = _override(weights)
    if path is not None:
        return path
    return cache_path() if cache_path().is_file() else None


def weights_path(weights: str | Path | None = None, download: bool = True) -> Path:
    """The local Pitts30K .mat: ``weights``, else ``$NETVLAD_WEIGHTS``, else the torch hub cache
    (downloaded there once, atomically)."""
    path = find_local_weights(weights)
    if path is not None:
        return path
    path = cache_path()
    if not download:
        raise UserError(f"{path}: NetVLAD weights not cached; download {WEIGHTS_URL} there")
    try:
        with io.atomic_path(path) as temp:
            # Writes to its own temporary file, then moves it onto ``temp``; shows a progress bar.
            torch.hub.download_url_to_file(WEIGHTS_URL, str(temp), progress=True)
    except OSError as error:  # URLError, HTTPError, timeouts and disk errors are all OSError
        raise UserError(
            f"cannot download NetVLAD weights from {WEIGHTS_URL} ({error}); download the file to {path} "
            "(or pass --netvlad-weights PATH / set NETVLAD_WEIGHTS), or use --descriptor rootsift-vlad offline"
        ) from None
    return path


@torch.no_grad()
def describe(model: NetVLAD, image: np.ndarray, max_size: int = 640) -> np.ndarray:
    """Global descriptor (dim,) float32 of an RGB float image (H, W, 3) in [0, 1], resized to ``max_size``."""
    device = next(model.parameters()).device
    tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None].to(device)
    height, width = tensor.shape[-2:]
    scale = max_size / max(height, width) if max_size > 0 else 1.0
    if scale < 1.0:
        size = (max(16, round(height * scale)), max(16, round(width * scale)))
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    return model(tensor)[0].float().cpu().numpy()
