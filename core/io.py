"""hloc-compatible files: pairs.txt, features.h5, matches.h5 — readers, writers, atomic replacement.

Formats (kept identical to hloc so its readers and users' scripts work):

* ``pairs.txt``: one ``name0 name1`` per line; names are paths relative to the image root.
* ``features.h5``: a group per image name (``/`` in names makes nested groups) holding
  ``keypoints`` (N, 2) float32 [x, y] with (0, 0) the centre of the top-left pixel, ``scores`` (N,)
  float32 and ``image_size`` (2,) int (W, H).
* ``matches.h5``: a group per pair keyed ``name0.replace('/', '-') + '/' + name1.replace('/', '-')``
  with ``matches0`` (N0,) int32 (index into image 1's keypoints or -1, padded to N0) and
  ``matching_scores0`` (N0,) float32.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from core.errors import UserError
from core.files import (  # noqa: F401  (re-exported: core.io.atomic_path and friends)
    atomic_path,
    check_output_dir,
    check_output_file,
    write_text_atomic,
)

# ---------------------------------------------------------------------------------------------- atomic
# The writer and the output checks live in core.files (the lowest layer; match plots use them too).
# atomic_path: temp file + one rename, the umask's permissions, no partial file on failure.


def check_match_outputs(features: str | Path, matches: str | Path) -> None:
    """match_dense's outputs, checked before any pair is matched (a folder or a read-only place fails now)."""
    features, matches = Path(features), Path(matches)
    check_output_file(features, "--features", example="features.h5")
    check_output_file(matches, "--matches", example="matches.h5")
    if os.path.abspath(features) == os.path.abspath(matches):
        raise UserError(f"{features}: --features and --matches name the same file; give two file names")
    raw = Path(str(matches) + ".raw")  # match_dense keeps the raw per-pair matches there
    if os.path.lexists(raw) and not raw.is_dir():
        raise UserError(f"{raw}: is a file, but match_dense keeps raw matches in this folder; move the file away")


# ----------------------------------------------------------------------------------------------- pairs
def names_to_pair(name0: str, name1: str) -> str:
    """hloc's key of a pair in matches.h5."""
    return f"{name0.replace('/', '-')}/{name1.replace('/', '-')}"


def read_pairs(path: str | Path, known_names: "set[str] | None" = None) -> list[tuple[str, str]]:
    """Read a pairs file; with ``known_names``, an unknown image name is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pairs file not found; create it with `python -m pipeline.pairs`")
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise UserError(f"{path}:{number}: expected 'name0 name1', got {line!r}")
        name0, name1 = parts[0], parts[1]
        for name in (name0, name1):
            check_relative_name(name, f"{path}:{number}")
            if known_names is not None and name not in known_names:
                raise UserError(f"{path}:{number}: image {name!r} is not among the images; fix the pairs file")
        pairs.append((name0, name1))
    return pairs


def write_pairs(path: str | Path, pairs: "list[tuple[str, str]]") -> None:
    write_text_atomic(path, "".join(f"{a} {b}\n" for a, b in pairs))


def check_relative_name(name: str, where: str) -> None:
    """Image names from files must stay inside the image root (no absolute paths, no '..')."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise UserError(f"{where}: image name {name!r} leaves the image root; use paths relative to it")


def resolve_image(root: str | Path, name: str) -> Path:
    """The path of image ``name`` under ``root``, refusing names that resolve outside it."""
    root = Path(os.path.abspath(root))
    check_relative_name(name, str(root))
    # Lexical check: the *name* must stay inside the root; symlinks the user placed in the image
    # folder are the user's choice and are followed as usual.
    path = Path(os.path.normpath(root / name))
    if root != path and root not in path.parents:
        raise UserError(f"{root}: image name {name!r} resolves outside the image root; fix the list")
    return path


