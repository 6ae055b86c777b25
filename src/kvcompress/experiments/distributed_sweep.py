"""A sweep's pending specs on Ray: one spec per unit, on actors that keep the model loaded.

Each `SweepWorker` loads the model itself, prepares the shared inputs (text, captured states, task
prompts) and measures one spec at a time with the serial sweep's `measure_record`; the driver
writes each record as it arrives, same file and content, so an interrupted sweep resumes with or
without Ray. The uncompressed task baseline is reused from disk when its key matches, else measured
once by the first worker and given to every worker (replacements included).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path

from ..distributed import (
    RayOptions,
    WorkersLostError,
    actor_threads,
    connect,
    remote_class,
    run_on_actors,
)
from ..io import write_json_atomic
from .grid import SpecEntry
from .measuring import (
    _Context,
    _environment,
    load_from_settings,
    measure_baseline,
    measure_record,
    prepare_inputs,
    saved_baseline,
    summary,
    sweep_fingerprint,
)
from .records import BASELINE_FILE, record_path
from .settings import SweepSettings

logger = logging.getLogger(__name__)


class SweepWorker:
    """One Ray actor: the model, loaded once, and the sweep's shared inputs."""

    def __init__(self, settings: SweepSettings, loader: Callable | None, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.error = None
        try:
            model, tokenizer = (loader or load_from_settings)(settings)
            self.ctx = _Context(model, tokenizer, settings)
            prepare_inputs(self.ctx)
            self.ctx.fingerprint = sweep_fingerprint(model, self.ctx.texts)  # as the driver's (same model, texts)
            self.environment = _environment(model)
        except Exception as exc:  # reported to the driver by ready()
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> str | None:
        return self.error

    def baseline(self) -> dict | None:
        return None if self.error else measure_baseline(self.ctx)

    def set_baseline(self, baseline: dict) -> None:
        self.ctx.baseline = baseline

    def measure(self, unit: tuple[SpecEntry, str]) -> dict:
        entry, key = unit
        return measure_record(self.ctx, entry, key, self.environment)


def run_pending_on_ray(pending: list[SpecEntry], keys: dict[str, str], out: Path, settings: SweepSettings,
                       options: RayOptions, loader: Callable | None, on_record: Callable[[dict], None] | None,
                       total: int, fingerprint: dict | None = None) -> dict[str, dict]:
    """Measure `pending` on Ray actors, writing each record as it arrives; returns them by label.

    Raises WorkersLostError (after every other spec is written) if some specs were given up
    because their workers kept dying.
    """
    ray = connect(options)
    name = f"kvcompress-sweep-{uuid.uuid4().hex[:8]}"
    baseline, first = saved_baseline(out, settings, fingerprint), []
    if baseline is None:
        # Measured once, by the first worker (which then measures specs too); the other workers
        # start meanwhile and receive it (Ray passes the pending result) before their first spec.
        first = [remote_class(SweepWorker, options).options(name=f"{name}-first").remote(
            settings, loader, actor_threads(options))]
        baseline = first[0].baseline.remote()
    measured: dict[str, dict] = {}
    units = [(entry, keys[entry.label]) for entry in pending]
    saved = [not first]

    def save_baseline() -> None:
        if not saved[0]:
            value = ray.get(baseline)
            if value is not None:
                write_json_atomic(out / BASELINE_FILE, value)
            saved[0] = True

    def write(index: int, record: dict) -> None:
        save_baseline()  # before the first record that refers to it
        write_json_atomic(record_path(out, record["label"]), record)
        measured[record["label"]] = record
        logger.info(f"[{total - len(pending) + len(measured)}/{total}] {record['label']}: {summary(record)}")
        if on_record is not None:
            on_record(record)

    lost = run_on_actors(SweepWorker, (settings, loader, actor_threads(options)), "measure", units, write, options,
                         setup=[("set_baseline", (baseline,))], name=name, actors=first)
    save_baseline()
    if lost:
        labels = [pending[i].label for i in lost]
        raise WorkersLostError(f"{len(labels)} spec(s) not measured because their Ray worker died: "
                               f"{', '.join(labels)}; run the same command again to measure them")
    return measured
