"""ResNetFPN_8_2: the local-feature CNN of LoFTR (coarse features at 1/8, fine features at 1/2).

Module names and registration order follow the official network so that its state-dict keys load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        self.downsample = None if stride == 1 else nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

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

    ``with_fine=False`` builds a coarse-only network (no FPN): 3 stages (coarse 1/8) or 4 (coarse 1/16, cell
    (x, y) on pixel (16x, 16y)), and an empty fine map.

    Every strided stage uses a centred kernel, so coarse cell (x, y) sits on pixel (8x, 8y) and fine cell (x, y)
    on pixel (2x, 2y); the maps have ceil(H/8) x ceil(W/8) and ceil(H/2) x ceil(W/2) cells for any H, W.
    """

    def __init__(self, config: BackboneConfig, with_fine: bool = True) -> None:
        super().__init__()
        d0 = config.initial_dim
        dims = tuple(config.block_dims)
        #: False: a coarse-only backbone (3 or 4 stages, coarse stride 8 or 16): no FPN, no fine map
        self.with_fine = with_fine
        self.num_stages = len(dims)
        if with_fine and self.num_stages != 3:
            raise ValueError(f"the fine (1/2) FPN branch needs 3 stages, got block_dims {dims}")
        self.conv1 = nn.Conv2d(1, d0, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(d0)
        self.relu = nn.ReLU(inplace=True)

        # stage 1 at 1/2 (stride 1), every further stage halves the resolution: 1/4, 1/8 (, 1/16)
        cin = d0
        for index, dim in enumerate(dims, start=1):
            stride = 1 if index == 1 else 2
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(cin, dim, stride), BasicBlock(dim, dim, 1)))
            cin = dim

        # coarse head: a lateral 1x1 conv on the last stage (layer3_outconv in the official 3-stage network)
        setattr(self, f"layer{self.num_stages}_outconv", _conv1x1(dims[-1], dims[-1]))
        if with_fine:
            # FPN: lateral 1x1 convs and 3x3 smoothing heads (BN + LeakyReLU in between)
            d1, d2, d3 = dims
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
        coarse, inputs = self.forward_coarse(image)
        if inputs is None:  # coarse-only: an empty fine map
            return coarse, coarse.new_zeros(coarse.shape[0], 0, 0, 0)
        return coarse, self.fine_full(inputs)

    # The fine (1/2) map costs ~40 % of the backbone (two 3x3 heads at 1/4 and 1/2) but refinement reads it only in
    # window x window crops around matched cells. Splitting the pass lets a cold pair with few matches compute
    # just those crops (:meth:`fine_windows`), while :meth:`forward` computes the same ops over the whole map.
    def forward_coarse(self, image: torch.Tensor) -> tuple[torch.Tensor, "FineInputs | None"]:
        """Coarse 1/8 map, and what the fine branch needs (layer-1 output, FPN input at 1/4; None without it)."""
        x0 = self.relu(self.bn1(self.conv1(image)))
        if not self.with_fine:
            x = x0
            for index in range(1, self.num_stages + 1):
                x = getattr(self, f"layer{index}")(x)
            return getattr(self, f"layer{self.num_stages}_outconv")(x), None
        x1 = self.layer1(x0)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        coarse = self.layer3_outconv(x3)
        mid = self.layer2_outconv(x2)
        return coarse, FineInputs(x1, mid + _upsample_to(coarse, mid))

    def fine_full(self, inputs: "FineInputs") -> torch.Tensor:
        """The whole fine 1/2 map (N, C_f, Hf, Wf)."""
        mid = self.layer2_outconv2(inputs.lat2)
        fine = self.layer1_outconv(inputs.x1)
        return self.layer1_outconv2(fine + _upsample_to(mid, fine))

    def window_cost(self, window: int) -> tuple[float, float]:
        """Multiply-adds of one window by :meth:`fine_windows`, and per fine-map cell by :meth:`fine_full`."""
        d1, d2, d3 = self.layer1_outconv.in_channels, self.layer1_outconv.out_channels, self.layer3_outconv.out_channels
        mid_side, fine_side = _mid_patch_side(window), window + 4
        per_window = (
            (mid_side + 2) ** 2 * 9 * d3 * d3
            + mid_side**2 * 9 * d3 * d2
            + fine_side**2 * d1 * d2
            + (window + 2) ** 2 * 9 * d2 * d2
            + window**2 * 9 * d2 * d1
        )
        per_cell = (9 * d3 * d3 + 9 * d3 * d2) / 4 + d1 * d2 + 9 * d2 * d2 + 9 * d2 * d1
        return float(per_window), float(per_cell)

    def fine_windows(
        self,
        inputs: "FineInputs",
        b_ids: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        window: int,
        chunk: int = 256,
    ) -> torch.Tensor:
        """(M, window^2, C_f) crops of the fine map centred on fine cells (rows, cols) of batch items ``b_ids``.

        Equal (up to float rounding) to cropping :meth:`fine_full`'s map with zeros off the map, but only the
        receptive field of each crop is computed: the two 3x3 heads run as unpadded convolutions on patches with a
        2-cell halo, with off-map positions zeroed in between (that is what zero padding does on the full map),
        and the align-corners upsampling is evaluated at the crop's positions with the whole map's sampling grid.
        """
        x1, lat2 = inputs.x1, inputs.lat2
        count = int(b_ids.shape[0])
        channels = self.layer1_outconv2[-1].out_channels
        if count == 0:
            return x1.new_zeros(0, window * window, channels)
        out = []
        for start in range(0, count, chunk):
            sl = slice(start, start + chunk)
            out.append(self._windows_chunk(x1, lat2, b_ids[sl], rows[sl], cols[sl], window))
        return torch.cat(out)

    def _windows_chunk(
        self,
        x1: torch.Tensor,
        lat2: torch.Tensor,
        b_ids: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        window: int,
    ) -> torch.Tensor:
        half = window // 2
        h2, w2 = x1.shape[2], x1.shape[3]
        h4, w4 = lat2.shape[2], lat2.shape[3]
        side1 = window + 4  # fine positions feeding two 3x3 convs
        side_mid = _mid_patch_side(window)
        # full-map upsampling grid (align_corners=True, output twice the 1/4 map, cropped) at the patch positions
        pos_r = rows[:, None] - half - 2 + torch.arange(side1, device=rows.device)  # (M, side1)
        pos_c = cols[:, None] - half - 2 + torch.arange(side1, device=cols.device)
        r0, r1, wr = _align_corners_grid(pos_r.clamp(0, h2 - 1), h4, 2 * h4)
        c0, c1, wc = _align_corners_grid(pos_c.clamp(0, w2 - 1), w4, 2 * w4)
        mid_r, mid_c = r0[:, :1], c0[:, :1]  # first source row / column of each patch
        # mid head (1/4) on a side_mid patch: input with a 2-cell halo, zero off the map
        lat, inside4 = _patches(lat2, b_ids, mid_r - 2, mid_c - 2, side_mid + 4)
        head = self.layer2_outconv2
        x = _valid_conv(head[0], lat)
        x = head[2](head[1](x))
        x = x * inside4[:, :, 1:-1, 1:-1]
        mid = _valid_conv(head[3], x)  # (M, C, side_mid, side_mid)
        # bilinear samples of the mid patch at the side1 x side1 fine positions
        m = torch.arange(mid.shape[0], device=mid.device)[:, None, None]
        rr0, rr1 = (r0 - mid_r)[:, :, None], (r1 - mid_r)[:, :, None]
        cc0, cc1 = (c0 - mid_c)[:, None, :], (c1 - mid_c)[:, None, :]
        wr_, wc_ = wr[:, :, None, None], wc[:, None, :, None]
        up = (1 - wr_) * ((1 - wc_) * mid[m, :, rr0, cc0] + wc_ * mid[m, :, rr0, cc1]) + wr_ * (
            (1 - wc_) * mid[m, :, rr1, cc0] + wc_ * mid[m, :, rr1, cc1]
        )  # (M, s, s, C)
        up = up.permute(0, 3, 1, 2)
        # fine head (1/2)
        skip, inside2 = _patches(x1, b_ids, pos_r[:, :1], pos_c[:, :1], side1)
        x = (self.layer1_outconv(skip) + up) * inside2
        head = self.layer1_outconv2
        x = _valid_conv(head[0], x)
        x = head[2](head[1](x))
        x = x * inside2[:, :, 1:-1, 1:-1]
        x = _valid_conv(head[3], x) * inside2[:, :, 2:-2, 2:-2]  # (M, C_f, window, window)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], window * window, x.shape[1])


