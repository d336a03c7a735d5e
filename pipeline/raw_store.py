"""The raw-match store: every pair's matches as the matcher gave them, crash-safe, in chunk files.

Layout: ``<matches>.raw/<matching-config digest>/chunk-<id>.npz``, each chunk holding the pairs of one
matcher batch or one distributed shard (``keys`` names them), written atomically (temp file + rename)
as it arrives. A killed run leaves only whole chunks; a re-run reuses every stored pair. One file per
*chunk*, not per pair: at 10^5-10^6 pairs (Aachen-size jobs) a file per pair means as many inodes and
directory entries, and opening each at read time; chunks of 8-64 pairs cut both by that factor.

A pair's key is a digest of its names, its direction and both images' size and modification time: a
folder rebuilt with the same names never reuses matches of the old images. Stores written by earlier
versions (one ``<key>.npz`` per pair) are read as they are.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core import io
from core.cache import LRUCache
from core.errors import UserError
from core.stamps import digest, file_state
from matchers.base import Matches

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
_FIELDS = ("keypoints0", "keypoints1", "scores", "coarse0", "coarse1")
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def raw_root(matches_path: Path) -> Path:
    """The folder of raw matches and stamps kept next to ``matches.h5``."""
    return Path(str(matches_path) + ".raw")


class RawMatchStore:
    """Raw matches of many pairs under one matching-config digest (see the module docstring).

    ``description`` is everything that changes raw matches (matcher, weights, augmentations); its digest
    names the folder. ``image_dir`` makes the images' file states part of each pair's key.
    """

    def __init__(self, matches_path: Path, description: Mapping[str, Any], image_dir: Path | None = None) -> None:
        self.description = dict(description)
        self.digest = digest(self.description)
        self.root = raw_root(matches_path) / self.digest
        self.image_dir = image_dir
        self._chunks: LRUCache[dict[str, Matches]] = LRUCache(max_items=8)
        self._index = self._scan()

    # ------------------------------------------------------------------------------------- keys
    def key(self, pair: Pair, swapped: bool) -> str:
        states = [] if self.image_dir is None else [file_state(io.resolve_image(self.image_dir, n)) for n in pair]
        return digest([pair[0], pair[1], swapped, *states], 24)

    def __contains__(self, item: tuple[Pair, bool]) -> bool:
        return self.key(*item) in self._index

    def __len__(self) -> int:
        return len(self._index)

    # ---------------------------------------------------------------------------------- reading
    def load(self, pair: Pair, swapped: bool) -> Matches | None:
        """The stored matches of ``pair``, or None when absent or unreadable (then they are recomputed)."""
        key = self.key(pair, swapped)
        path = self._index.get(key)
        if path is None:
            return None
        if not path.name.startswith("chunk-"):
            return _read_single(path, pair)
        chunk = self._chunks.get(path.name)
        if chunk is None:
            chunk = _read_chunk(path)
            self._chunks.put(path.name, chunk)
        found = chunk.get(key)
        if found is None:  # the chunk was unreadable: forget its pairs so they are matched again
            self._index = {k: p for k, p in self._index.items() if p != path}
        return found

    def _scan(self) -> dict[str, Path]:
        """``{pair key: file}`` for every stored pair; reads only the ``keys`` member of each chunk."""
        index: dict[str, Path] = {}
        if not self.root.is_dir():
            return index
        for path in sorted(self.root.glob("*.npz")):
            if not path.name.startswith("chunk-"):
                index[path.stem] = path  # one file per pair (stores of earlier versions)
                continue
            try:
                with np.load(path, allow_pickle=False) as data:
                    keys = [str(k) for k in data["keys"]]
            except _UNREADABLE as error:
                logger.warning("%s: unreadable raw-match chunk (%s); its pairs are matched again", path, error)
                continue
            index.update(dict.fromkeys(keys, path))
        return index

    # ---------------------------------------------------------------------------------- writing
    def save(self, pair: Pair, swapped: bool, matches: Matches) -> None:
        self.save_many([(pair, swapped, matches)])

    def save_many(self, items: Sequence[tuple[Pair, bool, Matches]]) -> None:
        """Store the matches of several pairs as one chunk, atomically."""
        if not items:
            return
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            io.write_text_atomic(self.root / "matcher.json", json.dumps(self.description, indent=2, default=str))
        keys = [self.key(pair, swapped) for pair, swapped, _ in items]
        arrays: dict[str, np.ndarray] = {"keys": np.array(keys)}
        for slot, (pair, _, matches) in enumerate(items):
            arrays[f"{slot}/names"] = np.array(pair)
            for name in _FIELDS:
                value = getattr(matches, name)
                if value is not None:
                    arrays[f"{slot}/{name}"] = np.asarray(value, dtype=np.float32)
        path = self.root / f"chunk-{digest(keys, 20)}.npz"
        with io.atomic_path(path) as temp, open(temp, "wb") as handle:
            np.savez(handle, **arrays)
        self._index.update(dict.fromkeys(keys, path))
        self._chunks.put(path.name, {k: m for k, (_, _, m) in zip(keys, items)})


def _matches_from(data: Mapping[str, np.ndarray], prefix: str = "") -> Matches:
    def get(name: str) -> np.ndarray | None:
        key = prefix + name
        return data[key].astype(np.float32) if key in data else None

    coarse = get("coarse0") is not None
    return Matches(
        get("keypoints0").reshape(-1, 2),
        get("keypoints1").reshape(-1, 2),
        get("scores").reshape(-1),
        get("coarse0").reshape(-1, 2) if coarse else None,
        get("coarse1").reshape(-1, 2) if coarse else None,
    )


def _read_chunk(path: Path) -> dict[str, Matches]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {name: npz[name] for name in npz.files}
        return {str(key): _matches_from(data, f"{slot}/") for slot, key in enumerate(data["keys"])}
    except _UNREADABLE as error:
        logger.warning("%s: unreadable raw-match chunk (%s); its pairs are matched again", path, error)
        return {}


def _read_single(path: Path, pair: Pair) -> Matches | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {name: npz[name] for name in npz.files}
        if (str(data["name0"]), str(data["name1"])) != pair:
            return None
        return _matches_from(data)
    except _UNREADABLE as error:
        logger.warning("%s: unreadable raw matches (%s); recomputing them", path, error)
        return None


class StoredMatches(Mapping[Pair, Matches]):
    """Lazy read-only view of the stored raw matches of some pairs (what quantization and tracks read)."""

    def __init__(self, store: RawMatchStore, swapped: Mapping[Pair, bool]) -> None:
        self._store = store
        self._swapped = swapped

    def __getitem__(self, pair: Pair) -> Matches:
        matches = self._store.load(pair, self._swapped[pair])
        if matches is None:
            raise UserError(f"{self._store.root}: raw matches of {pair} vanished during the run; run again")
        return matches

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._swapped)

    def __len__(self) -> int:
        return len(self._swapped)


def missing_pairs(store: RawMatchStore, pairs: Iterable[Pair], swapped: Mapping[Pair, bool]) -> list[Pair]:
    """The pairs with no stored matches yet (in the given order)."""
    return [pair for pair in pairs if (pair, swapped[pair]) not in store]
