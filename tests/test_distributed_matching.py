"""``--distributed ray`` matching (issue 15): the same features.h5 / matches.h5 as one process, for SIFT and
LoFTR; a worker killed mid-job and a driver stopped mid-job cost no results. Local Ray, 2 workers."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from core.distributed import DistributedConfig
from matchers.base import Matcher, Matches
from pipeline.match_dense import DenseMatchConfig, run
from pipeline.raw_store import RawMatchStore
from tests.test_distributed import _shard_worker_pids
from tests.test_match_dense import assert_same_files, write_pairs

ray = pytest.importorskip("ray")
NAMES = [f"templeR{i:04d}.png" for i in range(1, 7)]
RAY = DistributedConfig("ray", workers=2, shard_pairs=2)


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.txt", [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1 : i + 4]])


def sift() -> Matcher:
    from matchers.factory import make_matcher

    return make_matcher("sift", resize=320, backend="opencv")


def random_loftr() -> Matcher:
    import torch

    from matchers.loftr import LoFTR, LoFTRMatcher

    torch.manual_seed(0)
    return LoFTRMatcher(LoFTR().eval(), resize=160, device="cpu", match_threshold=0.0)


def compact_loftr() -> Matcher:
    """The shipped loftr-compact weights: real matches, which the multi-view refinement can align."""
    from matchers.factory import make_matcher

    return make_matcher("loftr", weights="loftr-compact", resize=320, device="cpu")


class SlowSIFT(Matcher):
    """SIFT that takes its time per pair, so that a worker can be killed while it matches."""

    name = "slow-sift"

    def __init__(self) -> None:
        self.inner = sift()

    def prepare(self, image: np.ndarray):
        return self.inner.prepare(image)

    def match_prepared(self, prepared0, prepared1) -> Matches:
        time.sleep(0.4)
        return self.inner.match_prepared(prepared0, prepared1)

    def describe(self) -> dict:
        return self.inner.describe()


def _run(tmp_path: Path, name: str, pairs: Path, temple: Path, make, config: DenseMatchConfig, distributed=None):
    out = tmp_path / name
    result = run(
        pairs,
        temple / "images",
        out / "f.h5",
        out / "m.h5",
        make(),
        config,
        distributed=distributed or DistributedConfig(),
        worker_matcher=make,
    )
    return out, result


@pytest.mark.parametrize(
    "make,config",
    [
        (sift, DenseMatchConfig()),
        (random_loftr, DenseMatchConfig(batch_pairs=2, rotation="none", refine="none")),
        # exact tracks: the multi-view refinement also runs in shards on the workers
        (compact_loftr, DenseMatchConfig(batch_pairs=2, rotation="none", refine="tracks")),
    ],
    ids=["sift", "loftr", "loftr-tracks"],
)
def test_ray_workers_write_what_one_process_writes(local_ray_cluster, temple_ring, pairs, tmp_path, make, config):
    import torch

    # Each worker runs torch on its share of the cores (1 thread here); float sums in another thread count round
    # differently, so the single-process run uses the workers' count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone, _ = _run(tmp_path, "alone", pairs, temple_ring, make, config)
    finally:
        torch.set_num_threads(threads)
    spread, result = _run(tmp_path, "ray", pairs, temple_ring, make, config, RAY)
    assert result.distributed is not None and result.distributed.workers == 2
    assert result.pairs_matched == 12 and sum(result.matches_per_pair.values()) > 0
    assert_same_files(alone / "f.h5", spread / "f.h5")
    assert_same_files(alone / "m.h5", spread / "m.h5")


def test_a_killed_worker_process_costs_nothing(local_ray_cluster, temple_ring, pairs, tmp_path):
    alone, _ = _run(tmp_path, "alone", pairs, temple_ring, sift, DenseMatchConfig())
    earlier = set(_shard_worker_pids())
    killed: list[int] = []

    def kill_a_worker_once_it_works() -> None:
        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            pids = [pid for pid in _shard_worker_pids() if pid not in earlier]
            if pids:
                time.sleep(1.0)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_once_it_works)
    killer.start()
    spread, result = _run(tmp_path, "ray", pairs, temple_ring, SlowSIFT, DenseMatchConfig(), RAY)
    killer.join()
    assert killed and result.distributed.retried >= 1
    assert_same_files(alone / "f.h5", spread / "f.h5")
    assert_same_files(alone / "m.h5", spread / "m.h5")


def test_a_stopped_driver_resumes_with_every_finished_pair(
    local_ray_cluster, temple_ring, pairs, tmp_path, monkeypatch
):
    alone, _ = _run(tmp_path, "alone", pairs, temple_ring, sift, DenseMatchConfig())
    save_many = RawMatchStore.save_many
    saved: list[int] = []

    def save_then_stop(self, items):
        if len(saved) == 2:
            raise KeyboardInterrupt  # the driver is stopped after two shards arrived
        save_many(self, items)
        saved.append(len(items))

    monkeypatch.setattr(RawMatchStore, "save_many", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "ray", pairs, temple_ring, sift, DenseMatchConfig(), RAY)
    monkeypatch.setattr(RawMatchStore, "save_many", save_many)
    spread, result = _run(tmp_path, "ray", pairs, temple_ring, sift, DenseMatchConfig(), RAY)
    assert result.pairs_reused == sum(saved) == 4 and result.pairs_matched == 12 - 4
    assert_same_files(alone / "m.h5", spread / "m.h5")


def test_images_can_travel_with_their_shards(local_ray_cluster, temple_ring, pairs, tmp_path):
    """For workers without the driver's disk: each shard carries its image files (Ray's object store)."""
    from core.io import read_pairs
    from pipeline.match_dense import MatchShardTask, ShippedShards

    alone, _ = _run(tmp_path, "alone", pairs, temple_ring, sift, DenseMatchConfig())
    shipped = DistributedConfig("ray", workers=2, shard_pairs=2, ship_images=True)
    spread, _ = _run(tmp_path, "ray", pairs, temple_ring, sift, DenseMatchConfig(), shipped)
    assert_same_files(alone / "f.h5", spread / "f.h5")
    assert_same_files(alone / "m.h5", spread / "m.h5")
    # a worker that cannot see the image folder at all matches a shipped shard all the same
    task = MatchShardTask(sift, tmp_path / "no-such-folder", DenseMatchConfig(), {})
    task.setup()
    shard = ShippedShards([read_pairs(pairs)[:3]], temple_ring / "images")[0]
    assert set(shard.images) == {name for pair in shard.pairs for name in pair}
    matched_pairs, results, _ = task.run(shard)
    assert matched_pairs == shard.pairs and all(len(result) > 20 for result in results)
