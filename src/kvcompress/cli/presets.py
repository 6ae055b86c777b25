"""`kvcompress presets`: list the named presets and what they do."""

from __future__ import annotations

import argparse

from ..presets import PRESETS

NAME = "presets"
HELP = "list the named presets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print each preset's full spec as JSON")


def run(args: argparse.Namespace) -> int:
    for name in PRESETS.names():
        spec = PRESETS.get(name)
        print(f"{name:12s} {PRESETS.help(name)}")
        if args.json:
            print("    " + spec.to_json().replace("\n", "\n    "))
    return 0
