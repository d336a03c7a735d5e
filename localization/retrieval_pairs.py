"""Query -> db pairs by global-descriptor retrieval, for the Aachen and InLoc pipelines.

Uses the pipeline's retrieval step (global descriptors of every image, :mod:`pipeline.retrieval`) and
``pipeline.pairs.from_retrieval`` (top ``k`` db images per query). When this installation has no
retrieval step, the pipelines ask for a pairs file instead (``--pairs-query``: hloc's published
``pairs-query-netvlad*.txt`` lists, or ``exhaustive`` for small datasets).
"""
from __future__ import annotations

from pathlib import Path

from matchers.errors import UserError

NO_RETRIEVAL = (
    "global retrieval (pipeline.retrieval) is not available in this installation; give the query pairs with "
    "--pairs-query FILE (e.g. hloc's pairs-query-netvlad50.txt) or --pairs-query exhaustive (small datasets)"
)


def check_available() -> None:
    """Raise the :class:`UserError` above now, before hours of matching, when retrieval is missing."""
    try:
        from pipeline import pairs as pairs_step
        from pipeline import retrieval
    except ImportError:
        raise UserError(NO_RETRIEVAL) from None
    if getattr(retrieval, "main", None) is None or getattr(pairs_step, "from_retrieval", None) is None:
        raise UserError(NO_RETRIEVAL)


def retrieve_pairs(
    image_dir: str | Path, outputs: str | Path, query_names: "list[str]", db_names: "list[str]", k: int,
    device: str = "auto",
) -> dict[str, list[str]]:
    """{query: [top-k db images]} from global descriptors written under ``outputs``."""
    check_available()
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
