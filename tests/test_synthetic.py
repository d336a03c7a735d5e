"""The synthetic renderer: exact depth and poses (checked by hand-computed geometry), determinism,
speed, files, and enough texture for SIFT to match views correctly."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from datasets.middlebury import read_par_file
from datasets.synthetic import (
    Box,
    SceneConfig,
    World,
    intrinsics,
    look_at,
    make_world,
    project,
    read_scene,
    render_scene,
    render_view,
    ring_cameras,
    unproject,
    warp,
    write_scene,
)

SMALL = SceneConfig(width=160, height=120, num_views=4, seed=3, num_boxes=3)


def _flat(value: float, shape: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.full((*shape, 3), value, np.float32)


def test_depth_is_exact_for_hand_made_world() -> None:
    """One box and the ground seen by a camera on the +x axis: depths follow from plain geometry."""
    box = Box(np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.5, 1.0]), 0.0, tuple(_flat(0.5) for _ in range(6)))
    world = World(ground_size=20.0, ground_texture=_flat(0.3, (64, 64)), boxes=(box,), texels_per_unit=10.0)
    eye, target = np.array([5.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0])
    pose = look_at(eye, target)
    width, height = 65, 49
    K = intrinsics(width, height, 60.0)
    image, depth = render_view(world, K, pose, width, height, supersample=1)
    # The optical axis hits the +x face of the box at x = 0.5: depth 4.5.
    cx, cy = int(K[0, 2]), int(K[1, 2])
    assert depth[cy, cx] == pytest.approx(4.5, abs=1e-9)
    # A pixel on the face off-centre: the face is fronto-parallel, so camera z is still 4.5.
    assert depth[cy - 3, cx + 4] == pytest.approx(4.5, abs=1e-9)
    # The bottom row sees the ground: intersect that pixel's ray with z = 0 by hand.
    u, v = cx, height - 1
    ray_cam = np.linalg.inv(K) @ np.array([u, v, 1.0])
    ray_world = pose[:3, :3].T @ ray_cam
    t = -eye[2] / ray_world[2]
    assert depth[v, u] == pytest.approx(t * ray_cam[2], rel=1e-6)  # float32 storage
    # Above the box and the horizon: nothing is hit.
    assert depth[0, cx] == 0.0
    # The face (grey 0.5, lit) and the ground (0.3) have the colours given, up to the light factor.
    assert abs(int(image[cy, cx, 0]) - int(image[cy, cx, 1])) <= 1


def test_poses_look_at_the_target_and_are_rotations() -> None:
    K, poses = ring_cameras(SMALL)
    assert K.shape == (4, 3, 3) and poses.shape == (4, 4, 4)
    for k, pose in zip(K, poses):
        R = pose[:3, :3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.linalg.det(R) == pytest.approx(1.0)
        pixel, z = project(np.array([[0.0, 0.0, SMALL.target_height]]), k, pose)
        # jitter moves the target by at most 0.15 world units: the scene centre stays near the image centre
        assert z[0] > 0
        assert np.linalg.norm(pixel[0] - k[:2, 2]) < 0.1 * SMALL.width
        # cameras stand on the ring (radius and height up to the jitter)
        center = -R.T @ pose[:3, 3]
        assert np.hypot(center[0], center[1]) == pytest.approx(SMALL.radius, abs=0.3)
        assert center[2] == pytest.approx(SMALL.camera_height, abs=0.2)


def test_deterministic_and_seeded() -> None:
    a, b = render_scene(SMALL), render_scene(SMALL)
    c = render_scene(SceneConfig(**{**SMALL.__dict__, "seed": 4}))
    for image_a, image_b, depth_a, depth_b in zip(a.images, b.images, a.depths, b.depths):
        assert np.array_equal(image_a, image_b) and np.array_equal(depth_a, depth_b)
    assert not np.array_equal(a.images[0], c.images[0])
    assert a.images[0].shape == (120, 160, 3) and a.images[0].dtype == np.uint8
    assert a.depths[0].dtype == np.float32 and (a.depths[0] > 0).mean() > 0.5


def test_render_speed() -> None:
    config = SceneConfig(width=320, height=240)
    world = make_world(config)
    K, poses = ring_cameras(config)
    render_view(world, K[0], poses[0], 320, 240)  # warm-up
    start = time.perf_counter()
    render_view(world, K[1], poses[1], 320, 240)
    seconds = time.perf_counter() - start
    # ~0.2 s on a quiet core; generous bound because the test machine is shared
    assert seconds < 2.0, f"a 320x240 view took {seconds:.2f} s"


def test_warp_is_photo_consistent() -> None:
    """Pixels mapped with depth + poses into another view land on the same colour (Lambertian): better
    than with a wrong pose, and better than half a pixel off (the pixel conventions agree)."""
    import cv2

    scene = render_scene(SceneConfig(width=160, height=120, num_views=3, seed=1))
    ys, xs = np.mgrid[2:118:3, 2:158:3]
    points = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    # Textures are finer than pixels: compare blurred images, sampled bilinearly at the warped points.
    blurred = [cv2.GaussianBlur(im.astype(np.float32), (0, 0), 1.5) for im in scene.images]
    _, visible = warp(scene, 0, 1, points)
    assert visible.mean() > 0.3
    world = unproject(scene.depths[0], scene.K[0], scene.poses[0], points[visible])
    source = blurred[0][ys.ravel()[visible], xs.ravel()[visible]]

    def median_difference(pose: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> float:
        pixels, _ = project(world, scene.K[1], pose)
        p = np.nan_to_num(pixels + np.array(shift), nan=-10.0).astype(np.float32)
        target = cv2.remap(blurred[1], p[:, 0:1].copy(), p[:, 1:2].copy(), cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))[:, 0]
        return float(np.median(np.abs(source - target).max(axis=1)))

    right = median_difference(scene.poses[1])
    assert right < 15.0
    assert median_difference(scene.poses[2]) > 3 * right
    for shift in ((0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5)):
        assert median_difference(scene.poses[1], shift) > right, shift
    # unproject / project round trip in the same view is exact
    world0 = unproject(scene.depths[0], scene.K[0], scene.poses[0], points)
    seen = np.isfinite(world0).all(1)
    back, _ = project(world0[seen], scene.K[0], scene.poses[0])
    assert np.allclose(back, points[seen], atol=1e-4)


def test_write_and_read(tmp_path: Path) -> None:
    scene = render_scene(SMALL)
    folder = write_scene(scene, tmp_path / "scene")
    assert sorted(p.name for p in (folder / "images").iterdir()) == scene.names
    cameras = read_par_file(folder / "cameras.txt")  # Middlebury format
    assert list(cameras) == scene.names
    assert np.allclose(cameras[scene.names[2]].R, scene.R[2]) and np.allclose(cameras[scene.names[2]].t, scene.t[2])
    again = read_scene(folder)
    assert again.config == SMALL
    assert all(np.array_equal(a, b) for a, b in zip(again.images, scene.images))  # PNG is lossless
    assert all(np.array_equal(a, b) for a, b in zip(again.depths, scene.depths))
    assert np.allclose(again.K, scene.K) and np.allclose(again.poses, scene.poses)


def test_sift_matches_are_geometrically_correct() -> None:
    """The textures give SIFT many correct matches between neighbouring views (checked with GT depth)."""
    from matchers.sift import SIFTMatcher

    scene = render_scene(SceneConfig(num_views=12))
    matcher = SIFTMatcher()
    gray = [(im.astype(np.float32) / 255.0) @ np.array([0.299, 0.587, 0.114], np.float32) for im in scene.images[:3]]
    for j in (1, 2):
        matches = matcher.match(gray[0], gray[j])
        pixels, valid = warp(scene, 0, j, matches.keypoints0)
        correct = valid & (np.linalg.norm(pixels - matches.keypoints1, axis=1) < 3.0)
        assert correct.sum() >= (150 if j == 1 else 50), (j, correct.sum(), len(matches))
        assert correct.sum() / len(matches) > 0.6
