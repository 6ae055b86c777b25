"""Sweep: measure many specs (reconstruction, decode-faithful quality, tasks), one JSON record each.

    entries = parse_specs("int8,int4,my_spec.yaml")          # or a grid file, see `grid.load_grid`
    run_sweep(entries, "runs/sweep", SweepSettings(tasks=("passkey",)))

Each spec's record is written to `OUT/records/<label>.json` (atomically) as soon as it is measured,
keyed by a hash of the spec, the settings and the run's fingerprint (`measuring.sweep_fingerprint`):
a rerun skips records with the same key and status "ok", measures the others again, and a spec that
raises gets an error record while the sweep goes on. `OUT/baseline.json` holds the uncompressed task
scores, `OUT/config.json` the resolved settings. With `ray=RayOptions(...)` the pending specs run on
Ray actors (`distributed_sweep`), same records. Record and grid formats: docs/analysis.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..distributed import RayOptions
from ..io import write_json_atomic
from .grid import SpecEntry, check_unique
from .measuring import (
    _Context,
    _environment,
    load_from_settings,
    measure_baseline,
    measure_record,
    measure_spec,
    prepare_inputs,
    saved_baseline,
    summary,
    sweep_fingerprint,
    sweep_texts,
    why_measured_again,
)
from .records import BASELINE_FILE, CONFIG_FILE, read_record, record_path
from .settings import SweepSettings, record_key

__all__ = ["measure_spec", "run_sweep"]

logger = logging.getLogger(__name__)


def _prepare(ctx: _Context, out: Path, progress: bool) -> None:
    prepare_inputs(ctx)
    baseline = saved_baseline(out, ctx.settings, ctx.fingerprint)
    if baseline is None:
        baseline = measure_baseline(ctx)
        write_json_atomic(out / BASELINE_FILE, baseline)
    ctx.baseline = baseline


def run_sweep(entries: list[SpecEntry], out_dir: str | os.PathLike, settings: SweepSettings | None = None, *,
              model=None, tokenizer=None, progress: bool = True,
              on_record: Callable[[dict], None] | None = None, command: str | None = None,
              ray: RayOptions | None = None, loader: Callable | None = None) -> list[dict]:
    """Measure every entry (skipping those already measured with the same key); return all records.

    Args:
        entries: the specs (see `parse_specs`, `load_grid`).
        out_dir: the sweep folder (created).
        settings: see `SweepSettings`.
        model, tokenizer: an already loaded model (else loaded from `settings`).
        on_record: called with each new record right after it is written.
        command: the command line that started the sweep, saved in config.json for the report.
        ray: run the pending specs on a Ray cluster (see `distributed_sweep`); None: in this process.
        loader: `loader(settings) -> (model, tokenizer)`, used when `model` is None (default
            `load_from_settings`); with `ray`, every worker calls it (so it must be picklable).
    """
    settings = settings or SweepSettings()
    entries = check_unique(list(entries))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = (loader or load_from_settings)(settings)
    texts = sweep_texts(tokenizer, settings)
    fingerprint = sweep_fingerprint(model, texts)
    keys = {entry.label: record_key(entry, settings, fingerprint) for entry in entries}
    write_json_atomic(out / CONFIG_FILE, {"command": command, "settings": settings.to_dict(),
                                          "fingerprint": fingerprint,
                                          "specs": [{**e.to_dict(), "key": keys[e.label]} for e in entries]})
    done = {}
    for entry in entries:
        record = read_record(record_path(out, entry.label))
        if not record or record.get("status") != "ok":
            continue
        if record.get("key") == keys[entry.label]:
            done[entry.label] = record
        else:
            logger.warning(f"{entry.label}: measuring again, its record is stale: "
                           f"{why_measured_again(record, fingerprint)}")
    pending = [e for e in entries if e.label not in done]
    if done:
        logger.info(f"resuming: {len(done)} of {len(entries)} specs already measured")
    baseline_ok = saved_baseline(out, settings, fingerprint) is not None
    if not pending and not baseline_ok:
        logger.info(f"{out / BASELINE_FILE} is missing or damaged: measuring the uncompressed baseline again")
    if (pending and ray is None) or (not pending and not baseline_ok):  # with Ray, the workers measure it
        ctx = _Context(model, tokenizer, settings, texts=texts, fingerprint=fingerprint)
        _prepare(ctx, out, progress)
        environment = _environment(model)
    if pending and ray is not None:
        from .distributed_sweep import run_pending_on_ray

        measured = run_pending_on_ray(pending, keys, out, settings, ray, loader, on_record, len(entries),
                                      fingerprint)
        return [done.get(e.label) or measured[e.label] for e in entries]
    records = []
    for i, entry in enumerate(entries, 1):
        if entry.label in done:
            records.append(done[entry.label])
            continue
        record = measure_record(ctx, entry, keys[entry.label], environment, progress)
        write_json_atomic(record_path(out, entry.label), record)
        records.append(record)
        logger.info(f"[{i}/{len(entries)}] {entry.label}: {summary(record)}")
        if on_record is not None:
            on_record(record)
    return records
