"""Query -> db pairs by global-descriptor retrieval, for the Aachen and InLoc pipelines.

Uses ``pipeline.pairs.query_retrieval`` (global descriptors of every image, :mod:`pipeline.retrieval`; the
top ``k`` db images per query). Instead, users may give a pairs file
(``--pairs-query``: hloc's published ``pairs-query-netvlad*.txt`` lists) or ``exhaustive``.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError

#: --pairs-query value meaning every query with every db image (small datasets)
EXHAUSTIVE = "exhaustive"


def pairs_label(pairs_query: str | Path | None, num_loc: int) -> str:
    """The tag of the query pairs file name: retrieval<k>, exhaustive, or given (a user's file)."""
    if pairs_query is None:
        return f"retrieval{num_loc}"
    return EXHAUSTIVE if str(pairs_query) == EXHAUSTIVE else "given"


def query_pairs(
    image_dir: Path,
    outputs: Path,
    queries: "list[str]",
    db_names: "list[str]",
    pairs_query: str | Path | None,
    num_loc: int,
    target: Path,
    unknown_query: str,
    unknown_db: str,
) -> dict[str, list[str]]:
    """{query: [db images]} from ``exhaustive``, a given pairs file, or retrieval; written to ``target``.

    A given file naming an image outside ``queries`` / ``db_names`` is a :class:`UserError` whose message
    ends with ``unknown_query`` / ``unknown_db`` (each pipeline says where its images should be).
    """
    from core.io import write_pairs
    from pipeline.pairs import query_retrieval

    from .localize import parse_retrieval

    if pairs_query is not None and str(pairs_query) == EXHAUSTIVE:
        pairs = {query: list(db_names) for query in queries}  # small datasets: every query with every db image
    elif pairs_query is not None:
        pairs = parse_retrieval(pairs_query)
        known_queries, known_db = set(queries), set(db_names)
        stray = [q for q in pairs if q not in known_queries]
        if stray:
            raise UserError(f"{pairs_query}: query {stray[0]!r} {unknown_query}")
        unknown = [d for ds in pairs.values() for d in ds if d not in known_db]
        if unknown:
            raise UserError(f"{pairs_query}: db image {unknown[0]!r} {unknown_db}")
    else:
        pairs = {query: [] for query in queries}
        for query, db in query_retrieval(image_dir, outputs, list(queries), list(db_names), num_loc):
            pairs[query].append(db)
    write_pairs(target, [(q, d) for q, ds in pairs.items() for d in ds])
    return pairs
