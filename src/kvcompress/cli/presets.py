"""`kvcompress presets`: list the named presets and what they do."""

from __future__ import annotations

import argparse

from ..presets import PRESETS

NAME = "presets"
HELP = "list the named presets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print each preset's full spec as JSON")


# The embedded model's shape, at which bits per value are shown (they depend on head_dim).
SHAPE_LAYERS, SHAPE_HEAD_DIM = 30, 64


def run(args: argparse.Namespace) -> int:
    from ..cache.bits import spec_bits_per_value

    print(f"bits/value: stored bits per compressed K/V value at head_dim {SHAPE_HEAD_DIM} (the embedded "
          "model; window and sinks apart)\n")
    for name in PRESETS.names():
        spec = PRESETS.get(name)
        bits = spec_bits_per_value(spec, SHAPE_LAYERS, SHAPE_HEAD_DIM)
        shown = f"{bits:5.2f}" if bits is not None else "  -  "
        print(f"{name:16s} {shown}  {PRESETS.help(name)}")
        if args.json:
            print("    " + spec.to_json().replace("\n", "\n    "))
    return 0
