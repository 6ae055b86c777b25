"""The default breaking-point analysis: a fixed sweep plus its report, sized for a 2-core CPU.

`analyze(out_dir)` runs `DEFAULT_GRID` with `DEFAULT_SETTINGS` through `sweep.run_sweep` and writes
the report: quantization at 8/4/3/2 bits and K4/V2, K2/V4; Hadamard-rotated 4/3/2 bits; the bitsN
codebooks; low rank with pre- and post-RoPE keys (some ranks by reconstruction only) and with
4-bit coefficients; the tasks on a few specs and the uncompressed model. `analyze_kinds` runs it
per kind of text. Figures and time: docs/analysis.md.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..extras import require_extra
from .grid import SpecEntry, load_grid
from .report import write_kinds_report, write_report
from .settings import SweepSettings
from .sweep import run_sweep

_LOWRANK = {"key": {"method": "lowrank", "key_space": "pre_rope"}, "value": {"method": "lowrank"}}
_LOWRANK_POST = {"key": {"method": "lowrank"}, "value": {"method": "lowrank"}}
_LOWRANK_INT4 = {"key": {"method": "lowrank+quant", "key_space": "pre_rope", "bits": 4, "axis": "channel",
                         "group_size": 32},
                 "value": {"method": "lowrank+quant", "bits": 4, "axis": "token", "group_size": 16}}
_HADAMARD = {"key": {"method": "hadamard+quant", "axis": "token", "group_size": 32},
             "value": {"method": "hadamard+quant", "axis": "token", "group_size": 32}}
_BITS = "key.bits,value.bits"


def _with_ranks(base: dict, rank: int) -> dict:
    spec = {part: dict(settings) for part, settings in base.items()}
    spec["key"]["rank"] = spec["value"]["rank"] = rank
    return spec


def _lowrank_entries(base: dict, suffix: str, ranks: list[int], evaluated: tuple[int, ...],
                     with_tasks: tuple[int, ...] = ()) -> list[dict]:
    """Entries for `ranks` (listed in that order): decode-faithful evaluation only at `evaluated`,
    tasks only at `with_tasks`, direct reconstruction at every rank."""
    return [{"label": f"lowrank{r}{suffix}", "spec": _with_ranks(base, r), "eval": r in evaluated,
             "tasks": r in with_tasks} for r in ranks]


_ALL_RANKS = [56, 48, 40, 32, 24, 16, 8]

DEFAULT_GRID: dict = {
    "specs": [
        {"spec": "int8", "tasks": False},
        "int4",
        {"spec": "int3", "tasks": False},
        "int2",
        "k4v2",
        {"spec": "k2v4", "tasks": False},
        "bits4",
        {"spec": "bits3", "tasks": False},
        "bits2",
        *_lowrank_entries(_LOWRANK, "", _ALL_RANKS, evaluated=(48, 32, 16), with_tasks=(32,)),
        *_lowrank_entries(_LOWRANK_POST, "-post", _ALL_RANKS, evaluated=(32,)),
        *_lowrank_entries(_LOWRANK_INT4, "-int4", [48, 32], evaluated=(48, 32)),
    ],
    "grids": [
        {"name": "hadamard-int{key.bits}", "base": _HADAMARD, "vary": {_BITS: [4, 3, 2]}, "tasks": False},
    ],
}

DEFAULT_SETTINGS = SweepSettings(eval_tokens=1024, recon_tokens=512, tasks=("passkey", "agreement"),
                                 passkey_lengths=(256, 512, 1024), passkey_depths=(0.1, 0.5, 0.9),
                                 agreement_prompts=3, agreement_prompt_tokens=256, agreement_new_tokens=24)


def default_entries() -> list[SpecEntry]:
    """The specs of the default analysis (see module doc)."""
    return load_grid(DEFAULT_GRID)


def analyze(out_dir: str | os.PathLike, settings: SweepSettings | None = None, *, entries: list[SpecEntry] | None = None,
            model=None, tokenizer=None, progress: bool = False, command: str | None = None,
            executor=None) -> Path:
    """Run the default sweep into `out_dir` (resuming if it was interrupted) and write its report.

    `executor`: runs the sweep's specs (see `sweep.run_sweep`). Returns the path of `report.md`.
    """
    require_extra("report", "matplotlib", "The analysis report's plots")  # before a long sweep, not after it
    settings = settings or DEFAULT_SETTINGS
    run_sweep(entries or default_entries(), out_dir, settings, model=model, tokenizer=tokenizer, progress=progress,
              command=command, executor=executor)
    return write_report(out_dir)


def analyze_kinds(out_dir: str | os.PathLike, settings: SweepSettings, kinds: list[str], **options) -> Path:
    """`analyze` once per kind of text, into `OUT/<kind>/` (each resumes on its own), then
    `OUT/report.md` with every kind side by side (`report.write_kinds_report`)."""
    for kind in kinds:
        analyze(Path(out_dir) / kind, dataclasses.replace(settings, text=kind, corpus=None), **options)
    return write_kinds_report(out_dir, kinds)
