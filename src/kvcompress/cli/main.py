"""The `kvcompress` command line: one sub-command per module in `kvcompress.cli`.

Each command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`.
This module only dispatches, prints the library's progress messages (INFO and above of the
`kvcompress` loggers) on stdout, and turns user errors (bad values, missing files, a missing
optional extra) into one line with exit status 2. It holds no logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..distributed import WorkersLostError, WorkerStartError
from ..extras import MissingExtraError

COMMAND_MODULES = (
    "kvcompress.cli.calibrate",
    "kvcompress.cli.eval",
    "kvcompress.cli.presets",
    "kvcompress.cli.sweep",
    "kvcompress.cli.report",
    "kvcompress.cli.analyze",
    "kvcompress.cli.bench",
    "kvcompress.cli.tune",
    "kvcompress.cli.measure_presets",
    "kvcompress.cli.generate",
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


class _ElapsedFormatter(logging.Formatter):
    """'[   12 s] message': seconds since the command started."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.relativeCreated / 1000:6.0f} s] {record.getMessage()}"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a message is emitted (so a stdout redirected or
    captured after the handler was installed still receives it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns it; the property always reads sys.stdout
        pass


def configure_logging() -> None:
    """Progress messages of the library (logger "kvcompress") to stdout, once per process."""
    logger = logging.getLogger("kvcompress")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(_ElapsedFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, MissingExtraError) as err:
        print(f"kvcompress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (WorkerStartError, WorkersLostError) as err:
        print(f"kvcompress {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
