"""Ground truth for LoFTR training: coarse match matrix / indices and fine sub-pixel offsets.

Conventions are the model's (see :mod:`matchers.loftr.model`): coarse cell (cx, cy) of an image sits at pixel
(8 cx, 8 cy), (0, 0) being the centre of the top-left pixel; a fine window of image 1 is centred on its coarse cell
and spans +-4 px, so a normalised offset of +-1 is +-4 px.

Coarse GT (paper Sec. 3.5, "Supervision"; official ``spvs_coarse``): every cell centre of image 0 is warped into
image 1, rounded to the nearest cell j there, and the pair (i, j) is a match when

* the warp is valid (depth known and consistent, or the point lies inside the homography's source),
* j lies inside image 1 and is not a padded cell, i is not a padded cell,
* the warp of cell j back into image 0 rounds to cell i (mutual nearest neighbour, so every row and column of the
  GT matrix holds at most one match).

Fine GT (official ``spvs_fine``): for a match (i, j) the offset of the warped point of cell i from the centre of
cell j, divided by the window radius in pixels (fine stride 2 x window // 2 = 4 px):
``(warp(8 c_i) - 8 c_j) / 4``. Offsets outside [-1, 1] cannot be predicted by the window and are masked by the loss.

Two warps are provided: depth + intrinsics + relative pose, with the depth-consistency check of the paper
(relative difference below 0.2, official ``warp_kpts``), and a homography (which covers in-plane rotations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from matchers.loftr.config import COARSE_STRIDE, FINE_STRIDE

#: a warp maps (N, P, 2) pixels of one image to (pixels (N, P, 2) in the other image, valid (N, P) bool)
Warp = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Supervision:
    """Ground truth of a batch.

    ``conf_gt`` (N, L, S) float 0/1 matrix; ``b_ids``, ``i_ids``, ``j_ids`` (M,) its non-zero entries (batch,
    row-major cell of image 0, of image 1); ``offsets`` (M, 2) fine GT (x, y) in window units; ``shape0`` /
    ``shape1`` the coarse grids (h, w).
    """

    conf_gt: torch.Tensor
    b_ids: torch.Tensor
    i_ids: torch.Tensor
    j_ids: torch.Tensor
    offsets: torch.Tensor
    shape0: tuple[int, int]
    shape1: tuple[int, int]

    @property
    def num_matches(self) -> int:
        return int(self.b_ids.shape[0])


def coarse_grid(
    shape: tuple[int, int], batch: int = 1, device: torch.device | str = "cpu", stride: int = COARSE_STRIDE
) -> torch.Tensor:
    """(batch, h*w, 2) pixel positions (x, y) of the coarse cells of a grid (h, w) of ``stride`` px, row-major."""
    h, w = shape
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).to(torch.float64) * stride
    return grid[None].expand(batch, -1, -1).contiguous()


def coarse_shape(image_size: tuple[int, int], stride: int = COARSE_STRIDE) -> tuple[int, int]:
    """Coarse grid (h, w) of an image of (H, W) pixels: ceil(H/8) x ceil(W/8) (``stride`` 8), as the backbone
    makes."""
    return (-(-image_size[0] // stride), -(-image_size[1] // stride))


def coarse_mask(mask: torch.Tensor | None, stride: int = COARSE_STRIDE) -> torch.Tensor | None:
    """(N, H, W) pixel validity -> (N, h*w) bool cell validity, the way :meth:`LoFTR.encode` samples it."""
    if mask is None:
        return None
    return mask[:, ::stride, ::stride].bool().flatten(1)


def _nearest_cell(
    points: torch.Tensor, shape: tuple[int, int], stride: int = COARSE_STRIDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major index of the nearest coarse cell of each point (N, P, 2), and whether it lies on the grid."""
    h, w = shape
    cell = torch.round(points / stride).long()
    inside = (cell[..., 0] >= 0) & (cell[..., 0] < w) & (cell[..., 1] >= 0) & (cell[..., 1] < h)
    index = cell[..., 1].clamp(0, h - 1) * w + cell[..., 0].clamp(0, w - 1)
    return index, inside


