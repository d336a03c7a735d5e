"""hloc file helpers: names stay inside the image root, pairs parsing, HDF5 round trip, truncated files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from core import io
from core.errors import UserError


def test_resolve_image_refuses_names_leaving_the_root_but_follows_user_symlinks(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    assert io.resolve_image(root, "link.png") == root / "link.png"
    assert io.resolve_image(root, "sub/a.png") == root / "sub" / "a.png"
    for bad in ("../outside.png", "sub/../../outside.png", str(tmp_path / "outside.png"), "~/x.png"):
        with pytest.raises(UserError, match="image root"):
            io.resolve_image(root, bad)


def test_pairs_file_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("a.png b.png\n# comment\n\nc.png\n")
    with pytest.raises(UserError, match=r"pairs.txt:4"):
        io.read_pairs(path)
    path.write_text("a.png ../etc/passwd\n")
    with pytest.raises(UserError, match="leaves the image root"):
        io.read_pairs(path)
    path.write_text("a.png b.png\n")
    with pytest.raises(UserError, match="not among the images"):
        io.read_pairs(path, known_names={"a.png"})


def test_features_and_matches_round_trip_in_hloc_layout(tmp_path):
    keypoints = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
    io.write_features(tmp_path / "f.h5", {"dir/a.png": (keypoints, np.ones(3), (640, 480))})
    io.write_matches(tmp_path / "m.h5", {("dir/a.png", "b.png"): (np.array([1, -1, 0]), np.array([0.9, 0, 0.5]))})
    with h5py.File(tmp_path / "f.h5") as file:  # exactly as hloc reads it
        np.testing.assert_array_equal(file["dir"]["a.png"]["keypoints"][()], keypoints)
        assert tuple(file["dir/a.png"]["image_size"][()]) == (640, 480)
    with h5py.File(tmp_path / "m.h5") as file:
        assert file["dir-a.png"]["b.png"]["matches0"].dtype == np.int32
    indices, scores = io.read_matches(tmp_path / "m.h5", "b.png", "dir/a.png")  # reversed lookup
    np.testing.assert_array_equal(indices, [[1, 0], [0, 2]])
    np.testing.assert_allclose(scores, [0.9, 0.5])
    assert io.list_pairs(tmp_path / "m.h5") == {"dir-a.png/b.png"}


def test_truncated_hdf5_is_a_clear_error(tmp_path):
    io.write_features(tmp_path / "f.h5", {"a.png": (np.zeros((5, 2)), np.ones(5), (10, 10))})
    data = (tmp_path / "f.h5").read_bytes()
    (tmp_path / "f.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="crash"):
        io.read_features(tmp_path / "f.h5")
