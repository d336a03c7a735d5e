"""Training data sources: determinism, homography pairs consistent with their H, and the MegaDepth / ScanNet
loaders on tiny fake layouts built from a rendered scene (so their GT can be checked against the true geometry)."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
import torch

from core.errors import UserError
from recipes.training.data import (
    HomographyConfig,
    HomographyPairs,
    MegaDepthPairs,
    MixedPairs,
    ScanNetPairs,
    SyntheticConfig,
    SyntheticPairs,
    collate,
    photometric,
)
from recipes.training.supervision import supervise_batch


def _photo(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((300, 400)).astype(np.float32), (0, 0), 2.0)
    return (image - image.min()) / (image.max() - image.min())


def test_homography_pairs_are_deterministic_and_consistent() -> None:
    source = HomographyPairs([_photo(0), _photo(1)], HomographyConfig(height=96, width=128), seed=5, augment=False)
    a, b = source.sample(7), source.sample(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(source.sample(8)["image0"], a["image0"])
    # image 1 seen through H^-1 reproduces image 0 where it is defined
    H = a["H_0to1"].numpy()
    im0, im1 = a["image0"][0].numpy(), a["image1"][0].numpy()
    ys, xs = np.mgrid[0:96, 0:128].astype(np.float64)
    p = np.stack([xs, ys, np.ones_like(xs)], -1) @ H.T
    back = cv2.remap(
        im1,
        (p[..., 0] / p[..., 2]).astype(np.float32),
        (p[..., 1] / p[..., 2]).astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=-1,
    )
    inside = (back >= 0) & (np.abs(p[..., 0] / p[..., 2] - 63) < 60) & (np.abs(p[..., 1] / p[..., 2] - 47) < 44)
    assert inside.mean() > 0.3
    assert np.abs(back[inside] - im0[inside]).mean() < 0.02


def test_photometric_augmentation_stays_in_range() -> None:
    out = photometric(_photo(), np.random.default_rng(0))
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, _photo())


def test_mixed_pairs_and_collate() -> None:
    homography = HomographyPairs([_photo()], HomographyConfig(height=64, width=96), seed=1)
    synthetic = SyntheticPairs(SyntheticConfig(height=64, width=96, num_worlds=1, supersample=1), seed=1)
    mixed = MixedPairs([homography, synthetic], [1.0, 1.0], seed=2)
    kinds = {("H_0to1" in mixed.sample(k)) for k in range(8)}
    assert kinds == {True, False}
    batch = collate([homography.sample(0), homography.sample(1)])
    assert batch["image0"].shape == (2, 1, 64, 96) and batch["H_0to1"].shape == (2, 3, 3)
    with pytest.raises(ValueError):
        collate([homography.sample(0), synthetic.sample(0)])


def test_object_centric_pairs_have_no_ground_and_consistent_depth() -> None:
    from datasets.synthetic import project, unproject

    config = SyntheticConfig.object_centric(height=96, width=128, num_worlds=2)
    source = SyntheticPairs(config, seed=3, augment=False)
    sample = source.sample(0)
    assert torch.equal(sample["image0"], source.sample(0)["image0"])  # deterministic in the index
    image0, depth0 = sample["image0"][0].numpy(), sample["depth0"].numpy()
    background = depth0 == 0
    assert 0.02 < background.mean() < 0.98  # objects floating in a void: no ground fills the view
    # a dark, uniform background (apart from anti-aliased object edges)
    assert np.mean(image0[background] > config.object_background + 0.01) < 0.1
    # pixels of image 0 carried by depth and the relative pose land where the renderer puts them in image 1
    K0, K1, T = (sample[k].double().numpy() for k in ("K0", "K1", "T_0to1"))
    ys, xs = np.nonzero(~background)
    points = np.stack([xs, ys], 1)[::37].astype(np.float64)
    world = unproject(depth0, K0, np.eye(4), points)  # camera-0 frame
    depth1 = sample["depth1"].numpy()

    def agreeing(T_0to1: np.ndarray) -> int:
        projected, z = project(world, K1, T_0to1)
        u, v = np.round(projected).astype(int).T
        inside = (u >= 0) & (u < 128) & (v >= 0) & (v < 96) & (z > 0)
        return int((np.abs(depth1[v[inside], u[inside]] - z[inside]) < 0.01 * z[inside]).sum())

    shifted = T.copy()
    shifted[:3, 3] += 0.3  # a pose error of 0.3 world units (the boxes are 0.6-2.6 units wide)
    assert agreeing(T) > 20 and agreeing(T) > 3 * agreeing(shifted)


@pytest.fixture(scope="module")
def scene():
    from datasets.synthetic import SceneConfig, render_scene

    return render_scene(SceneConfig(width=128, height=96, num_views=2, arc_degrees=15, supersample=1, seed=2))


def _true_pairs(scene, sup, scale: float = 1.0):
    """Check a supervision built from a (possibly resized) copy of the scene against its geometry."""
    from datasets.synthetic import project, unproject

    w0, w1 = sup.shape0[1], sup.shape1[1]
    pts = torch.stack([sup.i_ids % w0, sup.i_ids // w0], 1).double().numpy() * 8
    original = (pts + 0.5) / scale - 0.5  # resized pixel centres -> original pixels
    world = unproject(scene.depths[0], scene.K[0], scene.poses[0], original)
    truth, _ = project(world, scene.K[1], scene.poses[1])
    truth = (truth + 0.5) * scale - 0.5
    cells = np.stack([sup.j_ids.numpy() % w1, sup.j_ids.numpy() // w1], 1) * 8
    return truth, cells


def test_megadepth_loader_on_a_fake_index(scene, tmp_path) -> None:
    root = tmp_path / "megadepth"
    (root / "Undistorted_SfM/0001/images").mkdir(parents=True)
    (root / "depths").mkdir()
    (root / "index").mkdir()
    image_paths, depth_paths = [], []
    for k in range(2):
        name = f"Undistorted_SfM/0001/images/{k}.png"
        cv2.imwrite(str(root / name), cv2.cvtColor(scene.images[k], cv2.COLOR_RGB2BGR))
        with h5py.File(root / f"depths/{k}.h5", "w") as f:
            f["depth"] = scene.depths[k]
        image_paths.append(name)
        depth_paths.append(f"depths/{k}.h5")
    K_colmap = scene.K.copy()
    K_colmap[:, :2, 2] += 0.5  # COLMAP's pixel-corner origin
    pair_infos = np.empty(1, dtype=object)
    pair_infos[0] = (np.array([0, 1]), 0.6, np.zeros(0))
    np.savez(
        root / "index/0001.npz",
        image_paths=np.array(image_paths, dtype=object),
        depth_paths=np.array(depth_paths, dtype=object),
        intrinsics=K_colmap,
        poses=scene.poses,
        pair_infos=pair_infos,
    )
    with pytest.raises(UserError, match="trust-index"):
        MegaDepthPairs(root)
    source = MegaDepthPairs(root, long_side=160, allow_pickle=True, augment=False)
    sample = source.sample(0)
    assert sample["image0"].shape == (1, 160, 160)  # resized to 160x120, padded to a square
    assert sample["mask0"][:120].all() and not sample["mask0"][120:].any()
    sup = supervise_batch({k: v[None] for k, v in sample.items()})
    assert sup.num_matches > 30
    assert int((sup.i_ids // 20).max()) < 15  # no GT in padded rows
    truth, cells = _true_pairs(scene, sup, scale=160 / 128)
    # nearest cell of the true correspondence, up to nearest-pixel depth resampling (which moves a few points at
    # depth edges onto the neighbouring surface)
    assert np.mean(np.abs(truth - cells).max(axis=1) <= 4.0 + 0.7) > 0.9


def test_megadepth_rejects_paths_outside_the_root(scene, tmp_path) -> None:
    root = tmp_path / "md"
    (root / "index").mkdir(parents=True)
    pair_infos = np.empty(1, dtype=object)
    pair_infos[0] = (np.array([0, 1]), 0.6, np.zeros(0))
    np.savez(
        root / "index/s.npz",
        image_paths=np.array(["../../etc/passwd", "b"], dtype=object),
        depth_paths=np.array(["a", "b"], dtype=object),
        intrinsics=scene.K,
        poses=scene.poses,
        pair_infos=pair_infos,
    )
    with pytest.raises(UserError, match="outside"):
        MegaDepthPairs(root, allow_pickle=True).sample(0)


def test_scannet_loader_on_a_fake_layout(scene, tmp_path) -> None:
    root = tmp_path / "scannet"
    folder = root / "scene0005_01"
    for sub in ("color", "depth", "pose"):
        (folder / sub).mkdir(parents=True)
    (root / "index").mkdir()
    for k, stem in enumerate((10, 20)):
        cv2.imwrite(str(folder / f"color/{stem}.jpg"), cv2.cvtColor(scene.images[k], cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / f"depth/{stem}.png"), np.round(scene.depths[k] * 1000).astype(np.uint16))
        np.savetxt(folder / f"pose/{stem}.txt", np.linalg.inv(scene.poses[k]))  # camera-to-world
    K = scene.K[0].copy()
    K[:2, 2] += 0.5
    np.savez(root / "index/intrinsics.npz", scene0005_01=K)
    np.savez(root / "index/scene0005_01.npz", name=np.array([[5, 1, 10, 20]]))
    source = ScanNetPairs(root, size=(96, 128), augment=False)
    sample = source.sample(0)
    assert sample["image0"].shape == (1, 96, 128)
    assert torch.allclose(sample["T_0to1"], torch.from_numpy(scene.poses[1] @ np.linalg.inv(scene.poses[0])))
    sup = supervise_batch({k: v[None] for k, v in sample.items()})
    assert sup.num_matches > 30
    truth, cells = _true_pairs(scene, sup)
    assert np.abs(truth - cells).max() <= 4.0 + 0.05  # millimetre depth quantisation
    with pytest.raises(UserError, match="no ScanNet index"):
        ScanNetPairs(tmp_path / "nowhere")
