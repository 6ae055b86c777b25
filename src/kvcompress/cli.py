"""The `kvcompress` command line: one sub-command per module in `kvcompress.commands`.

Each command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`.
This module only dispatches; it holds no logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "kvcompress.commands.calibrate_cmd",
    "kvcompress.commands.eval_cmd",
    "kvcompress.commands.presets_cmd",
    "kvcompress.commands.sweep_cmd",
    "kvcompress.commands.report_cmd",
    "kvcompress.commands.analyze_cmd",
    "kvcompress.commands.bench_cmd",
    "kvcompress.commands.tune_cmd",
    "kvcompress.commands.measure_presets_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompress", description="Real KV-cache compression for transformers, "
                                     "with honestly measured quality.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"kvcompress {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
