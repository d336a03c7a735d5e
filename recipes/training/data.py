"""Training pairs for LoFTR: homographic pairs from photos, synthetic multi-view pairs with exact depth, and
loaders for the official MegaDepth / ScanNet training layouts.

Every source is a deterministic function of an integer: ``source.sample(index)`` returns the same pair for the same
index (all randomness comes from ``numpy.random.default_rng([seed, index])``), so a training run's data position is
just its step counter and a resumed run sees exactly the data it would have seen.

A sample is a dict of tensors: ``image0`` / ``image1`` (1, H, W) float32 in [0, 1] and either ``H_0to1`` (3, 3)
(homography pairs) or ``depth0`` / ``depth1`` (H, W), ``K0`` / ``K1`` (3, 3), ``T_0to1`` (4, 4) (depth pairs), and
optional ``mask0`` / ``mask1`` (H, W) bool padding masks. Pixel convention: (0, 0) is the centre of the top-left
pixel (intrinsics from COLMAP-style files, whose origin is the pixel corner, are shifted by -0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from core.errors import UserError
from core.image_io import is_image_file, read_gray

Sample = dict[str, torch.Tensor]

#: scikit-image sample photos usable for training: those whose docstrings state public domain, CC0 or "no known
#: copyright restrictions" (``moon`` and ``page``, whose origin is not stated, are left out); see the model card
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "cell",
)


class PairSource(Protocol):
    """Anything with a deterministic ``sample(index) -> Sample``."""

    def sample(self, index: int) -> Sample: ...


# ---------------------------------------------------------------------------------------------- photos
def parse_size(text: str) -> tuple[int, int]:
    """A ``--size`` as users type it, ``WxH`` (``640x480``), as images are shaped: (H, W); a UserError otherwise
    (raised from an argparse ``type``, it reaches :func:`core.errors.run_cli` as one ``error:`` line)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"bad --size {text!r}; use WxH, e.g. 640x480") from None
    return height, width


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); a UserError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; pass an existing folder to --data homography:DIR")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise UserError(f"no images found in {folder}; put .jpg/.png files there")
    return paths


def load_photos(folder: str | Path, max_side: int = 1024) -> list[np.ndarray]:
    """Grayscale float32 photos of a folder, downscaled (area) so the longer side is at most ``max_side``."""
    return [limit_size(read_gray(p), max_side) for p in list_images(folder)]


def skimage_photos(names: Sequence[str] = SKIMAGE_PHOTOS, max_side: int = 1024) -> list[np.ndarray]:
    """scikit-image's bundled sample photos as grayscale float32 (needs ``pip install scikit-image``)."""
    try:
        import skimage.data
    except ImportError:
        raise UserError("the skimage photo source needs scikit-image: pip install scikit-image") from None
    photos = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 3:
            image = cv2.cvtColor(image[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
        image = image.astype(np.float32)
        image = image / 255.0 if image.max() > 1.0 else image
        photos.append(limit_size(image, max_side))
    return photos


def limit_size(image: np.ndarray, max_side: int) -> np.ndarray:
    scale = max_side / max(image.shape)
    if scale >= 1:
        return image.astype(np.float32)
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)


# ---------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class PhotometricConfig:
    """Per-image photometric augmentation ranges (0 disables a term)."""

    brightness: float = 0.15  # additive, uniform in [-b, b]
    contrast: float = 0.3  # multiplicative around the mean, uniform in [1 - c, 1 + c]
    gamma: float = 0.35  # exponent exp(U[-g, g])
    noise: float = 0.03  # gaussian noise std, uniform in [0, noise]
    blur_probability: float = 0.2  # gaussian blur sigma U[0.3, 1.5]


def photometric(
    image: np.ndarray, rng: np.random.Generator, config: PhotometricConfig = PhotometricConfig()
) -> np.ndarray:
    """Randomly changed brightness, contrast, gamma, blur and noise of a float image in [0, 1]."""
    out = image.astype(np.float32)
    if config.blur_probability and rng.random() < config.blur_probability:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, 1.5)))
    if config.gamma:
        out = np.clip(out, 0, 1) ** float(np.exp(rng.uniform(-config.gamma, config.gamma)))
    if config.contrast:
        mean = float(out.mean())
        out = (out - mean) * float(rng.uniform(1 - config.contrast, 1 + config.contrast)) + mean
    if config.brightness:
        out = out + float(rng.uniform(-config.brightness, config.brightness))
    if config.noise:
        out = out + rng.normal(0, rng.uniform(0, config.noise), out.shape).astype(np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- homographies
@dataclass(frozen=True)
class HomographyConfig:
    """Random homographic pairs: image 0 is a crop of a photo, image 1 the crop seen through a homography."""

    height: int = 240
    width: int = 320
    #: the photo is first resized so that the crop covers 1/zoom of its shorter side, zoom in this range
    zoom: tuple[float, float] = (1.0, 2.0)
    max_rotation_deg: float = 30.0  # in-plane rotation of image 1
    scale: tuple[float, float] = (0.7, 1.4)  # zoom of image 1 relative to image 0
    perspective: float = 0.15  # corner displacement, fraction of the image size
    translation: float = 0.15  # fraction of the image size
    photometric: PhotometricConfig = PhotometricConfig()


def random_homography(rng: np.random.Generator, width: int, height: int, config: HomographyConfig) -> np.ndarray:
    """A homography of image 0 to image 1: rotation + scale about the centre, corner jitter and shift."""
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    centre = corners.mean(axis=0)
    angle = math.radians(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
    scale = math.exp(rng.uniform(math.log(config.scale[0]), math.log(config.scale[1])))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = (corners - centre) @ rot.T * scale + centre
    size = np.array([width, height], np.float64)
    moved += rng.uniform(-config.perspective, config.perspective, (4, 2)) * size
    moved += rng.uniform(-config.translation, config.translation, 2) * size
    return cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32)).astype(np.float64)


