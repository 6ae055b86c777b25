"""Spec lists and grid files of a sweep: what to measure, each spec with a unique label.

A grid file (YAML or JSON) lists specs and/or grids (see `sweep` for the format). This module
only reads and expands them; it measures nothing and writes no file.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..extras import require_extra
from ..io import parse_list
from ..presets import load_spec
from ..spec import CacheSpec
from .records import label_slug


@dataclass(frozen=True)
class SpecEntry:
    """One spec of a sweep: a unique label, the resolved spec, whether decode-faithful evaluation
    and the tasks run on it (direct reconstruction always does; it is cheap)."""

    label: str
    spec: CacheSpec
    tasks: bool = True
    eval: bool = True

    def to_dict(self) -> dict:
        return {"label": self.label, "spec": self.spec.to_dict(), "tasks": self.tasks, "eval": self.eval}


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"grid field {dotted!r}: {part!r} is not a mapping")
    node[parts[-1]] = value


def _get_dotted(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"name template field {{{dotted}}} is not set in the spec")
        node = node[part]
    return node


def expand_grid(grid: dict) -> list[tuple[str, dict]]:
    """(label, spec dict) for every combination of `grid["vary"]` applied to `grid["base"]`."""
    allowed = {"name", "base", "vary", "tasks", "eval"}
    if not isinstance(grid, dict) or set(grid) - allowed:
        raise ValueError(f"a grid must be a mapping with keys among {sorted(allowed)}, got {grid!r}")
    base = grid.get("base", {})
    vary = grid.get("vary", {})
    if not isinstance(base, dict) or not isinstance(vary, dict) or not vary:
        raise ValueError("a grid needs a 'base' spec mapping and a non-empty 'vary' mapping of field: [values]")
    for fields_text, values in vary.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid field {fields_text!r} needs a non-empty list of values, got {values!r}")
    out = []
    for combo in itertools.product(*vary.values()):
        spec = copy.deepcopy(base)
        parts = []
        for fields_text, value in zip(vary, combo):
            for dotted in fields_text.split(","):
                _set_dotted(spec, dotted.strip(), value)
            parts.append(f"{fields_text}={value}")
        template = grid.get("name")
        if template:
            label = re.sub(r"\{([\w.]+)\}", lambda m: str(_get_dotted(spec, m.group(1))), template)
        else:
            label = ",".join(parts)
        spec.setdefault("name", label)
        out.append((label, spec))
    return out


def _entry(item: Any, where: Path | None) -> SpecEntry:
    """A SpecEntry from a preset name, spec file, inline spec dict, or {spec, label, tasks, eval}."""
    label, tasks, evaluate = None, True, True
    if isinstance(item, dict) and "spec" in item:
        extra = set(item) - {"spec", "label", "tasks", "eval"}
        if extra:
            raise ValueError(f"a spec entry with 'spec' may only have 'label', 'tasks' and 'eval' besides, "
                             f"got {sorted(extra)}")
        label, tasks, evaluate = item.get("label"), bool(item.get("tasks", True)), bool(item.get("eval", True))
        item = item["spec"]
    if isinstance(item, str) and where is not None and (where / item).is_file():
        item = str(where / item)
    spec = load_spec(item)
    if label is None:
        label = spec.name or (Path(item).stem if isinstance(item, str) else None)
    if not label:
        raise ValueError(f"spec {spec.describe()} has no name; give it a 'name' or a 'label'")
    if spec.name is None:
        spec = dataclasses.replace(spec, name=label)
    return SpecEntry(str(label), spec, tasks=tasks and evaluate, eval=evaluate)


def load_grid(data: dict | list, where: Path | None = None) -> list[SpecEntry]:
    """Entries of a grid file's content (see module doc); `where` resolves relative spec paths."""
    if isinstance(data, list):
        data = {"specs": data}
    if not isinstance(data, dict) or not data or set(data) - {"specs", "grids"}:
        raise ValueError("a grid file must be a list of specs or a mapping with 'specs' and/or 'grids'")
    entries = [_entry(item, where) for item in data.get("specs") or []]
    for grid in data.get("grids") or []:
        flags = {k: bool(grid[k]) for k in ("tasks", "eval") if isinstance(grid, dict) and k in grid}
        entries += [_entry({"spec": spec, "label": label, **flags}, where) for label, spec in expand_grid(grid)]
    return check_unique(entries)


def check_unique(entries: list[SpecEntry]) -> list[SpecEntry]:
    seen: dict[str, str] = {}
    for entry in entries:
        slug = label_slug(entry.label)
        if slug in seen:
            raise ValueError(f"two specs share the label {entry.label!r} (record file {slug}.json); "
                             "give them different names")
        seen[slug] = entry.label
    if not entries:
        raise ValueError("no specs to sweep")
    return entries


def _read_structured(path: Path) -> Any:
    text = path.read_text()
    yaml = require_extra("yaml", "yaml", "YAML sweep grids") if path.suffix in (".yaml", ".yml") else None
    try:
        if yaml is not None:
            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as err:  # yaml and json raise their own error types
        raise ValueError(f"{path} is not valid {path.suffix[1:].upper()}: {err}") from err


def parse_specs(text: str) -> list[SpecEntry]:
    """Entries from a comma-separated list of presets / spec files, or from one grid file."""
    items = list(parse_list(text))
    if not items:
        raise ValueError("--specs is empty; give preset names, spec files or a grid file")
    if len(items) == 1 and Path(items[0]).suffix in (".yaml", ".yml", ".json") and Path(items[0]).is_file():
        path = Path(items[0])
        data = _read_structured(path)
        if isinstance(data, list) or (isinstance(data, dict) and data and set(data) <= {"specs", "grids"}):
            return load_grid(data, path.parent)
    return check_unique([_entry(item, None) for item in items])
