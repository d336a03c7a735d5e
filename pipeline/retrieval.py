"""Global image descriptors for retrieval, in hloc's ``global-features.h5``, and top-k pairs from them.

Descriptors (``--descriptor``):

* ``rootsift-vlad`` (weight-free, offline): RootSIFT descriptors of SIFT keypoints (rotation invariant)
  of the image resized to ``--max-size`` px, optionally plus a dense grid, aggregated with VLAD over a
  k-means vocabulary learned on the images themselves (intra-normalisation, signed square root, L2).
  The vocabulary is cached next to the output (``<output>.vocab-<key>.npy``), keyed by the image list,
  their sizes/mtimes and the settings; images added later are encoded with the same vocabulary.
* ``netvlad``: VGG16-NetVLAD-Pitts30K (:mod:`pipeline.netvlad`) with the .mat weights hloc publishes,
  downloaded once to the torch hub cache (``--netvlad-weights FILE`` or ``NETVLAD_WEIGHTS`` for a copy).
* ``auto`` (default): ``netvlad`` when its weights are on disk (given, ``$NETVLAD_WEIGHTS`` or cached),
  otherwise ``rootsift-vlad`` — never a download.

Output (hloc): one group per image name holding ``global_descriptor`` (D,) float32. The file also
records the descriptor and its settings (file attributes) and each image's size/mtime (group
attributes), so a re-run only describes new or changed images and never mixes descriptors. Finished
work is saved every ``checkpoint_seconds`` and on interruption, always by atomic replacement.

Pairs (:func:`pairs_from_retrieval`): the top ``--num-matched`` db images per query by cosine
similarity, self-pairs excluded; queries and db selected by name prefix(es) or list files (without a
db selection the db is every image that is not a query; without any selection every image is both);
optional spatial re-ranking of the top ``--rerank`` candidates by the number of RootSIFT matches that
survive a MAGSAC++ fundamental-matrix fit.

CLI::

    python -m pipeline.retrieval --images DIR --output global-features.h5 [--descriptor auto] \\
        [--num-matched K --pairs-output pairs.txt] [--query-prefix P | --query-list FILE] \\
        [--db-prefix P | --db-list FILE] [--rerank N] [--unique]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from core import io
from core.cache import LRUCache
from core.cli import add_config_arguments, config_from_args
from core.device import resolve_device
from core.errors import UserError, run_cli
from core.image_io import read_gray, read_rgb
from core.stamps import file_state, text_digest
from matchers.sift import SIFTExtractor, rootsift, verify_pair
from pipeline.images import list_images

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
DESCRIPTORS = ("auto", "rootsift-vlad", "netvlad")
VOCAB_VERSION = 1  # bump when the local features or the k-means change, so old caches are not reused
DATASET = "global_descriptor"
LOCAL_FEATURES_CACHED = 256  # images whose re-ranking features are kept (queries revisit their neighbours)


@dataclass(frozen=True)
class RetrievalConfig:
    """Settings of the global descriptors (RootSIFT-VLAD unless marked) and of the spatial re-ranking."""

    max_size: int = 640  # longest image side for SIFT (px)
    num_features: int = 2000  # SIFT keypoints per image (strongest)
    dense_step: int = 0  # > 0 adds RootSIFT on a grid with this step (px at max_size), 0 = keypoints only
    num_words: int = 64  # vocabulary size (descriptor dimension = 128 * num_words)
    vocab_images: int = 300  # at most this many images (evenly spaced) train the vocabulary
    vocab_samples_per_image: int = 1000  # descriptors sampled per image for k-means
    kmeans_iterations: int = 30  # k-means iterations of the vocabulary
    seed: int = 0  # seeds the vocabulary's image sample and k-means
    netvlad_max_size: int = 1024  # NetVLAD: longest image side (hloc's setting)
    rerank_ratio: float = 0.85  # re-ranking: Lowe ratio of RootSIFT matches
    rerank_threshold: float = 1.5  # re-ranking: MAGSAC++ threshold in px at max_size

    def digest(self, descriptor: str) -> str:
        """The settings that change ``descriptor``'s values, as a stable string (stored in the file)."""
        if descriptor == "netvlad":
            return json.dumps({"netvlad_max_size": self.netvlad_max_size})
        keep = {f.name for f in fields(self)} - {"netvlad_max_size", "rerank_ratio", "rerank_threshold"}
        return json.dumps({k: v for k, v in sorted(asdict(self).items()) if k in keep} | {"v": VOCAB_VERSION})


