"""Dense matching step: cache of prepared images, resume after a crash, hloc files, bad input, real SIFT."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from core import io
from core.errors import UserError
from core.image_io import read_gray
from matchers.base import Matcher, Matches
from pipeline.match_dense import DenseMatchConfig, main, main_cli, plan_order, planned_loads, raw_root, run

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 96


class ShiftMatcher(Matcher):
    """A matcher for crops of one texture at known offsets (looked up by image content).

    Like LoFTR it puts image 0's points on a grid and image 1's points off it (sub-pixel jitter that
    differs per pair), so the same scene point gets different raw points in different pairs.
    """

    name = "shift"

    def __init__(self, offsets: dict[str, np.ndarray], fail_after: int | None = None, option: int = 0) -> None:
        self.offsets = offsets  # content hash -> (x, y) offset of the crop in the texture
        self.fail_after = fail_after
        self.option = option
        self.prepare_calls = 0
        self.match_calls = 0
        self.seen: list[tuple[str, str]] = []  # content hashes of (image 0, image 1) per match call

    def prepare(self, image: np.ndarray) -> tuple[str, np.ndarray, tuple[int, int]]:
        self.prepare_calls += 1
        key = hashlib.sha1(image.tobytes()).hexdigest()
        return key, self.offsets.get(key), image.shape  # None for rotated views: they match nothing

    def match_prepared(self, p0, p1) -> Matches:
        self.match_calls += 1
        if self.fail_after is not None and self.match_calls > self.fail_after:
            raise RuntimeError("simulated crash")
        (key0, offset0, (h0, w0)), (key1, offset1, (h1, w1)) = p0, p1
        self.seen.append((key0, key1))
        if offset0 is None or offset1 is None:
            return Matches.empty()
        grid = np.stack(np.meshgrid(np.arange(4.0, w0 - 2, 12), np.arange(4.0, h0 - 2, 12)), -1).reshape(-1, 2)
        scene = grid + offset0
        seed = int(hashlib.sha1((key0 + key1).encode()).hexdigest()[:8], 16)
        points1 = scene - offset1 + np.random.default_rng(seed).uniform(-0.3, 0.3, grid.shape)
        inside = np.all((points1 >= 0) & (points1 <= [w1 - 1, h1 - 1]), axis=1)
        scores = 0.3 + 0.7 * np.abs(np.sin(scene[:, 0] * 0.37 + scene[:, 1] * 1.3))
        return Matches(
            grid[inside].astype(np.float32), points1[inside].astype(np.float32), scores[inside].astype(np.float32)
        )

    def describe(self) -> dict:
        return {"matcher": self.name, "option": self.option}


def make_scene(root: Path, count: int, subfolder_index: int | None = None, step=(12, 12)):
    """Crops of one texture with offsets (step_x * i, step_y * i); returns names and the offsets by hash."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((400, 600)).astype(np.float32), (0, 0), 1.5)
    texture = (255 * (texture - texture.min()) / (texture.max() - texture.min())).astype(np.uint8)
    names, offsets, by_name = [], {}, {}
    for i in range(count):
        name = f"sub/img{i:02d}.png" if i == subfolder_index else f"img{i:02d}.png"
        offset = np.array([step[0] * i, step[1] * i], float)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        x, y = int(offset[0]), int(offset[1])
        cv2.imwrite(str(path), texture[y : y + HEIGHT, x : x + WIDTH])
        offsets[hashlib.sha1(read_gray(path).tobytes()).hexdigest()] = offset
        names.append(name)
        by_name[name] = offset
    return names, offsets, by_name


def sequential(names, window):
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 : i + 1 + window]]


def write_pairs(path: Path, pairs) -> Path:
    path.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    return path