# -------------------------------------------------------------------------------------------- features
def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file; a truncated or corrupt file is a clear error, not a traceback."""
    path = Path(path)
    try:
        return h5py.File(path, mode, libver="latest")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as error:
        raise UserError(
            f"{path}: not a readable HDF5 file ({error}); it is probably left over from a crash — delete it and run again"
        ) from None


@contextlib.contextmanager
def _h5_writer(path: str | Path, num_bytes: int, num_objects: int) -> Iterator[h5py.File]:
    """A new HDF5 file at ``path``, atomically. On a full disk HDF5 fails on close with a RuntimeError (errno only
    in its text) or crashes the process (H5D__flush_all_cb, h5py 3 / HDF5 1.14): the room for the data and
    ~1 KiB of headers per object is checked first, and a failure that reaches Python is an OSError naming ``path``."""
    path = Path(path)
    try:
        stat = os.statvfs(path.parent)
    except OSError:  # the folder is not there yet (atomic_path makes it)
        stat = None
    if stat is not None and stat.f_bavail * stat.f_frsize < num_bytes + 1024 * num_objects + (64 << 10):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    with atomic_path(path) as temp:
        try:
            with h5py.File(temp, "w") as file:
                yield file
        except RuntimeError as error:
            found = re.search(r"errno\s*=\s*(\d+)", str(error))
            if found is None:
                raise
            raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) from error


def write_features(path: str | Path, features: "dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]") -> None:
    """Write ``{name: (keypoints (N,2), scores (N,), (W, H))}`` to a new features.h5, atomically."""
    num_bytes = sum(12 * len(scores) + 16 for _, scores, _ in features.values())
    with _h5_writer(path, num_bytes, 4 * len(features)) as file:
        for name, (keypoints, scores, size) in features.items():
            group = file.create_group(name)
            group.create_dataset("keypoints", data=np.asarray(keypoints, np.float32).reshape(-1, 2))
            group.create_dataset("scores", data=np.asarray(scores, np.float32).reshape(-1))
            group.create_dataset("image_size", data=np.asarray(size, np.int64))


def read_features(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Read every image of a features.h5 (nested names are joined with '/')."""
    out: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}
    with open_h5(path) as file:

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Group) and "keypoints" in obj:
                scores = obj["scores"][()] if "scores" in obj else np.ones(len(obj["keypoints"]), np.float32)
                size = tuple(int(v) for v in obj["image_size"][()]) if "image_size" in obj else (0, 0)
                out[name] = (obj["keypoints"][()].astype(np.float32), scores.astype(np.float32), size)

        file.visititems(visit)
    return out


def read_keypoints(path: str | Path, name: str) -> np.ndarray:
    with open_h5(path) as file:
        if name not in file:
            raise UserError(f"{path}: no keypoints for image {name!r}; re-run the matching step")
        return file[name]["keypoints"][()].astype(np.float32)


# --------------------------------------------------------------------------------------------- matches
def write_matches(
    path: str | Path,
    matches: "Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]",
    num_bytes: int | None = None,
) -> None:
    """Write ``{(name0, name1): (matches0 (N0,), scores0 (N0,))}`` to a new matches.h5, atomically.

    ``num_bytes``: the arrays' size for the free-space check, when the caller knows it without reading every pair
    (a lazy mapping would otherwise build each pair's arrays twice)."""
    if num_bytes is None:
        num_bytes = sum(8 * len(matches0) for matches0, _ in matches.values())
    with _h5_writer(path, num_bytes, 4 * len(matches)) as file:
        for (name0, name1), (matches0, scores0) in matches.items():
            group = file.require_group(names_to_pair(name0, name1))
            group.create_dataset("matches0", data=np.asarray(matches0, np.int32).reshape(-1))
            group.create_dataset("matching_scores0", data=np.asarray(scores0, np.float32).reshape(-1))


def find_pair(file: h5py.File, name0: str, name1: str) -> tuple[str, bool]:
    """The key of a pair in an open matches.h5 and whether it is stored reversed."""
    key = names_to_pair(name0, name1)
    if key in file:
        return key, False
    key = names_to_pair(name1, name0)
    if key in file:
        return key, True
    raise KeyError(f"pair ({name0}, {name1}) not in matches file")


def read_matches(path: str | Path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """(M, 2) index pairs into image 0's and image 1's keypoints, and their (M,) scores."""
    with open_h5(path) as file:
        try:
            return read_pair_matches(file, name0, name1)
        except KeyError:
            raise UserError(f"{path}: no matches for pair ({name0}, {name1}); re-run the matching step") from None


def read_pair_matches(file: h5py.File, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_matches` on an open matches.h5 (for reading many pairs); KeyError when the pair is absent."""
    key, reverse = find_pair(file, name0, name1)
    matches0 = file[key]["matches0"][()]
    scores0 = file[key]["matching_scores0"][()] if "matching_scores0" in file[key] else np.ones(len(matches0))
    valid = matches0 > -1
    indices = np.stack([np.where(valid)[0], matches0[valid]], axis=1).astype(np.int64)
    scores = scores0[valid].astype(np.float32)
    if reverse:
        indices = indices[:, ::-1].copy()
    return indices, scores


def list_pairs(path: str | Path) -> set[str]:
    """The pair keys present in a matches.h5 (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return set()
    keys: set[str] = set()
    with open_h5(path) as file:
        for first in file:
            for second in file[first]:
                keys.add(f"{first}/{second}")
    return keys
