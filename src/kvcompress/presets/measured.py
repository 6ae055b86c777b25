"""The measured presets (lossless ... extreme): the data file `kvcompress measure-presets` writes.

Each entry holds the spec that met a KL target on sweep and selection text ("sweep",
"verified") and, in files written since the corpus has a separate report part, the figures
measured on report text no step of the choice read ("report"); tables and help show the
report figures when present. This module only reads the file and registers its presets; it
does not measure (see `kvcompress.tuning.preset_selection`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..spec import CacheSpec

DATA_FILE = Path(__file__).with_name("measured_presets.json")
DATA_FORMAT = 1


def load_measured(path: str | Path | None = None) -> dict:
    """The measured-presets data (the shipped file by default); {} presets if the shipped file is absent."""
    path = Path(path) if path is not None else DATA_FILE
    if not path.exists():
        if path == DATA_FILE:
            return {"format": DATA_FORMAT, "presets": []}
        raise ValueError(f"measured presets file {path} does not exist; run `kvcompress measure-presets --file {path}`")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != DATA_FORMAT or not isinstance(data.get("presets"), list):
        raise ValueError(f"{path} is not a measured-presets file (format {DATA_FORMAT}); re-run "
                         "`kvcompress measure-presets`")
    return data

def reported_figures(entry: dict) -> tuple[dict, str]:
    """The figures to show for a preset and the text they come from: "report" (text the choice never
    read) when the file has them, else "selection" (the text that chose the preset; optimistic)."""
    if "report" in entry:
        return entry["report"], "report"
    return entry["verified"], "selection"


def preset_help(entry: dict) -> str:
    """One line for the preset registry: target and what was measured (see `reported_figures`)."""
    v, text = reported_figures(entry)
    return (f"measured: mean KL <= {entry['target_kl']:g} ({entry['describe']}; {text} text: ratio "
            f"{v['ratio']:.2f}x, KL {v['kl']:.4f}, PPL {v['ppl_change']:+.2%})")

def markdown_table(data: dict) -> str:
    """The presets of measured-presets `data` as a markdown table (figures per `reported_figures`,
    the text named in a column)."""
    base = data.get("baseline_passkey", {}).get("accuracy")
    lines = ["| preset | target KL | spec | ratio | PPL change | mean KL | top-1 | passkey | text |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in data["presets"]:
        v, text = reported_figures(e)
        lines.append(f"| `{e['name']}` | {e['target_kl']:g} | {e['describe']} | {v['ratio']:.2f}x | "
                     f"{v['ppl_change']:+.2%} | {v['kl']:.4f} | {v['top1']:.3f} | {e['passkey']['accuracy']:.2f} | "
                     f"{text} |")
    if base is not None:
        lines.append(f"| (uncompressed) | | | 1.00x | | | | {base:.2f} | |")
    return "\n".join(lines)

def register_measured(registry, data: dict) -> list[str]:
    """Register every preset of measured-presets `data` in `registry` (a `presets.Registry`); returns the names."""
    names = []
    for entry in data["presets"]:
        registry.register(entry["name"], preset_help(entry),
                          lambda entry=entry: CacheSpec.from_dict(entry["spec"]))
        names.append(entry["name"])
    return names