def read_h5(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as file:
        file.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_files(a: Path, b: Path) -> None:
    data_a, data_b = read_h5(a), read_h5(b)
    assert data_a.keys() == data_b.keys()
    for key in data_a:
        np.testing.assert_array_equal(data_a[key], data_b[key], err_msg=key)


# ------------------------------------------------------------------------------------------- tests
def test_outputs_are_hloc_files_with_correct_shared_keypoints(tmp_path):
    images = tmp_path / "images"
    names, offsets, by_name = make_scene(images, 6, subfolder_index=2)
    pairs = write_pairs(tmp_path / "pairs.txt", sequential(names, 2))
    config = DenseMatchConfig(cell_size=8, max_error=2, num_workers=2)
    result = main(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", ShiftMatcher(offsets), config)
    features, matches = result.features, result.matches

    # Read exactly as hloc does: plain h5py, nested groups for '/' in image names, '-' in pair keys.
    with h5py.File(features, "r") as f, h5py.File(matches, "r") as m:
        keypoints = {}
        for name in names:
            kp = f[name]["keypoints"].__array__()
            assert kp.dtype == np.float32 and kp.ndim == 2 and kp.shape[1] == 2 and len(kp) > 10
            assert f[name]["scores"].shape == (len(kp),)
            np.testing.assert_array_equal(f[name]["image_size"][()], [WIDTH, HEIGHT])
            keypoints[name] = kp
        assert "sub/img02.png" in f and "sub" in f  # nested group, as hloc writes it
        pair_matches = {}
        for a, b in sequential(names, 2):
            group = m[io.names_to_pair(a, b)]
            matches0 = group["matches0"].__array__()
            assert matches0.dtype == np.int32 and matches0.shape == (len(keypoints[a]),)  # padded to N0
            assert group["matching_scores0"].shape == matches0.shape
            valid = matches0 > -1
            assert valid.sum() > 10 and matches0.max() < len(keypoints[b])
            assert len(np.unique(matches0[valid])) == valid.sum()  # one-to-one
            # Geometry: matched keypoints are images of the same texture point.
            scene0 = keypoints[a][valid] + by_name[a]
            scene1 = keypoints[b][matches0[valid]] + by_name[b]
            assert np.abs(scene0 - scene1).max() < 1.0
            pair_matches[(a, b)] = matches0
        assert "sub-img02.png" in m["img01.png"] or "sub-img02.png" in m  # hloc's pair key

    # Shared keypoints form tracks over three images: A->B->C agrees with A->C.
    for a, b, c in zip(names, names[1:], names[2:]):
        ab, bc, ac = pair_matches[(a, b)], pair_matches[(b, c)], pair_matches[(a, c)]
        chained = np.where(ab > -1, bc[np.maximum(ab, 0)], -1)
        assert np.sum((chained > -1) & (chained == ac)) >= 8


def test_each_image_is_prepared_once_per_view(tmp_path):
    images = tmp_path / "images"
    names, offsets, _ = make_scene(images, 8)
    pairs = write_pairs(tmp_path / "pairs.txt", sequential(names, 3))
    matcher = ShiftMatcher(offsets)
    result = run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher, DenseMatchConfig(cache_size=4))
    assert result.num_pairs == 18 and matcher.match_calls == 18
    assert matcher.prepare_calls == result.prepare_calls == 8  # not 2 x 18 = 36
    assert result.cache_misses == 8 and result.cache_hits == 2 * 18 - 8

    # Rotation TTA: an image used second needs 4 views, one only ever first needs 1.
    matcher = ShiftMatcher(offsets)
    few = write_pairs(tmp_path / "few.txt", [(names[0], names[1]), (names[1], names[2]), (names[0], names[2])])
    run(few, images, tmp_path / "f2.h5", tmp_path / "m2.h5", matcher, DenseMatchConfig(rotation="union"))
    assert matcher.prepare_calls == 1 + 4 + 4
    # Two sizes: two views per image, still reused across pairs.
    matcher = ShiftMatcher(offsets)
    run(pairs, images, tmp_path / "f3.h5", tmp_path / "m3.h5", matcher, DenseMatchConfig(resize=(48, 64)))
    assert matcher.prepare_calls == 2 * 8 and matcher.match_calls == 2 * 18


def test_small_cache_on_exhaustive_pairs_is_planned_and_gives_the_same_result(tmp_path):
    images = tmp_path / "images"
    names, offsets, _ = make_scene(images, 10, step=(4, 2))
    all_pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    pairs = write_pairs(tmp_path / "pairs.txt", all_pairs)
    small = ShiftMatcher(offsets)
    result = run(
        pairs,
        images,
        tmp_path / "a" / "f.h5",
        tmp_path / "a" / "m.h5",
        small,
        DenseMatchConfig(cache_size=4, num_workers=0),
    )
    order = [all_pairs[i] for i in plan_order(all_pairs, 4)]
    assert small.prepare_calls == len(planned_loads(order, 4)) == result.cache_misses
    # Row-by-row order would miss ~ once per pair (45); the plan does much better.
    assert small.prepare_calls <= 25
    large = ShiftMatcher(offsets)
    run(
        pairs,
        images,
        tmp_path / "b" / "f.h5",
        tmp_path / "b" / "m.h5",
        large,
        DenseMatchConfig(cache_size=64, num_workers=2),
    )
    assert large.prepare_calls == 10
    assert_same_files(tmp_path / "a" / "f.h5", tmp_path / "b" / "f.h5")
    assert_same_files(tmp_path / "a" / "m.h5", tmp_path / "b" / "m.h5")


def test_a_killed_run_resumes_without_recomputing_finished_pairs(tmp_path):
    images = tmp_path / "images"
    names, offsets, _ = make_scene(images, 7)
    pairs = write_pairs(tmp_path / "pairs.txt", sequential(names, 3))
    features, matches = tmp_path / "out" / "f.h5", tmp_path / "out" / "m.h5"

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(pairs, images, features, matches, ShiftMatcher(offsets, fail_after=5))
    assert not matches.exists() and not features.exists()
    assert len(list(raw_root(matches).rglob("*.npz"))) == 5

    resumed = ShiftMatcher(offsets)
    result = run(pairs, images, features, matches, resumed)
    assert (result.pairs_reused, result.pairs_matched) == (5, 15 - 5)
    assert resumed.match_calls == 15 - 5

    reference = tmp_path / "uninterrupted"
    run(pairs, images, reference / "f.h5", reference / "m.h5", ShiftMatcher(offsets))
    assert_same_files(features, reference / "f.h5")
    assert_same_files(matches, reference / "m.h5")

    # The same run again does nothing.
    again = ShiftMatcher(offsets)
    result = run(pairs, images, features, matches, again)
    assert result.up_to_date and again.prepare_calls == 0 and again.match_calls == 0

    # A raw file cut short (and a temp file left) by a crash before the outputs were written is
    # recomputed; the rest is reused.
    raw_files = sorted(raw_root(matches).rglob("*.npz"))
    raw_files[0].write_bytes(raw_files[0].read_bytes()[:40])
    (raw_files[0].parent / ".leftover.npz.tmp").write_bytes(b"partial")
    features.unlink()
    matches.unlink()
    repaired = ShiftMatcher(offsets)
    result = run(pairs, images, features, matches, repaired)
    assert result.pairs_matched == 1 and repaired.match_calls == 1
    assert_same_files(matches, reference / "m.h5")

    # A truncated output file (e.g. copied during a crash) is rebuilt from the raw matches.
    matches.write_bytes(matches.read_bytes()[:100])
    rebuilt = ShiftMatcher(offsets)
    result = run(pairs, images, features, matches, rebuilt)
    assert not result.up_to_date and rebuilt.match_calls == 0
    assert_same_files(matches, reference / "m.h5")

    # Another matcher configuration never reuses these raw matches.
    other = ShiftMatcher(offsets, option=1)
    result = run(pairs, images, features, matches, other)
    assert result.pairs_matched == 15 and other.match_calls == 15


def test_changed_quantization_reuses_raw_matches(tmp_path):
    images = tmp_path / "images"
    names, offsets, _ = make_scene(images, 4)
    pairs = write_pairs(tmp_path / "pairs.txt", sequential(names, 2))
    run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", ShiftMatcher(offsets), DenseMatchConfig(max_kps=None))
    matcher = ShiftMatcher(offsets)
    result = run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher, DenseMatchConfig(max_kps=5))
    assert matcher.match_calls == 0 and not result.up_to_date
    assert max(result.keypoints_per_image.values()) == 5


