"""Choose the bits4 / bits3 / bits2 presets by measurement on selection text.

Evaluates candidate specs (each at or under its bits-per-value budget, checked from real stored
bytes) with the same decode-faithful evaluation as `kvcompress eval`, on a stretch of the
embedded corpus's calibration part (tokens from --offset on) that neither calibration nor the
reported figures read, and prints a table per budget. The figures the README reports come from
bits_table.py on the report part; this script's text is disjoint from it.

    OMP_NUM_THREADS=1 python benchmarks/select_bits_presets.py --tokens 2048 --dtype bfloat16

This script does not edit the presets: the chosen specs are written into presets.py by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bits_table import markdown, measure  # noqa: E402

SELECTION_OFFSET = 8192


def _cb(bits: int, **extra) -> dict:
    return {"method": "rotated+codebook", "bits": bits, **extra}


def _pca(bits: int, **extra) -> dict:
    return {"method": "pca+codebook", "bits": bits, **extra}


def candidates() -> dict[str, list[tuple[str, dict | str]]]:
    """Budget label -> [(label, spec)]: the KIVI reference with one more bit, then the candidates.

    Earlier rounds on the same selection text (1024 tokens) ruled out: centring values (worse
    than uncentred), per-channel normalisation of keys before the rotation (worse), post-RoPE
    keys for pca+codebook (worse than pre-RoPE), a pca basis of uncentred moments (worse), and
    centred pre-RoPE rotated keys (better than plain rotated keys, worse than pca keys).
    """
    out = {}
    for n in (4, 3, 2):
        out[f"bits{n}"] = [
            (f"int{n} (reference)", f"int{n}"),
            (f"K{n}/V{n} rotated", {"key": _cb(n), "value": _cb(n)}),
            (f"K{n} pre-RoPE pca/V{n} rotated", {"key": _pca(n, key_space="pre_rope"), "value": _cb(n)}),
            (f"K{n} pre-RoPE pca/V{n} pca", {"key": _pca(n, key_space="pre_rope"), "value": _pca(n)}),
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="selection tokens")
    parser.add_argument("--offset", type=int, default=SELECTION_OFFSET,
                        help="first token of the selection stretch within the calibration part")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--budgets", default="bits4,bits3,bits2", help="comma list of budgets to run")
    args = parser.parse_args(argv)
    for budget, specs in candidates().items():
        if budget not in args.budgets.split(","):
            continue
        labels = [label for label, _ in specs]
        rows = measure([spec for _, spec in specs], tokens=args.tokens, dtype=args.dtype, part="calibration", offset=args.offset,
                       labels=labels)
        print(f"\n{budget}: selection text (calibration part, tokens {args.offset}..{args.offset + args.tokens}), "
              f"{args.dtype}\n")
        print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
