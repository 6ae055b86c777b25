"""The tuning state: every measurement of a tune or preset selection, saved as it is made.

A rerun with the same versions, model, text and spec reuses the saved figure instead of
measuring again, so an interrupted run loses nothing. Entries are keyed by a fingerprint
(`measurement_fingerprint`: kvcompress / transformers / torch versions, the model's config and
weights hash, the text's corpus record and ids hash; see `kvcompress.fingerprint`); an entry
whose fingerprint differs is measured again and the log says what changed. This module does
not measure (callers pass the figures).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..fingerprint import environment, mismatch
from ..io import content_hash, write_json_atomic
from ..spec import CacheSpec

logger = logging.getLogger(__name__)

STATE_FORMAT = 2  # 2: entries keyed by a fingerprint with versions, weights hash and text record

__all__ = ["STATE_FORMAT", "TuneState", "measurement_fingerprint", "spec_key"]


def measurement_fingerprint(model_fp: dict, text_fp: dict | None) -> dict:
    """The fingerprint a saved measurement is keyed by: library versions, model (weights hash
    included, see `fingerprint.model_fingerprint`) and text (see `fingerprint.text_fingerprint`)."""
    return {"environment": environment(), "model": model_fp, "text": text_fp}


def _non_numeric(value, where: str) -> str | None:
    """The path of the first leaf of `value` that is not a number (None if all are)."""
    if isinstance(value, dict):
        return next((bad for k, v in value.items() if (bad := _non_numeric(v, f"{where}.{k}"))), None)
    if isinstance(value, list):
        return next((bad for i, v in enumerate(value) if (bad := _non_numeric(v, f"{where}[{i}]"))), None)
    if isinstance(value, (int, float)) or value is None:
        return None
    if isinstance(value, str) and where.endswith(".interval.ci_method"):  # how an interval was computed
        return None
    return f"{where} ({value!r})"


class TuneState:
    """Measurements of a tune (or a preset selection), kept in a JSON file and written after each new one.

    Entries are keyed by a hash of (kind, fingerprint, spec) (see module doc): a changed version,
    model, text or setting misses the old entries instead of reusing them, and the miss is logged
    with what changed (also kept in `redone`). A file that cannot be read is an error (delete it
    or pass another path); a file of the older format is read as empty, with a warning.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self.hits = 0
        self.redone: list[str] = []
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError as err:
                raise ValueError(f"tune state file {self.path} is not valid JSON ({err}); delete it to start over")
            if not isinstance(data, dict) or "entries" not in data:
                raise ValueError(f"{self.path} is not a kvcompress tune state file (format {STATE_FORMAT}); "
                                 "delete it or pass another --state")
            if data.get("format") != STATE_FORMAT:
                logger.warning("%s holds measurements of state format %s (now %s), made without version and "
                               "weights fingerprints: they are measured again", self.path, data.get("format"),
                               STATE_FORMAT)
            else:
                self.entries = data.get("entries", {})
                self._check_entries()

    def _check_entries(self) -> None:
        """ValueError naming the file and the entry if an entry is not what `put` writes (numbers only)."""
        fix = "the file was edited or damaged; delete it (its measurements are redone) or pass another --state"
        if not isinstance(self.entries, dict):
            raise ValueError(f"tune state file {self.path}: 'entries' is not a mapping; {fix}")
        for key, entry in self.entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("result"), dict):
                raise ValueError(f"tune state file {self.path}: entry {key} has no 'result' mapping; {fix}")
            bad = _non_numeric(entry["result"], "result")
            if bad:
                raise ValueError(f"tune state file {self.path}: entry {key} has a non-numeric value at {bad}; {fix}")

    @staticmethod
    def key(kind: str, fingerprint: dict, spec: dict | None) -> str:
        return content_hash([kind, fingerprint, spec])

    def lookup(self, kind: str, spec: dict | None, fingerprint: dict) -> dict | None:
        """The saved result of (kind, spec) under `fingerprint`, or None. When the same kind and
        spec were measured under another fingerprint, logs what changed (it is measured again)."""
        entry = self.entries.get(self.key(kind, fingerprint, spec))
        if entry is not None:
            self.hits += 1
            return entry["result"]
        for old in self.entries.values():
            if old.get("kind") == kind and old.get("spec") == spec:
                why = mismatch(old.get("fingerprint"), fingerprint)
                if why:
                    self.redone.append(f"{kind}: {why}")
                    logger.warning("measuring %s %s again: %s", kind, _spec_label(spec), why)
                    break
        return None

    def store(self, kind: str, spec: dict | None, fingerprint: dict, result: dict) -> None:
        self.entries[self.key(kind, fingerprint, spec)] = {"kind": kind, "spec": spec, "fingerprint": fingerprint,
                                                           "result": result}
        self.save()

    def measured(self, kind: str, fingerprint: dict, specs: list[CacheSpec],
                 run: Callable[[list[CacheSpec], Callable[[int, dict], None]], None],
                 on_new: Callable[[CacheSpec, dict], None] | None = None) -> list[dict]:
        """The results of `specs`, in order: saved ones looked up, the others measured by
        `run(missing specs, on_result)` (e.g. `functools.partial(executor.map, job)`) and saved
        as each arrives (then `on_new(spec, result)`)."""
        results = [self.lookup(kind, spec_key(spec), fingerprint) for spec in specs]
        missing = [i for i, result in enumerate(results) if result is None]

        def save(index: int, result: dict) -> None:
            spec = specs[missing[index]]
            self.store(kind, spec_key(spec), fingerprint, result)
            results[missing[index]] = result
            if on_new is not None:
                on_new(spec, result)

        run([specs[i] for i in missing], save)
        return results

    def save(self) -> None:
        if self.path is None:
            return
        write_json_atomic(self.path, {"format": STATE_FORMAT, "entries": self.entries}, indent=1)


def spec_key(spec: CacheSpec | None) -> dict | None:
    """A spec as state entries are keyed by it: its dict without the name (None: uncompressed)."""
    return None if spec is None else {k: v for k, v in spec.to_dict().items() if k != "name"}


def _spec_label(spec: dict | None) -> str:
    if spec is None:
        return "(uncompressed)"
    try:
        return CacheSpec.from_dict(spec).describe()
    except (ValueError, TypeError, KeyError):  # a label for a log line only; the spec is compared exactly
        return content_hash(spec, 8)