def test_replaced_images_with_the_same_names_are_matched_again(tmp_path):
    images = tmp_path / "images"
    names, offsets, _ = make_scene(images, 3)
    pairs = write_pairs(tmp_path / "pairs.txt", sequential(names, 2))
    run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", ShiftMatcher(offsets))
    # Rebuild the folder with other crops under the same names: old raw matches must not be reused.
    _, new_offsets, _ = make_scene(images, 3, step=(20, 4))
    matcher = ShiftMatcher(new_offsets)
    result = run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher)
    assert matcher.match_calls == 3 and result.pairs_reused == 0


def test_pairs_without_matches_get_a_row_of_minus_ones(tmp_path):
    images = tmp_path / "images"
    names, offsets, _ = make_scene(images, 3, step=(150, 0))  # crops far apart: no overlap of 0 and 2
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], names[1]), (names[1], names[2]), (names[0], names[2])])
    result = main(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", ShiftMatcher(offsets))
    features, matches = result.features, result.matches
    with h5py.File(features, "r") as f, h5py.File(matches, "r") as m:
        matches0 = m[io.names_to_pair(names[0], names[2])]["matches0"][()]
        assert len(matches0) == len(f[names[0]]["keypoints"]) and np.all(matches0 == -1)


def test_reference_images_keep_their_keypoints_and_go_second(tmp_path):
    images = tmp_path / "images"
    names, offsets, by_name = make_scene(images, 5)
    database = write_pairs(tmp_path / "db.txt", sequential(names[:4], 2))
    reference = main(database, images, tmp_path / "db_f.h5", tmp_path / "db_m.h5", ShiftMatcher(offsets)).features
    reference_keypoints = io.read_features(reference)

    query = names[4]
    pairs = write_pairs(tmp_path / "loc.txt", [(query, names[2]), (names[3], query)])
    matcher = ShiftMatcher(offsets)
    result = main(
        pairs,
        images,
        tmp_path / "q_f.h5",
        tmp_path / "q_m.h5",
        matcher,
        DenseMatchConfig(max_kps=None),
        reference_features=reference,
    )
    features, matches = result.features, result.matches
    output = io.read_features(features)
    for db in names[2:4]:
        np.testing.assert_array_equal(output[db][0], reference_keypoints[db][0])
    hash_of = {tuple(v): k for k, v in offsets.items()}
    query_hash = hash_of[tuple(by_name[query])]
    assert all(second != query_hash for _, second in matcher.seen)  # the fixed image is the refined one
    for a, b in [(query, names[2]), (names[3], query)]:
        indices, _ = io.read_matches(matches, a, b)
        assert len(indices) >= 10
        scene_a = output[a][0][indices[:, 0]] + by_name[a]
        scene_b = output[b][0][indices[:, 1]] + by_name[b]
        assert np.abs(scene_a - scene_b).max() < 1.0


def test_bad_input_gives_clear_errors(tmp_path):
    images = tmp_path / "images"
    names, offsets, _ = make_scene(images, 3)
    matcher = ShiftMatcher(offsets)
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], names[1]), (names[1], "missing.png")])
    with pytest.raises(UserError, match=r"pairs\.txt:2: image 'missing.png'"):
        run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher)
    (images / "empty.png").write_bytes(b"")
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], "empty.png")])
    with pytest.raises(UserError, match=r"empty\.png.*empty"):
        run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher)
    (images / "junk.png").write_bytes(b"not a png at all")
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], "junk.png")])
    with pytest.raises(UserError, match=r"junk\.png"):
        run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher)
    # A truncated image passes the size check (header intact) and fails when the loader thread decodes it.
    (images / "cut.png").write_bytes((images / names[2]).read_bytes()[:300])
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], "cut.png")])
    with pytest.raises(UserError, match=r"cut\.png"):
        run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher, DenseMatchConfig(num_workers=2))
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], "../outside.png")])
    with pytest.raises(UserError, match="leaves the image root"):
        run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher)
    truncated = tmp_path / "ref.h5"
    truncated.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], names[1])])
    with pytest.raises(UserError, match="ref.h5"):
        run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", matcher, reference_features=truncated)
    with pytest.raises(UserError, match="rotation"):
        DenseMatchConfig(rotation="sideways")
    assert matcher.match_calls == 0


