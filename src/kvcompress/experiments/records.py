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
    """The JSON object at `path`, or None if it is absent or unreadable (then it is measured again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_records(out_dir: str | os.PathLike, unreadable: list[Path] | None = None) -> list[dict]:
    """Records of a sweep folder, in the order of its config.json (else by file name).

    A record file that is not a JSON object with a label and a status is left out; its path is
    appended to `unreadable` when that list is given.
    """
    out = Path(out_dir)
    config = read_record(out / CONFIG_FILE)
    if config and isinstance(config.get("specs"), list):
        paths = [record_path(out, spec["label"]) for spec in config["specs"]
                 if isinstance(spec, dict) and "label" in spec]
    else:
        paths = sorted((out / RECORDS_DIR).glob("*.json"))
    records = []
    for path in paths:
        if not path.is_file():
            continue
        record = read_record(path)
        if record is None or "label" not in record or "status" not in record:
            if unreadable is not None:
                unreadable.append(path)
            continue
        records.append(record)
    return records