def homography_pair(
    photo: np.ndarray, rng: np.random.Generator, config: HomographyConfig = HomographyConfig(), augment: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image0, image1, H_0to1) from one grayscale photo; image 0 lies fully inside the (resized) photo."""
    h, w = config.height, config.width
    zoom = rng.uniform(*config.zoom)
    scale = max(h / photo.shape[0], w / photo.shape[1]) * zoom  # the crop fits in the resized photo
    size = (max(w, math.ceil(photo.shape[1] * scale)), max(h, math.ceil(photo.shape[0] * scale)))
    resized = cv2.resize(photo, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x0 = int(rng.integers(0, resized.shape[1] - w + 1))
    y0 = int(rng.integers(0, resized.shape[0] - h + 1))
    image0 = resized[y0 : y0 + h, x0 : x0 + w]
    H = random_homography(rng, w, h, config)
    shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)  # resized photo -> image 0
    image1 = cv2.warpPerspective(
        resized, H @ shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    if augment:
        image0 = photometric(image0, rng, config.photometric)
        image1 = photometric(image1, rng, config.photometric)
    return np.ascontiguousarray(image0, np.float32), np.ascontiguousarray(image1, np.float32), H


class HomographyPairs:
    """Homographic pairs from a list of grayscale photos; ``sample(index)`` is deterministic."""

    def __init__(
        self,
        photos: Sequence[np.ndarray],
        config: HomographyConfig = HomographyConfig(),
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        if not photos:
            raise UserError("the homography source has no photos")
        self.photos = list(photos)
        self.config = config
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.photos)

    def sample(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, 1, index])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        image0, image1, H = homography_pair(photo, rng, self.config, self.augment)
        return {
            "image0": torch.from_numpy(image0)[None],
            "image1": torch.from_numpy(image1)[None],
            "H_0to1": torch.from_numpy(H),
        }


# ---------------------------------------------------------------------------------------------- synthetic scenes
@dataclass(frozen=True)
class SyntheticConfig:
    """Two views of a random synthetic world (datasets.synthetic) with exact depth."""

    height: int = 240
    width: int = 320
    num_worlds: int = 16
    angle_deg: tuple[float, float] = (4.0, 30.0)  # azimuth difference between the views
    radius: tuple[float, float] = (5.5, 8.5)
    camera_height: tuple[float, float] = (1.5, 5.0)
    fov_deg: tuple[float, float] = (45.0, 70.0)
    roll_deg: float = 10.0
    supersample: int = 2
    photometric: PhotometricConfig = PhotometricConfig(brightness=0.1, contrast=0.2, gamma=0.25, noise=0.02)
    cache_worlds: int = 4
    #: object-centric views: no ground, a dark background and box textures of reduced contrast (a plaster model
    #: on a turntable rather than a textured street); its worlds are distinct from the plain ones
    objects: bool = False
    object_contrast: tuple[float, float] = (0.15, 1.0)  # texture contrast factor range (1 = unchanged)
    object_background: float = 0.12  # background grey level drawn from [0, this]

    @staticmethod
    def object_centric(height: int = 240, width: int = 320, num_worlds: int = 16) -> "SyntheticConfig":
        """Objects seen from closer, over a wider range of angles and elevations."""
        return SyntheticConfig(
            height=height,
            width=width,
            num_worlds=num_worlds,
            angle_deg=(4.0, 45.0),
            radius=(5.0, 8.0),
            camera_height=(0.3, 5.0),
            objects=True,
        )


class SyntheticPairs:
    """Pairs of rendered views with exact depth, intrinsics and relative pose."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig(), seed: int = 0, augment: bool = True) -> None:
        if config.num_worlds < 1:
            raise UserError(f"synthetic:N needs N >= 1 worlds, got {config.num_worlds}")
        self.config = config
        self.seed = seed
        self.augment = augment
        self._worlds: dict[int, object] = {}

    def _world(self, k: int):
        from datasets.synthetic import SceneConfig, make_world

        if k not in self._worlds:
            if len(self._worlds) >= self.config.cache_worlds:
                self._worlds.pop(next(iter(self._worlds)))
            base = 20_000 if self.config.objects else 10_000
            self._worlds[k] = make_world(SceneConfig(seed=base + 97 * self.seed + k))
        return self._worlds[k]

    def _object_world(self, world, rng: np.random.Generator):
        """``world`` without its ground, each box face's texture at a random contrast around its mean."""
        from dataclasses import replace

        low, high = self.config.object_contrast
        boxes = []
        for box in world.boxes:
            textures = []
            for texture in box.textures:
                mean = texture.mean(axis=(0, 1), keepdims=True)
                textures.append((mean + rng.uniform(low, high) * (texture - mean)).astype(np.float32))
            boxes.append(replace(box, textures=tuple(textures)))
        return replace(world, ground_size=0.0, boxes=tuple(boxes))

    def _camera(self, rng: np.random.Generator, azimuth: float) -> tuple[np.ndarray, np.ndarray]:
        from datasets.synthetic import intrinsics, look_at

        c = self.config
        radius, height = rng.uniform(*c.radius), rng.uniform(*c.camera_height)
        eye = np.array([radius * math.cos(azimuth), radius * math.sin(azimuth), height])
        target = np.array([0.0, 0.0, 0.5]) + rng.uniform(-1.0, 1.0, 3) * np.array([1.5, 1.5, 0.4])
        pose = look_at(eye, target)
        roll = math.radians(rng.uniform(-c.roll_deg, c.roll_deg))
        Rz = np.eye(4)
        Rz[:2, :2] = [[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]]
        K = intrinsics(c.width, c.height, rng.uniform(*c.fov_deg))
        return K, Rz @ pose

    def sample(self, index: int) -> Sample:
        from datasets.synthetic import render_view

        c = self.config
        rng = np.random.default_rng([self.seed, 2, index])
        world = self._world(int(rng.integers(c.num_worlds)))
        background = None
        if c.objects:
            world = self._object_world(world, rng)
            background = (float(rng.uniform(0.0, c.object_background)),) * 3
        a0 = rng.uniform(0, 2 * math.pi)
        a1 = a0 + math.radians(rng.uniform(*c.angle_deg)) * rng.choice([-1.0, 1.0])
        (K0, P0), (K1, P1) = self._camera(rng, a0), self._camera(rng, a1)
        out: Sample = {}
        for k, (K, P) in enumerate(((K0, P0), (K1, P1))):
            rgb, depth = render_view(world, K, P, c.width, c.height, c.supersample, background)
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
            if self.augment:
                gray = photometric(gray, rng, c.photometric)
            out[f"image{k}"] = torch.from_numpy(gray)[None]
            out[f"depth{k}"] = torch.from_numpy(depth)
            out[f"K{k}"] = torch.from_numpy(K)
        out["T_0to1"] = torch.from_numpy(P1 @ np.linalg.inv(P0))
        return out


