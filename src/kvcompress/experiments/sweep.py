"""Sweep: measure many specs (reconstruction, decode-faithful quality, tasks), one JSON record each.

    entries = parse_specs("int8,int4,my_spec.yaml")          # or a grid file, see `grid.load_grid`
    run_sweep(entries, "runs/sweep", SweepSettings(tasks=("passkey",)))

Each spec's record is written to `OUT/records/<label>.json` (atomically) as soon as it is measured,
keyed by a hash of the spec, the settings and the run's fingerprint (`measuring.sweep_fingerprint`):
a rerun skips records with the same key and status "ok", measures the others again, and a spec that
raises gets an error record while the sweep goes on. `OUT/baseline.json` holds the uncompressed task
scores, `OUT/config.json` the resolved settings. The pending specs run on the caller's executor
(`kvcompress.executor`; default here, `distributed.RayExecutor` on Ray), same records. Record and
grid formats: docs/analysis.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..executor import Executor, Local
from ..io import write_json_atomic
from .grid import SpecEntry, check_unique
from .measuring import (
    SweepJob,
    SweepUnit,
    load_from_settings,
    measure_spec,
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


def run_sweep(entries: list[SpecEntry], out_dir: str | os.PathLike, settings: SweepSettings | None = None, *,
              model=None, tokenizer=None, progress: bool = True,
              on_record: Callable[[dict], None] | None = None, command: str | None = None,
              executor: Executor | None = None) -> list[dict]:
    """Measure every entry (skipping those already measured with the same key); return all records.

    Args:
        entries: the specs (see `parse_specs`, `load_grid`).
        out_dir: the sweep folder (created).
        settings: see `SweepSettings`.
        model, tokenizer: an already loaded model (else loaded from `settings`).
        on_record: called with each new record right after it is written.
        command: the command line that started the sweep, saved in config.json for the report.
        executor: measures the pending specs (see `kvcompress.executor`); default: here, in order.
            The uncompressed baseline is measured here.
    """
    settings = settings or SweepSettings()
    entries = check_unique(list(entries))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = load_from_settings(settings)
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
    local = Local(model, tokenizer)
    job = SweepJob(settings, texts, fingerprint, progress)
    baseline = saved_baseline(out, settings, fingerprint)
    if baseline is None:
        if not pending:
            logger.info(f"{out / BASELINE_FILE} is missing or damaged: measuring the uncompressed baseline again")
        baseline = local.start(job).baseline()
        write_json_atomic(out / BASELINE_FILE, baseline)
    measured: dict[str, dict] = {}

    def write(index: int, record: dict) -> None:
        write_json_atomic(record_path(out, record["label"]), record)
        measured[record["label"]] = record
        logger.info(f"[{len(done) + len(measured)}/{len(entries)}] {record['label']}: {summary(record)}")
        if on_record is not None:
            on_record(record)

    (executor or local).map(job, [SweepUnit(e, keys[e.label], baseline) for e in pending], write)
    return [done.get(e.label) or measured[e.label] for e in entries]
