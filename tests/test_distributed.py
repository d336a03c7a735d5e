"""core.distributed: shards over local Ray actors give what one process gives, survive a killed worker,
and fail politely (issue 15). Ray runs as a local cluster of 2 workers on this machine's CPUs."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.distributed import DistributedConfig, ShardStats, run_shards
from core.errors import UserError

ray = pytest.importorskip("ray")


@dataclass
class SlowSquares:
    """Squares each number of a shard, slowly enough for a worker to be killed while it works."""

    seconds_per_item: float = 0.0

    def setup(self) -> None:
        self.calls = 0

    def run(self, shard: list[int]) -> list[int]:
        time.sleep(self.seconds_per_item * len(shard))
        return [value * value for value in shard]


# first, before the module's cluster starts: these need Ray not connected
def test_an_unreachable_cluster_is_one_clear_error(monkeypatch) -> None:
    if ray.is_initialized():
        pytest.skip("Ray is already connected in this process")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # the discard port: nothing listens
    start = time.time()
    with pytest.raises(UserError, match=r"cannot reach the Ray cluster at RAY_ADDRESS=127\.0\.0\.1:9.*ray start"):
        list(run_shards(SlowSquares(), [[1]], DistributedConfig("ray", workers=1)))
    assert time.time() - start < 10


def test_without_ray_the_error_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(UserError, match=r"needs Ray.*pip install 'loftr-sfm\[distributed\]'"):
        list(run_shards(SlowSquares(), [[1]], DistributedConfig("ray")))


def _collect(outcomes) -> dict[int, list[int]]:
    return {outcome.index: outcome.result for outcome in outcomes}


def test_ray_shards_give_what_one_process_gives(local_ray_cluster) -> None:
    shards = [list(range(start, start + 5)) for start in range(0, 40, 5)]
    alone = _collect(run_shards(SlowSquares(), shards))
    stats = ShardStats()
    spread = _collect(run_shards(SlowSquares(), shards, DistributedConfig("ray", workers=2), stats))
    assert spread == alone == {i: [v * v for v in shard] for i, shard in enumerate(shards)}
    assert stats.workers == 2 and stats.retried == 0


def _shard_worker_pids() -> list[int]:
    """Processes of Ray actors running a shard (their title is ray::ShardWorker...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if command.startswith("ray::ShardWorker"):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_a_killed_worker_costs_a_retry_not_the_job(local_ray_cluster) -> None:
    shards = [[value] for value in range(12)]
    killed: list[int] = []
    earlier = set(_shard_worker_pids())  # workers of earlier tests may still be shutting down

    def kill_one_worker() -> None:
        deadline = time.time() + 60
        while not killed and time.time() < deadline:
            pids = [pid for pid in _shard_worker_pids() if pid not in earlier]
            if pids:
                time.sleep(0.3)  # let it take a shard
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    stats = ShardStats()
    results = _collect(run_shards(SlowSquares(0.4), shards, DistributedConfig("ray", workers=2), stats))
    killer.join()
    assert killed, "no worker process was found to kill"
    assert results == {i: [i * i] for i in range(12)}
    assert stats.retried >= 1


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="--workers"):
        DistributedConfig("ray", workers=0)
    with pytest.raises(UserError, match="--distributed"):
        DistributedConfig("spark")