@dataclass(frozen=True)
class FineInputs:
    """Inputs of the fine branch: layer-1 output ``x1`` (1/2) and the FPN sum ``lat2`` at 1/4."""

    x1: torch.Tensor
    lat2: torch.Tensor


def _mid_patch_side(window: int) -> int:
    """Side of the 1/4 patch whose upsampling covers window + 4 fine positions (sampling step < 1/2)."""
    return (window + 3) // 2 + 2


def _align_corners_grid(
    pos: torch.Tensor, size_in: int, size_out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lower, upper) and upper weight of output positions ``pos`` of an align-corners resize."""
    scale = torch.tensor((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0, dtype=torch.float32)
    src = pos.to(torch.float32) * scale
    lower = src.floor().long().clamp(max=size_in - 1)
    upper = (lower + 1).clamp(max=size_in - 1)
    return lower, upper, src - lower


def _patches(
    feat: torch.Tensor, b_ids: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C, side, side) crops of ``feat`` at (top, left) (M, 1) with zeros off the map, and the (M, 1, s, s) mask."""
    height, width = feat.shape[2], feat.shape[3]
    offsets = torch.arange(side, device=feat.device)
    rows, cols = top + offsets, left + offsets  # (M, side)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    crop = feat[b_ids[:, None, None], :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    inside = inside[:, None].to(feat.dtype)
    return crop.permute(0, 3, 1, 2) * inside, inside


def _valid_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` without its zero padding (the caller supplies the halo)."""
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
