"""Query -> db pairs by global-descriptor retrieval, for the Aachen and InLoc pipelines.

Uses the pipeline's retrieval step (global descriptors of every image, :mod:`pipeline.retrieval`) and
``pipeline.pairs.from_retrieval`` (top ``k`` db images per query). Instead, users may give a pairs file
(``--pairs-query``: hloc's published ``pairs-query-netvlad*.txt`` lists) or ``exhaustive``.
"""
from __future__ import annotations

from pathlib import Path

from matchers.errors import UserError

#: --pairs-query value meaning every query with every db image (small datasets)
EXHAUSTIVE = "exhaustive"


def pairs_label(pairs_query: str | Path | None, num_loc: int) -> str:
    """The tag of the query pairs file name: retrieval<k>, exhaustive, or given (a user's file)."""
    if pairs_query is None:
        return f"retrieval{num_loc}"
    return EXHAUSTIVE if str(pairs_query) == EXHAUSTIVE else "given"


def retrieve_pairs(
    image_dir: str | Path, outputs: str | Path, query_names: "list[str]", db_names: "list[str]", k: int,
    device: str = "auto",
) -> dict[str, list[str]]:
    """{query: [top-k db images]} from global descriptors written under ``outputs``."""
    from pipeline import pairs as pairs_step
    from pipeline import retrieval

    if k < 1:
        raise UserError(f"the number of retrieved db images must be >= 1, got {k}")
    descriptors = Path(outputs) / "global-features.h5"
    retrieval.main(Path(image_dir), list(query_names) + list(db_names), descriptors, device=device)
    pairs: dict[str, list[str]] = {}
    for query, db in pairs_step.from_retrieval(descriptors, list(query_names), list(db_names), k):
        pairs.setdefault(query, []).append(db)
    return pairs
