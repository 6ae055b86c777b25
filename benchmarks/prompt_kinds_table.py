"""The prompt presets against kvpress's best policy at 5x, per kind of text (issue 24's criterion).

Reads the `side_by_side.json` that `benchmarks/side_by_side.py --out FOLDER/KIND` wrote for each
kind (kvpress's presses at keep 0.2 and the kvcompress rows in one run, fp32 protocol) and prints
one markdown row per kind and kvcompress row: its KL, kvpress's best KL at 5x context compression
on the same ids, their ratio and whether it meets the target (prompt-6x <= 0.5x, prompt-8x <= 0.7x).

    python benchmarks/prompt_kinds_table.py docs/prompt_kinds

This script measures nothing; a kvcompress row is matched to a target by its spec's file or preset
name (`prompt-6x`, `runs/x/prompt-6x-kinds.json` -> prompt-6x).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"prompt-6x": 0.5, "prompt-8x": 0.7}
KVPRESS_5X = 5.0


def target_of(spec: str) -> tuple[str, float] | None:
    name = Path(spec).name.removesuffix(".json")
    for preset, ratio in TARGETS.items():
        if name == preset or name.startswith(preset + "-"):
            return preset, ratio
    return None


def rows_of(data: dict) -> list[dict]:
    """Markdown-ready figures of one side_by_side.json: one entry per kvcompress row with a target."""
    kvpress = [r for r in data["rows"]
               if r["library"] == "kvpress" and abs(r["context_compression"] - KVPRESS_5X) < 0.05]
    if not kvpress:
        raise ValueError("no kvpress row at 5x context compression (run_kvpress.py --keep 0.2)")
    best = min(kvpress, key=lambda r: r["kl"])
    out = []
    for r in data["rows"]:
        target = target_of(r.get("spec", "")) if r["library"] == "kvcompress" else None
        if target is None:
            continue
        preset, limit = target
        out.append({"kind": data["text"].get("kind"), "spec": r["spec"], "preset": preset, "kl": r["kl"],
                    "kl_ci95": r["kl_ci95"], "whole_cache_fp32": r["whole_cache_ratio"],
                    "best_kvpress": best["method"], "best_kl": best["kl"], "ratio": r["kl"] / best["kl"],
                    "target": limit, "met": r["kl"] <= limit * best["kl"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder with one side_by_side --out folder per kind (docs, code, plays)")
    args = parser.parse_args(argv)
    from kvcompress.corpus import KINDS

    # one folder per kind of text; others beside them (docs_extra/, records of earlier choices) are not read
    files = [path for kind in KINDS if (path := Path(args.folder) / kind / "side_by_side.json").is_file()]
    if not files:
        print(f"prompt_kinds_table: {args.folder}: no KIND/side_by_side.json; write them with "
              "benchmarks/side_by_side.py --out FOLDER/KIND", file=sys.stderr)
        return 2
    print("| kind | spec | KL (95% CI) | kvpress best at 5x | its KL | ratio | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for path in files:
        try:
            rows = rows_of(json.loads(path.read_text()))
        except (ValueError, KeyError) as err:
            print(f"prompt_kinds_table: {path}: {err}", file=sys.stderr)
            return 2
        for r in rows:
            lo, hi = r["kl_ci95"]
            print(f"| {r['kind']} | `{r['spec']}` | {r['kl']:.4f} ({lo:.4f} .. {hi:.4f}) | {r['best_kvpress']} | "
                  f"{r['best_kl']:.4f} | {r['ratio']:.3f}x | <= {r['target']:g}x | {'yes' if r['met'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
