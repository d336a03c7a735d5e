"""The synthetic renderer: exact depth and poses (checked by hand-computed geometry), determinism,
speed, files, and enough texture for SIFT to match views correctly; the object-centric layout and its
presets (exact focal, GT consistency, dark background, framing, weak but usable texture, CLI)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.errors import UserError
from core.par_files import read_par_file
from datasets.synthetic import (
    Box,
    Scene,
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
        target = cv2.remap(
            blurred[1],
            p[:, 0:1].copy(),
            p[:, 1:2].copy(),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(0, 0, 0),
        )[:, 0]
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


# ------------------------------------------------------------------------------------ object-centric layout
def _object_config(preset: str = "object_tele", **overrides) -> SceneConfig:
    """The preset at a test size: 160x120, 16 views (22.5 deg apart), coarser textures, no supersampling.
    The focal length is a fraction of the width, so the framing is the preset's."""
    fields = dict(width=160, height=120, num_views=16, supersample=1, texels_per_unit=60.0)
    return SceneConfig.preset(preset, **{**fields, **overrides})


@pytest.fixture(scope="module")
def object_scene():
    return render_scene(_object_config())


def test_presets_cameras_and_focal() -> None:
    tele, wide = SceneConfig.preset("object_tele"), SceneConfig.preset("object_wide")
    for config in (tele, wide):
        assert (config.layout, config.num_views, config.width, config.height) == ("object", 48, 640, 480)
        assert config.arc_degrees == 360.0 and config.background is not None and config.background < 0.1
    K, poses = ring_cameras(tele)
    assert np.all(K[:, 0, 0] == 3200.0) and np.all(K[:, 1, 1] == 3200.0)  # exactly 5 x width
    assert K[0, 0, 0] / tele.width == 5.0
    assert np.degrees(2 * np.arctan(0.5 * tele.width / tele.focal)) == pytest.approx(11.42, abs=0.01)
    K_wide, _ = ring_cameras(wide)
    assert 1.0 <= K_wide[0, 0, 0] / wide.width <= 1.2
    # a full ring: azimuths 7.5 deg apart all round; heights alternate (not one circle); all look at the object
    centres = np.stack([-pose[:3, :3].T @ pose[:3, 3] for pose in poses])
    azimuths = np.degrees(np.unwrap(np.arctan2(centres[:, 1], centres[:, 0])))
    assert np.allclose(np.diff(azimuths), 7.5, atol=1.0) and azimuths[-1] - azimuths[0] > 350
    heights = centres[:, 2]
    assert np.all(np.diff(heights[::2]) < 0.5) and heights[::2].mean() - heights[1::2].mean() > 1.5
    for k, pose in zip(K, poses):
        pixel, z = project(np.zeros((1, 3)), k, pose)
        assert z[0] > 0 and np.linalg.norm(pixel[0] - k[:2, 2]) < 0.05 * tele.width
    # presets take overrides; unknown names and fields are user errors
    assert SceneConfig.preset("object_wide", num_views=5).num_views == 5
    with pytest.raises(UserError, match="unknown scene preset 'nope'.*object_tele"):
        SceneConfig.preset("nope")
    with pytest.raises(UserError, match="no field 'colour'"):
        SceneConfig.preset("object_tele", colour=1)
    with pytest.raises(UserError, match="unknown layout"):
        SceneConfig(layout="room")


def test_default_scene_is_unchanged_by_the_new_fields() -> None:
    config = SceneConfig()
    assert (config.layout, config.focal_factor, config.background, config.noise, config.height_step) == (
        "boxes",
        None,
        None,
        0.0,
        0.0,
    )
    K, _ = ring_cameras(config)
    assert K[0, 0, 0] == intrinsics(320, 240, 60.0)[0, 0]
    assert len(make_world(config).boxes) == config.num_boxes


