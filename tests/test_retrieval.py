"""Retrieval: RootSIFT-VLAD global descriptors, top-k pairs, query selection, precision@k against GT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from core import io
from core.errors import UserError
from matchers.sift import rootsift
from pipeline import pairs as pairs_step
from pipeline import retrieval
from recipes import retrieval_eval
from tests.conftest import PROJECT_ROOT

# Small images keep the tests fast on a shared machine; the accuracy targets are met at this size too.
FAST = retrieval.RetrievalConfig(max_size=320, num_features=1000)


def _mixed_folder(
    tmp_path: Path, sacre_coeur: Path, temple_ring: Path, temple_step: int = 4
) -> tuple[Path, set[str], set[str]]:
    """10 sacre_coeur + every ``temple_step``-th temple_ring image as symlinks, names prefixed by scene."""
    folder = tmp_path / "images"
    folder.mkdir()
    sacre = sorted((sacre_coeur / "images").iterdir())[:10]
    temple = sorted((temple_ring / "images").glob("*.png"))[::temple_step]
    assert len(sacre) == 10 and len(temple) == len(range(0, 47, temple_step))
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
    np.testing.assert_allclose(rootsift(sift), np.sqrt(sift / 8.0), atol=1e-6)
    # Euclidean distance of RootSIFT = Hellinger kernel of the L1-normalised SIFT.
    assert np.isclose(np.linalg.norm(rootsift(sift)), 1.0)


def test_mixed_scenes_never_cross(tmp_path: Path, sacre_coeur: Path, temple_ring: Path) -> None:
    folder, sacre, temple = _mixed_folder(tmp_path, sacre_coeur, temple_ring, temple_step=1)  # 10 + 47
    features = retrieval.main(folder, None, tmp_path / "global-features.h5", "rootsift-vlad", config=FAST)
    names, descriptors = pairs_step.read_global_descriptors(features)
    assert set(names) == sacre | temple
    assert descriptors.shape == (57, FAST.num_words * 128)
    pairs = pairs_step.top_k_pairs(descriptors @ descriptors.T, names, names, 3)
    assert len(pairs) == 57 * 3
    for query, db in pairs:
        assert query != db
        assert (query in sacre) == (db in sacre), f"{query} retrieved {db} from the other scene"
    # The vocabulary is cached with the output and reused.
    assert len(list(tmp_path.glob("global-features.vocab-*.npy"))) == 1


def test_temple_ring_precision_at_5(tmp_path: Path, temple_ring: Path) -> None:
    result = retrieval_eval.main(
        temple_ring / "images",
        temple_ring / "templeR_par.txt",
        "rootsift-vlad",
        k=5,
        output=tmp_path / "g.h5",
        config=FAST,
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


def test_query_db_selection(tmp_path: Path) -> None:
    names = ["db/a.jpg", "db/b.jpg", "q/1.jpg", "q/2.jpg"]
    queries, db = ["q/1.jpg", "q/2.jpg"], ["db/a.jpg", "db/b.jpg"]
    assert retrieval.select_query_db(names, "q/") == (queries, db)  # db: every non-query image
    assert retrieval.select_query_db(names, "q/", db_prefix="db/") == (queries, db)
    assert retrieval.select_query_db(names, ["q/1", "db/a"], db_list=["db/b.jpg"]) == (
        ["db/a.jpg", "q/1.jpg"],
        ["db/b.jpg"],
    )
    assert retrieval.select_query_db(names, None, ["db/b.jpg"]) == (["db/b.jpg"], ["db/a.jpg", "q/1.jpg", "q/2.jpg"])
    assert retrieval.select_query_db(names) == (names, names)
    assert retrieval.select_query_db(names, db_prefix="db/") == (names, ["db/a.jpg", "db/b.jpg"])
    listing = tmp_path / "queries.txt"
    listing.write_text("# hloc query list\nq/2.jpg SIMPLE_RADIAL 640 480 500 320 240 0\n")
    assert retrieval.select_query_db(names, query_list=listing) == (["q/2.jpg"], ["db/a.jpg", "db/b.jpg", "q/1.jpg"])
    with pytest.raises(UserError, match="prefix"):
        retrieval.select_query_db(names, "x/")
    with pytest.raises(UserError, match="not among"):
        retrieval.select_query_db(names, None, ["q/3.jpg"])
    with pytest.raises(UserError, match="no database"):
        retrieval.select_query_db(names, ["q/", "db/"])
    with pytest.raises(UserError, match="not both"):
        retrieval.select_query_db(names, "q/", ["q/1.jpg"])
    (tmp_path / "evil.txt").write_text("../outside.jpg\n")
    with pytest.raises(UserError, match="leaves the image root"):
        retrieval.select_query_db(names, query_list=tmp_path / "evil.txt")


def _write_descriptors(path: Path, descriptors: dict[str, list[float]], kind: str | None = None) -> Path:
    with h5py.File(path, "w") as file:
        if kind:
            file.attrs["descriptor"] = kind
        for name, value in descriptors.items():
            file.create_group(name).create_dataset("global_descriptor", data=np.asarray(value, np.float32))
    return path


def test_pairs_from_retrieval_topk_selection_and_files(tmp_path: Path) -> None:
    # Unit vectors at known angles in a plane: cosine similarities are cos(angle difference).
    angles = {"db/a.jpg": 0, "db/b.jpg": 22, "db/c.jpg": 90, "q/x.jpg": 10, "q/y.jpg": 85}
    vectors = {n: [np.cos(np.radians(a)), np.sin(np.radians(a)), 0.0] for n, a in angles.items()}
    features = _write_descriptors(tmp_path / "g.h5", vectors)
    pairs = retrieval.pairs_from_retrieval(features, tmp_path / "p.txt", 2, query_prefix="q/")
    # q/x (10 deg): a (10 deg away), then b (12); q/y (85 deg): c (5), then b (63).
    assert pairs == [("q/x.jpg", "db/a.jpg"), ("q/x.jpg", "db/b.jpg"), ("q/y.jpg", "db/c.jpg"), ("q/y.jpg", "db/b.jpg")]
    assert io.read_pairs(tmp_path / "p.txt") == pairs
    # Every image against every other: self excluded, each unordered pair once with unique.
    everything = retrieval.pairs_from_retrieval(features, None, 1)
    assert ("db/a.jpg", "q/x.jpg") in everything and all(a != b for a, b in everything)
    assert len(everything) == 5
    unique = retrieval.pairs_from_retrieval(features, None, 1, unique=True)
    assert len({frozenset(p) for p in unique}) == len(unique) < len(everything)
    ranked = retrieval.pairs_from_retrieval(features, None, 10, query_list=["q/x.jpg"])  # db: the 4 others
    assert [db for _, db in ranked] == ["db/a.jpg", "db/b.jpg", "q/y.jpg", "db/c.jpg"]
    # A separate db file (hloc's db_descriptors); mixing descriptor kinds is refused.
    db_file = _write_descriptors(tmp_path / "db.h5", {"db/z.jpg": vectors["db/c.jpg"]}, kind="rootsift-vlad")
    assert retrieval.pairs_from_retrieval(features, None, 3, query_prefix="q/", db_global_features=db_file) == [
        ("q/x.jpg", "db/z.jpg"),
        ("q/y.jpg", "db/z.jpg"),
    ]
    other = _write_descriptors(tmp_path / "other.h5", {"q/x.jpg": vectors["q/x.jpg"]}, kind="netvlad")
    with pytest.raises(UserError, match="same --descriptor"):
        retrieval.pairs_from_retrieval(other, None, 1, db_global_features=db_file)
    with pytest.raises(UserError, match=">= 1"):
        retrieval.pairs_from_retrieval(features, None, 0)
    with pytest.raises(UserError, match="image folder"):
        retrieval.pairs_from_retrieval(features, None, 1, rerank=3)


def test_spatial_rerank_puts_the_true_neighbour_first(temple_ring: Path, sacre_coeur: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("templeR0010.png", "templeR0011.png", "templeR0030.png"):
        os.symlink(temple_ring / "images" / name, folder / name)
    sacre = sorted((sacre_coeur / "images").iterdir())[0]
    os.symlink(sacre, folder / sacre.name)
    # GT: 0011 is 7.6 deg from 0010 (a neighbour), 0030 about 68 deg away, the sacre_coeur photo unrelated.
    candidates = {"templeR0010.png": [sacre.name, "templeR0030.png", "templeR0011.png"]}
    reranked = retrieval.spatial_rerank(folder, candidates, 2, FAST)
    assert reranked == {"templeR0010.png": ["templeR0011.png", "templeR0030.png"]}


def test_resume_describes_only_new_or_changed_images(
    tmp_path: Path, temple_ring: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((temple_ring / "images").glob("*.png"))[:6]
    for path in sources[:5]:
        os.symlink(path, folder / path.name)
    output = tmp_path / "out" / "global-features.h5"
    config = retrieval.RetrievalConfig(max_size=160, num_features=300, num_words=8)
    calls: list[int] = []
    real_sift = retrieval._sift
    monkeypatch.setattr(retrieval, "_sift", lambda *a, **k: calls.append(1) or real_sift(*a, **k))

    retrieval.main(folder, None, output, "rootsift-vlad", config=config)
    assert len(calls) == 5  # each image read once: vocabulary and encoding share the features
    first = {name: value for name, value in zip(*pairs_step.read_global_descriptors(output))}
    vocabularies = list(output.parent.glob("global-features.vocab-*.npy"))
    assert len(vocabularies) == 1

    calls.clear()
    retrieval.main(folder, None, output, "rootsift-vlad", config=config)
    assert calls == []  # up to date

    os.symlink(sources[5], folder / sources[5].name)  # a new image: encoded with the same vocabulary
    retrieval.main(folder, None, output, "rootsift-vlad", config=config)
    assert len(calls) == 1
    assert list(output.parent.glob("global-features.vocab-*.npy")) == vocabularies
    second = {name: value for name, value in zip(*pairs_step.read_global_descriptors(output))}
    assert set(second) == set(first) | {sources[5].name}
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value)

    calls.clear()  # other settings: everything again, new vocabulary, the old one removed
    retrieval.main(
        folder,
        None,
        output,
        "rootsift-vlad",
        config=retrieval.RetrievalConfig(max_size=160, num_features=300, num_words=4),
    )
    assert len(calls) == 6
    assert pairs_step.read_global_descriptors(output)[1].shape == (6, 4 * 128)
    assert len(list(output.parent.glob("global-features.vocab-*.npy"))) == 1
    assert list(output.parent.glob("global-features.vocab-*.npy")) != vocabularies
    calls.clear()
    (vocabulary,) = output.parent.glob("global-features.vocab-*.npy")
    before = vocabulary.stat().st_mtime_ns
    retrieval.main(
        folder,
        None,
        output,
        "rootsift-vlad",
        config=retrieval.RetrievalConfig(max_size=160, num_features=300, num_words=4),
        overwrite=True,
    )
    assert len(calls) == 6  # every image described again
    assert vocabulary.stat().st_mtime_ns != before  # and the vocabulary learned again
    with pytest.raises(TypeError, match="output="):
        retrieval.main(folder, output)  # type: ignore[arg-type]


def test_interrupted_run_keeps_finished_images(
    tmp_path: Path, temple_ring: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((temple_ring / "images").glob("*.png"))[:4]
    for path in sources:
        os.symlink(path, folder / path.name)
    (folder / "templeR0002b.png").write_bytes(b"not an image")  # third in order, not a vocabulary image
    output = tmp_path / "global-features.h5"
    config = retrieval.RetrievalConfig(max_size=160, num_features=300, num_words=8, vocab_images=2)
    with pytest.raises(UserError, match="templeR0002b.png"):
        retrieval.main(folder, None, output, "rootsift-vlad", config=config)
    names, _ = pairs_step.read_global_descriptors(output)
    assert names == [sources[0].name, sources[1].name]  # the images finished before the error are saved
    (folder / "templeR0002b.png").unlink()
    calls: list[int] = []
    real_sift = retrieval._sift
    monkeypatch.setattr(retrieval, "_sift", lambda *a, **k: calls.append(1) or real_sift(*a, **k))
    retrieval.main(folder, None, output, "rootsift-vlad", config=config)
    assert len(calls) == 2  # only the two missing images, with the saved vocabulary
    assert pairs_step.read_global_descriptors(output)[0] == [p.name for p in sources]
    assert not list(tmp_path.glob(".global-features.h5.*"))  # no temporary files left behind


def test_auto_descriptor_uses_netvlad_only_when_weights_are_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import netvlad

    monkeypatch.delenv("NETVLAD_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert retrieval.resolve_descriptor("auto") == "rootsift-vlad"
    netvlad.cache_path().parent.mkdir(parents=True)
    netvlad.cache_path().write_bytes(b"x")
    assert retrieval.resolve_descriptor("auto") == "netvlad"
    assert retrieval.resolve_descriptor("rootsift-vlad") == "rootsift-vlad"
    with pytest.raises(UserError, match="not found"):
        retrieval.resolve_descriptor("auto", tmp_path / "missing.mat")


def test_netvlad_missing_weights_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="NetVLAD weights not found"):
        retrieval.main(tmp_path, ["a.png"], tmp_path / "g.h5", descriptor="netvlad", weights=tmp_path / "none.mat")
    with pytest.raises(UserError, match="unknown global descriptor"):
        retrieval.main(tmp_path, ["a.png"], tmp_path / "g.h5", descriptor="vlad")


def test_cli_query_prefix_and_rerank(tmp_path: Path, sacre_coeur: Path, temple_ring: Path) -> None:
    folder, sacre, temple = _mixed_folder(tmp_path, sacre_coeur, temple_ring)
    output, pairs_file = tmp_path / "out" / "global-features.h5", tmp_path / "out" / "pairs.txt"
    command = [
        sys.executable,
        "-m",
        "pipeline.retrieval",
        "--images",
        str(folder),
        "--output",
        str(output),
        "--num-matched",
        "2",
        "--pairs-output",
        str(pairs_file),
        "--query-prefix",
        "temple_templeR000",
        "--rerank",
        "4",
        "--max-size",
        "320",
        "--descriptor",
        "rootsift-vlad",
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

    bad = subprocess.run(
        command + ["--query-prefix", "nothing"], cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: no image name starts with the query prefix"
    )
    assert "Traceback" not in bad.stderr


def test_pairs_from_images_for_reconstruct(tmp_path: Path, temple_ring: Path) -> None:
    names = sorted(p.name for p in (temple_ring / "images").glob("*.png"))[:12]
    pairs = retrieval.pairs_from_images(
        temple_ring / "images", names, 3, tmp_path, device="cpu", descriptor="rootsift-vlad", config=FAST
    )
    assert (tmp_path / "global-features.h5").is_file()
    assert all(a != b and a in names and b in names for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == len(pairs)  # each unordered pair once
    assert {a for a, _ in pairs} | {b for _, b in pairs} == set(names)
    assert 12 * 3 / 2 <= len(pairs) <= 12 * 3