def supervise(
    warp01: Warp,
    warp10: Warp,
    image_size0: tuple[int, int],
    image_size1: tuple[int, int],
    batch: int,
    mask0: torch.Tensor | None = None,
    mask1: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    stride: int = COARSE_STRIDE,
) -> Supervision:
    """Coarse and fine GT from warps in both directions (see the module docstring).

    ``image_size0/1`` are (H, W) pixels; ``mask0/1`` optional (N, H, W) pixel validity (padding = 0); ``stride``:
    of the coarse grid (16 for the coarse-only student; the fine offsets are meaningful at 8 only).
    """
    shape0, shape1 = coarse_shape(image_size0, stride), coarse_shape(image_size1, stride)
    grid0 = coarse_grid(shape0, batch, device, stride)
    grid1 = coarse_grid(shape1, batch, device, stride)
    w01, valid01 = warp01(grid0)
    w10, valid10 = warp10(grid1)
    nearest1, inside1 = _nearest_cell(w01, shape1, stride)  # (N, L)
    nearest0, inside0 = _nearest_cell(w10, shape0, stride)  # (N, S)
    ok = valid01 & inside1
    valid_back = valid10 & inside0
    # mutual check: the cell we land on must map back to where we came from
    loop = torch.gather(nearest0, 1, nearest1)
    ok &= torch.gather(valid_back, 1, nearest1)
    ok &= loop == torch.arange(grid0.shape[1], device=device)[None]
    cm0, cm1 = coarse_mask(mask0, stride), coarse_mask(mask1, stride)
    if cm0 is not None:
        ok &= cm0.to(device)
    if cm1 is not None:
        ok &= torch.gather(cm1.to(device), 1, nearest1)
    b_ids, i_ids = torch.nonzero(ok, as_tuple=True)
    j_ids = nearest1[b_ids, i_ids]
    conf_gt = torch.zeros(batch, grid0.shape[1], grid1.shape[1], device=device)
    conf_gt[b_ids, i_ids, j_ids] = 1.0
    radius = float(FINE_STRIDE * 2)  # window 5 -> +-2 fine cells of 2 px
    offsets = (w01[b_ids, i_ids] - grid1[b_ids, j_ids]) / radius
    return Supervision(conf_gt, b_ids, i_ids, j_ids, offsets.float(), shape0, shape1)


# ---------------------------------------------------------------------------------------------- warps
def homography_warp(H: torch.Tensor, source_size: tuple[int, int] | torch.Tensor | None = None) -> Warp:
    """Warp by (N, 3, 3) homographies. Points mapping behind the plane (w <= 0) are invalid.

    ``source_size``: (N, 2) or (H, W) of the target image; a warped point outside [-0.5, size - 0.5) is invalid
    (only matters for pixels that never came from the source picture; the coarse GT checks the grid anyway).
    """
    H = H.to(torch.float64)

    def warp(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pts = points.to(H.device, torch.float64)
        homog = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1) @ H.transpose(1, 2)
        w = homog[..., 2]
        valid = w > 1e-9
        out = homog[..., :2] / torch.where(valid, w, torch.ones_like(w))[..., None]
        return out, valid

    return warp


