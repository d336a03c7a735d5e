"""Shared test fixtures: the read-only data in ../shared/data and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """A path under ../shared/data; the test is skipped with a reason when it is absent."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test data {path} is absent (a fresh clone has no ../shared/data)")
    return path


@pytest.fixture
def temple_ring() -> Path:
    return data_path("temple_ring")


@pytest.fixture
def scannet_sample() -> Path:
    return data_path("scannet_sample")


@pytest.fixture
def sacre_coeur() -> Path:
    return data_path("sacre_coeur")


@pytest.fixture(scope="module")
def local_ray_cluster():
    """A local Ray cluster of 2 CPUs for one test module; its workers import the test modules by path
    (their tasks and matchers live there)."""
    import os

    ray = pytest.importorskip("ray")
    here = Path(__file__).parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()