def test_cli_with_sift_on_real_images_matches_the_ground_truth_geometry(temple_ring, tmp_path):
    names = [f"templeR{i:04d}.png" for i in (1, 2, 3, 4)]
    pairs = write_pairs(tmp_path / "pairs.txt", sequential(names, 2))
    result = main_cli(
        [
            "--images",
            str(temple_ring / "images"),
            "--pairs",
            str(pairs),
            "--features",
            str(tmp_path / "f.h5"),
            "--matches",
            str(tmp_path / "m.h5"),
            "--matcher",
            "sift",
            "--cell-size",
            "4",
            "--max-error",
            "1",
        ]
    )
    assert result.prepare_calls == 4 and result.num_pairs == 5
    cameras = {}
    for line in (temple_ring / "templeR_par.txt").read_text().splitlines()[1:]:
        parts = line.split()
        values = np.array(parts[1:], float)
        cameras[parts[0]] = (values[:9].reshape(3, 3), values[9:18].reshape(3, 3), values[18:21])
    features = io.read_features(tmp_path / "f.h5")
    for a, b in sequential(names, 2):
        (K0, R0, t0), (K1, R1, t1) = cameras[a], cameras[b]
        R, t = R1 @ R0.T, t1 - R1 @ R0.T @ t0
        skew = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
        F = np.linalg.inv(K1).T @ skew @ R @ np.linalg.inv(K0)
        indices, _ = io.read_matches(tmp_path / "m.h5", a, b)
        x0 = np.c_[features[a][0][indices[:, 0]], np.ones(len(indices))]
        x1 = np.c_[features[b][0][indices[:, 1]], np.ones(len(indices))]
        lines = x0 @ F.T
        distance = np.abs(np.sum(x1 * lines, axis=1)) / np.hypot(lines[:, 0], lines[:, 1])
        assert len(indices) > 30
        assert np.median(distance) < 0.5 and np.mean(distance < 2.0) > 0.8