def depth_warp(
    depth0: torch.Tensor,
    depth1: torch.Tensor,
    K0: torch.Tensor,
    K1: torch.Tensor,
    T_0to1: torch.Tensor,
    tolerance: float = 0.2,
) -> Warp:
    """Warp pixels of image 0 into image 1 with depth (N, H, W), intrinsics (N, 3, 3) and relative pose (N, 4, 4).

    Valid (official ``warp_kpts``): depth of the source pixel > 0, the point lies in front of camera 1 and inside
    image 1, and the depth of image 1 at the (rounded) landing pixel agrees with the point's computed depth:
    ``|d1 - z| / d1 < tolerance`` (not occluded). Depths are read at the nearest pixel.
    """
    depth0, depth1 = depth0.to(torch.float64), depth1.to(torch.float64)
    K0, K1, T = K0.to(torch.float64), K1.to(torch.float64), T_0to1.to(torch.float64)
    h0, w0 = depth0.shape[1:]
    h1, w1 = depth1.shape[1:]

    def sample(depth: torch.Tensor, pts: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        cols, rows = torch.round(pts[..., 0]).long(), torch.round(pts[..., 1]).long()
        inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        flat = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
        return torch.gather(depth.flatten(1), 1, flat), inside

    def warp(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pts = points.to(depth0.device, torch.float64)
        z0, inside0 = sample(depth0, pts, h0, w0)
        homog = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1)
        cam0 = (homog @ torch.linalg.inv(K0).transpose(1, 2)) * z0[..., None]
        cam1 = cam0 @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
        z1 = cam1[..., 2]
        front = z1 > 1e-9
        proj = cam1 @ K1.transpose(1, 2)
        out = proj[..., :2] / torch.where(front, z1, torch.ones_like(z1))[..., None]
        d1, inside1 = sample(depth1, out, h1, w1)
        consistent = (d1 - z1).abs() < tolerance * d1
        valid = inside0 & (z0 > 0) & front & inside1 & (d1 > 0) & consistent
        return out, valid

    return warp


def invert_pose(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid (N, 4, 4) transforms."""
    R, t = T[:, :3, :3], T[:, :3, 3:]
    out = torch.zeros_like(T)
    out[:, :3, :3] = R.transpose(1, 2)
    out[:, :3, 3:] = -R.transpose(1, 2) @ t
    out[:, 3, 3] = 1
    return out


def supervise_batch(
    batch: dict[str, torch.Tensor], depth_tolerance: float = 0.2, stride: int = COARSE_STRIDE
) -> Supervision:
    """GT for a training batch: uses ``H_0to1`` (N, 3, 3) when present, else ``depth0/1``, ``K0/1``, ``T_0to1``.

    Images are ``image0`` / ``image1`` (N, 1, H, W); optional ``mask0`` / ``mask1`` (N, H, W) padding masks.
    """
    image0, image1 = batch["image0"], batch["image1"]
    n = image0.shape[0]
    size0 = (int(image0.shape[2]), int(image0.shape[3]))
    size1 = (int(image1.shape[2]), int(image1.shape[3]))
    if "H_0to1" in batch:
        H = batch["H_0to1"].to(torch.float64)
        w01, w10 = homography_warp(H), homography_warp(torch.linalg.inv(H))
    else:
        T = batch["T_0to1"].to(torch.float64)
        w01 = depth_warp(batch["depth0"], batch["depth1"], batch["K0"], batch["K1"], T, depth_tolerance)
        w10 = depth_warp(batch["depth1"], batch["depth0"], batch["K1"], batch["K0"], invert_pose(T), depth_tolerance)
    return supervise(
        w01, w10, size0, size1, n, batch.get("mask0"), batch.get("mask1"), device=image0.device, stride=stride
    )


def supervise_samples(
    samples: list[dict[str, torch.Tensor]], depth_tolerance: float = 0.2, stride: int = COARSE_STRIDE
) -> Supervision:
    """GT for a list of single (unbatched) samples of equal image sizes, merged as one batch.

    Lets a batch mix homography and depth pairs: each sample is supervised with its own warp.
    """
    parts = []
    for sample in samples:
        batch = {k: v[None] for k, v in sample.items()}
        parts.append(supervise_batch(batch, depth_tolerance, stride))
    first = parts[0]
    b_ids = torch.cat([p.b_ids + k for k, p in enumerate(parts)])
    return Supervision(
        torch.cat([p.conf_gt for p in parts]),
        b_ids,
        torch.cat([p.i_ids for p in parts]),
        torch.cat([p.j_ids for p in parts]),
        torch.cat([p.offsets for p in parts]),
        first.shape0,
        first.shape1,
    )
