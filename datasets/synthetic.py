"""A small synthetic scene rendered by numpy ray casting: known cameras, exact depth, no external data.

The world is a textured ground square with textured boxes standing on it (random sizes, positions and
yaw). Every face carries its own procedural texture — multi-scale noise, random filled shapes, checker
patches and text-like glyph blobs — so that both SIFT and LoFTR find plenty of distinct matches.
Lambertian shading with one directional light (view-independent, so colours are consistent across views);
the background is a smooth gradient with depth 0 (invalid).

Object-centric layout (``SceneConfig(layout="object")``): no ground; one compact object centred at the
origin, a plinth carrying a leaning stack of boxes of decreasing size and varied yaw with side pieces
sticking out (``num_boxes`` pieces, like a statue), surfaced with a weak plaster / stone texture (smooth
noise, faint stains, fine grains) whose amplitude is ``texture_contrast``; a flat near-black background
(``background`` grey level) and Gaussian sensor noise (``noise``, 8-bit levels); a full ring of cameras
looking at the object, alternately ``height_step / 2`` above and below ``camera_height``; ``focal_factor``
sets the focal length in image widths exactly (K in ``cameras.txt``; no distortion). Presets
(``SceneConfig.preset(name, **overrides)``, CLI ``--preset``), 48 views of 640x480, the object spanning
~70 % of the image height:

* ``object_tele``: focal 5 x width = 3200 px (11.4 deg field of view), cameras 24 units away;
* ``object_wide``: the same object through a normal lens, focal 1.1 x width = 704 px (48.9 deg).

Weak texture: OpenCV's SIFT finds 200-475 keypoints per view (median 300; COLMAP's SIFT ~530), 96 % of
them on the object, the rest on its outline. ``pipeline.reconstruct --matcher sift`` (exhaustive pairs,
shared SIMPLE_RADIAL camera) registers 48/48 on both presets: relative-rotation error median 0.11 deg
(mean 0.13, max 0.40) and focal 3224 px for 3200 on ``object_tele``; 0.12 deg (mean 0.13, max 0.40) and
705 px for 704 on ``object_wide``. The telephoto ring is near a cliff for self-calibration: with
``texture_contrast=0.25`` and the cameras 25 units away, SIFT still registered 48/48 but at focal 4305 px,
with two views 9-15 deg off (median 0.56 deg, max 18 deg).

Conventions (the same as :mod:`datasets.middlebury` and OpenCV):

* world: z up; cameras: x right, y down, z forward;
* ``K`` (3, 3) per view with pixel *centres* at integer coordinates (hloc's convention; COLMAP's
  principal point is +0.5 of ours);
* ``poses`` (N, 4, 4) world-to-camera ``[R | t]``;
* ``depths`` (H, W) float32 camera z of the surface seen at each pixel centre (exact, not rendered
  from the anti-aliased colour pass); 0 where no surface is hit.

API: ``render_scene(SceneConfig(...)) -> Scene``; ``write_scene(scene, folder)`` / ``read_scene(folder)``;
for other viewpoints ``make_world(config)`` then ``render_view(world, K, pose, width, height)``;
``unproject`` / ``project`` / ``warp`` to map pixels between views with the depth (training supervision).

CLI: ``python -m datasets.synthetic --output DIR [--preset object_tele|object_wide] [--views 12]
[--width 320 --height 240] [--seed 0] [--arc 110]`` (the flags override the preset's values).
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np

from core.cli import add_config_arguments, config_from_args, field_comments
from core.errors import UserError, run_cli

FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_PLAIN,
)
GLYPHS = string.ascii_letters + string.digits + "#%&@?"
Layout = Literal["boxes", "object"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

# Object-centric presets (see the module docstring). The object is about 2.2 units tall and up to 1.9 wide;
# the ring radius is chosen so that it spans about 70 % of the image height with either lens, seen from
# about 16 deg above, the views alternating 3 deg higher and lower.
_OBJECT = dict(
    layout="object",
    width=640,
    height=480,
    num_views=48,
    arc_degrees=360.0,
    target_height=0.0,
    num_boxes=7,
    texels_per_unit=160.0,
    texture_contrast=0.3,
    background=0.03,
    noise=1.0,
)
PRESETS: dict[str, dict] = {
    # telephoto: focal 5 x width = 3200 px (horizontal field of view 11.4 deg), cameras 24 units away
    "object_tele": {
        **_OBJECT,
        "focal_factor": 5.0,
        "radius": 23.0,
        "camera_height": 6.7,
        "height_step": 2.4,
        "jitter": 0.15,
    },
    # a normal lens: focal 1.1 x width = 704 px (field of view 48.9 deg), cameras 5.2 units away
    "object_wide": {
        **_OBJECT,
        "focal_factor": 1.1,
        "radius": 5.0,
        "camera_height": 1.45,
        "height_step": 0.5,
        "jitter": 0.03,
    },
}


@dataclass(frozen=True)
class SceneConfig:
    """Scene layout and cameras; everything is deterministic given ``seed``."""

    width: int = 320  # image width
    height: int = 240  # image height
    num_views: int = 12  # number of views
    seed: int = 0  # random seed of the world and the cameras
    fov_degrees: float = 60.0  # horizontal field of view
    radius: float = 7.0  # distance of the cameras from the vertical axis through the origin
    camera_height: float = 3.5  # height of the cameras above the ground
    arc_degrees: float = 110.0  # cameras spread evenly over this arc (360 = full ring); 10 deg steps suit SIFT
    target_height: float = 0.5  # cameras look at (0, 0, target_height)
    jitter: float = 0.15  # random offsets of camera positions (world units) and look-at targets
    num_boxes: int = 6  # boxes on the ground ("object": pieces of the object, the plinth first)
    ground_size: float = 10.0  # the ground is a square of this side centred at the origin
    texels_per_unit: float = 60.0  # texture resolution (finer detail than pixels: SIFT finds more)
    supersample: int = 2  # colour samples per pixel per axis (anti-aliasing)
    # --- added for object-centric scenes; the defaults leave the "boxes" scenes exactly as they were
    layout: Layout = "boxes"  # boxes: boxes on a textured ground; object: one compact object at the origin
    focal_factor: float | None = None  # focal length in units of the image width; overrides fov_degrees when set
    height_step: float = 0.0  # cameras alternate between camera_height + height_step / 2 and - height_step / 2
    texture_contrast: float = 1.0  # "object": relative amplitude of the object's texture (weak texture: ~0.1)
    background: float | None = None  # grey level in [0, 1] of a flat background; none: the pale sky gradient
    noise: float = 0.0  # std of Gaussian image noise in 8-bit grey levels (seeded per view)

    def __post_init__(self) -> None:
        if self.width < 8 or self.height < 8:
            raise UserError(f"image size must be at least 8x8, got {self.width}x{self.height}")
        if self.num_views < 1:
            raise UserError(f"num_views must be >= 1, got {self.num_views}")
        if not 1.0 <= self.fov_degrees <= 170.0:
            raise UserError(f"fov_degrees must be in [1, 170], got {self.fov_degrees}")
        if self.supersample < 1:
            raise UserError(f"supersample must be >= 1, got {self.supersample}")
        if self.layout not in LAYOUTS:
            raise UserError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.focal_factor is not None and not 0.05 <= self.focal_factor <= 100.0:
            raise UserError(f"focal_factor (focal / image width) must be in [0.05, 100], got {self.focal_factor}")
        if self.texture_contrast < 0:
            raise UserError(f"texture_contrast must be >= 0, got {self.texture_contrast}")
        if self.background is not None and not 0.0 <= self.background <= 1.0:
            raise UserError(f"background must be a grey level in [0, 1] or None, got {self.background}")
        if self.noise < 0:
            raise UserError(f"noise must be >= 0 (8-bit grey levels), got {self.noise}")
        if self.layout == "object":
            if self.num_boxes < 1:
                raise UserError(f"the object layout needs num_boxes >= 1 (the plinth), got {self.num_boxes}")
            if self.radius <= 2.0:
                raise UserError(f"object layout: cameras must stand outside the object: radius > 2, got {self.radius}")
        elif self.radius <= self.ground_size / np.sqrt(2) * 0.5:
            raise UserError("cameras must stand outside the ground square: increase radius or reduce ground_size")

    @property
    def focal(self) -> float:
        """Focal length in pixels (square pixels)."""
        if self.focal_factor is not None:
            return self.focal_factor * self.width
        return 0.5 * self.width / np.tan(np.radians(self.fov_degrees) / 2)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SceneConfig":
        """A named configuration (see :data:`PRESETS`), with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise UserError(f"unknown scene preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"SceneConfig has no field {unknown[0]!r}")
        return cls(**fields)


@dataclass(frozen=True)
class Box:
    """An upright box: centre, half extents along its own axes, yaw about z, one texture per face."""

    center: np.ndarray  # (3,)
    half_size: np.ndarray  # (3,)
    yaw: float  # radians
    textures: tuple[np.ndarray, ...]  # 6 textures (float32 RGB) for faces -x, +x, -y, +y, -z, +z

    @property
    def rotation(self) -> np.ndarray:
        """Box-to-world rotation."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class World:
    """Everything needed to render any view."""

    ground_size: float
    ground_texture: np.ndarray  # float32 RGB
    boxes: tuple[Box, ...]
    texels_per_unit: float
    light: np.ndarray = field(default_factory=lambda: np.array([0.4, 0.25, 0.88]) / np.linalg.norm([0.4, 0.25, 0.88]))
    ambient: float = 0.45


@dataclass
class Scene:
    """Rendered views with their cameras (see the module docstring for conventions)."""

    names: list[str]
    images: list[np.ndarray]  # (H, W, 3) uint8 RGB
    depths: list[np.ndarray]  # (H, W) float32 camera z; 0 = background
    K: np.ndarray  # (N, 3, 3)
    poses: np.ndarray  # (N, 4, 4) world-to-camera
    config: SceneConfig | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def R(self) -> np.ndarray:
        return self.poses[:, :3, :3]

    @property
    def t(self) -> np.ndarray:
        return self.poses[:, :3, 3]

    def cameras(self):
        """``{name: core.par_files.GTCamera}`` (K, R, t), e.g. for pipeline.evaluate_model."""
        from core.par_files import GTCamera

        return {n: GTCamera(n, self.K[i].copy(), self.R[i].copy(), self.t[i].copy()) for i, n in enumerate(self.names)}


# ----------------------------------------------------------------------------------------- textures
def _noise(rng: np.random.Generator, height: int, width: int, octaves: int = 5) -> np.ndarray:
    """Multi-scale value noise in [0, 1], (H, W) float32."""
    out = np.zeros((height, width), np.float32)
    total = 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = rng.random((max(2, height * cells // max(height, width)), cells)).astype(np.float32)
        amplitude = 0.6**octave
        out += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amplitude
    out /= total
    return np.clip((out - out.min()) / max(float(np.ptp(out)), 1e-6), 0.0, 1.0)


def _random_colour(rng: np.random.Generator, low: float = 0.0, high: float = 1.0) -> tuple[int, int, int]:
    """An 8-bit colour with channels in [low, high] (fractions of 255); OpenCV 5 draws text on uint8 only."""
    return tuple(int(round(255 * v)) for v in rng.uniform(low, high, 3))


def procedural_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A feature-rich texture (H, W, 3) float32 in [0, 1]: noise, shapes, checker patches, glyphs."""
    height, width = max(8, int(height)), max(8, int(width))
    base = np.array(_random_colour(rng, 0.25, 0.85), np.float32)
    tint = np.array(_random_colour(rng, 0.1, 0.9), np.float32)
    noise = _noise(rng, height, width)[..., None]
    texture = np.ascontiguousarray(np.clip(base * (1 - noise) + tint * noise + 0.5, 0, 255), dtype=np.uint8)
    area = height * width
    scale = np.sqrt(area)
    for _ in range(int(area / 400) + 3):  # filled shapes
        colour = _random_colour(rng)
        kind = rng.integers(3)
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        size = int(rng.uniform(0.015, 0.08) * scale) + 2
        if kind == 0:
            cv2.circle(texture, centre, size, colour, -1, lineType=cv2.LINE_AA)
        elif kind == 1:
            offset = rng.integers(-2 * size, 2 * size, 2)
            corner = (centre[0] + int(offset[0]), centre[1] + int(offset[1]))
            cv2.rectangle(texture, centre, corner, colour, -1)
        else:
            count = int(rng.integers(3, 7))
            points = (np.array(centre) + rng.integers(-2 * size, 2 * size, (count, 2))).astype(np.int32)
            cv2.fillPoly(texture, [points], colour, lineType=cv2.LINE_AA)
    for _ in range(int(area / 20000) + 1):  # checker patches
        cell = int(rng.integers(3, 9))
        w, h = int(rng.integers(4, 10)) * cell, int(rng.integers(4, 10)) * cell
        x0, y0 = int(rng.integers(0, max(1, width - w))), int(rng.integers(0, max(1, height - h)))
        yy, xx = np.mgrid[0:h, 0:w]
        checker = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)[..., None]
        patch = texture[y0 : y0 + h, x0 : x0 + w]
        dark = np.array(_random_colour(rng, 0.0, 0.3), np.float32)
        light = np.array(_random_colour(rng, 0.7, 1.0), np.float32)
        patch[...] = (dark * checker + light * (1 - checker)).astype(np.uint8)[: patch.shape[0], : patch.shape[1]]
    for _ in range(int(area / 700) + 2):  # text-like glyph blobs
        text = "".join(rng.choice(list(GLYPHS), int(rng.integers(1, 5))))
        font = FONTS[int(rng.integers(len(FONTS)))]
        font_scale = float(rng.uniform(0.3, 1.1))
        origin = (int(rng.integers(-10, width)), int(rng.integers(5, height + 10)))
        cv2.putText(texture, text, origin, font, font_scale, _random_colour(rng), int(rng.integers(1, 3)), cv2.LINE_AA)
    return texture.astype(np.float32) / 255.0


