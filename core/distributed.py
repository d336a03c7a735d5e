"""Work split in shards over Ray actors (``--distributed ray``), or run in this process.

A step hands :func:`run_shards` a picklable *task* (built once per worker: for matching, the matcher is
loaded once per actor) and a list of shards; results come back one shard at a time, in completion order,
so the caller writes each to its crash-safe store as it arrives (a killed driver resumes with the same
command). A worker that dies (its process killed, out of memory, a node lost) has its shard retried on a
fresh actor; the job finishes with the same results.

Ray's own conventions: ``RAY_ADDRESS`` names the cluster to join (``ray start --head`` on a laptop, a
SLURM or Kubernetes cluster); without it a local cluster is started and stopped with the job. Workers:
one per GPU (``num_gpus=1`` each), else one per 2 CPU cores.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from core.errors import UserError

Shard = TypeVar("Shard")
Result = TypeVar("Result")

DISTRIBUTED_MODES = ("none", "ray")
INSTALL_HINT = "pip install 'loftr-sfm[distributed]' (or pip install ray)"


@dataclass(frozen=True)
class DistributedConfig:
    """How a step spreads its shards (``--distributed``, ``--workers``)."""

    distributed: Literal["none", "ray"] = "none"  # none: this process; ray: Ray actors ($RAY_ADDRESS or local)
    workers: int | None = None  # Ray workers; default one per GPU, else one per 2 CPU cores
    max_retries: int = 3  # times a shard is retried after its worker died
    shard_pairs: int = 64  # most pairs per shard (a shard is matched by one worker, its images cached there)
    #: send each shard's image files through Ray's object store (for workers without the driver's disk);
    #: none: when joining a cluster ($RAY_ADDRESS), not on a local one
    ship_images: bool | None = None

    def __post_init__(self) -> None:
        if self.distributed not in DISTRIBUTED_MODES:
            raise UserError(f"unknown --distributed {self.distributed!r}; choose one of {', '.join(DISTRIBUTED_MODES)}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_pairs < 1:
            raise UserError(f"--shard-pairs must be >= 1, got {self.shard_pairs}")


def shard_size(count: int, config: DistributedConfig, most: int, multiple: int = 1) -> int:
    """Items per shard for ``count`` items: about four shards per worker (balance), at most ``most`` items (rounded
    up to) a whole number of ``multiple`` (matcher batches), at least one ``multiple``."""
    balanced = -(-count // (4 * (config.workers or 2)))
    return -(-max(1, min(most, balanced)) // multiple) * multiple


def ships_images(config: DistributedConfig) -> bool:
    """Whether shards carry their image files (``ship_images``, or by default when joining a cluster)."""
    if config.ship_images is not None:
        return config.ship_images
    return config.distributed == "ray" and bool(os.environ.get("RAY_ADDRESS"))


class ShardTask(Protocol[Shard, Result]):
    """What a worker runs: ``setup()`` once (load the model), then ``run(shard)`` per shard."""

    def setup(self) -> None: ...

    def run(self, shard: Shard) -> Result: ...


@dataclass
class ShardStats:
    """What a distributed run did (for the step's summary)."""

    workers: int = 0  # Ray actors started at first (0: ran in this process)
    retried: int = 0  # shards run again after their worker died


@dataclass
class ShardOutcome(Generic[Result]):
    index: int  # position of the shard in the list given to run_shards
    result: Result


def run_shards(
    task: ShardTask,
    shards: Sequence[Any],
    config: DistributedConfig = DistributedConfig(),
    stats: ShardStats | None = None,
) -> Iterator[ShardOutcome]:
    """Run ``task`` on every shard; yields each shard's outcome as it completes (``stats`` counts retries)."""
    stats = stats if stats is not None else ShardStats()
    if config.distributed == "none" or not shards:
        task.setup()
        for index, shard in enumerate(shards):
            yield ShardOutcome(index, task.run(shard))
        return
    yield from _run_on_ray(task, shards, config, stats)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"--distributed ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(ray: Any) -> bool:
    """Join ``$RAY_ADDRESS`` or start a local cluster; True when this call started Ray (and must stop it)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    if address and not _reachable(address):
        raise UserError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} (nothing answers there); start it "
            f"(ray start --head), fix RAY_ADDRESS, or unset it to run a local cluster"
        )
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray cluster"
        reason = " ".join(str(error).split())[:160]
        raise UserError(
            f"cannot reach {where} ({reason}); start it (ray start --head), fix RAY_ADDRESS, "
            f"or unset it to run a local cluster"
        ) from None
    return True


def _reachable(address: str, timeout_s: float = 3.0) -> bool:
    """Whether something listens at a ``host:port`` (or ``ray://host:port``) address: Ray itself retries an
    unreachable head for minutes before it gives up. ``auto`` and other forms are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def default_workers(resources: dict[str, float]) -> int:
    """One worker per GPU, else one per 2 CPU cores (LoFTR uses two threads well on a CPU)."""
    gpus = int(resources.get("GPU", 0))
    return gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2)


def _actor_class(ray: Any) -> Any:
    @ray.remote(max_restarts=0)
    class ShardWorker:
        def __init__(self, task: ShardTask, threads: int) -> None:
            try:
                import torch

                torch.set_num_threads(max(1, threads))
            except ImportError:  # SIFT-only installs
                pass
            self.task, self.ready = task, False

        def run(self, shard: Any) -> Any:
            if not self.ready:  # here, not in __init__: an error in setup reaches the driver as itself
                self.task.setup()
                self.ready = True
            return self.task.run(shard)

        def pid(self) -> int:
            return os.getpid()

    return ShardWorker


def _run_on_ray(
    task: ShardTask, shards: Sequence[Any], config: DistributedConfig, stats: ShardStats
) -> Iterator[ShardOutcome]:
    ray = import_ray()
    started = connect(ray)
    try:
        resources = ray.cluster_resources()
        workers = min(config.workers or default_workers(resources), len(shards))
        gpus = int(resources.get("GPU", 0))
        cpus_each = max(float(resources.get("CPU", 1)) / workers, 0.01)
        options = {"num_cpus": cpus_each, "num_gpus": 1 if gpus >= workers else 0}
        worker_class = _actor_class(ray)
        task_ref = ray.put(task)

        def new_actor() -> Any:
            return worker_class.options(**options).remote(task_ref, int(cpus_each))

        stats.workers = workers
        yield from _schedule(ray, new_actor, workers, shards, config.max_retries, stats)
    finally:
        if started:
            ray.shutdown()


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _schedule(
    ray: Any, new_actor: Callable[[], Any], workers: int, shards: Sequence[Any], max_retries: int, stats: ShardStats
) -> Iterator[ShardOutcome]:
    """Keep each actor busy with one shard; a shard whose actor died goes to a fresh actor."""
    pending = list(range(len(shards)))[::-1]  # popped from the end: shards in order
    retries = [0] * len(shards)
    idle = [new_actor() for _ in range(workers)]
    running: dict[Any, tuple[int, Any]] = {}
    try:
        while pending or running:
            while idle and pending:
                actor, index = idle.pop(), pending.pop()
                running[actor.run.remote(shards[index])] = (index, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as error:
                if getattr(error, "actor_init_failed", False):  # not a death: the worker cannot even start
                    raise UserError(f"Ray workers cannot start: {_last_line(error)}") from None
                retries[index] += 1
                stats.retried += 1
                if retries[index] > max_retries:
                    raise UserError(
                        f"a Ray worker died on shard {index} {retries[index]} times (out of memory?); "
                        f"run with fewer --workers or without --distributed"
                    ) from None
                pending.append(index)
                idle.append(new_actor())
                continue
            except ray.exceptions.RayTaskError as error:  # the task raised: the same error as in one process
                raise error.as_instanceof_cause() from None
            idle.append(actor)
            yield ShardOutcome(index, result)
    finally:  # free the workers (and their models) now, also when the driver stops early
        for actor in idle + [actor for _, actor in running.values()]:
            ray.kill(actor)
