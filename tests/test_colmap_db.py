"""The database step: EXIF focal priors, camera modes, COLMAP's keypoint origin, match import and
pycolmap verification on correspondences with known geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from core import io
from core.errors import UserError
from pipeline.colmap_db import (
    CameraPrior,
    VerificationConfig,
    build_database,
    camera_prior,
    exif_focal_length,
    group_cameras,
)


def _jpeg(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, **tags) -> Path:
    """A JPEG with EXIF: keyword tags make, model (main IFD) and f35, focal, res, unit, px (Exif IFD)."""
    exif = Image.Exif()
    main = {"make": 0x010F, "model": 0x0110}
    sub_tags = {"f35": 0xA405, "focal": 0x920A, "res": 0xA20E, "unit": 0xA210, "px": 0xA002}
    sub = exif.get_ifd(0x8769)
    for key, value in tags.items():
        if key in main:
            exif[main[key]] = value
        else:
            sub[sub_tags[key]] = value
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return path


def test_exif_focal_length(tmp_path: Path) -> None:
    # 35 mm equivalent: f = f35 / 35 * max(W, H) (COLMAP's rule)
    focal, key = exif_focal_length(_jpeg(tmp_path / "a.jpg", make="Canon", model="EOS", f35=28), (640, 480))
    assert focal == pytest.approx(28 / 35 * 640) and key == ("Canon", "EOS", 28.0)
    # millimetres + sensor resolution: a 36 mm wide, 4000 px sensor, photo downscaled to 800 px
    path = _jpeg(tmp_path / "b.jpg", focal=50.0, res=IFDRational(4000, 36), unit=4, px=4000)
    focal, _ = exif_focal_length(path, (800, 600))
    assert focal == pytest.approx(50 / 36 * 800, rel=1e-4)
    # the same in inches (unit 2)
    path = _jpeg(tmp_path / "c.jpg", focal=50.0, res=IFDRational(4000 * 254, 360), unit=2, px=4000)
    assert exif_focal_length(path, (800, 600))[0] == pytest.approx(50 / 36 * 800, rel=1e-4)
    # focal length alone cannot be converted to pixels: no prior
    assert exif_focal_length(_jpeg(tmp_path / "d.jpg", focal=50.0), (800, 600))[0] is None
    # no EXIF: COLMAP's default 1.2 * max(W, H), not flagged as a prior
    plain = tmp_path / "e.png"
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(plain)
    prior = camera_prior(plain, (64, 48))
    assert prior.focal_length == pytest.approx(1.2 * 64) and not prior.prior_focal_length and prior.exif_key == ()
    assert camera_prior(tmp_path / "a.jpg", (640, 480)).prior_focal_length


def test_camera_modes() -> None:
    priors = {
        "a": CameraPrior(640, 480, 768.0, False, ()),
        "b": CameraPrior(640, 480, 768.0, False, ()),
        "c": CameraPrior(480, 640, 768.0, False, ()),
        "d": CameraPrior(640, 480, 512.0, True, ("Canon", "EOS", 28.0)),
        "e": CameraPrior(640, 480, 512.0, True, ("Canon", "EOS", 28.0)),
        "f": CameraPrior(640, 480, 640.0, True, ("Canon", "EOS", 35.0)),
    }
    auto = group_cameras(priors, "auto")
    assert auto["a"] == auto["b"] and auto["d"] == auto["e"]
    assert len({auto["a"], auto["c"], auto["d"], auto["f"]}) == 4
    assert len(set(group_cameras(priors, "per-image").values())) == 6
    with pytest.raises(UserError, match="one size"):
        group_cameras(priors, "single")
    same_size = {k: v for k, v in priors.items() if k != "c"}
    assert set(group_cameras(same_size, "single").values()) == {0}
    with pytest.raises(UserError, match="camera mode"):
        group_cameras(priors, "per-folder")


def _two_view_scene(rng: np.random.Generator, n: int = 200):
    """Two pinhole cameras looking at random points: exact correspondences (hloc pixel convention)."""
    points = rng.uniform([-1, -1, 4], [1, 1, 6], (n, 3))
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    angle = np.radians(8)
    R = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    t = np.array([-0.5, 0.05, 0.1])
    x0 = points @ K.T
    x0 = x0[:, :2] / x0[:, 2:]
    x1 = (points @ R.T + t) @ K.T
    x1 = x1[:, :2] / x1[:, 2:]
    return x0.astype(np.float32), x1.astype(np.float32)


def test_build_database_imports_and_verifies(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image_dir = tmp_path / "images"
    names = ["a.jpg", "b.jpg", "c.jpg"]
    for i, name in enumerate(names):
        _jpeg(image_dir / name, size=(640, 480), seed=i, make="Canon", model="EOS", f35=28)
    x0, x1 = _two_view_scene(rng)
    n = len(x0)
    # c has random keypoints: its pairs are pure noise (25 random matches, like a non-overlapping pair)
    xc = rng.uniform(0, [640, 480], (n, 2)).astype(np.float32)
    io.write_features(
        tmp_path / "features.h5",
        {
            "a.jpg": (x0, np.ones(n), (640, 480)),
            "b.jpg": (x1, np.ones(n), (640, 480)),
            "c.jpg": (xc, np.ones(n), (640, 480)),
        },
    )
    matches_ab = np.arange(n, dtype=np.int32)
    wrong = rng.choice(n, 40, replace=False)
    matches_ab[wrong] = rng.permutation(wrong)  # 40 outliers (a few may map to themselves)
    few = np.full(n, -1, np.int32)
    few[:10] = np.arange(10)  # fewer than min_num_inliers: not even imported
    io.write_matches(
        tmp_path / "matches.h5",
        {
            ("a.jpg", "b.jpg"): (matches_ab, np.ones(n)),
            ("c.jpg", "a.jpg"): (np.where(np.arange(n) < 25, rng.permutation(n), -1).astype(np.int32), np.ones(n)),
            ("b.jpg", "c.jpg"): (few, np.ones(n)),
        },
    )
    pairs = [("a.jpg", "b.jpg"), ("c.jpg", "a.jpg"), ("b.jpg", "c.jpg")]
    database = tmp_path / "database.db"
    image_ids, stats = build_database(
        database,
        image_dir,
        names,
        pairs,
        tmp_path / "features.h5",
        tmp_path / "matches.h5",
        camera_mode="auto",
        verification=VerificationConfig(),
    )
    assert stats.num_images == 3 and stats.num_cameras == 1 and stats.num_keypoints == 3 * n
    assert stats.num_pairs == 3 and stats.num_matched_pairs == 2 and stats.num_matches == n + 25
    assert stats.num_verified_pairs == 1
    truly_right = int(np.sum(matches_ab == np.arange(n)))
    # every right match kept; an outlier can pass only by landing within 4 px of its epipolar line
    assert truly_right - 2 <= stats.num_inlier_matches <= truly_right + 8
    assert not any(p.name.startswith(".database") for p in tmp_path.iterdir())  # no temporary left over
    with pycolmap.Database.open(str(database)) as db:
        camera = db.read_all_cameras()[0]
        assert camera.has_prior_focal_length and camera.params[0] == pytest.approx(28 / 35 * 640)
        assert np.allclose(db.read_keypoints(image_ids["b.jpg"])[:, :2], x1 + 0.5)
        geometry = db.read_two_view_geometry(image_ids["a.jpg"], image_ids["b.jpg"])
        inliers = np.asarray(geometry.inlier_matches)
        if image_ids["a.jpg"] > image_ids["b.jpg"]:
            inliers = inliers[:, ::-1]
        assert np.all(matches_ab[inliers[:, 0]] == inliers[:, 1])
        assert np.sum(inliers[:, 0] != inliers[:, 1]) <= 8  # most of the 40 outliers were rejected
        assert not db.exists_matches(image_ids["b.jpg"], image_ids["c.jpg"])


def test_missing_features_is_a_user_error(tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    _jpeg(image_dir / "a.jpg")
    _jpeg(image_dir / "b.jpg", seed=1)
    io.write_features(tmp_path / "features.h5", {"a.jpg": (np.zeros((3, 2)), np.ones(3), (64, 48))})
    io.write_matches(tmp_path / "matches.h5", {})
    with pytest.raises(UserError, match="no keypoints for image 'b.jpg'"):
        build_database(
            tmp_path / "db.db",
            image_dir,
            ["a.jpg", "b.jpg"],
            [("a.jpg", "b.jpg")],
            tmp_path / "features.h5",
            tmp_path / "matches.h5",
        )