def weak_texture(rng: np.random.Generator, height: int, width: int, colour: np.ndarray, contrast: float) -> np.ndarray:
    """A plaster / stone-like texture (H, W, 3) float32 in [0, 1]: ``colour`` modulated by smooth noise,
    faint stains and fine grains (pores, specks) whose relative amplitude is about ``contrast``."""
    height, width = max(8, int(height)), max(8, int(width))
    area = height * width
    detail = 0.6 * (_noise(rng, height, width, octaves=6) - 0.5)  # smooth shading variations
    stains = np.zeros((height, width), np.float32)
    for _ in range(int(area / 4000) + 2):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        axes = (int(rng.integers(4, 24)), int(rng.integers(4, 24)))
        cv2.ellipse(
            stains, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(-1, 1)), -1, cv2.LINE_AA
        )
    detail += 0.4 * cv2.GaussianBlur(stains, (0, 0), 3.0)
    grains = np.zeros((height, width), np.float32)
    for _ in range(int(area / 90) + 4):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        value = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0))
        cv2.circle(grains, centre, int(rng.integers(1, 5)), value, -1, cv2.LINE_AA)
    detail += cv2.GaussianBlur(grains, (0, 0), 0.8)
    tint = 1.0 + 0.15 * contrast * rng.uniform(-1, 1, 3).astype(np.float32)
    texture = np.asarray(colour, np.float32) * tint * (1.0 + contrast * detail[..., None])
    return np.clip(texture, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------- world
def make_object_world(config: SceneConfig) -> World:
    """One compact object centred at the origin, no ground: a plinth with a leaning stack of boxes of
    decreasing size and varied yaw on it (like a statue) and side pieces sticking out, all with
    :func:`weak_texture` of ``config.texture_contrast``; ``config.num_boxes`` pieces in all."""
    rng = np.random.default_rng([config.seed, 4243])  # independent of the boxes layout's stream
    density = config.texels_per_unit
    plaster = np.array([0.80, 0.76, 0.68]) * rng.uniform(0.92, 1.05)  # light plaster
    stone = np.array([0.55, 0.55, 0.58]) * rng.uniform(0.9, 1.1)  # a darker plinth
    pieces: list[tuple[np.ndarray, np.ndarray, float, np.ndarray]] = []  # centre, half size, yaw, colour
    plinth = np.array([rng.uniform(0.7, 0.8), rng.uniform(0.6, 0.7), rng.uniform(0.12, 0.16)])
    pieces.append((np.array([0.0, 0.0, plinth[2]]), plinth, float(rng.uniform(0, np.pi / 2)), stone))
    count = config.num_boxes - 1
    num_side = count // 3
    num_stack = count - num_side
    top, half_xy = 2 * plinth[2], np.array([0.58, 0.48])
    xy = np.zeros(2)
    for _ in range(num_stack):
        half = np.array([*(half_xy * rng.uniform(0.8, 1.0, 2)), rng.uniform(0.18, 0.3)])
        xy = xy + rng.uniform(-0.08, 0.08, 2)
        pieces.append((np.array([xy[0], xy[1], top + half[2] - 0.02]), half, float(rng.uniform(0, np.pi)), plaster))
        top += 2 * half[2] - 0.02
        half_xy = half_xy * 0.85
    for _ in range(num_side):  # arms: horizontal pieces sticking out of a stack piece (num_stack >= 2 num_side)
        centre, half, _, _ = pieces[1 + int(rng.integers(num_stack))]
        direction = rng.uniform(0, 2 * np.pi)
        arm = np.array([rng.uniform(0.3, 0.45), rng.uniform(0.08, 0.14), rng.uniform(0.08, 0.14)])
        offset = (half[0] + 0.6 * arm[0]) * np.array([np.cos(direction), np.sin(direction)])
        lift = rng.uniform(-0.5, 0.5) * half[2]
        arm_centre = np.array([centre[0] + offset[0], centre[1] + offset[1], centre[2] + lift])
        pieces.append((arm_centre, arm, float(direction), plaster))
    # centre the bounding box of all pieces at the origin
    corners = []
    for centre, half, yaw, _ in pieces:
        c, s = np.cos(yaw), np.sin(yaw)
        R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
        corners.append(centre + (signs * half) @ R.T)
    corners = np.concatenate(corners)
    shift = (corners.min(axis=0) + corners.max(axis=0)) / 2
    boxes: list[Box] = []
    for centre, half, yaw, colour in pieces:
        dims = 2 * half
        spans = [(dims[1], dims[2])] * 2 + [(dims[0], dims[2])] * 2 + [(dims[0], dims[1])] * 2
        textures = tuple(weak_texture(rng, h * density, w * density, colour, config.texture_contrast) for w, h in spans)
        boxes.append(Box(centre - shift, half, yaw, textures))
    return World(0.0, np.zeros((8, 8, 3), np.float32), tuple(boxes), density)


def make_world(config: SceneConfig) -> World:
    """Random boxes on a textured ground (deterministic given ``config.seed``); for ``layout="object"``
    the object of :func:`make_object_world`."""
    if config.layout == "object":
        return make_object_world(config)
    rng = np.random.default_rng(config.seed)
    density = config.texels_per_unit
    ground_pixels = int(config.ground_size * density)
    ground = procedural_texture(rng, ground_pixels, ground_pixels)
    boxes: list[Box] = []
    attempts = 0
    max_extent = 0.36 * config.ground_size
    while len(boxes) < config.num_boxes and attempts < 1000:
        attempts += 1
        half = np.array([rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.3)])
        xy = rng.uniform(-max_extent, max_extent, 2)
        radius = np.linalg.norm(half[:2])
        if np.linalg.norm(xy) + radius > max_extent * 1.2:
            continue
        if any(np.linalg.norm(xy - b.center[:2]) < radius + np.linalg.norm(b.half_size[:2]) + 0.2 for b in boxes):
            continue
        dims = 2 * half
        # faces -x, +x (span y, z); -y, +y (span x, z); -z, +z (span x, y)
        spans = [(dims[1], dims[2])] * 2 + [(dims[0], dims[2])] * 2 + [(dims[0], dims[1])] * 2
        textures = tuple(procedural_texture(rng, h * density, w * density) for w, h in spans)
        boxes.append(Box(np.array([xy[0], xy[1], half[2]]), half, float(rng.uniform(0, np.pi)), textures))
    return World(config.ground_size, ground, tuple(boxes), density)


