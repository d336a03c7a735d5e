"""hloc's ``global-features.h5`` read as one descriptor matrix, and the top-k ranking of a similarity matrix.

The bottom of image retrieval: :mod:`pipeline.retrieval` writes the descriptors and re-ranks, and
:mod:`pipeline.pairs` turns rankings into pairs; both read through here (so neither imports the other back).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core import io
from core.errors import UserError

Pair = tuple[str, str]


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