# ------------------------------------------------------------------------------------ local features
def _sift(image: np.ndarray, config: RetrievalConfig, dense: bool) -> tuple[np.ndarray, np.ndarray]:
    """Raw SIFT (N, 128) uint8 and keypoints (N, 2) in pixels of the image resized to ``config.max_size``."""
    # OpenCV's SIFT as the vocabularies were built with (no precise upscaling, its own keypoint count)
    extractor = SIFTExtractor("opencv", config.num_features, precise_upscale=False, strongest_only=False)
    found, _ = extractor.detect_resized(image, config.max_size, config.dense_step if dense else 0)
    # OpenCV's SIFT values are integers in [0, 255]: uint8 keeps caches 4x smaller, losslessly.
    return np.clip(np.rint(found.descriptors), 0, 255).astype(np.uint8), found.points


# ------------------------------------------------------------------------------------------ VLAD
def learn_vocabulary(descriptors: np.ndarray, num_words: int, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """k-means centres (K, D) of ``descriptors`` (seeded, k-means++ initialisation)."""
    descriptors = np.ascontiguousarray(descriptors, np.float32)
    if len(descriptors) < num_words:
        raise UserError(
            f"only {len(descriptors)} local features to learn {num_words} visual words; add images or lower --num-words"
        )
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, iterations, 1e-4)
    _, _, centres = cv2.kmeans(descriptors, num_words, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return centres.astype(np.float32)


def vlad(descriptors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """VLAD (Jegou et al.) with intra-normalisation (Arandjelovic & Zisserman 2013), signed square root
    and L2 normalisation: (K * D,) float32 (all zeros for an image without features)."""
    num_words, dim = centres.shape
    out = np.zeros((num_words, dim), np.float64)
    if len(descriptors):
        distance = (descriptors**2).sum(1, keepdims=True) - 2.0 * descriptors @ centres.T + (centres**2).sum(1)[None]
        assignment = np.argmin(distance, axis=1)
        np.add.at(out, assignment, descriptors - centres[assignment])
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # intra-normalisation
    out = np.sign(out) * np.sqrt(np.abs(out))  # signed square root (power law 0.5)
    out = out.reshape(-1)
    return (out / max(np.linalg.norm(out), 1e-12)).astype(np.float32)


def vocabulary_path(output: Path, key: str) -> Path:
    return output.with_name(f"{output.stem}.vocab-{key}.npy")


def _vocab_key(names: Sequence[str], stamps: dict[str, str], config: RetrievalConfig) -> str:
    """Cache key of a vocabulary: the image list, their sizes and mtimes, and the settings."""
    return text_digest([config.digest("rootsift-vlad"), *(f"|{name}:{stamps[name]}" for name in names)])


def _vocab_subset(names: Sequence[str], limit: int) -> list[str]:
    if len(names) <= limit:
        return list(names)
    return [names[i] for i in np.linspace(0, len(names) - 1, limit).round().astype(int)]


def _rootsift_vlad(
    image_dir: Path, names: Sequence[str], todo: Sequence[str], config: RetrievalConfig, vocab: Path
) -> Iterable[tuple[str, np.ndarray]]:
    """(name, VLAD) for ``todo``, lazily; the vocabulary is loaded from ``vocab`` or learned on ``names``
    and saved there first (before this returns)."""
    local: dict[str, np.ndarray] = {}  # raw uint8 SIFT of vocabulary images still to be encoded

    def features(name: str, keep: bool = False) -> np.ndarray:
        if name in local:
            return local.pop(name)
        raw = _sift(read_gray(io.resolve_image(image_dir, name)), config, dense=True)[0]
        if keep:
            local[name] = raw
        return raw

    centres = np.load(vocab, allow_pickle=False) if vocab.is_file() else None
    if centres is None or centres.shape != (config.num_words, 128):
        subset = _vocab_subset(names, config.vocab_images)
        wanted = set(todo)
        rng = np.random.default_rng(config.seed)
        samples = []
        for name in tqdm(subset, desc="retrieval vocabulary", disable=len(subset) < 2):
            descriptors = features(name, keep=name in wanted)
            if len(descriptors) > config.vocab_samples_per_image:
                descriptors = descriptors[rng.choice(len(descriptors), config.vocab_samples_per_image, replace=False)]
            samples.append(rootsift(descriptors))
        centres = learn_vocabulary(np.concatenate(samples), config.num_words, config.kmeans_iterations, config.seed)
        with io.atomic_path(vocab) as temp, open(temp, "wb") as handle:
            np.save(handle, centres)
    return ((name, vlad(rootsift(features(name)), centres)) for name in todo)


def _netvlad(
    image_dir: Path, todo: Sequence[str], config: RetrievalConfig, device: str, weights: Path
) -> Iterable[tuple[str, np.ndarray]]:
    from pipeline import netvlad

    model = netvlad.load_mat_weights(netvlad.NetVLAD(), weights).eval().to(resolve_device(device))
    for name in todo:
        image = read_rgb(io.resolve_image(image_dir, name))
        yield name, netvlad.describe(model, image, config.netvlad_max_size)


# ------------------------------------------------------------------------------------------ file
def resolve_descriptor(descriptor: str, weights: str | Path | None = None) -> str:
    """``auto`` -> ``netvlad`` when its weights are on disk, else ``rootsift-vlad``; checks the name."""
    if descriptor not in DESCRIPTORS:
        raise UserError(f"unknown global descriptor {descriptor!r}; choose one of {', '.join(DESCRIPTORS)}")
    if descriptor != "auto":
        return descriptor
    from pipeline import netvlad

    found = netvlad.find_local_weights(weights)
    if found is None:
        logger.info("no NetVLAD weights on disk (%s): using the weight-free rootsift-vlad", netvlad.cache_path())
        return "rootsift-vlad"
    return "netvlad"


def _stamp(image_dir: Path, name: str) -> str:
    """Size and mtime of an image: a re-run describes the image again when they change."""
    path = io.resolve_image(image_dir, name)
    state = file_state(path) if path.is_file() else None
    if state is None:
        raise UserError(f"{path}: image {name!r} not found; check --images and the image list")
    size, mtime_ns = state
    return f"{size}:{mtime_ns}"


def read_state(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(file attributes, {name: stamp}) of a global-features.h5 (empty when absent or unreadable)."""
    if not path.is_file():
        return {}, {}
    stamps: dict[str, str] = {}
    try:
        with h5py.File(path, "r") as file:
            attrs = {key: str(value) for key, value in file.attrs.items()}

            def visit(name: str, obj: object) -> None:
                if isinstance(obj, h5py.Group) and DATASET in obj:
                    stamps[name] = str(obj.attrs.get("stamp", ""))

            file.visititems(visit)
    except OSError:  # a truncated file from a crash: start again
        logger.warning("%s is unreadable; describing every image again", path)
        return {}, {}
    return attrs, stamps


class _Writer:
    """Adds descriptors to a global-features.h5, each flush an atomic replacement of the whole file."""

    def __init__(self, path: Path, attrs: dict[str, str], keep_existing: bool, every_seconds: float) -> None:
        self.path, self.attrs, self.keep, self.every = path, attrs, keep_existing, every_seconds
        self.pending: dict[str, tuple[np.ndarray, str]] = {}
        self.last = time.monotonic()

    def add(self, name: str, descriptor: np.ndarray, stamp: str) -> None:
        self.pending[name] = (np.asarray(descriptor, np.float32).reshape(-1), stamp)
        if time.monotonic() - self.last > self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending and self.keep:
            return
        with io.atomic_path(self.path) as temp:
            if self.keep and self.path.is_file():
                shutil.copyfile(self.path, temp)
            with h5py.File(temp, "a" if self.keep else "w") as file:
                for key, value in self.attrs.items():
                    file.attrs[key] = value
                for name, (descriptor, stamp) in self.pending.items():
                    if name in file:
                        del file[name]
                    group = file.require_group(name)
                    group.create_dataset(DATASET, data=descriptor)
                    group.attrs["stamp"] = stamp
        self.pending.clear()
        self.keep = True  # later flushes add to what is now on disk
        self.last = time.monotonic()


# ------------------------------------------------------------------------------------------- main
def main(
    image_dir: Path,
    names: Sequence[str] | None = None,
    output: Path = Path("global-features.h5"),
    descriptor: str = "auto",
    device: str = "auto",
    config: RetrievalConfig = RetrievalConfig(),
    weights: Path | None = None,
    overwrite: bool = False,
    checkpoint_seconds: float = 120.0,
) -> Path:
    """Describe ``names`` (default: every image under ``image_dir``) into ``output``; returns ``output``.

    Resumes: images already in ``output`` with the same descriptor, settings and file size/mtime are
    kept; ``overwrite`` describes everything again (and relearns the RootSIFT-VLAD vocabulary).
    ``device`` and ``weights`` (a local NetVLAD .mat) are for ``netvlad``; ``rootsift-vlad`` runs on
    the CPU.
    """
    if isinstance(names, (str, os.PathLike)):
        raise TypeError("names must be a list of image names; pass the output file as output=...")
    image_dir, output = Path(image_dir), Path(output)
    descriptor = resolve_descriptor(descriptor, weights)
    names = list_images(image_dir) if names is None else list(dict.fromkeys(names))
    if not names:
        raise UserError(f"{image_dir}: no images to describe; check --images")
    if descriptor == "netvlad":  # first: a missing download fails before any work
        from pipeline import netvlad

        weights = netvlad.weights_path(weights)  # downloads once; offline: one-line UserError
    stamps = {name: _stamp(image_dir, name) for name in names}
    settings = {"descriptor": descriptor, "settings": config.digest(descriptor)}
    if descriptor == "netvlad":
        settings["weights"] = f"{weights.name}:{weights.stat().st_size}"
    else:
        settings["vocabulary"] = vocabulary_path(output, _vocab_key(names, stamps, config)).name

    attrs, done = ({}, {}) if overwrite else read_state(output)
    same = all(attrs.get(key) == value for key, value in settings.items() if key != "vocabulary")
    if descriptor == "rootsift-vlad" and same:
        # Images added later are encoded with the vocabulary the file was built with.
        same = bool(attrs.get("vocabulary")) and (output.parent / attrs["vocabulary"]).is_file()
        if same:
            settings["vocabulary"] = attrs["vocabulary"]
    if done and not same:
        logger.info("%s was built with other descriptor settings: describing every image again", output)
    todo = [name for name in names if not same or done.get(name) != stamps[name]]
    if not todo:
        logger.info("%s: all %d global descriptors are up to date", output, len(names))
        return output

    if descriptor == "netvlad":
        results = _netvlad(image_dir, todo, config, device, weights)
    else:
        vocab = output.parent / settings["vocabulary"]
        if overwrite and vocab.is_file():
            vocab.unlink()  # relearn it too
        results = _rootsift_vlad(image_dir, names, todo, config, vocab)
    writer = _Writer(output, settings, keep_existing=same and bool(done), every_seconds=checkpoint_seconds)
    try:
        for name, value in tqdm(
            results, total=len(todo), desc=f"global descriptors ({descriptor})", disable=len(todo) < 2
        ):
            writer.add(name, value, stamps[name])
    finally:
        writer.flush()  # also on errors and Ctrl-C: finished images are kept
    if descriptor == "rootsift-vlad":
        for stale in output.parent.glob(f"{output.stem}.vocab-*.npy"):
            if stale.name != settings["vocabulary"]:
                stale.unlink()
    logger.info("%d global descriptors (%s) written to %s", len(todo), descriptor, output)
    return output


# ------------------------------------------------------------------------------------------ pairs
def read_name_list(path: str | Path) -> list[str]:
    """Image names from a file, one per line (extra columns, as in hloc's query lists, are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image list not found")
    names = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name = line.split()[0]
            io.check_relative_name(name, str(path))
            names.append(name)
    return names


def select_names(
    names: Sequence[str],
    prefix: str | Sequence[str] | None = None,
    name_list: str | Path | Sequence[str] | None = None,
    what: str = "query",
) -> list[str] | None:
    """The ``names`` selected by prefix(es) or by a list (a file or names); None without a selection."""
    if prefix is not None and name_list is not None:
        raise UserError(f"give a {what} prefix or a {what} list, not both")
    if prefix is None and name_list is None:
        return None
    if prefix is not None:
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        chosen = [name for name in names if name.startswith(prefixes)]
        if not chosen:
            raise UserError(f"no image name starts with the {what} prefix {' or '.join(map(repr, prefixes))}; check it")
        return chosen
    listed = read_name_list(name_list) if isinstance(name_list, (str, os.PathLike)) else list(name_list)
    known = set(names)
    unknown = [name for name in listed if name not in known]
    if unknown:
        raise UserError(f"{what} images {unknown[:3]} are not among the described images; fix the {what} list")
    return list(dict.fromkeys(listed))


def select_query_db(
    names: Sequence[str],
    query_prefix: str | Sequence[str] | None = None,
    query_list: str | Path | Sequence[str] | None = None,
    db_prefix: str | Sequence[str] | None = None,
    db_list: str | Path | Sequence[str] | None = None,
    db_names: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(queries, db) among ``names`` (and ``db_names``, the names of a separate db file, when given).

    Without a db selection the db is every image that is not a query (all of them without a query
    selection, so every image is both query and db)."""
    queries = select_names(names, query_prefix, query_list, "query")
    db_pool = list(db_names) if db_names is not None else list(names)
    db = select_names(db_pool, db_prefix, db_list, "db")
    if db is None:
        chosen = set(queries) if queries is not None and db_names is None else set()
        db = [name for name in db_pool if name not in chosen]
    if queries is None:
        queries = list(names)
    if not db:
        raise UserError("the query selection leaves no database image to retrieve from; check the selection")
    return queries, db


def read_global_features(path: str | Path) -> tuple[dict[str, int], np.ndarray, str]:
    """({name: row}, L2-normalised descriptors (N, D), descriptor kind or '' for foreign files)."""
    from pipeline.global_features import read_global_descriptors

    names, matrix = read_global_descriptors(path)
    attrs, _ = read_state(Path(path))
    return {name: i for i, name in enumerate(names)}, matrix, attrs.get("descriptor", "")


def _local_features(image_dir: Path, name: str, config: RetrievalConfig) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints (px at ``config.max_size``) and their RootSIFT descriptors, for spatial re-ranking."""
    raw, points = _sift(read_gray(io.resolve_image(image_dir, name)), config, dense=False)
    return points, rootsift(raw)


def verified_matches(
    features0: tuple[np.ndarray, np.ndarray],
    features1: tuple[np.ndarray, np.ndarray],
    ratio: float = 0.85,
    threshold: float = 1.5,
) -> int:
    """RootSIFT matches (ratio test) consistent with a MAGSAC++ fundamental matrix."""
    (points0, descriptors0), (points1, descriptors1) = features0, features1
    return int(verify_pair(points0, descriptors0, points1, descriptors1, ratio, threshold)[2].sum())


def spatial_rerank(
    image_dir: Path, candidates: dict[str, list[str]], num_matched: int, config: RetrievalConfig = RetrievalConfig()
) -> dict[str, list[str]]:
    """Re-order each query's candidates by verified matches (ties keep the global order), keep ``num_matched``."""
    cache: LRUCache[tuple[np.ndarray, np.ndarray]] = LRUCache(max_items=LOCAL_FEATURES_CACHED)

    def features(name: str) -> tuple[np.ndarray, np.ndarray]:
        return cache.get_or_create(name, lambda: _local_features(Path(image_dir), name, config))

    counts: dict[frozenset[str], int] = {}  # symmetric: a pair seen from both sides is verified once
    out: dict[str, list[str]] = {}
    for query, ranked in tqdm(candidates.items(), desc="spatial re-ranking", disable=len(candidates) < 2):
        scores = []
        for db in ranked:
            key = frozenset((query, db))
            if key not in counts:
                counts[key] = verified_matches(
                    features(query), features(db), config.rerank_ratio, config.rerank_threshold
                )
            scores.append(counts[key])
        order = sorted(range(len(ranked)), key=lambda i: -scores[i])[:num_matched]  # stable sort
        out[query] = [ranked[i] for i in order]
    return out


def unique_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Each unordered pair once (first occurrence kept): for matching, (a, b) and (b, a) are the same."""
    seen: set[frozenset[str]] = set()
    out: list[Pair] = []
    for name0, name1 in pairs:
        key = frozenset((name0, name1))
        if key not in seen:
            seen.add(key)
            out.append((name0, name1))
    return out


def pairs_from_retrieval(
    global_features: str | Path,
    output: str | Path | None,
    num_matched: int,
    query_prefix: str | Sequence[str] | None = None,
    query_list: str | Path | Sequence[str] | None = None,
    db_prefix: str | Sequence[str] | None = None,
    db_list: str | Path | Sequence[str] | None = None,
    db_global_features: str | Path | None = None,
    exclude_self: bool = True,
    unique: bool = False,
    rerank: int = 0,
    image_dir: str | Path | None = None,
    config: RetrievalConfig = RetrievalConfig(),
    names: Sequence[str] | None = None,
) -> list[Pair]:
    """Top ``num_matched`` db images per query by cosine similarity of global descriptors (hloc's
    ``pairs_from_retrieval``); written to ``output`` (hloc pairs.txt) unless None.

    Images: ``names`` (default: every image in ``global_features``), split into queries and db by
    :func:`select_query_db`; ``db_global_features`` takes the db from another file. ``exclude_self``
    drops pairs of an image with itself; ``unique`` lists each unordered pair once (for SfM).
    ``rerank`` > ``num_matched``: the top ``rerank`` candidates are re-ranked by verified RootSIFT
    matches (needs ``image_dir``). Returns the pairs, query by query, best first.
    """
    from pipeline.global_features import top_k_pairs

    if num_matched < 1:
        raise UserError(f"the number of retrieved images must be >= 1, got {num_matched}")
    if rerank > num_matched and image_dir is None:
        raise UserError("spatial re-ranking reads the images: give the image folder (--images)")
    index, matrix, kind = read_global_features(global_features)
    db_index, db_matrix, db_kind = index, matrix, kind
    if db_global_features is not None:
        db_index, db_matrix, db_kind = read_global_features(db_global_features)
        if kind and db_kind and kind != db_kind:
            raise UserError(
                f"{global_features} holds {kind} descriptors but {db_global_features} holds "
                f"{db_kind}; describe both with the same --descriptor"
            )
        if matrix.shape[1] != db_matrix.shape[1]:
            raise UserError(
                f"{global_features} has {matrix.shape[1]}-D descriptors but {db_global_features} "
                f"{db_matrix.shape[1]}-D; describe both with the same settings"
            )
    if names is None:
        names = list(index)
    else:
        missing = [name for name in names if name not in index]
        if missing:
            raise UserError(f"{global_features}: no global descriptor for {missing[:3]}; re-run pipeline.retrieval")
    queries, db = select_query_db(
        names, query_prefix, query_list, db_prefix, db_list, list(db_index) if db_global_features else None
    )
    similarity = matrix[[index[q] for q in queries]] @ db_matrix[[db_index[d] for d in db]].T
    ranked: dict[str, list[str]] = {query: [] for query in queries}
    for query, other in top_k_pairs(similarity, queries, db, max(num_matched, rerank), exclude_self):
        ranked[query].append(other)
    if rerank > num_matched:
        ranked = spatial_rerank(Path(image_dir), ranked, num_matched, config)
    pairs = [(query, other) for query, others in ranked.items() for other in others[:num_matched]]
    if unique:
        pairs = unique_pairs(pairs)
    if output is not None:
        io.write_pairs(output, pairs)
        logger.info("%d retrieval pairs written to %s", len(pairs), output)
    return pairs


def pairs_from_images(
    image_dir: Path,
    names: Sequence[str],
    top_k: int,
    outputs: Path,
    device: str = "auto",
    descriptor: str = "auto",
    rerank: int = 0,
    config: RetrievalConfig = RetrievalConfig(),
    weights: Path | None = None,
) -> list[Pair]:
    """Retrieval pairs for reconstruction: each image's top ``top_k`` among the others, each unordered
    pair once. Global descriptors go to (and are resumed from) ``outputs/global-features.h5``."""
    features = main(
        Path(image_dir), list(names), Path(outputs) / "global-features.h5", descriptor, device, config, weights
    )
    return pairs_from_retrieval(
        features, None, top_k, unique=True, rerank=rerank, image_dir=image_dir, config=config, names=list(names)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--image-list", type=Path, help="describe only these images (one name per line)")
    parser.add_argument("--output", type=Path, default=Path("global-features.h5"))
    parser.add_argument("--descriptor", choices=DESCRIPTORS, default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--netvlad-weights",
        type=Path,
        help="local VGG16-NetVLAD-Pitts30K .mat (default: $NETVLAD_WEIGHTS, else cached/downloaded)",
    )
    parser.add_argument("--overwrite", action="store_true", help="describe every image again")
    parser.add_argument("--num-matched", type=int, help="also write top-K pairs (needs --pairs-output)")
    parser.add_argument("--pairs-output", type=Path)
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--query-prefix", nargs="+", help="queries: images whose name starts with one of these")
    query.add_argument("--query-list", type=Path, help="queries: names in this file (first column)")
    db = parser.add_mutually_exclusive_group()
    db.add_argument("--db-prefix", nargs="+", help="db: images whose name starts with one of these")
    db.add_argument("--db-list", type=Path, help="db: names in this file (default: every non-query image)")
    parser.add_argument("--unique", action="store_true", help="list each unordered pair once (for SfM)")
    parser.add_argument("--rerank", type=int, default=0, help="spatially re-rank the top N candidates (0 = off)")
    add_config_arguments(parser.add_argument_group("descriptor and re-ranking settings"), RetrievalConfig)
    return parser


def main_cli(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if (args.num_matched is None) != (args.pairs_output is None):
        raise UserError("--num-matched and --pairs-output go together")
    config = config_from_args(args, RetrievalConfig)
    names = read_name_list(args.image_list) if args.image_list is not None else list_images(args.images)
    if args.pairs_output is not None:  # check the selection before the (long) description step
        select_query_db(names, args.query_prefix, args.query_list, args.db_prefix, args.db_list)
    output = main(
        args.images,
        names,
        args.output,
        args.descriptor,
        args.device,
        config,
        args.netvlad_weights,
        overwrite=args.overwrite,
    )
    print(f"{len(names)} global descriptors written to {output}")
    if args.pairs_output is not None:
        pairs = pairs_from_retrieval(
            output,
            args.pairs_output,
            args.num_matched,
            args.query_prefix,
            args.query_list,
            args.db_prefix,
            args.db_list,
            unique=args.unique,
            rerank=args.rerank,
            image_dir=args.images,
            config=config,
            names=names,
        )
        print(f"{len(pairs)} retrieval pairs written to {args.pairs_output}")
    return output


if __name__ == "__main__":
    run_cli(main_cli)
