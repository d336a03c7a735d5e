"""Global image descriptors for retrieval, in hloc's ``global-features.h5``, and top-k pairs from them.

Descriptors (``--descriptor``):

* ``rootsift-vlad`` (default, weight-free, offline): RootSIFT descriptors (SIFT keypoints of the image
  resized to ``--max-size`` px, optionally plus a dense grid) aggregated with VLAD over a k-means
  vocabulary learned on the images themselves (intra-normalisation, signed square root, L2). The
  vocabulary is cached next to the output, keyed by the image list, their sizes/mtimes and the settings.
* ``netvlad``: VGG16-NetVLAD-Pitts30K (pipeline.netvlad) with the .mat weights hloc publishes, downloaded
  once to the torch hub cache (``--netvlad-weights FILE`` or ``NETVLAD_WEIGHTS`` for a local copy).

Output format (hloc): one group per image name holding ``global_descriptor`` (D,) float32.

Pairs: the top ``--num-matched`` db images per query by cosine similarity (pipeline.pairs.top_k_pairs),
self-pairs excluded; queries/db selected by ``--query-prefix`` or ``--query-list`` (the rest is the db;
without either, every image is both); optional spatial re-ranking of the top ``--rerank`` candidates by
the number of SIFT matches that survive a MAGSAC++ fundamental-matrix fit.

CLI::

    python -m pipeline.retrieval --images DIR --output global-features.h5 [--descriptor rootsift-vlad] \
        [--num-matched K --pairs-output pairs.txt] [--query-prefix P | --query-list FILE] [--rerank N]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from matchers.errors import UserError, run_cli
from matchers.image_io import read_gray
from pipeline import io
from pipeline import pairs as pairs_step
from pipeline.images import list_images

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
DESCRIPTORS = ("rootsift-vlad", "netvlad")
VOCAB_VERSION = 1  # bump when the local features or the k-means change, so old caches are not reused


@dataclass(frozen=True)
class RetrievalConfig:
    """Settings of the weight-free RootSIFT-VLAD descriptor."""

    max_size: int = 640  # longest image side for SIFT (px)
    num_features: int = 2000  # SIFT keypoints per image (strongest)
    dense_step: int = 0  # > 0 adds RootSIFT on a grid with this step (px at max_size), 0 = keypoints only
    num_words: int = 64  # vocabulary size
    vocab_images: int = 300  # at most this many images (evenly spaced) train the vocabulary
    vocab_samples_per_image: int = 1000  # descriptors sampled per image for k-means
    kmeans_iterations: int = 30
    seed: int = 0


# ------------------------------------------------------------------------------------ local features
def _to_uint8(image: np.ndarray, max_size: int) -> tuple[np.ndarray, float]:
    """Resize a float [0,1] gray image so its longest side is at most ``max_size``; returns uint8, scale."""
    height, width = image.shape[:2]
    scale = min(1.0, max_size / max(height, width)) if max_size > 0 else 1.0
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), scale


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then element-wise square root."""
    descriptors = np.asarray(descriptors, np.float32)
    descriptors = descriptors / np.maximum(np.abs(descriptors).sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(np.maximum(descriptors, 0.0))


def extract_local(
    image: np.ndarray, config: RetrievalConfig, return_keypoints: bool = False
) -> "np.ndarray | tuple[np.ndarray, np.ndarray]":
    """RootSIFT descriptors (N, 128) of a float gray image; with ``return_keypoints`` also the (N, 2)
    keypoints in original pixel coordinates (detected keypoints only, no dense grid)."""
    gray, scale = _to_uint8(image, config.max_size)
    sift = cv2.SIFT_create(nfeatures=config.num_features)
    keypoints, descriptors = sift.detectAndCompute(gray, None)
    if descriptors is None:
        descriptors = np.zeros((0, 128), np.float32)
    points = np.array([kp.pt for kp in keypoints], np.float32).reshape(-1, 2) / scale
    if return_keypoints:
        return rootsift(descriptors), points
    if config.dense_step > 0:
        step = config.dense_step
        height, width = gray.shape
        grid = [
            cv2.KeyPoint(float(x), float(y), float(step))
            for y in range(step // 2, height, step)
            for x in range(step // 2, width, step)
        ]
        _, dense = sift.compute(gray, grid)
        if dense is not None:
            descriptors = np.concatenate([descriptors, dense])
    return rootsift(descriptors)


# ------------------------------------------------------------------------------------------ VLAD
def learn_vocabulary(descriptors: np.ndarray, num_words: int, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """k-means centres (K, D) of ``descriptors`` (seeded, k-means++ initialisation)."""
    descriptors = np.ascontiguousarray(descriptors, np.float32)
    if len(descriptors) < num_words:
        raise UserError(
            f"only {len(descriptors)} local features to learn {num_words} visual words; "
            "add images or lower --num-words"
        )
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, iterations, 1e-4)
    _, _, centres = cv2.kmeans(descriptors, num_words, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return centres.astype(np.float32)


def vlad(descriptors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """VLAD (Jegou et al.) with intra-normalisation (Arandjelovic & Zisserman 2013), signed square root
    and L2 normalisation: (K * D,) float32."""
    num_words, dim = centres.shape
    out = np.zeros((num_words, dim), np.float64)
    if len(descriptors):
        distance = (
            (descriptors**2).sum(1, keepdims=True) - 2.0 * descriptors @ centres.T + (centres**2).sum(1)[None]
        )
        assignment = np.argmin(distance, axis=1)
        np.add.at(out, assignment, descriptors - centres[assignment])
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # intra-normalisation
    out = np.sign(out) * np.sqrt(np.abs(out))  # signed square root (power law 0.5)
    out = out.reshape(-1)
    return (out / max(np.linalg.norm(out), 1e-12)).astype(np.float32)


def _vocab_key(image_dir: Path, names: Sequence[str], config: RetrievalConfig) -> str:
    """Cache key of a vocabulary: the image list, their sizes and mtimes, and the settings."""
    digest = hashlib.sha1(f"v{VOCAB_VERSION}|{sorted(asdict(config).items())}".encode())
    for name in names:
        stat = io.resolve_image(image_dir, name).stat()
        digest.update(f"|{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def vocabulary_path(output: Path, key: str) -> Path:
    return output.with_name(f"{output.stem}.vocab-{key}.npy")


# ------------------------------------------------------------------------------------------- main
def _check_descriptor(descriptor: str) -> None:
    if descriptor not in DESCRIPTORS:
        raise UserError(f"unknown global descriptor {descriptor!r}; choose one of {', '.join(DESCRIPTORS)}")


def compute_rootsift_vlad(
    image_dir: Path, names: Sequence[str], config: RetrievalConfig, vocab_cache: Path | None = None
) -> dict[str, np.ndarray]:
    """{name: VLAD descriptor} with a vocabulary learned on ``names`` (loaded from ``vocab_cache`` if
    it exists there, else learned and saved there)."""
    local: dict[str, np.ndarray] = {}

    def features(name: str) -> np.ndarray:
        if name not in local:
            local[name] = extract_local(read_gray(io.resolve_image(image_dir, name)), config)
        return local[name]

    centres = None
    if vocab_cache is not None and vocab_cache.exists():
        centres = np.load(vocab_cache, allow_pickle=False)
        if centres.shape != (config.num_words, 128):
            centres = None
    if centres is None:
        subset = list(names)
        if len(subset) > config.vocab_images:
            subset = [subset[i] for i in np.linspace(0, len(subset) - 1, config.vocab_images).round().astype(int)]
        rng = np.random.default_rng(config.seed)
        samples = []
        for name in tqdm(subset, desc="retrieval vocabulary", disable=len(subset) < 2):
            descriptors = features(name)
            if len(descriptors) > config.vocab_samples_per_image:
                descriptors = descriptors[rng.choice(len(descriptors), config.vocab_samples_per_image, replace=False)]
            samples.append(descriptors)
        centres = learn_vocabulary(np.concatenate(samples), config.num_words, config.kmeans_iterations, config.seed)
        if vocab_cache is not None:
            with io.atomic_path(vocab_cache) as temp:
                with open(temp, "wb") as handle:
                    np.save(handle, centres)
    out: dict[str, np.ndarray] = {}
    for name in tqdm(names, desc="global descriptors", disable=len(names) < 2):
        out[name] = vlad(features(name), centres)
        local.pop(name, None)
    return out


def compute_netvlad(
    image_dir: Path, names: Sequence[str], config: RetrievalConfig, device: str = "auto",
    weights: Path | None = None,
) -> dict[str, np.ndarray]:
    """{name: NetVLAD descriptor (4096,)} of the images resized to ``config.max_size``."""
    from matchers.image_io import read_rgb
    from pipeline import netvlad

    model = netvlad.load_netvlad(weights, netvlad.resolve_device(device))
    return {
        name: netvlad.describe(model, read_rgb(io.resolve_image(image_dir, name)), config.max_size)
        for name in tqdm(names, desc="NetVLAD descriptors", disable=len(names) < 2)
    }


def write_global_features(path: Path, descriptors: dict[str, np.ndarray]) -> None:
    """hloc's global-features.h5 (a group per name with ``global_descriptor``), written atomically."""
    with io.atomic_path(path) as temp, h5py.File(temp, "w") as file:
        for name, descriptor in descriptors.items():
            file.create_group(name).create_dataset("global_descriptor", data=descriptor.astype(np.float32))


def main(
    image_dir: Path,
    names: Sequence[str] | None = None,
    output: Path = Path("global-features.h5"),
    descriptor: str = "rootsift-vlad",
    device: str = "auto",
    config: RetrievalConfig | None = None,
    weights: Path | None = None,
) -> Path:
    """Compute global descriptors of ``names`` (default: every image under ``image_dir``) into ``output``.

    ``device`` and ``weights`` (a local NetVLAD .mat) are for ``netvlad``; ``rootsift-vlad`` runs on the
    CPU. Returns ``output``.
    """
    _check_descriptor(descriptor)
    image_dir, output = Path(image_dir), Path(output)
    names = list_images(image_dir) if names is None else list(dict.fromkeys(names))
    if not names:
        raise UserError(f"{image_dir}: no images to describe; check --images")
    config = config or RetrievalConfig()
    if descriptor == "netvlad":
        descriptors = compute_netvlad(image_dir, names, config, device, weights)
    else:
        cache = vocabulary_path(output, _vocab_key(image_dir, names, config))
        descriptors = compute_rootsift_vlad(image_dir, names, config, cache)
    write_global_features(output, descriptors)
    logger.info("%d global descriptors (%s) written to %s", len(descriptors), descriptor, output)
    return output


# ------------------------------------------------------------------------------------------ pairs
def select_queries(
    names: Sequence[str], query_prefix: str | None = None, query_list: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(queries, db): by prefix or list the queries are those names and the db is the rest; with
    neither, every image is both."""
    if query_prefix is not None and query_list is not None:
        raise UserError("give --query-prefix or --query-list, not both")
    if query_prefix is None and query_list is None:
        return list(names), list(names)
    if query_prefix is not None:
        chosen = {name for name in names if name.startswith(query_prefix)}
    else:
        chosen = set(query_list)
        unknown = sorted(chosen - set(names))
        if unknown:
            raise UserError(f"query images {unknown[:3]} are not among the images; fix the query list")
    queries = [name for name in names if name in chosen]
    db = [name for name in names if name not in chosen]
    if not queries:
        raise UserError(f"no image matches the query selection (prefix {query_prefix!r}); check it")
    if not db:
        raise UserError("every image is a query, so there is no database to retrieve from; check the selection")
    return queries, db


def read_query_list(path: Path) -> list[str]:
    """Query names from a file, one per line (extra columns, as in hloc's query lists, are ignored)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: query list not found")
    names = []
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name = line.split()[0]
            io.check_relative_name(name, str(path))
            names.append(name)
    return names


def _match_count(features0: tuple[np.ndarray, np.ndarray], features1: tuple[np.ndarray, np.ndarray]) -> int:
    """SIFT matches (mutual nearest neighbours + ratio test) consistent with a MAGSAC++ fundamental matrix."""
    (points0, desc0), (points1, desc1) = features0, features1
    if len(desc0) < 8 or len(desc1) < 8:
        return 0
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc0, desc1, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < 0.85 * m[1].distance]
    if len(good) < 8:
        return len(good) // 2
    p0 = points0[[m.queryIdx for m in good]].astype(np.float64)
    p1 = points1[[m.trainIdx for m in good]].astype(np.float64)
    _, mask = cv2.findFundamentalMat(p0, p1, cv2.USAC_MAGSAC, 1.5, 0.999, 10000)
    return 0 if mask is None else int(mask.sum())


def spatial_rerank(
    image_dir: Path, pairs: Sequence[Pair], num_matched: int, config: RetrievalConfig | None = None
) -> list[Pair]:
    """Re-order each query's candidates by verified SIFT matches and keep the best ``num_matched``."""
    config = config or RetrievalConfig()
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def features(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in cache:
            desc, points = extract_local(read_gray(io.resolve_image(image_dir, name)), config, return_keypoints=True)
            cache[name] = (points, desc)
        return cache[name]

    by_query: dict[str, list[str]] = {}
    for query, db in pairs:
        by_query.setdefault(query, []).append(db)
    out: list[Pair] = []
    for query, candidates in tqdm(by_query.items(), desc="spatial re-ranking", disable=len(by_query) < 2):
        counts = [_match_count(features(query), features(db)) for db in candidates]
        # Stable on ties: the global-descriptor order breaks them.
        order = sorted(range(len(candidates)), key=lambda i: -counts[i])[:num_matched]
        out.extend((query, candidates[i]) for i in order)
    return out


def retrieve(
    image_dir: Path,
    global_features: Path,
    queries: Sequence[str],
    db: Sequence[str],
    num_matched: int,
    rerank: int = 0,
    config: RetrievalConfig | None = None,
) -> list[Pair]:
    """Top ``num_matched`` db images per query; with ``rerank`` > ``num_matched``, the top ``rerank``
    are re-ranked spatially first."""
    if num_matched < 1:
        raise UserError(f"the number of retrieved images must be >= 1, got {num_matched}")
    candidates = max(num_matched, rerank)
    pairs = pairs_step.from_retrieval(global_features, list(queries), list(db), candidates, exclude_self=True)
    if rerank > num_matched:
        pairs = spatial_rerank(image_dir, pairs, num_matched, config)
    return pairs


def pairs_from_images(
    image_dir: Path,
    names: Sequence[str],
    top_k: int,
    outputs: Path,
    device: str = "auto",
    descriptor: str = "rootsift-vlad",
    rerank: int = 0,
    config: RetrievalConfig | None = None,
) -> list[Pair]:
    """Retrieval pairs for reconstruction: every image against all others, top ``top_k``, with each
    unordered pair listed once. Global descriptors go to ``outputs/global-features.h5``."""
    features = main(Path(image_dir), list(names), Path(outputs) / "global-features.h5", descriptor, device, config)
    pairs = retrieve(Path(image_dir), features, list(names), list(names), top_k, rerank, config)
    seen: set[frozenset[str]] = set()
    unique: list[Pair] = []
    for name0, name1 in pairs:
        key = frozenset((name0, name1))
        if key not in seen:
            seen.add(key)
            unique.append((name0, name1))
    return unique


def main_cli(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--output", type=Path, default=Path("global-features.h5"))
    parser.add_argument("--descriptor", choices=DESCRIPTORS, default="rootsift-vlad")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--netvlad-weights", type=Path, help="local VGG16-NetVLAD-Pitts30K .mat (else downloaded)")
    parser.add_argument("--num-matched", type=int, help="also write top-K pairs (needs --pairs-output)")
    parser.add_argument("--pairs-output", type=Path)
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--query-prefix", help="images whose name starts with this are queries, the rest db")
    selection.add_argument("--query-list", type=Path, help="file of query names (one per line); the rest is db")
    parser.add_argument("--rerank", type=int, default=0, help="spatially re-rank the top N candidates (0 = off)")
    defaults = RetrievalConfig()
    parser.add_argument("--max-size", type=int, default=defaults.max_size)
    parser.add_argument("--num-words", type=int, default=defaults.num_words)
    parser.add_argument("--dense-step", type=int, default=defaults.dense_step)
    args = parser.parse_args(argv)
    if (args.num_matched is None) != (args.pairs_output is None):
        raise UserError("--num-matched and --pairs-output go together")
    config = RetrievalConfig(max_size=args.max_size, num_words=args.num_words, dense_step=args.dense_step)
    names = list_images(args.images)
    # Check the query selection before the (long) description step.
    query_list = read_query_list(args.query_list) if args.query_list is not None else None
    queries, db = select_queries(names, args.query_prefix, query_list)
    output = main(args.images, names, args.output, args.descriptor, args.device, config, args.netvlad_weights)
    print(f"{len(names)} global descriptors ({args.descriptor}) written to {output}")
    if args.pairs_output is not None:
        pairs = retrieve(args.images, output, queries, db, args.num_matched, args.rerank, config)
        io.write_pairs(args.pairs_output, pairs)
        print(f"{len(pairs)} retrieval pairs written to {args.pairs_output}")
    return output


if __name__ == "__main__":
    run_cli(main_cli)
