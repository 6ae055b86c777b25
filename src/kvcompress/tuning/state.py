"""The tuning state: every measurement of a tune or preset selection, saved as it is made.

A rerun with the same model, text and spec reuses the saved figure instead of measuring again,
so an interrupted run loses nothing. This module does not measure (callers pass the figures).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..io import content_hash, write_json_atomic

logger = logging.getLogger(__name__)

STATE_FORMAT = 1

def model_fingerprint(model) -> dict:
    """What identifies a model's measurements: its name, config fingerprint, dtype and a weight checksum."""
    from ..calibration import config_fingerprint
    from ..models import model_id

    first = next(model.parameters())
    return {"model": model_id(model), "config": config_fingerprint(model), "dtype": str(first.dtype),
            "weights": f"{first.detach().double().sum().item():.10e}"}


def text_fingerprint(ids: torch.Tensor, source: str, offset: int = 0) -> dict:
    """What identifies a text: where it came from, the offset, its length and a hash of its ids."""
    return {"source": source, "offset": int(offset), "tokens": int(ids.shape[-1]),
            "sha256": content_hash(ids.flatten().tolist())}


def _non_numeric(value, where: str) -> str | None:
    """The path of the first leaf of `value` that is not a number (None if all are)."""
    if isinstance(value, dict):
        return next((bad for k, v in value.items() if (bad := _non_numeric(v, f"{where}.{k}"))), None)
    if isinstance(value, list):
        return next((bad for i, v in enumerate(value) if (bad := _non_numeric(v, f"{where}[{i}]"))), None)
    if isinstance(value, (int, float)) or value is None:
        return None
    return f"{where} ({value!r})"


class TuneState:
    """Measurements of a tune, kept in a JSON file and written after each new one.

    Entries are keyed by a hash of (kind, model fingerprint, text fingerprint, spec), so a
    changed model, text or setting misses the old entries instead of reusing them. A file that
    cannot be read is an error (delete it or pass another path); nothing is silently dropped.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self.hits = 0
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError as err:
                raise ValueError(f"tune state file {self.path} is not valid JSON ({err}); delete it to start over")
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise ValueError(f"{self.path} is not a kvcompress tune state file (format {STATE_FORMAT}); "
                                 "delete it or pass another --state")
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
    def key(kind: str, model_fp: dict, text_fp: dict, spec: dict) -> str:
        return content_hash([kind, model_fp, text_fp, spec])

    def get(self, key: str) -> dict | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            return entry["result"]
        return None

    def put(self, key: str, kind: str, spec: dict, result: dict, **context) -> None:
        self.entries[key] = {"kind": kind, "spec": spec, "result": result, **context}
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        write_json_atomic(self.path, {"format": STATE_FORMAT, "entries": self.entries}, indent=1)
