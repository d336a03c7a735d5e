"""Ground truth for LoFTR training: homography and depth warps against hand computations and a rendered scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipes.training.supervision import (
    coarse_shape,
    depth_warp,
    homography_warp,
    invert_pose,
    supervise,
    supervise_batch,
    supervise_samples,
)


def _batch(H: np.ndarray, size0: tuple[int, int], size1: tuple[int, int]) -> dict[str, torch.Tensor]:
    return {
        "image0": torch.zeros(1, 1, *size0),
        "image1": torch.zeros(1, 1, *size1),
        "H_0to1": torch.tensor(H, dtype=torch.float64)[None],
    }


def test_rotation_homography_gives_hand_computed_indices() -> None:
    # in-plane rotation by 90 degrees: (x, y) -> (40 - y, x); image 0 is 64x48 (8x6 cells), image 1 48x64 (6x8)
    H = np.array([[0.0, -1.0, 40.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    sup = supervise_batch(_batch(H, (48, 64), (64, 48)))
    assert sup.shape0 == (6, 8) and sup.shape1 == (8, 6)
    # hand computation: cell (cx, cy) at pixel (8cx, 8cy) lands on (40 - 8cy, 8cx) = cell (5 - cy, cx) of image 1
    expected = {cy * 8 + cx: cx * 6 + (5 - cy) for cy in range(6) for cx in range(8)}
    got = dict(zip(sup.i_ids.tolist(), sup.j_ids.tolist()))
    assert got == expected
    assert torch.all(sup.offsets == 0)
    assert sup.conf_gt.shape == (1, 48, 48) and int(sup.conf_gt.sum()) == 48
    assert torch.all(sup.conf_gt[0, sup.i_ids, sup.j_ids] == 1)


def test_subpixel_translation_gives_fine_offsets() -> None:
    # shift by (+3, -2) px: every cell maps to itself (3/8 and 2/8 round to 0), offset (3, -2) / 4 px
    H = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]])
    sup = supervise_batch(_batch(H, (48, 64), (48, 64)))
    assert sup.num_matches == 48
    assert torch.equal(sup.i_ids, sup.j_ids)
    assert torch.allclose(sup.offsets, torch.tensor([[0.75, -0.5]]).expand(48, 2))


def test_shift_by_two_cells_drops_cells_leaving_the_image() -> None:
    H = np.array([[1.0, 0.0, 17.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # 17 px = 2 cells + 1 px
    sup = supervise_batch(_batch(H, (48, 64), (48, 64)))
    i_x = sup.i_ids % 8
    assert int(i_x.max()) == 5  # cells x = 6, 7 land beyond the right border
    assert sup.num_matches == 6 * 6
    assert torch.equal(sup.j_ids, sup.i_ids + 2)
    assert torch.allclose(sup.offsets[:, 0], torch.full((36,), 0.25))


def test_padding_masks_are_respected() -> None:
    H = np.eye(3)
    batch = _batch(H, (48, 64), (48, 64))
    mask1 = torch.ones(1, 48, 64, dtype=torch.bool)
    mask1[:, :, 32:] = False  # image 1 is padded on its right half
    mask0 = torch.ones(1, 48, 64, dtype=torch.bool)
    mask0[:, 40:, :] = False  # image 0's last cell row is padding
    batch.update(mask0=mask0, mask1=mask1)
    sup = supervise_batch(batch)
    assert sup.num_matches == 5 * 4  # rows 0-4 (row 5 padded in image 0), columns 0-3
    assert int((sup.j_ids % 8).max()) == 3 and int((sup.i_ids // 8).max()) == 4


def test_batched_homographies_and_merge() -> None:
    H1 = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]])
    H2 = np.array([[0.0, -1.0, 56.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    s1 = {k: v[0] for k, v in _batch(H1, (64, 64), (64, 64)).items()}
    s2 = {k: v[0] for k, v in _batch(H2, (64, 64), (64, 64)).items()}
    merged = supervise_samples([s1, s2])
    single = [supervise_batch({k: v[None] for k, v in s.items()}) for s in (s1, s2)]
    assert merged.num_matches == single[0].num_matches + single[1].num_matches
    assert merged.conf_gt.shape[0] == 2
    assert torch.equal(
        merged.b_ids,
        torch.cat(
            [torch.zeros(single[0].num_matches, dtype=torch.long), torch.ones(single[1].num_matches, dtype=torch.long)]
        ),
    )
    # rotation by 90 deg about 56: cell (cx, cy) -> (7 - cy, cx), j = cx * 8 + 7 - cy
    second = merged.b_ids == 1
    i, j = merged.i_ids[second], merged.j_ids[second]
    assert torch.equal(j, (i % 8) * 8 + 7 - i // 8)


def test_homography_warp_rejects_points_behind_the_plane() -> None:
    H = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.01, 0.0, 1.0]]], dtype=torch.float64)
    pts = torch.tensor([[[50.0, 0.0], [150.0, 0.0]]], dtype=torch.float64)
    out, valid = homography_warp(H)(pts)
    assert valid.tolist() == [[True, False]]
    assert torch.allclose(out[0, 0], torch.tensor([100.0, 0.0], dtype=torch.float64))


def test_coarse_shape_rounds_up() -> None:
    assert coarse_shape((240, 320)) == (30, 40)
    assert coarse_shape((241, 327)) == (31, 41)


@pytest.fixture(scope="module")
def scene():
    from datasets.synthetic import SceneConfig, render_scene

    return render_scene(SceneConfig(width=160, height=120, num_views=3, arc_degrees=24, supersample=1, seed=4))


def _depth_batch(scene, a: int, b: int) -> dict[str, torch.Tensor]:
    T = scene.poses[b] @ np.linalg.inv(scene.poses[a])
    gray = [torch.from_numpy(scene.images[k].mean(axis=2).astype(np.float32) / 255)[None] for k in (a, b)]
    return {
        "image0": gray[0][None],
        "image1": gray[1][None],
        "depth0": torch.from_numpy(scene.depths[a])[None],
        "depth1": torch.from_numpy(scene.depths[b])[None],
        "K0": torch.from_numpy(scene.K[a])[None],
        "K1": torch.from_numpy(scene.K[b])[None],
        "T_0to1": torch.from_numpy(T)[None],
    }


def test_depth_warp_agrees_with_the_scene_geometry(scene) -> None:
    from datasets.synthetic import project, unproject

    batch = _depth_batch(scene, 0, 1)
    ys, xs = np.mgrid[0:120:8, 0:160:8]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    out, valid = depth_warp(batch["depth0"], batch["depth1"], batch["K0"], batch["K1"], batch["T_0to1"])(
        torch.from_numpy(pts)[None]
    )
    out, valid = out[0].numpy(), valid[0].numpy()
    # true correspondences: the 3D point seen at each pixel of view 0, projected into view 1
    world = unproject(scene.depths[0], scene.K[0], scene.poses[0], pts)
    truth, z = project(world, scene.K[1], scene.poses[1])
    assert valid.sum() > 0.4 * len(pts)
    assert np.abs(out[valid] - truth[valid]).max() < 1e-6
    # the depth check only keeps points that are really visible: their colours agree (Lambertian renderer)
    img0 = scene.images[0].astype(np.float64)
    img1 = scene.images[1].astype(np.float64)
    c0 = img0[pts[valid, 1].astype(int), pts[valid, 0].astype(int)]
    r = np.round(out[valid]).astype(int)
    c1 = img1[r[:, 1], r[:, 0]]
    assert np.median(np.abs(c0 - c1)) < 25
    # background pixels (depth 0) are never valid
    assert not valid[scene.depths[0][pts[:, 1].astype(int), pts[:, 0].astype(int)] == 0].any()


def test_depth_supervision_matches_true_correspondences(scene) -> None:
    from datasets.synthetic import project, unproject

    sup = supervise_batch(_depth_batch(scene, 0, 2))
    assert sup.num_matches > 50
    h0, w0 = sup.shape0
    w1 = sup.shape1[1]
    pts = torch.stack([sup.i_ids % w0, sup.i_ids // w0], 1).double().numpy() * 8
    world = unproject(scene.depths[0], scene.K[0], scene.poses[0], pts)
    truth, _ = project(world, scene.K[2], scene.poses[2])
    cells = np.stack([sup.j_ids.numpy() % w1, sup.j_ids.numpy() // w1], 1) * 8
    # j is the nearest cell of the true correspondence, and the offset is the exact remainder in 4 px units
    assert np.abs(truth - cells).max() <= 4.0 + 1e-9
    assert np.allclose(sup.offsets.numpy(), (truth - cells) / 4.0, atol=1e-4)
    # every row and column of the GT matrix holds at most one match
    assert int(sup.conf_gt.sum(dim=2).max()) == 1 and int(sup.conf_gt.sum(dim=1).max()) == 1


def test_depth_consistency_rejects_occluded_points() -> None:
    # a fronto-parallel plane at z = 2 seen by a camera shifted along x; image 1's depth map claims an occluder at
    # z = 1 over its left half, so points landing there are rejected
    K = torch.tensor([[[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]]], dtype=torch.float64)
    depth0 = torch.full((1, 48, 64), 2.0)
    depth1 = torch.full((1, 48, 64), 2.0)
    depth1[:, :, :32] = 1.0
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, 0, 3] = -0.16  # x' = x - 0.16 -> 4 px shift to the left at z = 2
    pts = torch.tensor([[[40.0, 20.0], [10.0, 20.0]]], dtype=torch.float64)
    out, valid = depth_warp(depth0, depth1, K, K, T)(pts)
    assert torch.allclose(out[0], torch.tensor([[36.0, 20.0], [6.0, 20.0]], dtype=torch.float64))
    assert valid.tolist() == [[True, False]]
    assert torch.allclose(invert_pose(invert_pose(T)), T)


def test_supervise_requires_mutual_nearest_cells() -> None:
    # a 2x zoom: several cells of image 1 map back to one cell of image 0; only the mutual ones survive
    H = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    sup = supervise(homography_warp(H), homography_warp(torch.linalg.inv(H)), (64, 64), (64, 64), 1)
    # cells (cx, cy) with cx, cy < 4 map to (2cx, 2cy): all mutual
    assert sup.num_matches == 16
    assert torch.equal(sup.j_ids, (sup.i_ids // 8) * 2 * 8 + (sup.i_ids % 8) * 2)
