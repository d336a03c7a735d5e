"""Image pairs to match, in hloc's pairs.txt format (one ``name0 name1`` per line): every way the project
builds pairs lives here.

Strategies:

* ``exhaustive``: every unordered pair (small sets).
* ``sequential``: each image with its next ``window`` images (videos), optionally with loop closure
  pairs at quadratically growing gaps, as COLMAP's sequential matcher does.
* ``retrieval``: the top-k most similar images by global descriptor (hloc's global-features.h5, written
  by :mod:`pipeline.retrieval`): among a folder's images (:func:`retrieval_from_images`, reconstruction),
  queries against a database (:func:`query_retrieval`, localization), or from a descriptor file.
* ``covisibility``: pairs of images sharing the most 3D points in a COLMAP model (hloc's
  pairs_from_covisibility), used to re-triangulate a reference model with new features.
* ``poses``: nearest cameras by distance among those whose viewing directions differ by less than a
  threshold (hloc's pairs_from_poses).

CLI::

    python -m pipeline.pairs --images DIR --output pairs.txt --method exhaustive|sequential \
        [--window 5] [--loop-closure]
    python -m pipeline.pairs --output pairs.txt --method retrieval --global-features G.h5 \
        [--query-prefix q/] [--num-matched 20]
    python -m pipeline.pairs --output pairs.txt --method covisibility|poses --model sfm/ [--num-matched 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from core import io
from core.cli import add_config_arguments, config_from_options
from core.colmap_model import read_model
from core.errors import UserError, run_cli
from pipeline import retrieval
from pipeline.global_features import read_global_descriptors, top_k_pairs
from pipeline.images import list_images

Pair = tuple[str, str]
PairsMethod = Literal["exhaustive", "sequential", "retrieval", "covisibility", "poses"]
METHODS: tuple[str, ...] = get_args(PairsMethod)
#: the strategies that need nothing but the images (what a reconstruction can use)
IMAGE_METHODS = ("exhaustive", "sequential", "retrieval")

__all__ = [
    "PairsConfig",
    "exhaustive",
    "sequential",
    "make_pairs",
    "retrieval_from_images",
    "query_retrieval",
    "from_retrieval",
    "read_global_descriptors",
    "top_k_pairs",
    "covisibility",
    "from_poses",
]


@dataclass(frozen=True)
class PairsConfig:
    """How pairs are chosen."""

    method: PairsMethod = "exhaustive"
    window: int = 5  # sequential: each image with its next WINDOW images
    loop_closure: bool = False  # sequential: also pair images at gaps 2, 4, 8... windows apart (close the loop)
    num_matched: int = 20  # retrieval / covisibility / poses: images paired with each image
    rotation_threshold: float = 30.0  # poses: degrees two viewing directions may differ by
    query_prefix: str | None = None  # retrieval from --global-features: queries are the names with this prefix

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown pairs method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.window < 1:
            raise UserError(f"sequential pairs need a window >= 1, got {self.window}")
        if self.num_matched < 1:
            raise UserError(f"the number of images paired with each image must be >= 1, got {self.num_matched}")


def exhaustive(names: Sequence[str]) -> list[Pair]:
    """Every unordered pair once, in list order."""
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def sequential(names: Sequence[str], window: int = PairsConfig.window, loop_closure: bool = False) -> list[Pair]:
    """Each image with its ``window`` successors; with loop closure also at gaps 2^k beyond the window."""
    if window < 1:
        raise UserError(f"sequential pairs need a window >= 1, got {window}")
    pairs: set[Pair] = set()
    count = len(names)
    for i in range(count):
        for j in range(i + 1, min(i + window + 1, count)):
            pairs.add((names[i], names[j]))
        if loop_closure:
            gap = 2 * window
            while i + gap < count:
                pairs.add((names[i], names[i + gap]))
                gap *= 2
    order = {name: index for index, name in enumerate(names)}
    return sorted(pairs, key=lambda pair: (order[pair[0]], order[pair[1]]))


def make_pairs(
    names: Sequence[str], config: PairsConfig, image_dir: Path, outputs: Path, device: str = "auto"
) -> list[Pair]:
    """The pairs of a folder's images ``names`` for the strategies that need only the images (a reconstruction's);
    retrieval writes (and resumes) its descriptors in ``outputs/global-features.h5``."""
    if config.method == "exhaustive":
        return exhaustive(list(names))
    if config.method == "sequential":
        return sequential(list(names), config.window, config.loop_closure)
    if config.method == "retrieval":
        return retrieval_from_images(image_dir, names, config.num_matched, outputs, device)
    raise UserError(f"--pairs {config.method} needs a model, not images; choose one of {', '.join(IMAGE_METHODS)}")


# ------------------------------------------------------------------------------------------ retrieval
def retrieval_from_images(
    image_dir: Path, names: Sequence[str], num_matched: int, outputs: Path, device: str = "auto"
) -> list[Pair]:
    """Each image with its ``num_matched`` most similar others, each unordered pair once (for SfM); the global
    descriptors go to (and are resumed from) ``outputs/global-features.h5``."""
    return retrieval.pairs_from_images(Path(image_dir), list(names), num_matched, Path(outputs), device=device)


def query_retrieval(
    image_dir: Path,
    outputs: Path,
    query_names: Sequence[str],
    db_names: Sequence[str],
    num_matched: int,
    device: str = "auto",
) -> list[Pair]:
    """(query, db) pairs: each query with its ``num_matched`` most similar db images, best first (localization);
    the global descriptors of all of them go to (and are resumed from) ``outputs/global-features.h5``."""
    if num_matched < 1:
        raise UserError(f"the number of retrieved db images must be >= 1, got {num_matched}")
    descriptors = Path(outputs) / "global-features.h5"
    retrieval.main(Path(image_dir), list(query_names) + list(db_names), descriptors, device=device)
    return from_retrieval(descriptors, list(query_names), list(db_names), num_matched)


def from_retrieval(
    global_features: str | Path,
    query_names: Sequence[str] | None,
    db_names: Sequence[str] | None,
    num_matched: int,
    exclude_self: bool = True,
) -> list[Pair]:
    """Top-k pairs by cosine similarity of global descriptors (all images when names are None)."""
    all_names, _ = read_global_descriptors(global_features)
    query_names = list(query_names) if query_names is not None else all_names
    db_names = list(db_names) if db_names is not None else all_names
    _, queries = read_global_descriptors(global_features, query_names)
    _, db = read_global_descriptors(global_features, db_names)
    return top_k_pairs(queries @ db.T, query_names, db_names, num_matched, exclude_self)


# ------------------------------------------------------------------------------------------ models
def _reconstruction(model: "str | Path | object"):
    """A pycolmap Reconstruction: the object itself, or read from a model folder."""
    return model if hasattr(model, "points3D") else read_model(model, "a COLMAP model folder (--model)")


def covisibility(model: "str | Path | object", num_matched: int, unique: bool = False) -> list[Pair]:
    """For each registered image, the ``num_matched`` images sharing the most 3D points with it, most first
    (ties: the lower image id); ``unique``: each unordered pair once, sorted by name (a reference model's
    re-triangulation). A model folder or a ``pycolmap.Reconstruction``.

    Counts come from one sparse product (images x points) @ (points x images), which keeps Aachen's
    6,697 images and 1.6 M points in seconds; a point counts once per image.
    """
    from scipy.sparse import coo_matrix

    reconstruction = _reconstruction(model)
    image_ids = sorted(reconstruction.reg_image_ids())
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    rows, cols = [], []
    for column, point in enumerate(reconstruction.points3D.values()):
        for element in point.track.elements:
            if element.image_id in row_of:
                rows.append(row_of[element.image_id])
                cols.append(column)
    if not rows:
        return []
    observations = coo_matrix(
        (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(image_ids), reconstruction.num_points3D())
    ).tocsr()
    observations.data[:] = 1.0  # an image observing a point twice still counts once
    covisible = (observations @ observations.T).tocsr()
    covisible.setdiag(0)
    covisible.eliminate_zeros()
    names = [reconstruction.images[image_id].name for image_id in image_ids]
    pairs: list[Pair] = []
    for row in range(len(image_ids)):
        start, stop = covisible.indptr[row], covisible.indptr[row + 1]
        neighbours, counts = covisible.indices[start:stop], covisible.data[start:stop]
        order = np.lexsort((neighbours, -counts))[:num_matched]  # most shared points, then lower id
        pairs.extend((names[row], names[other]) for other in neighbours[order])
    if unique:
        return sorted({(a, b) if a < b else (b, a) for a, b in pairs})
    return pairs


def from_poses(
    model: "str | Path | object | Mapping[str, np.ndarray]",
    num_matched: int,
    rotation_threshold: float = PairsConfig.rotation_threshold,
) -> list[Pair]:
    """Nearest cameras by centre distance among those viewing within ``rotation_threshold`` degrees.

    ``model`` is a COLMAP model folder, a ``pycolmap.Reconstruction`` (registered images), or a mapping
    ``name -> cam_from_world`` pose as a (3, 4) or (4, 4) matrix [R | t] (COLMAP convention).
    """
    if isinstance(model, Mapping):
        names = list(model)
        matrices = [_pose_matrix(name, model[name]) for name in names]
        rotations = np.stack([matrix[:, :3] for matrix in matrices])
        translations = np.stack([matrix[:, 3] for matrix in matrices])
    else:
        reconstruction = _reconstruction(model)
        images = [reconstruction.images[i] for i in sorted(reconstruction.reg_image_ids())]
        names = [image.name for image in images]
        rotations = np.stack([image.cam_from_world().rotation.matrix() for image in images]) if images else None
        translations = np.stack([image.cam_from_world().translation for image in images]) if images else None
    if len(names) < 2:
        return []
    # Camera centre C = -R^T t; viewing direction = camera z-axis in world = third row of R_cam_from_world.
    centres = -np.einsum("nji,nj->ni", rotations, translations)
    axes = rotations[:, 2]
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    cos_angle = np.clip(axes @ axes.T, -1.0, 1.0)
    allowed = np.degrees(np.arccos(cos_angle)) <= rotation_threshold
    np.fill_diagonal(allowed, False)
    pairs: list[Pair] = []
    for i, name in enumerate(names):
        candidates = np.where(allowed[i])[0]
        order = candidates[np.argsort(distance[i, candidates], kind="stable")][:num_matched]
        pairs.extend((name, names[j]) for j in order)
    return pairs


def _pose_matrix(name: str, pose: np.ndarray) -> np.ndarray:
    """A (3, 4) [R | t] from a (3, 4) or (4, 4) cam_from_world matrix; anything else is a UserError."""
    matrix = np.asarray(pose, dtype=np.float64)
    if matrix.shape not in ((3, 4), (4, 4)):
        raise UserError(f"pose of {name!r} must be a (3, 4) or (4, 4) cam_from_world matrix, got shape {matrix.shape}")
    return matrix[:3, :4]


# ------------------------------------------------------------------------------------------ main
def main(
    output: Path,
    images: Path | None = None,
    global_features: Path | None = None,
    model: Path | None = None,
    config: PairsConfig = PairsConfig(),
) -> list[Pair]:
    """Compute pairs with ``config.method`` and write them to ``output``; returns the pairs."""
    method = config.method
    if method in ("exhaustive", "sequential"):
        if images is None:
            raise UserError(f"--method {method} needs --images DIR")
        pairs = make_pairs(list_images(images), config, images, Path(output).parent)
    elif method == "retrieval":
        if global_features is None:
            raise UserError("--method retrieval needs --global-features G.h5 (from `python -m pipeline.retrieval`)")
        names, _ = read_global_descriptors(global_features)
        prefix = config.query_prefix
        queries = names if prefix is None else [n for n in names if n.startswith(prefix)]
        db = names if prefix is None else [n for n in names if not n.startswith(prefix)]
        pairs = from_retrieval(global_features, queries, db, config.num_matched)
    else:
        if model is None:
            raise UserError(f"--method {method} needs --model DIR (a COLMAP model)")
        pairs = (
            covisibility(model, config.num_matched)
            if method == "covisibility"
            else from_poses(model, config.num_matched, config.rotation_threshold)
        )
    io.write_pairs(output, pairs)
    print(f"{len(pairs)} pairs ({method}) written to {output}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, required=True, help="pairs.txt to write")
    parser.add_argument("--images", type=Path, help="image folder (exhaustive, sequential)")
    parser.add_argument("--global-features", type=Path, help="global-features.h5 (retrieval)")
    parser.add_argument("--model", type=Path, help="COLMAP model folder (covisibility, poses)")
    add_config_arguments(parser, PairsConfig)
    return parser


def main_cli(argv: Sequence[str] | None = None) -> list[Pair]:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_options(parser, args, PairsConfig)
    return main(args.output, args.images, args.global_features, args.model, config)


if __name__ == "__main__":
    run_cli(main_cli)
