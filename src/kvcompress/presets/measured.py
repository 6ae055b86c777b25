"""The measured presets (lossless ... extreme; prompt-6x, prompt-8x): the data files
`kvcompress measure-presets` writes, read and registered here.

An entry holds its spec, its target (a KL target, or for prompt presets a whole-cache
`min_ratio` with the "cache" measured after an N-token prompt in "dtype") and its figures on the
sweep, selection ("verified") and report texts; tables and help show the report figures when
present. A shipped file that is missing raises `MissingDataFileError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..spec import CacheSpec

DATA_FILE = Path(__file__).with_name("measured_presets.json")
PROMPT_DATA_FILE = Path(__file__).with_name("prompt_presets.json")
SHIPPED = (DATA_FILE, PROMPT_DATA_FILE)
DATA_FORMAT = 1


class MissingDataFileError(FileNotFoundError):
    """A data file the package ships is absent: the installation is incomplete."""


def load_measured(path: str | Path | None = None) -> dict:
    """The measured-presets data (the shipped file by default).

    Raises `MissingDataFileError` naming the file when a shipped file is absent (a wheel built
    without it), never an empty registry."""
    path = Path(path) if path is not None else DATA_FILE
    if not path.exists():
        if path in SHIPPED:
            raise MissingDataFileError(
                f"{path} is missing from the installed kvcompress package (its package data must ship "
                f"{path.name}; see [tool.setuptools.package-data] in pyproject.toml); reinstall kvcompress")
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
        kinds = entry["report"].get("by_kind")
        if kinds:  # chosen on several kinds of text: the geometric mean of their KLs
            return entry["report"], f"report (geometric-mean KL of {', '.join(kinds)})"
        return entry["report"], "report"
    return entry["verified"], "selection"


def preset_help(entry: dict) -> str:
    """One line for the preset registry: target and what was measured (see `reported_figures`)."""
    v, text = reported_figures(entry)
    if "min_ratio" in entry:
        cache = entry["cache"]
        return (f"measured: whole cache >= {entry['min_ratio']:g}x smaller than fp16 at the end of a "
                f"{cache['context_tokens']}-token prompt in {cache['dtype']} ({entry['describe']}; "
                f"{cache['ratio']:.2f}x; {text} text, prompt protocol: KL {v['kl']:.4f}, PPL {v['ppl_change']:+.2%})")
    return (f"measured: mean KL <= {entry['target_kl']:g} ({entry['describe']}; {text} text: ratio "
            f"{v['ratio']:.2f}x, KL {v['kl']:.4f}, PPL {v['ppl_change']:+.2%})")

def markdown_table(data: dict) -> str:
    """The presets of measured-presets `data` as a markdown table (figures per `reported_figures`,
    the text named in a column)."""
    base = data.get("baseline_passkey", {}).get("accuracy")
    target = "target" if any("min_ratio" in e for e in data["presets"]) else "target KL"
    lines = [f"| preset | {target} | spec | ratio | PPL change | mean KL | top-1 | passkey | text |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in data["presets"]:
        v, text = reported_figures(e)
        if "min_ratio" in e:  # a prompt preset: the target is the floor, the ratio the whole cache's
            target, ratio = f">= {e['min_ratio']:g}x", e["cache"]["ratio"]
        else:
            target, ratio = f"{e['target_kl']:g}", v["ratio"]
        passkey = f"{e['passkey']['accuracy']:.2f}" if "passkey" in e else "-"
        lines.append(f"| `{e['name']}` | {target} | {e['describe']} | {ratio:.2f}x | "
                     f"{v['ppl_change']:+.2%} | {v['kl']:.4f} | {v['top1']:.3f} | {passkey} | {text} |")
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