def test_object_gt_is_consistent(object_scene) -> None:
    """Object pixels unprojected with the depth of view i lie on a box face, project into view j where
    ``warp`` says, and the depth of view j agrees there."""
    scene = object_scene
    world = make_world(scene.config)
    for i, j in ((0, 1), (5, 6), (15, 0)):
        ys, xs = np.nonzero(scene.depths[i] > 0)
        points = np.stack([xs, ys], axis=1)[:: max(1, len(xs) // 400)].astype(np.float64)
        pixels, valid = warp(scene, i, j, points)
        assert valid.mean() > 0.4, (i, j, valid.mean())  # 22.5 deg apart: most of the object is still seen
        xyz = unproject(scene.depths[i], scene.K[i], scene.poses[i], points)
        assert np.isfinite(xyz).all()
        # on the surface of some box: on its boundary in that box's frame (float32 depth: ~1e-6 relative)
        on_surface = np.zeros(len(xyz), bool)
        for box in world.boxes:
            local = np.abs((xyz - box.center) @ box.rotation)
            on_surface |= np.abs((local - box.half_size).max(axis=1)) < 1e-4
        assert on_surface.all()
        expected, z = project(xyz, scene.K[j], scene.poses[j])
        assert np.allclose(pixels, expected)
        rows, cols = np.round(expected[valid, 1]).astype(int), np.round(expected[valid, 0]).astype(int)
        seen = scene.depths[j][rows, cols]
        assert np.median(np.abs(seen - z[valid]) / z[valid]) < 1e-3
        assert (np.abs(seen - z[valid]) / z[valid] < 0.02).all()


def test_object_background_is_dark_and_has_no_depth(object_scene) -> None:
    for image, depth in zip(object_scene.images, object_scene.depths):
        background = depth == 0
        assert background[0, :].all() and background[:, 0].all() and background[:, -1].all()  # framed by it
        grey = image.astype(np.float32).mean(axis=2)
        # near-black and smooth: only the sensor noise (1 grey level); away from anti-aliased object edges
        inner = background & (cv2.dilate((~background).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0)
        assert grey[inner].mean() < 12 and grey[inner].std() < 2.0
        assert np.median(grey[~background]) > 60  # the object is much brighter


def test_object_is_centred_and_fills_the_frame() -> None:
    for preset in ("object_tele", "object_wide"):
        config = _object_config(preset, num_views=6)
        scene = render_scene(config)
        for depth in scene.depths:
            ys, xs = np.nonzero(depth > 0)
            assert 0.08 < len(xs) / depth.size < 0.5, preset
            assert 0.5 < (ys.max() - ys.min() + 1) / config.height < 0.85, preset
            assert 0.25 < (xs.max() - xs.min() + 1) / config.width < 0.75, preset
            centre = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
            assert np.all(np.abs(centre - scene.K[0, :2, 2]) < 0.12 * np.array([config.width, config.height]))


def test_object_scene_files_and_determinism(tmp_path: Path, object_scene) -> None:
    config = _object_config(num_views=3)
    scene = render_scene(config)
    again = render_scene(config)
    assert all(np.array_equal(a, b) for a, b in zip(scene.images, again.images))
    assert np.array_equal(scene.images[0], object_scene.images[0])  # the ring of 16 starts at the same view
    assert not np.array_equal(scene.images[0], render_scene(replace(config, seed=1)).images[0])
    folder = write_scene(scene, tmp_path / "object")
    cameras = read_par_file(folder / "cameras.txt")
    assert cameras[scene.names[0]].K[0, 0] == 800.0  # 5 x 160, exact in the par file
    assert np.count_nonzero(cameras[scene.names[0]].K - scene.K[0]) == 0
    assert read_scene(folder).config == config


def test_object_texture_is_weak_but_sift_finds_it() -> None:
    """One full-size view of the tele preset: hundreds of SIFT keypoints, not thousands, nearly all on the
    object; and neighbouring views match correctly."""
    from matchers.sift import SIFTMatcher

    config = SceneConfig.preset("object_tele")
    world = make_world(config)
    K, poses = ring_cameras(config)
    matcher = SIFTMatcher()
    grey, depths = [], []
    for i in (0, 1):
        image, depth = render_view(
            world, K[i], poses[i], config.width, config.height, config.supersample, (config.background,) * 3
        )
        grey.append(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0)
        depths.append(depth)
    features = matcher.prepare(grey[0])
    assert 100 <= len(features.keypoints) <= 2000, len(features.keypoints)
    rows, cols = np.round(features.keypoints[:, 1]).astype(int), np.round(features.keypoints[:, 0]).astype(int)
    # on the object or at its outline (blobs of the silhouette); none from the background's noise
    distance = cv2.distanceTransform((depths[0] == 0).astype(np.uint8), cv2.DIST_L2, 5)
    assert (distance[rows, cols] <= 10).mean() > 0.9
    scene = Scene(["a", "b"], [], depths, K[:2], poses[:2])
    matches = matcher.match(grey[0], grey[1])
    pixels, valid = warp(scene, 0, 1, matches.keypoints0)
    correct = valid & (np.linalg.norm(pixels - matches.keypoints1, axis=1) < 2.0)
    assert correct.sum() >= 50 and correct.sum() / len(matches) > 0.7, (correct.sum(), len(matches))


def test_cli_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from core.errors import run_cli
    from datasets.synthetic import main_cli

    main_cli(
        ["--output", str(tmp_path / "s"), "--preset", "object_wide", "--views", "2", "--width", "64", "--height", "48"]
    )
    scene = read_scene(tmp_path / "s")
    assert scene.config == SceneConfig.preset("object_wide", num_views=2, width=64, height=48)
    # without a preset: SceneConfig's values, the flags (short or the config's spelling) over them
    main_cli(["--output", str(tmp_path / "u"), "--num-views", "2", "--width", "32", "--height", "24", "--arc", "40"])
    assert read_scene(tmp_path / "u").config == SceneConfig(num_views=2, width=32, height=24, arc_degrees=40.0)
    assert len(scene) == 2 and scene.K[0, 0, 0] == pytest.approx(1.1 * 64, abs=1e-12)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main_cli(["--output", str(tmp_path / "t"), "--preset", "object_zoom"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown scene preset 'object_zoom'" in err
    assert not (tmp_path / "t").exists()
