"""The one place that knows Ray: `RayExecutor` runs a job's units on a pool of Ray actors.

    executor = RayExecutor(RayOptions(workers=2), load_args=(None, "float32", "cpu"), model=model)  # embedded model
    run_sweep(entries, out, settings, model=model, tokenizer=tokenizer, executor=executor)

Each actor loads its own model (`loader(load_args)`, picklable arguments, no model shipped), is
refused if that model's fingerprint differs from the caller's, starts the job once and takes one
unit at a time; results reach `on_result` in the caller as they arrive. A unit whose actor died
goes to a fresh actor up to `RayOptions.retries` times, then `WorkersLostError` names it (what
finished was already handed over). Ray is imported through `extras.require_extra`.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .extras import require_extra
from .fingerprint import mismatch, model_fingerprint
from .models import load_named_model

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
                  on_result: Callable[[int, Any], None], options: RayOptions, *, name: str | None = None) -> list[int]:
    """Run `getattr(worker, method)(unit)` for every unit on `options.workers` actors of `worker_cls`.

    Args:
        worker_cls: a plain class (decorated here) with `ready() -> str | None` (None: ready, else
            an error message) and `method`.
        worker_args: constructor arguments (picklable; a model loader, not a model).
        units: the work; `on_result(index, result)` is called in the driver for each finished one.
        name: prefix of the actors' names (`{name}-{n}`), so a user can find them
            (`ray.get_actor`); None: unnamed.

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

    def start_actor():
        nonlocal started
        kwargs = {"name": f"{name}-{started}"} if name else {}
        actor = remote_cls.options(**kwargs).remote(*worker_args)
        started += 1
        in_flight[actor.ready.remote()] = (actor, None)

    def give(actor):
        if pending:
            index = pending.popleft()
            attempts[index] += 1
            in_flight[getattr(actor, method).remote(units[index])] = (actor, index)
        else:
            ray.kill(actor)

    startup_deaths = 0
    for _ in range(min(options.workers, len(units))):
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


class _JobActor:
    """One Ray actor: its own model, checked against the caller's, and the job started on it."""

    def __init__(self, job, loader: Callable | None, load_args, threads: int, model_fp: dict | None):
        import torch

        torch.set_num_threads(threads)
        self.error = None
        try:
            model, tokenizer = (loader or load_named_model)(load_args)
            loaded = model_fingerprint(model)
            if model_fp is not None and loaded != model_fp:
                raise ValueError(f"it loaded another model than the caller ({mismatch(model_fp, loaded)}); "
                                 "check --model/--dtype")
            self.measure = job.start(model, tokenizer)
        except Exception as exc:  # reported to the driver by ready()
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> str | None:
        return self.error

    def run(self, unit):
        return self.measure(unit)


class RayExecutor:
    """Runs a job's units on Ray actors that each load the model (see module doc).

    Args:
        options: where and how wide (`RayOptions`).
        load_args: what `loader` is called with on every actor (picklable), e.g. the CLI's
            (model name, dtype name, device) for the default `models.load_named_model`.
        loader: `loader(load_args) -> (model, tokenizer)`; it must be importable on the workers.
        model: the caller's model: an actor whose model has another fingerprint is refused
            (`WorkerStartError`); None: not checked.
        name: prefix of the actors' names (a unique suffix is added per `map`).
    """

    def __init__(self, options: RayOptions, load_args=None, *, loader: Callable | None = None, model=None,
                 name: str = "kvcompress"):
        if loader is None and load_args is None:
            raise ValueError("RayExecutor needs load_args (model name, dtype name, device) or a loader")
        self.options, self.load_args, self.loader, self.name = options, load_args, loader, name
        self.model_fp = None if model is None else model_fingerprint(model)

    def map(self, job, units: Sequence[Any], on_result: Callable[[int, Any], None]) -> None:
        """`job` on every unit (see `Executor`); WorkersLostError naming the units given up, after
        every other result was handed to `on_result`."""
        if not units:
            return
        args = (job, self.loader, self.load_args, actor_threads(self.options), self.model_fp)
        lost = run_on_actors(_JobActor, args, "run", units, on_result, self.options,
                             name=f"{self.name}-{uuid.uuid4().hex[:8]}")
        if lost:
            labels = "; ".join(job.label(units[i]) for i in lost)
            raise WorkersLostError(f"{len(lost)} unit(s) of work not done because their Ray worker died: {labels}; "
                                   "run the same command again to do them (what finished is saved)")
