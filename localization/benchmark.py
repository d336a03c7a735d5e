"""One pipeline for the localization benchmarks; a small adapter per benchmark holds what differs.

:func:`run` is the skeleton every benchmark follows (each step writes files under the output folder):

1. query cameras (the adapter reads them from the dataset, checking its layout);
2. the reference: its db images and the 3D points of their keypoints (Aachen: db pairs, dense matching and
   triangulation with the SIFT model's poses; InLoc: the cutouts, 3D from their depth scans);
3. query-db pairs: a given file, ``exhaustive``, or global retrieval of ``num_loc`` db images;
4. dense matching of the query pairs (with the db keypoints held fixed where the reference has them);
5. localization (:mod:`localization.localize`), then the pose file, the submission file for
   visuallocalization.net (``name qw qx qy qz tx ty tz`` with the query's file name) and the JSON log;
6. with ground truth, evaluation at the benchmark's thresholds (:mod:`localization.evaluate`).

:class:`BenchmarkAdapter` is what a benchmark provides: its layout, query cameras, reference and file names
(:class:`localization.aachen.AachenAdapter`, :class:`localization.inloc.InLocAdapter`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pycolmap

from core.cli import add_config_arguments, config_from_options
from core.distributed import DistributedConfig
from core.files import check_output_dir, write_text_atomic
from core.poses import read_poses, write_poses, write_submission

from .evaluate import Evaluation, evaluate
from .localize import (
    LocalizationResult,
    LocalizeConfig,
    PointSource,
    QueryMatchingConfig,
    add_localize_arguments,
    json_safe,
    localize,
    localize_config_from_args,
    options_of,
    summary_line,
    write_log,
)
from .retrieval_pairs import pairs_label, query_pairs

if TYPE_CHECKING:
    from matchers.base import Matcher
    from pipeline.match_dense import DenseMatchConfig


@dataclass(frozen=True)
class BenchmarkConfig:
    """Options every benchmark pipeline has (each benchmark's config derives from it)."""

    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    #: query-db pairs file (names relative to the image root, e.g. hloc's pairs-query-netvlad50.txt), or
    #: 'exhaustive' (every query with every db image); none: global retrieval
    pairs_query: str | None = None
    num_loc: int = 50  # db images retrieved per query
    #: LoFTR weights used when none are given (None: $LOFTR_WEIGHTS, else outdoor, else offline loftr-compact)
    default_weights: str | None = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # matching over Ray workers

    def __post_init__(self) -> None:
        if self.pairs_query is not None:  # a Path from the API: names and labels take its text
            object.__setattr__(self, "pairs_query", str(self.pairs_query))


@dataclass(kw_only=True)
class BenchmarkOutputs:
    """Files every benchmark writes, and what the run found (each benchmark adds its own files)."""

    query_pairs: Path
    query_features: Path
    query_matches: Path
    poses: Path
    submission: Path
    log: Path
    evaluation_file: Path  # written with ground truth only
    result: LocalizationResult | None = None
    stats: dict = field(default_factory=dict)  # facts about the reference, written to the log
    evaluation: Evaluation | None = None  # with ground truth only


class BenchmarkAdapter(ABC):
    """What differs between benchmarks; :func:`run` calls the methods in the order they are listed."""

    #: the submission file's prefix: ``<prefix>_hloc_<matcher>_<estimator>.txt``
    submission_prefix: str
    #: (metres, degrees) thresholds of the benchmark's evaluation
    thresholds: tuple[tuple[float, float], ...]
    #: how a given pairs file's unknown query / db image is explained (where the benchmark keeps its images)
    unknown_query: str
    unknown_db: str

    def __init__(self, dataset: str | Path) -> None:
        self.dataset = Path(dataset)

    @property
    @abstractmethod
    def image_root(self) -> Path:
        """The folder image names are relative to."""

    @abstractmethod
    def query_cameras(self) -> dict[str, pycolmap.Camera]:
        """Query name -> camera; checks the dataset's layout first (a UserError naming it)."""

    def localize_config(self, config: BenchmarkConfig, cameras: dict[str, pycolmap.Camera]) -> LocalizeConfig:
        """The localization options for these queries (a benchmark may derive a threshold from them)."""
        return config.localize

    @abstractmethod
    def output_paths(self, outputs: Path, label: str, common: dict[str, Path]) -> BenchmarkOutputs:
        """The files of a run (``common``: the fields of :class:`BenchmarkOutputs` every benchmark names alike;
        ``label``: the matcher's name, which file names carry)."""

    @abstractmethod
    def prepare_reference(
        self,
        matcher: Matcher,
        dense: DenseMatchConfig,
        out: BenchmarkOutputs,
        cameras: dict[str, pycolmap.Camera],
        worker_matcher: Callable[[], Matcher] | None = None,
    ) -> list[str]:
        """Build the reference (writing its files, filling ``out.stats``); returns the db image names.
        ``worker_matcher``: how Ray workers build the matcher (``config.distributed``)."""

    def reference_features(self, out: BenchmarkOutputs) -> Path | None:
        """A features file whose db keypoints query matching must keep (they carry the reference's 3D)."""
        return None

    @abstractmethod
    def point_source(self, out: BenchmarkOutputs) -> PointSource:
        """The 3D points of db keypoints (after query matching)."""


def _matcher(config: BenchmarkConfig, matcher: Matcher | None) -> Matcher:
    return matcher if matcher is not None else config.localize.matching.make_matcher(config.default_weights)


def worker_matcher(config: BenchmarkConfig, matcher: Matcher | None) -> Callable[[], Matcher] | None:
    """How a Ray worker builds the run's matcher (None: a copy of the ready ``matcher`` travels to it)."""
    return (
        None
        if matcher is not None
        else functools.partial(config.localize.matching.make_matcher, config.default_weights)
    )


def run(
    adapter: BenchmarkAdapter,
    outputs: str | Path,
    config: BenchmarkConfig,
    matcher: Matcher | None = None,
    gt: str | Path | None = None,
) -> BenchmarkOutputs:
    """Run a benchmark (see the module docstring); ``matcher``: a ready matcher instead of ``config``'s;
    ``gt``: ground-truth poses (``name qw qx qy qz tx ty tz``) to evaluate against."""
    from pipeline import match_dense

    outputs = Path(outputs)
    check_output_dir(outputs, "--outputs")  # a file or a read-only place fails now, not after matching
    cameras = adapter.query_cameras()
    model = _matcher(config, matcher)  # unavailable weights fail now, not after the pairs are made
    localize_config = adapter.localize_config(config, cameras)
    dense = config.localize.matching.dense_config(model.name)
    outputs.mkdir(parents=True, exist_ok=True)
    tag = f"{model.name}-{localize_config.pose.estimator}"
    common = {
        "query_pairs": outputs / f"pairs-query-{pairs_label(config.pairs_query, config.num_loc)}.txt",
        "poses": outputs / f"poses-{tag}.txt",
        "submission": outputs / f"{adapter.submission_prefix}_hloc_{model.name}_{localize_config.pose.estimator}.txt",
        "log": outputs / f"poses-{tag}_log.json",
        "evaluation_file": outputs / f"evaluation-{tag}.json",
    }
    out = adapter.output_paths(outputs, model.name, common)
    db_names = adapter.prepare_reference(model, dense, out, cameras, worker_matcher(config, matcher))
    pairs = query_pairs(
        adapter.image_root,
        outputs,
        list(cameras),
        db_names,
        config.pairs_query,
        config.num_loc,
        out.query_pairs,
        unknown_query=adapter.unknown_query,
        unknown_db=adapter.unknown_db,
    )
    match_dense.main(
        out.query_pairs,
        adapter.image_root,
        out.query_features,
        out.query_matches,
        model,
        dense,
        reference_features=adapter.reference_features(out),
        distributed=config.distributed,
        worker_matcher=worker_matcher(config, matcher),
    )
    source = adapter.point_source(out)
    out.result = localize(source, cameras, pairs, out.query_features, out.query_matches, localize_config)
    write_poses(out.poses, out.result.poses)
    write_submission(out.submission, out.result.poses)
    facts = {"dataset": str(adapter.dataset), "matching": model.describe(), "pairs": str(out.query_pairs)}
    write_log(out.log, out.result, localize_config, {**facts, **out.stats})
    if gt is not None:
        out.evaluation = evaluate(read_poses(gt), out.result.poses, adapter.thresholds)
        write_text_atomic(
            out.evaluation_file, json.dumps(json_safe(out.evaluation.to_dict()), indent=1, allow_nan=False)
        )
    return out


# ----------------------------------------------------------------------------------------------- CLI
def add_benchmark_arguments(
    parser: argparse.ArgumentParser,
    config: BenchmarkConfig,
    dataset_help: str,
    helps: dict[str, str],
    exclude_pose: tuple[str, ...] = (),
) -> None:
    """A benchmark's options: dataset and outputs, then options generated from ``config``'s classes (the
    benchmark's own fields, matching, localization, pose estimation) with ``config``'s values as defaults.
    ``helps``: help texts by field name (a benchmark's wording); ``exclude_pose``: pose fields the benchmark's
    config owns instead (InLoc's size-dependent threshold)."""
    parser.add_argument("--dataset", type=Path, required=True, help=dataset_help)
    parser.add_argument("--outputs", type=Path, required=True, help="output folder")
    add_config_arguments(parser, QueryMatchingConfig, defaults=config.localize.matching, helps=helps)
    add_config_arguments(parser, BenchmarkConfig, defaults=config, exclude=("default_weights",), helps=helps)
    if type(config) is not BenchmarkConfig:  # the benchmark's own fields
        inherited = [f.name for f in dataclasses.fields(BenchmarkConfig)]
        add_config_arguments(parser, type(config), defaults=config, exclude=inherited, helps=helps)
    add_localize_arguments(parser, config.localize, exclude_pose)
    add_config_arguments(parser, DistributedConfig, defaults=config.distributed)
    parser.add_argument(
        "--gt",
        type=Path,
        default=None,
        help="ground-truth poses 'name qw qx qy qz tx ty tz': also print the recall at the benchmark's "
        "thresholds (and write evaluation-<matcher>-<estimator>.json)",
    )


def benchmark_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: Any) -> Any:
    """The benchmark config (of ``defaults``' class) that the parsed command line describes."""
    localize_config = localize_config_from_args(parser, args, defaults.localize)
    own = {**options_of(parser, args, BenchmarkConfig), **options_of(parser, args, type(defaults))}
    distributed = config_from_options(parser, args, DistributedConfig)
    return dataclasses.replace(defaults, localize=localize_config, distributed=distributed, **own)


def report(out: BenchmarkOutputs) -> None:
    """The summary the benchmark CLIs print: localized queries and the submission, then the evaluation."""
    print(f"{summary_line(out.result)}; submission: {out.submission}")
    if out.evaluation is not None:
        print(out.evaluation.table())


def run_cli_main(
    argv: list[str] | None,
    build_parser: Callable[[], argparse.ArgumentParser],
    main: Callable[..., BenchmarkOutputs],
    defaults: BenchmarkConfig,
) -> BenchmarkOutputs:
    """A benchmark's ``main_cli``: parse, run ``main(dataset, outputs, config, gt=...)``, print the report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = main(args.dataset, args.outputs, benchmark_config_from_args(parser, args, defaults), gt=args.gt)
    report(out)
    return out
