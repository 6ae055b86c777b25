"""Run independent units of work on a pool of Ray actors; the driver gets each result as it arrives.

    lost = run_on_actors(SweepWorker, (settings, loader), "measure", units, on_result, RayOptions(workers=2))

Each actor is built once (it loads its model itself) and takes one unit at a time; `on_result(index,
result)` runs in the driver as results arrive. A unit whose actor dies is retried on a fresh actor
up to `RayOptions.retries` times, then returned as lost; an actor that fails to start ends the run
(`WorkerStartError`). Ray is imported through `extras.require_extra`. Units that raise inside an
actor are the caller's worker's to report; a cluster this module joined is not shut down.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .extras import require_extra

logger = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """A Ray actor could not be built (for example its model failed to load); the message says why."""


class WorkersLostError(RuntimeError):
    """Some units were not done because their actors died more often than `RayOptions.retries` allows."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    Attributes:
        address: None starts a local cluster; "auto" or "ray://host:port" / "host:port" joins one.
        workers: number of actors (each keeps one copy of the model).
        cpus_per_worker, gpus_per_worker: Ray resources each actor reserves (a GPU actor sees
            only its own GPU as `cuda:0`).
        num_cpus: CPUs of a local cluster started here (None: Ray counts the machine's).
        retries: how many times a unit whose actor died is tried again on a fresh actor.
    """

    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    num_cpus: int | None = None
    retries: int = 1

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"--ray-workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("--ray-cpus-per-worker and --ray-gpus-per-worker must not be negative")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"--ray-num-cpus must be at least 1, got {self.num_cpus}")
        if self.retries < 0:
            raise ValueError(f"--ray-retries must not be negative, got {self.retries}")


def import_ray() -> ModuleType:
    """The `ray` module, or MissingExtraError naming `kvcompress[ray]`."""
    return require_extra("ray", "ray", "--ray")


def connect(options: RayOptions) -> ModuleType:
    """`ray`, initialised: joins `options.address`, or starts a local cluster (unless one is already up)."""
    ray = import_ray()
    if not ray.is_initialized():
        if options.address:
            ray.init(address=options.address, log_to_driver=True)
        else:
            ray.init(num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info(f"Ray cluster: {ray.cluster_resources()}")
    return ray


def actor_threads(options: RayOptions) -> int:
    """torch CPU threads an actor should use: its reserved CPUs, at least 1."""
    return max(1, int(options.cpus_per_worker))


def remote_class(worker_cls: type, options: RayOptions):
    """`worker_cls` as a Ray actor class reserving the resources of `options` (no automatic restarts)."""
    ray = connect(options)
    return ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                      max_restarts=0)(worker_cls)


def run_on_actors(worker_cls: type, worker_args: Sequence[Any], method: str, units: Sequence[Any],
                  on_result: Callable[[int, Any], None], options: RayOptions, *,
                  setup: Sequence[tuple[str, tuple]] = (), name: str | None = None,
                  actors: Sequence[Any] = ()) -> list[int]:
    """Run `getattr(worker, method)(unit)` for every unit on `options.workers` actors of `worker_cls`.

    Args:
        worker_cls: a plain class (decorated here) with `ready() -> str | None` (None: ready, else
            an error message) and `method`.
        worker_args: constructor arguments (picklable; a model loader, not a model).
        units: the work; `on_result(index, result)` is called in the driver for each finished one.
        setup: (method name, args) calls made on every actor before its first unit, also on
            actors started to replace dead ones (for example, a shared baseline).
        name: prefix of the actors' names (`{name}-{n}`), so a user can find them
            (`ray.get_actor`); None: unnamed.
        actors: actors already created (from `remote_class`, perhaps still starting), used
            first; they count towards `options.workers`.

    Returns the indices of the units given up because their actors kept dying (empty when all
    finished). Raises WorkerStartError if an actor cannot be built.
    """
    ray = connect(options)
    RayActorError = require_extra("ray", "ray.exceptions", "--ray").RayActorError  # noqa: N806

    remote_cls = remote_class(worker_cls, options)
    pending: deque[int] = deque(range(len(units)))
    attempts = [0] * len(units)
    lost: list[int] = []
    in_flight: dict[Any, tuple[Any, int | None]] = {}  # ObjectRef -> (actor, unit index or None for ready)
    started = 0

    def start_actor(actor=None):
        nonlocal started
        if actor is None:
            kwargs = {"name": f"{name}-{started}"} if name else {}
            actor = remote_cls.options(**kwargs).remote(*worker_args)
            started += 1
        in_flight[actor.ready.remote()] = (actor, None)
        for setup_method, args in setup:  # actor tasks run in submission order
            getattr(actor, setup_method).remote(*args)

    def give(actor):
        if pending:
            index = pending.popleft()
            attempts[index] += 1
            in_flight[getattr(actor, method).remote(units[index])] = (actor, index)
        else:
            ray.kill(actor)

    startup_deaths = 0
    for actor in list(actors)[:len(units)]:
        start_actor(actor)
    for actor in list(actors)[len(units):]:
        ray.kill(actor)
    for _ in range(min(options.workers, len(units)) - min(len(actors), len(units))):
        start_actor()
    try:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            actor, index = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as err:
                if index is None:
                    startup_deaths += 1
                    if startup_deaths > options.workers + options.retries:
                        raise WorkerStartError(f"Ray workers keep dying while they start: {err}") from err
                    logger.warning("a Ray worker died while starting; starting another")
                else:
                    again = attempts[index] <= options.retries
                    logger.warning(f"a Ray worker died on unit {index}; "
                                   + ("it goes to another worker" if again else "given up (rerun to do it)"))
                    (pending.appendleft if again else lost.append)(index)
                running = len(in_flight)  # actors starting or busy
                if pending and running < options.workers:
                    start_actor()
                continue
            if index is None:
                if result is not None:
                    raise WorkerStartError(f"a Ray worker could not start: {result}")
                give(actor)
                continue
            on_result(index, result)
            give(actor)
    finally:
        for actor, _ in list(in_flight.values()):
            ray.kill(actor)
    return sorted(lost)
