"""ResNetFPN_8_2: the local-feature CNN of LoFTR (coarse features at 1/8, fine features at 1/2).

Module names and registration order follow the official network so that its state-dict keys load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (1x1 conv + BN shortcut when strided)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.conv2 = _conv3x3(cout, cout)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            None if stride == 1 else nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(shortcut + out)


def _upsample_to(coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Upsample by 2 (bilinear, align_corners=True, as trained) and crop to the skip map.

    For sides that are not multiples of 8 the finer map is one cell shorter than twice the coarser one; the
    upsampled map is cropped rather than resized so that every cell keeps the sampling position the weights were
    trained with (this is also what kornia does for arbitrary sizes).
    """
    up = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=True)
    return up[..., : skip.shape[2], : skip.shape[3]]


class ResNetFPN_8_2(nn.Module):
    """ResNet (3 stages x 2 BasicBlocks) + FPN; returns (coarse 1/8 map, fine 1/2 map).

    Every strided stage uses a centred kernel, so coarse cell (x, y) sits on pixel (8x, 8y) and fine cell (x, y)
    on pixel (2x, 2y); the maps have ceil(H/8) x ceil(W/8) and ceil(H/2) x ceil(W/2) cells for any H, W.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        d0 = config.initial_dim
        d1, d2, d3 = config.block_dims
        self.conv1 = nn.Conv2d(1, d0, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(d0)
        self.relu = nn.ReLU(inplace=True)

        self.layer1 = nn.Sequential(BasicBlock(d0, d1, 1), BasicBlock(d1, d1, 1))  # 1/2
        self.layer2 = nn.Sequential(BasicBlock(d1, d2, 2), BasicBlock(d2, d2, 1))  # 1/4
        self.layer3 = nn.Sequential(BasicBlock(d2, d3, 2), BasicBlock(d3, d3, 1))  # 1/8

        # FPN: lateral 1x1 convs and 3x3 smoothing heads (BN + LeakyReLU in between)
        self.layer3_outconv = _conv1x1(d3, d3)
        self.layer2_outconv = _conv1x1(d2, d3)
        self.layer2_outconv2 = nn.Sequential(_conv3x3(d3, d3), nn.BatchNorm2d(d3), nn.LeakyReLU(), _conv3x3(d3, d2))
        self.layer1_outconv = _conv1x1(d1, d2)
        self.layer1_outconv2 = nn.Sequential(_conv3x3(d2, d2), nn.BatchNorm2d(d2), nn.LeakyReLU(), _conv3x3(d2, d1))

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.relu(self.bn1(self.conv1(image)))
        x1 = self.layer1(x0)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)

        coarse = self.layer3_outconv(x3)
        mid = self.layer2_outconv(x2)
        mid = self.layer2_outconv2(mid + _upsample_to(coarse, mid))
        fine = self.layer1_outconv(x1)
        fine = self.layer1_outconv2(fine + _upsample_to(mid, fine))
        return coarse, fine
