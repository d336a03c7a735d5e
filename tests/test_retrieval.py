"""Retrieval: RootSIFT-VLAD global descriptors, top-k pairs, query selection, precision@k against GT."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from matchers.errors import UserError
from pipeline import io
from pipeline import pairs as pairs_step
from pipeline import retrieval
from recipes import retrieval_eval
from tests.conftest import PROJECT_ROOT

# Small images keep the tests fast on a shared machine; the accuracy targets are met at this size too.
FAST = retrieval.RetrievalConfig(max_size=320, num_features=1000)


def _mixed_folder(tmp_path: Path, sacre_coeur: Path, temple_ring: Path) -> tuple[Path, set[str], set[str]]:
    """10 sacre_coeur + 12 temple_ring images as symlinks, names prefixed by scene."""
    folder = tmp_path / "images"
    folder.mkdir()
    sacre = sorted((sacre_coeur / "images").iterdir())[:10]
    temple = sorted((temple_ring / "images").glob("*.png"))[::4][:12]
    assert len(sacre) == 10 and len(temple) == 12
    for path in sacre:
        os.symlink(path, folder / f"sacre_{path.name}")
    for path in temple:
        os.symlink(path, folder / f"temple_{path.name}")
    names = {p.name for p in folder.iterdir()}
    return folder, {n for n in names if n.startswith("sacre_")}, {n for n in names if n.startswith("temple_")}


def test_vlad_is_normalised_and_intra_normalised() -> None:
    rng = np.random.default_rng(0)
    centres = rng.random((4, 8)).astype(np.float32)
    descriptors = rng.random((50, 8)).astype(np.float32)
    out = retrieval.vlad(descriptors, centres)
    assert out.shape == (32,)
    assert np.isclose(np.linalg.norm(out), 1.0, atol=1e-5)
    # Hand computation: residual sums per nearest centre, each block L2-normalised, signed sqrt, L2.
    assignment = np.argmin(((descriptors[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    blocks = np.stack([(descriptors[assignment == k] - centres[k]).sum(0) for k in range(4)])
    blocks /= np.linalg.norm(blocks, axis=1, keepdims=True)
    expected = (np.sign(blocks) * np.sqrt(np.abs(blocks))).reshape(-1)
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected), atol=1e-5)


def test_rootsift_hellinger() -> None:
    sift = np.array([[1.0, 3.0, 0.0, 4.0]], np.float32)
    np.testing.assert_allclose(retrieval.rootsift(sift), np.sqrt(sift / 8.0), atol=1e-6)
    # Euclidean distance of RootSIFT = Hellinger kernel of the L1-normalised SIFT.
    assert np.isclose(np.linalg.norm(retrieval.rootsift(sift)), 1.0)


def test_mixed_scenes_never_cross(tmp_path: Path, sacre_coeur: Path, temple_ring: Path) -> None:
    folder, sacre, temple = _mixed_folder(tmp_path, sacre_coeur, temple_ring)
    features = retrieval.main(folder, None, tmp_path / "global-features.h5", config=FAST)
    names, descriptors = pairs_step.read_global_descriptors(features)
    assert set(names) == sacre | temple
    assert descriptors.shape == (22, FAST.num_words * 128)
    pairs = pairs_step.top_k_pairs(descriptors @ descriptors.T, names, names, 3)
    assert len(pairs) == 22 * 3
    for query, db in pairs:
        assert query != db
        assert (query in sacre) == (db in sacre), f"{query} retrieved {db} from the other scene"
    # The vocabulary is cached with the output and reused.
    assert len(list(tmp_path.glob("global-features.vocab-*.npy"))) == 1


def test_temple_ring_precision_at_5(tmp_path: Path, temple_ring: Path) -> None:
    result = retrieval_eval.main(
        temple_ring / "images", temple_ring / "templeR_par.txt", k=5, output=tmp_path / "g.h5", config=FAST
    )
    assert result.num_queries == 47
    assert result.precision >= 0.8


def test_neighbour_matrix_angles() -> None:
    def rot_y(degrees: float) -> np.ndarray:
        a = np.radians(degrees)
        return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])

    neighbours = retrieval_eval.neighbour_matrix([rot_y(0), rot_y(29), rot_y(31), rot_y(60)], 30.0)
    # Pairwise differences: 29, 31, 60 / 2, 31 / 29 degrees; neighbours are those <= 30.
    expected = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(neighbours, expected)


def test_query_selection() -> None:
    names = ["db/a.jpg", "db/b.jpg", "q/1.jpg", "q/2.jpg"]
    assert retrieval.select_queries(names, "q/") == (["q/1.jpg", "q/2.jpg"], ["db/a.jpg", "db/b.jpg"])
    assert retrieval.select_queries(names, None, ["db/b.jpg"]) == (["db/b.jpg"], ["db/a.jpg", "q/1.jpg", "q/2.jpg"])
    assert retrieval.select_queries(names) == (names, names)
    with pytest.raises(UserError):
        retrieval.select_queries(names, "x/")
    with pytest.raises(UserError):
        retrieval.select_queries(names, None, ["q/3.jpg"])


def test_netvlad_missing_weights_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="NetVLAD weights not found"):
        retrieval.main(tmp_path, ["a.png"], tmp_path / "g.h5", descriptor="netvlad", weights=tmp_path / "none.mat")
    with pytest.raises(UserError, match="unknown global descriptor"):
        retrieval.main(tmp_path, ["a.png"], tmp_path / "g.h5", descriptor="vlad")


def test_cli_query_prefix_and_rerank(tmp_path: Path, sacre_coeur: Path, temple_ring: Path) -> None:
    folder, sacre, temple = _mixed_folder(tmp_path, sacre_coeur, temple_ring)
    output, pairs_file = tmp_path / "out" / "global-features.h5", tmp_path / "out" / "pairs.txt"
    command = [
        sys.executable, "-m", "pipeline.retrieval", "--images", str(folder), "--output", str(output),
        "--num-matched", "2", "--pairs-output", str(pairs_file), "--query-prefix", "temple_templeR000",
        "--rerank", "4", "--max-size", "320",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    with h5py.File(output) as file:
        assert set(file) == sacre | temple
        assert file[sorted(sacre)[0]]["global_descriptor"].shape == (64 * 128,)
    pairs = io.read_pairs(pairs_file)
    queries = sorted(n for n in temple if n.startswith("temple_templeR000"))
    assert queries and len(pairs) == 2 * len(queries)
    for query, db in pairs:
        assert query in queries and db not in queries  # queries only against the db, never themselves
        assert db in temple  # spatially verified neighbours come from the same scene

    bad = subprocess.run(command[:-4] + ["--query-prefix", "nothing"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: no image matches")
    assert "Traceback" not in bad.stderr


def test_pairs_from_images_for_reconstruct(tmp_path: Path, temple_ring: Path) -> None:
    names = sorted(p.name for p in (temple_ring / "images").glob("*.png"))[:12]
    pairs = retrieval.pairs_from_images(temple_ring / "images", names, 3, tmp_path, device="cpu", config=FAST)
    assert (tmp_path / "global-features.h5").is_file()
    assert all(a != b and a in names and b in names for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == len(pairs)  # each unordered pair once
    assert {a for a, _ in pairs} | {b for _, b in pairs} == set(names)
    assert 12 * 3 / 2 <= len(pairs) <= 12 * 3
