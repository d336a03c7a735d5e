"""The raw-match store (pipeline.raw_store): chunked, crash-safe, readable across versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.stamps import digest
from matchers.base import Matches
from pipeline.raw_store import RawMatchStore, StoredMatches, missing_pairs


def _matches(seed: int, count: int, coarse: bool = True) -> Matches:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 100, (4, count, 2)).astype(np.float32)
    return Matches(
        points[0],
        points[1],
        rng.uniform(0, 1, count).astype(np.float32),
        points[2] if coarse else None,
        points[3] if coarse else None,
    )


def _same(a: Matches, b: Matches) -> bool:
    return all(
        (x is None and y is None) or np.array_equal(x, y)
        for x, y in zip(
            (a.keypoints0, a.keypoints1, a.scores, a.coarse0, a.coarse1),
            (b.keypoints0, b.keypoints1, b.scores, b.coarse0, b.coarse1),
        )
    )


def test_a_chunk_of_pairs_is_one_file_and_reads_back_exactly(tmp_path: Path) -> None:
    store = RawMatchStore(tmp_path / "matches.h5", {"matcher": "test"})
    items = [((f"a{i}.png", f"b{i}.png"), i % 2 == 0, _matches(i, 5 + i, coarse=i != 3)) for i in range(40)]
    store.save_many(items[:32])
    store.save_many(items[32:])
    assert len(list(store.root.glob("*.npz"))) == 2 and (store.root / "matcher.json").is_file()
    reopened = RawMatchStore(tmp_path / "matches.h5", {"matcher": "test"})  # a new process: index from disk
    assert len(reopened) == 40
    for pair, swapped, matches in items:
        assert _same(reopened.load(pair, swapped), matches)
        assert reopened.load(pair, not swapped) is None  # the direction is part of the key
    view = StoredMatches(reopened, {pair: swapped for pair, swapped, _ in items})
    assert _same(view[items[3][0]], items[3][2]) and len(view) == 40


def test_another_matching_config_never_sees_these_matches(tmp_path: Path) -> None:
    RawMatchStore(tmp_path / "m.h5", {"matcher": "a"}).save(("x", "y"), False, _matches(0, 3))
    assert RawMatchStore(tmp_path / "m.h5", {"matcher": "b"}).load(("x", "y"), False) is None


def test_changed_images_invalidate_their_pairs(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("x.png", "y.png"):
        (images / name).write_bytes(b"1")
    store = RawMatchStore(tmp_path / "m.h5", {"matcher": "a"}, images)
    store.save(("x.png", "y.png"), False, _matches(0, 3))
    assert (("x.png", "y.png"), False) in store
    (images / "y.png").write_bytes(b"22")  # same name, other image
    assert (("x.png", "y.png"), False) not in RawMatchStore(tmp_path / "m.h5", {"matcher": "a"}, images)


def test_a_cut_chunk_only_costs_its_own_pairs(tmp_path: Path) -> None:
    store = RawMatchStore(tmp_path / "m.h5", {"matcher": "a"})
    first = [((f"a{i}", f"b{i}"), False, _matches(i, 4)) for i in range(3)]
    second = [((f"c{i}", f"d{i}"), False, _matches(10 + i, 4)) for i in range(3)]
    store.save_many(first)
    store.save_many(second)
    chunk = store.root / f"chunk-{digest([store.key(p, s) for p, s, _ in second], 20)}.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])  # disk full or tampering
    reopened = RawMatchStore(tmp_path / "m.h5", {"matcher": "a"})
    pairs = [p for p, _, _ in first + second]
    assert missing_pairs(reopened, pairs, dict.fromkeys(pairs, False)) == [p for p, _, _ in second]
    assert _same(reopened.load(*first[0][:2]), first[0][2])


def test_stores_of_one_file_per_pair_are_still_read(tmp_path: Path) -> None:
    store = RawMatchStore(tmp_path / "m.h5", {"matcher": "a"})
    store.root.mkdir(parents=True)
    matches = _matches(5, 6)
    with open(store.root / f"{store.key(('p', 'q'), True)}.npz", "wb") as handle:  # the layout before chunks
        np.savez(
            handle,
            name0=np.array("p"),
            name1=np.array("q"),
            keypoints0=matches.keypoints0,
            keypoints1=matches.keypoints1,
            scores=matches.scores,
            coarse0=matches.coarse0,
            coarse1=matches.coarse1,
        )
    assert _same(RawMatchStore(tmp_path / "m.h5", {"matcher": "a"}).load(("p", "q"), True), matches)
