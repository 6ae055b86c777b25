"""Units of work and who runs them: a job measures units on a model, an executor runs a job's units.

    executor.map(job, units, on_result)   # on_result(index, result) here, as each unit finishes

`job.start(model, tokenizer)` prepares what the units share (captured states, a baseline) and
returns the function that measures one unit. A job is picklable, so an executor may start it
where another copy of the model lives (`distributed.RayExecutor`); `Local` runs every unit here,
in order, on the caller's model. Tune, preset selection and sweeps take an executor and never
know which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Job(Protocol):
    """A kind of measurement: `start(model, tokenizer)` -> function measuring one unit; `label(unit)`
    names a unit in messages."""

    def start(self, model, tokenizer) -> Callable[[Any], Any]: ...

    def label(self, unit: Any) -> str: ...


class Executor(Protocol):
    """Runs `job` on every unit; `on_result(index, result)` is called in the caller for each."""

    def map(self, job: Job, units: Sequence[Any], on_result: Callable[[int, Any], None]) -> None: ...


class Local:
    """Every unit here, in order, on the caller's model. A job is started once per `Local` (its
    shared inputs are reused by later `map` calls with the same job object)."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self._started: dict[int, tuple[Job, Callable]] = {}  # id(job) -> (job, measure); the job is kept alive

    def start(self, job: Job) -> Callable[[Any], Any]:
        if id(job) not in self._started:
            self._started[id(job)] = (job, job.start(self.model, self.tokenizer))
        return self._started[id(job)][1]

    def map(self, job: Job, units: Sequence[Any], on_result: Callable[[int, Any], None]) -> None:
        if not units:
            return
        measure = self.start(job)
        for index, unit in enumerate(units):
            on_result(index, measure(unit))
