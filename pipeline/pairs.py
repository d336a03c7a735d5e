"""Image pairs to match, in hloc's pairs.txt format (one ``name0 name1`` per line).

Strategies:

* ``exhaustive``: every unordered pair (small sets).
* ``sequential``: each image with its next ``window`` images (videos), optionally with loop closure
  pairs at quadratically growing gaps, as COLMAP's sequential matcher does.
* ``retrieval``: the top-k most similar images by global descriptor (hloc's global-features.h5).
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
from pathlib import Path

import numpy as np

from core import io
from core.errors import UserError, run_cli
from pipeline.images import list_images

Pair = tuple[str, str]
METHODS = ("exhaustive", "sequential", "retrieval", "covisibility", "poses")


def exhaustive(names: Sequence[str]) -> list[Pair]:
    """Every unordered pair once, in list order."""
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def sequential(names: Sequence[str], window: int = 5, loop_closure: bool = False) -> list[Pair]:
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


def read_global_descriptors(path: str | Path, names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Names and L2-normalised descriptors (N, D) from an hloc global-features.h5."""
    features: dict[str, np.ndarray] = {}
    with io.open_h5(path) as file:

        def visit(name: str, obj: object) -> None:
            if hasattr(obj, "keys") and "global_descriptor" in obj:
                features[name] = obj["global_descriptor"][()].astype(np.float32).reshape(-1)

        file.visititems(visit)
    if names is None:
        names = sorted(features)
    missing = [name for name in names if name not in features]
    if missing:
        raise UserError(f"{path}: no global descriptor for {missing[:3]}...; re-run `python -m pipeline.retrieval`")
    if not names:
        return [], np.zeros((0, 0), np.float32)
    matrix = np.stack([features[name] for name in names])
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return list(names), matrix


def top_k_pairs(
    similarity: np.ndarray,
    query_names: Sequence[str],
    db_names: Sequence[str],
    num_matched: int,
    exclude_self: bool = True,
) -> list[Pair]:
    """The ``num_matched`` most similar db images per query (rows of ``similarity``)."""
    similarity = similarity.astype(np.float64).copy()
    if exclude_self:
        db_index = {name: j for j, name in enumerate(db_names)}
        for i, name in enumerate(query_names):
            if name in db_index:
                similarity[i, db_index[name]] = -np.inf
    k = min(num_matched, similarity.shape[1])
    pairs: list[Pair] = []
    for i, name in enumerate(query_names):
        order = np.argsort(-similarity[i], kind="stable")[:k]
        pairs.extend((name, db_names[j]) for j in order if np.isfinite(similarity[i, j]))
    return pairs


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


def _read_model(model: str | Path):
    import pycolmap

    model = Path(model)
    if not model.is_dir() or not any((model / f"images{ext}").exists() for ext in (".bin", ".txt")):
        raise UserError(f"{model}: not a COLMAP model folder (expected cameras/images/points3D .bin or .txt)")
    return pycolmap.Reconstruction(str(model))


def covisibility(model: "str | Path | object", num_matched: int) -> list[Pair]:
    """For each registered image, the ``num_matched`` images sharing the most 3D points with it."""
    reconstruction = model if hasattr(model, "points3D") else _read_model(model)
    image_ids = sorted(reconstruction.reg_image_ids())
    pairs: list[Pair] = []
    for image_id in image_ids:
        image = reconstruction.images[image_id]
        counts: dict[int, int] = {}
        for point2D in image.points2D:
            if not point2D.has_point3D():
                continue
            for element in reconstruction.points3D[point2D.point3D_id].track.elements:
                if element.image_id != image_id:
                    counts[element.image_id] = counts.get(element.image_id, 0) + 1
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:num_matched]
        pairs.extend((image.name, reconstruction.images[other].name) for other, _ in ranked)
    return pairs


def from_poses(
    model: "str | Path | object | Mapping[str, np.ndarray]", num_matched: int, rotation_threshold: float = 30.0
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
        reconstruction = model if hasattr(model, "points3D") else _read_model(model)
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


def main(
    output: Path,
    method: str = "exhaustive",
    images: Path | None = None,
    window: int = 5,
    loop_closure: bool = False,
    global_features: Path | None = None,
    query_prefix: str | None = None,
    num_matched: int = 20,
    model: Path | None = None,
    rotation_threshold: float = 30.0,
) -> list[Pair]:
    """Compute pairs with ``method`` and write them to ``output``; returns the pairs."""
    if method in ("exhaustive", "sequential"):
        if images is None:
            raise UserError(f"--method {method} needs --images DIR")
        names = list_images(images)
        pairs = exhaustive(names) if method == "exhaustive" else sequential(names, window, loop_closure)
    elif method == "retrieval":
        if global_features is None:
            raise UserError("--method retrieval needs --global-features G.h5 (from `python -m pipeline.retrieval`)")
        names, _ = read_global_descriptors(global_features)
        queries = names if query_prefix is None else [n for n in names if n.startswith(query_prefix)]
        db = names if query_prefix is None else [n for n in names if not n.startswith(query_prefix)]
        pairs = from_retrieval(global_features, queries, db, num_matched)
    elif method in ("covisibility", "poses"):
        if model is None:
            raise UserError(f"--method {method} needs --model DIR (a COLMAP model)")
        pairs = (
            covisibility(model, num_matched)
            if method == "covisibility"
            else from_poses(model, num_matched, rotation_threshold)
        )
    else:
        raise UserError(f"unknown pairs method {method!r}; choose one of {', '.join(METHODS)}")
    io.write_pairs(output, pairs)
    print(f"{len(pairs)} pairs ({method}) written to {output}")
    return pairs


def main_cli(argv: Sequence[str] | None = None) -> list[Pair]:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--method", choices=METHODS, default="exhaustive")
    parser.add_argument("--images", type=Path)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--loop-closure", action="store_true")
    parser.add_argument("--global-features", type=Path)
    parser.add_argument("--query-prefix")
    parser.add_argument("--num-matched", type=int, default=20)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rotation-threshold", type=float, default=30.0)
    args = parser.parse_args(argv)
    return main(**vars(args))


if __name__ == "__main__":
    run_cli(main_cli)