def test_cli_reports_bad_input_without_traceback(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pairs = write_pairs(tmp_path / "pairs.txt", [("a.png", "b.png")])
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.match_dense",
            "--images",
            str(images),
            "--pairs",
            str(pairs),
            "--features",
            str(tmp_path / "f.h5"),
            "--matches",
            str(tmp_path / "m.h5"),
            "--matcher",
            "sift",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    assert "error:" in process.stderr and "pairs.txt:1" in process.stderr and "Traceback" not in process.stderr


@pytest.mark.parametrize("threshold,options", [(None, {}), (0.0, {"rotation": "union", "both_directions": True})])
def test_loftr_with_random_weights_end_to_end(temple_ring, tmp_path, threshold, options):
    torch = pytest.importorskip("torch")
    from matchers.loftr import LoFTR, LoFTRMatcher

    torch.manual_seed(0)
    matcher = LoFTRMatcher(LoFTR().eval(), resize=96, device="cpu", match_threshold=threshold)
    names = [f"templeR{i:04d}.png" for i in (1, 2, 3)]
    pairs = write_pairs(tmp_path / "pairs.txt", [(names[0], names[1]), (names[1], names[2]), (names[0], names[2])])
    result = run(
        pairs, temple_ring / "images", tmp_path / "f.h5", tmp_path / "m.h5", matcher, DenseMatchConfig(**options)
    )
    views = 4 if options.get("rotation") else 1
    assert result.prepare_calls == 1 + 2 * views  # image 0 only ever first; 1 and 2 also second
    with h5py.File(tmp_path / "f.h5", "r") as f, h5py.File(tmp_path / "m.h5", "r") as m:
        for a, b in [(names[0], names[1]), (names[1], names[2]), (names[0], names[2])]:
            kp0, kp1 = f[a]["keypoints"][()], f[b]["keypoints"][()]
            matches0 = m[io.names_to_pair(a, b)]["matches0"][()]
            assert kp0.dtype == np.float32 and kp0.shape[1] == 2 and matches0.shape == (len(kp0),)
            assert matches0.max(initial=-1) < len(kp1)
            for kp in (kp0, kp1):  # mapped back into the 640 x 480 original, whatever the rotation
                assert np.all((kp >= -0.5) & (kp <= [639.5, 479.5]))
            if threshold is None:  # random weights never pass the 0.2 threshold: clean empty outputs
                assert len(kp0) == 0 and len(matches0) == 0
        if threshold is not None:
            assert sum(result.matches_per_pair.values()) > 10


def test_loftr_pairs_are_batched_with_the_same_results(temple_ring, tmp_path):
    torch = pytest.importorskip("torch")
    from matchers.loftr import LoFTR, LoFTRMatcher

    torch.manual_seed(0)
    matcher = LoFTRMatcher(LoFTR().eval(), resize=96, device="cpu", match_threshold=0.0)
    calls = []
    batched_call = matcher._inference.match_batch
    matcher._inference.match_batch = lambda pairs, **kw: calls.append(len(pairs)) or batched_call(pairs, **kw)
    names = [f"templeR{i:04d}.png" for i in range(1, 6)]
    pairs = write_pairs(tmp_path / "pairs.txt", [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]])
    outputs = {}
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        out.mkdir()
        run(pairs, temple_ring / "images", out / "f.h5", out / "m.h5", matcher, DenseMatchConfig(batch_pairs=batch))
        outputs[batch] = (read_h5(out / "f.h5"), read_h5(out / "m.h5"))
    assert calls == [4, 4, 2]  # 10 pairs of equal-size images: batches of 4, 4 and 2 (batch_pairs=1 never batches)
    (f1, m1), (f4, m4) = outputs[1], outputs[4]
    assert f1.keys() == f4.keys() and m1.keys() == m4.keys() and sum(len(v) for v in m1.values()) > 0
    for key in m1:  # the same matches; scores equal up to float rounding
        if key.endswith("matches0"):
            np.testing.assert_array_equal(m1[key], m4[key], err_msg=key)
        else:
            np.testing.assert_allclose(m1[key], m4[key], rtol=1e-3, atol=1e-7, err_msg=key)
    for key in f1:
        np.testing.assert_allclose(f1[key], f4[key], rtol=1e-3, atol=1e-3, err_msg=key)