# ----------------------------------------------------------------------------------------- cameras
def intrinsics(width: int, height: int, fov_degrees: float) -> np.ndarray:
    """Pinhole K with square pixels, principal point at the image centre (integer-centre convention)."""
    focal = 0.5 * width / np.tan(np.radians(fov_degrees) / 2)
    return np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """World-to-camera (4, 4) of a camera at ``eye`` looking at ``target`` (x right, y down, z forward);
    ``up`` defaults to world +z."""
    up = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, np.float64)
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:
        raise UserError("look_at: the viewing direction is parallel to 'up'")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    pose = np.eye(4)
    pose[:3, :3] = R
    pose[:3, 3] = -R @ eye
    return pose


def ring_cameras(config: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
    """(K (N, 3, 3), poses (N, 4, 4)) of ``num_views`` cameras on a ring/arc around the scene."""
    rng = np.random.default_rng(config.seed + 7919)  # independent of the world's stream
    K = intrinsics(config.width, config.height, config.fov_degrees)
    if config.focal_factor is not None:
        K[0, 0] = K[1, 1] = config.focal
    full = abs(config.arc_degrees - 360.0) < 1e-9
    count = config.num_views if full else max(config.num_views - 1, 1)
    angles = np.radians(np.arange(config.num_views) * config.arc_degrees / count)
    poses = []
    for index, angle in enumerate(angles):
        eye = np.array([config.radius * np.cos(angle), config.radius * np.sin(angle), config.camera_height])
        if config.height_step:
            eye[2] += config.height_step / 2 * (1 if index % 2 == 0 else -1)
        eye = eye + rng.uniform(-config.jitter, config.jitter, 3)
        target = np.array([0.0, 0.0, config.target_height]) + rng.uniform(-config.jitter, config.jitter, 3)
        poses.append(look_at(eye, target))
    return np.repeat(K[None], config.num_views, axis=0), np.stack(poses)


# ----------------------------------------------------------------------------------------- ray casting
def _sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup at texel coordinates (u right, v down); (N, 3)."""
    count = len(u)
    if count == 0:
        return np.zeros((0, 3), np.float32)
    columns = 1024  # cv2.remap maps must stay below 32767 rows/columns: lay the samples out in 2D
    rows = -(-count // columns)
    map_u = np.zeros(rows * columns, np.float32)
    map_v = np.zeros(rows * columns, np.float32)
    map_u[:count], map_v[:count] = u, v
    mapped = cv2.remap(
        texture,
        map_u.reshape(rows, columns),
        map_v.reshape(rows, columns),
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return mapped.reshape(-1, 3)[:count]


BoxHits = list["tuple[np.ndarray, np.ndarray, np.ndarray] | None"]  # per box: (rays, face axis, local dirs)


def _cast_ground(world: World, origin: np.ndarray, directions: np.ndarray, best: np.ndarray, hit_kind: np.ndarray):
    """Hits of the ground square (z = 0, seen from above) into ``best`` / ``hit_kind`` (0); returns the hit
    points' (x, y)."""
    dz = directions[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dz < -1e-12, -origin[2] / dz, np.inf)
    half = world.ground_size / 2
    with np.errstate(invalid="ignore"):  # inf * 0 for rays parallel to an axis
        gx, gy = origin[0] + t_ground * directions[:, 0], origin[1] + t_ground * directions[:, 1]
    inside = np.isfinite(t_ground) & (np.abs(gx) <= half) & (np.abs(gy) <= half) & (t_ground > 0)
    inside &= half > 0  # ground_size 0: no ground
    best[inside] = t_ground[inside]
    hit_kind[inside] = 0
    return gx, gy


def _cast_boxes(
    world: World, origin: np.ndarray, directions: np.ndarray, best: np.ndarray, hit_kind: np.ndarray
) -> BoxHits:
    """Hits of the boxes (slab test in each box's frame) into ``best`` / ``hit_kind`` (1 + box index)."""
    norms2 = np.einsum("ij,ij->i", directions, directions)
    box_hits: BoxHits = []
    for index, box in enumerate(world.boxes):
        # Cull with the bounding sphere first: a box covers a small part of the image.
        offset = origin - box.center
        b = directions @ offset
        candidates = np.nonzero(b * b - norms2 * (offset @ offset - box.half_size @ box.half_size) >= 0)[0]
        if len(candidates) == 0:
            box_hits.append(None)
            continue
        rotation = box.rotation
        local_origin = rotation.T @ offset
        local_dirs = directions[candidates] @ rotation  # rows: R^T d
        near = np.empty((3, len(candidates)))
        far = np.full(len(candidates), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for axis in range(3):
                inverse = 1.0 / local_dirs[:, axis]
                ta = (-box.half_size[axis] - local_origin[axis]) * inverse
                tb = (box.half_size[axis] - local_origin[axis]) * inverse
                near[axis] = np.fmin(ta, tb)
                far = np.fmin(far, np.fmax(ta, tb))
        entry_axis = near.argmax(axis=0)  # the slab entered last is the face hit
        t_near = near[entry_axis, np.arange(len(candidates))]
        hit = (t_near <= far) & (t_near > 1e-9) & (t_near < best[candidates])
        rays = candidates[hit]
        best[rays] = t_near[hit]
        hit_kind[rays] = 1 + index
        box_hits.append((rays, entry_axis[hit], local_dirs[hit]))
    return box_hits


def _shade_boxes(
    world: World, origin: np.ndarray, best: np.ndarray, hit_kind: np.ndarray, box_hits: BoxHits, colours: np.ndarray
) -> None:
    """Colours of the rays whose nearest hit is a box face: its texture, Lambertian light."""
    spans = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
    for index, box in enumerate(world.boxes):
        if box_hits[index] is None:
            continue
        rays, axis, local_dirs = box_hits[index]
        final = hit_kind[rays] == 1 + index  # not hidden by a box tested later
        rays, axis, local_dirs = rays[final], axis[final], local_dirs[final]
        if len(rays) == 0:
            continue
        local_origin = box.rotation.T @ (origin - box.center)
        p = local_origin + best[rays, None] * local_dirs
        sign = np.where(local_dirs[np.arange(len(axis)), axis] > 0, -1, 1)  # outward normal of the face
        face = 2 * axis + (sign > 0)
        normals_local = np.zeros((len(axis), 3))
        normals_local[np.arange(len(axis)), axis] = sign
        light = world.ambient + (1 - world.ambient) * np.clip(normals_local @ box.rotation.T @ world.light, 0.0, 1.0)
        out = np.zeros((len(axis), 3), np.float32)
        for face_id in np.unique(face):
            sel = face == face_id
            a0, a1 = spans[face_id // 2]
            u = (p[sel, a0] + box.half_size[a0]) * world.texels_per_unit - 0.5
            v = (box.half_size[a1] - p[sel, a1]) * world.texels_per_unit - 0.5  # image v down = world up
            out[sel] = _sample(box.textures[face_id], u, v)
        colours[rays] = out * light[:, None]


def _cast(
    world: World, origin: np.ndarray, directions: np.ndarray, shade: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Nearest hit distance along ``directions`` (N, 3) from ``origin``; and shaded colours if asked.

    Distances are in units of the direction vectors (so with camera-z-normalised directions they are
    depths). Misses have distance inf.
    """
    count = len(directions)
    best = np.full(count, np.inf)
    hit_kind = np.full(count, -1, np.int64)  # -1 none, 0 ground, 1 + box index
    gx, gy = _cast_ground(world, origin, directions, best, hit_kind)
    box_hits = _cast_boxes(world, origin, directions, best, hit_kind)
    if not shade:
        return best, None
    colours = np.zeros((count, 3), np.float32)
    mask = hit_kind == 0
    if mask.any():
        half = world.ground_size / 2
        u = (gx[mask] + half) * world.texels_per_unit - 0.5
        v = (half - gy[mask]) * world.texels_per_unit - 0.5
        light = world.ambient + (1 - world.ambient) * max(world.light[2], 0.0)
        colours[mask] = _sample(world.ground_texture, u, v) * light
    _shade_boxes(world, origin, best, hit_kind, box_hits, colours)
    return best, colours


def _rays(K: np.ndarray, pose: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre and world ray directions (camera z component 1) through pixels (xs, ys)."""
    R, t = pose[:3, :3], pose[:3, 3]
    pixels = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], axis=1)
    cam = pixels @ np.linalg.inv(K).T
    return -R.T @ t, cam @ R  # rows: R^T d


def render_view(
    world: World,
    K: np.ndarray,
    pose: np.ndarray,
    width: int,
    height: int,
    supersample: int = 2,
    background: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one view: (image (H, W, 3) uint8 RGB, depth (H, W) float32, 0 where nothing is hit).

    ``background``: RGB in [0, 1] where no surface is hit; None draws a pale sky gradient.
    """
    K, pose = np.asarray(K, np.float64), np.asarray(pose, np.float64)
    s = int(supersample)
    offsets = (np.arange(s) + 0.5) / s - 0.5
    xs = (np.arange(width)[None, :, None, None] + offsets[None, None, None, :]) * np.ones((height, 1, s, 1))
    ys = (np.arange(height)[:, None, None, None] + offsets[None, None, :, None]) * np.ones((1, width, 1, s))
    origin, directions = _rays(K, pose, xs, ys)
    distance, colours = _cast(world, origin, directions, shade=True)
    # Background: a smooth vertical gradient by ray elevation (featureless, depth 0).
    elevation = directions[:, 2] / np.linalg.norm(directions, axis=1)
    if background is None:
        sky = (0.75 + 0.2 * elevation[:, None]) * np.array([0.78, 0.84, 0.95], np.float32)
    else:
        sky = np.asarray(background, np.float32)[None, :]
    colours = np.where(np.isfinite(distance)[:, None], colours, sky)
    image = colours.reshape(height, width, s, s, 3).mean(axis=(2, 3))
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    yc, xc = np.mgrid[0:height, 0:width].astype(np.float64)
    origin, directions = _rays(K, pose, xc, yc)
    depth, _ = _cast(world, origin, directions, shade=False)
    depth = np.where(np.isfinite(depth), depth, 0.0).reshape(height, width).astype(np.float32)
    return image, depth


def render_scene(config: SceneConfig | None = None) -> Scene:
    """Render ``config.num_views`` views of the world on a ring of cameras."""
    config = config if config is not None else SceneConfig()
    world = make_world(config)
    K, poses = ring_cameras(config)
    background = None if config.background is None else (config.background,) * 3
    images, depths = [], []
    for index, (k, pose) in enumerate(zip(K, poses)):
        image, depth = render_view(world, k, pose, config.width, config.height, config.supersample, background)
        if config.noise > 0:
            noise = np.random.default_rng([config.seed, 104729, index]).normal(0.0, config.noise, image.shape[:2])
            image = np.clip(image + noise[..., None] + 0.5, 0, 255).astype(np.uint8)  # grey noise: all channels
        images.append(image)
        depths.append(depth)
    names = [f"view_{i:03d}.png" for i in range(config.num_views)]
    return Scene(names, images, depths, K, poses, config)


# ----------------------------------------------------------------------------------------- geometry
def unproject(depth: np.ndarray, K: np.ndarray, pose: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World coordinates (N, 3) of pixels ``points`` (N, 2), nearest-pixel depth; NaN where depth is 0."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, depth.shape[1] - 1)
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, depth.shape[0] - 1)
    z = depth[rows, cols].astype(np.float64)
    cam = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.linalg.inv(K).T * z[:, None]
    world = (cam - pose[:3, 3]) @ pose[:3, :3]
    world[z <= 0] = np.nan
    return world


def project(world_points: np.ndarray, K: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 2) and camera depths (N,) of world points in a view."""
    cam = world_points @ pose[:3, :3].T + pose[:3, 3]
    uvw = cam @ K.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]


def warp(scene: Scene, i: int, j: int, points: np.ndarray, tolerance: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Map pixels of view ``i`` into view ``j``; returns (pixels (N, 2), valid (N,)).

    Valid: depth known in ``i``, in front of ``j``, inside ``j`` and not occluded there (the depth of
    ``j`` at the landing pixel agrees within ``tolerance`` relative).
    """
    world = unproject(scene.depths[i], scene.K[i], scene.poses[i], points)
    pixels, z = project(world, scene.K[j], scene.poses[j])
    height, width = scene.depths[j].shape
    valid = np.isfinite(pixels).all(axis=1) & (z > 0)
    valid &= (pixels[:, 0] > -0.5) & (pixels[:, 0] < width - 0.5)
    valid &= (pixels[:, 1] > -0.5) & (pixels[:, 1] < height - 0.5)
    seen = np.zeros(len(points))
    rows = np.clip(np.round(np.nan_to_num(pixels[:, 1])).astype(int), 0, height - 1)
    cols = np.clip(np.round(np.nan_to_num(pixels[:, 0])).astype(int), 0, width - 1)
    seen[valid] = scene.depths[j][rows[valid], cols[valid]]
    valid &= np.abs(seen - np.nan_to_num(z)) <= tolerance * np.maximum(np.nan_to_num(z), 1e-9)
    return pixels, valid


# ----------------------------------------------------------------------------------------- files
def write_scene(scene: Scene, folder: str | Path) -> Path:
    """Write ``images/*.png``, ``depths/*.npy``, ``cameras.txt`` (Middlebury par format: K, R, t)
    and ``scene.json`` (the config) under ``folder``; files are written atomically."""
    from core.io import atomic_path, write_text_atomic
    from core.par_files import write_par_file

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "depths").mkdir(parents=True, exist_ok=True)
    for name, image, depth in zip(scene.names, scene.images, scene.depths):
        with atomic_path(folder / "images" / name) as temp:
            ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise UserError(f"cannot encode {name} as PNG")
            temp.write_bytes(encoded.tobytes())
        with atomic_path(folder / "depths" / (Path(name).stem + ".npy")) as temp, open(temp, "wb") as handle:
            np.save(handle, depth.astype(np.float32))
    write_par_file(folder / "cameras.txt", scene.cameras().values())
    write_text_atomic(folder / "scene.json", json.dumps(asdict(scene.config) if scene.config else {}, indent=2))
    return folder


def read_scene(folder: str | Path) -> Scene:
    """Read a scene written by :func:`write_scene`."""
    from core.image_io import read_rgb
    from core.par_files import read_par_file

    folder = Path(folder)
    cameras = read_par_file(folder / "cameras.txt")
    names = list(cameras)
    images = [np.clip(read_rgb(folder / "images" / n) * 255 + 0.5, 0, 255).astype(np.uint8) for n in names]
    depth_paths = [folder / "depths" / (Path(n).stem + ".npy") for n in names]
    missing = [p for p in depth_paths if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: depth map missing; re-create the scene with `python -m datasets.synthetic`")
    depths = [np.load(p, allow_pickle=False) for p in depth_paths]
    poses = np.stack([np.vstack([np.hstack([c.R, c.t[:, None]]), [0, 0, 0, 1]]) for c in cameras.values()])
    config = None
    if (folder / "scene.json").is_file():
        data = json.loads((folder / "scene.json").read_text())
        config = SceneConfig(**data) if data else None
    return Scene(names, images, depths, np.stack([c.K for c in cameras.values()]), poses, config)


def main(output: Path, config: SceneConfig = SceneConfig()) -> Scene:
    """Render the scene of ``config`` and write it to ``output``."""
    scene = render_scene(config)
    write_scene(scene, output)
    return scene


#: options users type in their short spelling (the config's own spelling works too)
SHORT_OPTIONS = {"num_views": ("--views", "--num-views"), "arc_degrees": ("--arc", "--arc-degrees")}


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The CLI; its defaults are the values of ``preset`` (a name of :data:`PRESETS`) or of ``SceneConfig()``."""
    defaults = SceneConfig.preset(preset) if preset is not None else SceneConfig()
    parser = argparse.ArgumentParser(
        prog="python -m datasets.synthetic",
        description="Render a synthetic textured scene with known cameras and depth.",
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--preset", default=None, help=f"a named scene ({', '.join(PRESETS)}); the other options override its values"
    )
    add_config_arguments(parser, SceneConfig, exclude=SHORT_OPTIONS, defaults=defaults)
    helps = field_comments(SceneConfig)
    for name, spellings in SHORT_OPTIONS.items():
        kind = type(getattr(defaults, name))
        parser.add_argument(*spellings, dest=name, type=kind, default=getattr(defaults, name), help=helps.get(name))
    return parser


def main_cli(argv: list[str] | None = None) -> None:
    # the preset first: it supplies the defaults of every other option
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default=None)
    args = build_parser(preset.parse_known_args(argv)[0].preset).parse_args(argv)
    scene = main(args.output, config_from_args(args, SceneConfig))
    print(f"wrote {len(scene)} views to {args.output}")


if __name__ == "__main__":
    run_cli(main_cli)