# ---------------------------------------------------------------------------------------------- MegaDepth / ScanNet
def _resize_pad(
    image: np.ndarray, depth: np.ndarray | None, K: np.ndarray, long_side: int, pad_to: int | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Resize so the longer side is ``long_side`` (sides multiples of 8), pad bottom/right to ``pad_to``.

    Returns (image, depth (nearest-resized), K of the resized image, mask (bool, True = real pixel)).
    ``K`` is in the centre-of-pixel convention.
    """
    h, w = image.shape
    scale = long_side / max(h, w)
    new_w, new_h = max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)
    sx, sy = new_w / w, new_h / h
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    # pixel centres: x' = (x + 0.5) sx - 0.5
    A = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], np.float64)
    K = A @ K
    if depth is not None:
        depth = cv2.resize(depth.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    mask = np.ones((new_h, new_w), bool)
    if pad_to is not None:
        if pad_to < max(new_h, new_w):
            raise ValueError(f"pad_to {pad_to} is smaller than the resized image {new_w}x{new_h}")
        pad = ((0, pad_to - new_h), (0, pad_to - new_w))
        image = np.pad(image, pad)
        mask = np.pad(mask, pad)
        if depth is not None:
            depth = np.pad(depth, pad)
    return image.astype(np.float32), depth, K, mask


def _load_index(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=allow_pickle) as data:
            return {k: data[k] for k in data.files}
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise UserError(
                f"{path} stores Python objects (the official index format); it is only read with "
                f"--trust-index, which unpickles it: use it only for index files you trust"
            ) from None
        raise UserError(f"{path} is not a readable .npz index ({error})") from None
    except (OSError, EOFError) as error:
        raise UserError(f"{path} is not a readable .npz index ({error})") from None


def _safe_join(root: Path, relative: str) -> Path:
    path = (root / str(relative)).resolve()
    if root.resolve() not in path.parents:
        raise UserError(f"index entry {relative!r} points outside {root}; fix the index file")
    return path


class MegaDepthPairs:
    """Pairs from the official MegaDepth training layout (LoFTR's ``MegaDepthDataset``).

    ``root`` holds the images / depths under the relative paths the index stores (``Undistorted_SfM/...``,
    ``phoenix/S6/...``); ``index_dir`` holds one ``<scene>.npz`` per scene with ``image_paths``, ``depth_paths``,
    ``intrinsics`` (N, 3, 3) (COLMAP convention), ``poses`` (N, 4, 4) world-to-camera and ``pair_infos``
    (``((i0, i1), overlap, central_matches)``). Depths are HDF5 files with a ``depth`` dataset. Images are resized
    to ``long_side`` and padded to a ``long_side`` square (with masks), as the official loader does.
    """

    def __init__(
        self,
        root: str | Path,
        index_dir: str | Path | None = None,
        long_side: int = 640,
        min_overlap: float = 0.0,
        max_overlap: float = 1.0,
        seed: int = 0,
        allow_pickle: bool = False,
        augment: bool = True,
    ) -> None:
        self.root = Path(root)
        index_dir = Path(index_dir) if index_dir is not None else self.root / "index"
        files = sorted(index_dir.glob("*.npz")) if index_dir.is_dir() else []
        if not files:
            raise UserError(
                f"no MegaDepth index files (*.npz) in {index_dir}; pass megadepth:ROOT with ROOT/index "
                f"holding the official scene_info npz files"
            )
        self.scenes = [_load_index(f, allow_pickle) for f in files]
        self.pairs: list[tuple[int, int, int]] = []
        for s, info in enumerate(self.scenes):
            for item in info["pair_infos"]:
                (i0, i1), overlap = item[0], float(item[1])
                if min_overlap <= overlap <= max_overlap:
                    self.pairs.append((s, int(i0), int(i1)))
        if not self.pairs:
            raise UserError(
                f"the MegaDepth index in {index_dir} has no pairs with overlap in [{min_overlap}, {max_overlap}]"
            )
        self.long_side = long_side
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.pairs)

    def _view(self, scene: dict[str, np.ndarray], i: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        import h5py

        image = read_gray(_safe_join(self.root, scene["image_paths"][i]))
        with h5py.File(_safe_join(self.root, scene["depth_paths"][i]), "r") as f:
            depth = np.asarray(f["depth"], np.float32)
        depth = depth[: image.shape[0], : image.shape[1]]
        if depth.shape != image.shape:
            depth = np.pad(depth, ((0, image.shape[0] - depth.shape[0]), (0, image.shape[1] - depth.shape[1])))
        K = np.asarray(scene["intrinsics"][i], np.float64).copy()
        K[0, 2] -= 0.5  # COLMAP: origin at the pixel corner
        K[1, 2] -= 0.5
        image, depth, K, mask = _resize_pad(image, depth, K, self.long_side, self.long_side)
        if self.augment:
            image = np.where(mask, photometric(image, rng), 0).astype(np.float32)
        return image, depth, K, mask, np.asarray(scene["poses"][i], np.float64)

    def sample(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, 3, index])
        s, i0, i1 = self.pairs[int(rng.integers(len(self.pairs)))]
        scene = self.scenes[s]
        out: Sample = {}
        poses = []
        for k, i in enumerate((i0, i1)):
            image, depth, K, mask, pose = self._view(scene, i, rng)
            out[f"image{k}"] = torch.from_numpy(image)[None]
            out[f"depth{k}"] = torch.from_numpy(depth)
            out[f"K{k}"] = torch.from_numpy(K)
            out[f"mask{k}"] = torch.from_numpy(mask)
            poses.append(pose)
        out["T_0to1"] = torch.from_numpy(poses[1] @ np.linalg.inv(poses[0]))
        return out


class ScanNetPairs:
    """Pairs from the official ScanNet training layout (LoFTR's ``ScanNetDataset``).

    ``root``: ``scene%04d_%02d/{color/<id>.jpg, depth/<id>.png (uint16 millimetres), pose/<id>.txt (camera-to-world
    4x4)}``; ``index_dir``: ``*.npz`` files with ``name`` (M, 4) rows ``(scene, sub_scene, id0, id1)``, and
    ``intrinsics.npz`` (in ``index_dir`` or its parent) mapping ``scene%04d_%02d`` to the 3x3 K of the 640x480
    images (COLMAP-style convention, shifted by -0.5 here). Images are resized to 640x480.
    """

    def __init__(
        self,
        root: str | Path,
        index_dir: str | Path | None = None,
        intrinsics: str | Path | None = None,
        size: tuple[int, int] = (480, 640),
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        self.root = Path(root)
        index_dir = Path(index_dir) if index_dir is not None else self.root / "index"
        files = sorted(f for f in index_dir.glob("*.npz") if f.name != "intrinsics.npz") if index_dir.is_dir() else []
        if not files:
            raise UserError(
                f"no ScanNet index files (*.npz) in {index_dir}; pass scannet:ROOT with ROOT/index "
                f"holding the official scene_data npz files"
            )
        names = [_load_index(f, False)["name"] for f in files]
        self.names = np.concatenate([np.asarray(n).reshape(-1, 4) for n in names]).astype(np.int64)
        candidates = (
            [Path(intrinsics)] if intrinsics else [index_dir / "intrinsics.npz", index_dir.parent / "intrinsics.npz"]
        )
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"ScanNet intrinsics.npz not found (looked at {', '.join(map(str, candidates))})")
        self.intrinsics = _load_index(found, False)
        self.size = size
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.names)

    def sample(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, 4, index])
        scene, sub, id0, id1 = (int(v) for v in self.names[int(rng.integers(len(self.names)))])
        scene_name = f"scene{scene:04d}_{sub:02d}"
        if scene_name not in self.intrinsics:
            raise UserError(f"intrinsics.npz has no entry for {scene_name}")
        K_base = np.asarray(self.intrinsics[scene_name], np.float64).reshape(3, 3).copy()
        K_base[0, 2] -= 0.5
        K_base[1, 2] -= 0.5
        out: Sample = {}
        poses = []
        h, w = self.size
        for k, stem in enumerate((id0, id1)):
            folder = _safe_join(self.root, scene_name)
            image = read_gray(folder / "color" / f"{stem}.jpg")
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            depth_raw = cv2.imread(str(folder / "depth" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            if depth_raw is None:
                raise UserError(f"{folder / 'depth' / f'{stem}.png'} is missing or unreadable")
            depth = cv2.resize(depth_raw.astype(np.float32) / 1000.0, (w, h), interpolation=cv2.INTER_NEAREST)
            cam_to_world = np.loadtxt(folder / "pose" / f"{stem}.txt").reshape(4, 4)
            if self.augment:
                image = photometric(image, rng)
            out[f"image{k}"] = torch.from_numpy(image.astype(np.float32))[None]
            out[f"depth{k}"] = torch.from_numpy(depth)
            out[f"K{k}"] = torch.from_numpy(K_base)
            poses.append(np.linalg.inv(cam_to_world))
        out["T_0to1"] = torch.from_numpy(poses[1] @ np.linalg.inv(poses[0]))
        return out


# ---------------------------------------------------------------------------------------------- mixing
class MixedPairs:
    """Draw each sample from one of several sources (by weight); deterministic in the index."""

    def __init__(self, sources: Sequence[PairSource], weights: Sequence[float] | None = None, seed: int = 0) -> None:
        if not sources:
            raise UserError("no training data: pass at least one --data SOURCE")
        self.sources = list(sources)
        w = np.asarray(weights if weights is not None else [1.0] * len(sources), np.float64)
        self.probabilities = w / w.sum()
        self.seed = seed

    def sample(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, 0, index])
        k = int(rng.choice(len(self.sources), p=self.probabilities))
        return self.sources[k].sample(index)


def collate(samples: Sequence[Sample]) -> Sample:
    """Stack samples with the same keys and image sizes into a batch (leading dimension N)."""
    keys = set(samples[0])
    for s in samples[1:]:
        if set(s) != keys:
            raise ValueError(
                "cannot batch samples of different kinds (homography vs depth); use batch size 1 or one kind of data"
            )
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
