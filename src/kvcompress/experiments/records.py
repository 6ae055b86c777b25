"""The files of a sweep folder: `records/<label>.json` (one per spec), `config.json`, `baseline.json`.

Records are written atomically by the sweep (`kvcompress.io.write_json_atomic`); this module
only names and reads them. It does not measure or render anything.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

RECORDS_DIR = "records"
CONFIG_FILE = "config.json"
BASELINE_FILE = "baseline.json"


def label_slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "spec"


def record_path(out_dir: str | os.PathLike, label: str) -> Path:
    return Path(out_dir) / RECORDS_DIR / f"{label_slug(label)}.json"


def read_record(path: Path) -> dict | None:
    """The record at `path`, or None if it is absent or unreadable (then it is measured again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_records(out_dir: str | os.PathLike) -> list[dict]:
    """Records of a sweep folder, in the order of its config.json (else by file name)."""
    out = Path(out_dir)
    config = read_record(out / CONFIG_FILE)
    if config and config.get("specs"):
        paths = [record_path(out, spec["label"]) for spec in config["specs"]]
    else:
        paths = sorted((out / RECORDS_DIR).glob("*.json"))
    records = [read_record(path) for path in paths if path.is_file()]
    return [r for r in records if r is not None]