def test_loftr_batch_of_mixed_sizes_equals_pairs_one_by_one():
    torch = pytest.importorskip("torch")
    from matchers.loftr import LoFTR, LoFTRMatcher

    torch.manual_seed(1)
    matcher = LoFTRMatcher(LoFTR().eval(), resize=None, device="cpu", match_threshold=0.0)
    matcher.batch_cells = 2 * 12 * 16 * 12 * 16  # two 96x128 pairs per call
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((200, 260)).astype(np.float32), (0, 0), 1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    crops = [texture[y : y + 96, x : x + 128] for x, y in ((0, 0), (10, 6), (20, 12), (30, 18))] + [texture[:120, :104]]
    prepared = [matcher.prepare(np.ascontiguousarray(c)) for c in crops]
    pairs = [
        (prepared[0], prepared[1]),
        (prepared[1], prepared[2]),
        (prepared[0], prepared[4]),
        (prepared[2], prepared[3]),
        (prepared[0], prepared[3]),
    ]
    batched = matcher.match_prepared_batch(pairs)
    single = [matcher.match_prepared(a, b) for a, b in pairs]
    assert len(batched) == len(single) == 5
    for b, s in zip(batched, single):
        assert len(b) == len(s) > 0
        np.testing.assert_allclose(b.keypoints0, s.keypoints0, atol=1e-3)
        np.testing.assert_allclose(b.keypoints1, s.keypoints1, atol=1e-3)
        np.testing.assert_allclose(b.scores, s.scores, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("refine,tolerance", [("none", 0.4), ("klt", 0.02)])
def test_klt_refinement_puts_second_image_points_on_the_true_positions(tmp_path, refine, tolerance):
    # ShiftMatcher jitters image-1 points by up to 0.3 px; the crops sit at integer offsets, so refined
    # points land exactly on image 1's own grid and quantization keeps them there.
    images = tmp_path / "images"
    names, offsets, by_name = make_scene(images, 4)
    pairs = write_pairs(tmp_path / "pairs.txt", sequential(names, 2))
    run(pairs, images, tmp_path / "f.h5", tmp_path / "m.h5", ShiftMatcher(offsets), DenseMatchConfig(refine=refine))
    features, matches = read_h5(tmp_path / "f.h5"), read_h5(tmp_path / "m.h5")
    errors = []
    for a, b in sequential(names, 2):
        matches0 = matches[f"{a}/{b}/matches0"]
        valid = matches0 > -1
        scene0 = features[f"{a}/keypoints"][valid] + by_name[a]
        scene1 = features[f"{b}/keypoints"][matches0[valid]] + by_name[b]
        errors.append(np.linalg.norm(scene0 - scene1, axis=1))
    errors = np.concatenate(errors)
    assert len(errors) > 40
    assert np.median(errors) < tolerance
    if refine == "none":
        assert np.median(errors) > 0.05  # the jitter is really there without refinement


def test_rotation_auto_matches_a_turned_image_in_its_sift_orientation(tmp_path):
    from tests.test_orientation import scene
    from tests.test_tta import UprightMatcher, to_rot90_coordinates

    images = tmp_path / "images"
    images.mkdir()
    upright = np.rint(scene(seed=2) * 255).astype(np.uint8)  # 240 x 320, structured enough for SIFT
    cv2.imwrite(str(images / "a.png"), upright)
    cv2.imwrite(str(images / "b.png"), np.ascontiguousarray(np.rot90(upright, 1)))
    pairs = write_pairs(tmp_path / "pairs.txt", [("a.png", "b.png")])
    counts = {}
    for mode in ("none", "auto"):
        out = tmp_path / mode
        config = DenseMatchConfig(rotation=mode, cell_size=1, max_error=0.5)
        result = run(pairs, images, out / "f.h5", out / "m.h5", UprightMatcher(), config)
        # np.rot90(b, 3) is a again; the turn is reported, also by an up-to-date re-run.
        assert result.turns == ({("a.png", "b.png"): 3} if mode == "auto" else {})
        again = run(pairs, images, out / "f.h5", out / "m.h5", UprightMatcher(), config)
        assert again.up_to_date and again.turns == result.turns
        features, matches = read_h5(out / "f.h5"), read_h5(out / "m.h5")
        matches0 = matches["a.png/b.png/matches0"]
        valid = matches0 > -1
        counts[mode] = int(valid.sum())
        if mode == "auto":
            points0 = features["a.png/keypoints"][valid]
            points1 = features["b.png/keypoints"][matches0[valid]]
            grid = UprightMatcher()
            shifted = grid.grid + np.stack([grid.parallax, 0 * grid.parallax], 1)
            lookup = {tuple(p): q for p, q in zip(grid.grid.round(3), shifted)}
            expected = to_rot90_coordinates(np.array([lookup[tuple(p)] for p in points0.round(3)]), 320)
            np.testing.assert_allclose(points1, expected, atol=1e-3)
    assert counts["auto"] >= 0.9 * len(UprightMatcher().grid)
    assert counts["none"] < 0.5 * counts["auto"]


@pytest.mark.parametrize(
    "flags",
    [(), ("--refine", "klt"), ("--refine", "none", "--rotation", "none"), ("--cell-size", "6", "--max-error", "1.5")],
)
@pytest.mark.parametrize("matcher", ["sift", "loftr"])
def test_cli_derives_the_same_dense_options_as_reconstruct(matcher, flags):
    """One source of the matcher-dependent defaults: match_dense's command line gives what reconstruct runs."""
    from pipeline import match_dense, reconstruct

    parser = match_dense.build_parser()
    files = ["--images", "i", "--pairs", "p.txt", "--features", "f.h5", "--matches", "m.h5"]
    _, dense = match_dense.configs_from_args(parser, parser.parse_args([*files, "--matcher", matcher, *flags]))
    rparser = reconstruct.build_parser()
    run = reconstruct.config_from_args(
        rparser, rparser.parse_args(["--images", "i", "--outputs", "o", "--matcher", matcher, *flags])
    )
    assert reconstruct.dense_config(run, matcher) == dense
    expected = {
        ("sift", ()): (2, 2.0, "none", "none"),
        ("loftr", ()): (8, 2.0, "auto", "tracks"),
        ("loftr", ("--refine", "klt")): (4, 0.5, "auto", "klt"),
    }.get((matcher, flags))
    if expected is not None:  # the documented defaults (README: reconstruct's)
        assert (dense.cell_size, dense.max_error, dense.rotation, dense.refine) == expected


def test_localization_variant_snaps_to_reference_keypoints():
    from pipeline.match_dense import DenseOverrides, dense_defaults

    loftr = dense_defaults("loftr", for_localization=True)
    assert (loftr.cell_size, loftr.max_error, loftr.rotation, loftr.refine) == (4, 1.0, "none", "klt")
    sift = dense_defaults("sift", for_localization=True)
    assert (sift.cell_size, sift.max_error, sift.rotation, sift.refine) == (8, 2.0, "none", "none")
    plain = dense_defaults("loftr", overrides=DenseOverrides(refine="none"), for_localization=True)
    assert (plain.cell_size, plain.max_error, plain.refine) == (8, 2.0, "none")


def test_raw_store_names_are_the_digests_earlier_runs_used(tmp_path):
    """Raw matches are found by sha1 digests of JSON: the names must not change, or every earlier store is lost."""
    import json

    from pipeline.raw_store import RawMatchStore

    description = {"matcher": {"matcher": "loftr", "weights": "outdoor"}, "rotation": "auto", "resize": [None]}
    store = RawMatchStore(tmp_path / "m.h5", description)
    expected = hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert store.root == tmp_path / "m.h5.raw" / expected
    pair_digest = hashlib.sha1(json.dumps(["a.png", "b.png", False], sort_keys=True).encode()).hexdigest()[:24]
    assert store.key(("a.png", "b.png"), False) == pair_digest
