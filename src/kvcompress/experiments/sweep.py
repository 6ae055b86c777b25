"""Sweep: measure many specs (reconstruction, decode-faithful quality, tasks), one JSON record each.

    entries = parse_specs("int8,int4,my_spec.yaml")          # or a grid file, see `load_grid`
    run_sweep(entries, "runs/sweep", SweepSettings(tasks=("passkey",)))

For every spec the sweep writes `OUT/records/<label>.json` as soon as that spec is done
(written to a temporary file, then renamed, so a record is either whole or absent):

    {"label", "key", "status": "ok" | "error", "spec", "describe", "settings", "model",
     "reconstruction": {...}  (see `reconstruction.direct_reconstruction`),
     "eval": {...}            (see `evaluate.EvalResult`; with `context_tokens`, `prompt.PromptEvalResult`),
     "tasks": {"passkey": {..., "uncompressed": {...}}, "agreement": {...}},
     "error", "traceback"     (only when status is "error"),
     "timing": {phase: {"wall_s", "cpu_s"}}}

`key` is a hash of the resolved spec, the settings that shape the record and the run's
fingerprint (kvcompress / transformers / torch versions, the model's config and weights hash,
the texts read; see `measuring.sweep_fingerprint`), which the record also holds with the texts'
corpus records; a record whose key differs is measured again and the log says why. Rerunning the
same sweep skips every spec whose record exists with the same key and status "ok" and leaves
that file untouched (so an interrupted sweep resumes and loses nothing already measured);
records with an error are measured again. A spec that raises gets an error record and the
sweep goes on (KeyboardInterrupt stops it). The uncompressed figures are measured in the same
run: the PPL baseline inside every evaluation, the tasks once per sweep (`OUT/baseline.json`,
reused on resume when its key matches). `OUT/config.json` holds the resolved settings and
specs.

A grid file (YAML or JSON) lists specs and/or grids:

    specs:                       # presets, spec files (relative to the grid file), inline specs,
      - int4                     # or {spec: ..., label: ..., tasks: false, eval: false}
      - {label: v2, spec: {key: {method: none}, value: {bits: 2, axis: token, group_size: 32}}}
    grids:                       # each: the cartesian product of `vary` applied to `base`
      - name: "lowrank{key.rank}"            # label template; {dotted.field} is replaced
        base: {key: {method: lowrank, key_space: pre_rope}, value: {method: lowrank}}
        vary: {"key.rank,value.rank": [48, 32, 16]}   # "a,b": both fields take each value
        tasks: false                          # optional, for every spec of the grid (as is eval)

`tasks: false` leaves the tasks out for that spec; `eval: false` leaves out decode-faithful
evaluation and the tasks, keeping only direct reconstruction (cheap: a curve can have many
points, the expensive measurements a few).

The pending specs are measured by the caller's executor (`kvcompress.executor`; default: here,
in order; `distributed.RayExecutor`: on Ray actors): same records, same files, written by this
process as they arrive.

This module does not draw plots or tables (see `report`) and does not define the metrics
(see `kvcompress.measure`).
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
