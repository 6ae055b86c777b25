"""The `kvcompress` command line: one sub-command per module in `kvcompress.cli`.

Each command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`, and may
define `interrupted(args) -> str` (what a Ctrl-C leaves behind). Exit statuses: 0 done; 1 the
command ran but its result is a failure; 2 a user error, printed as ONE line
`kvcompress CMD: error: ...` with no traceback (`--debug` shows it); 130 interrupted, with one line
saying what was saved. Progress of the library (logger "kvcompress") goes to stdout.
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
    parser.add_argument("--debug", action="store_true", help="show a traceback for errors (before the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show a traceback for errors")
        command.set_defaults(run=module.run, interrupted=getattr(module, "interrupted", None))
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


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user can fix something (the message says what)."""
    from ..corpus import CorpusError
    from ..models import ModelLoadError

    return (ValueError, OSError, CorpusError, ModelLoadError, MissingExtraError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's message without its quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return " ".join(str(text).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    prefix = f"kvcompress {args.command}"
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        saved = args.interrupted(args) if args.interrupted else "nothing was written"
        print(f"{prefix}: interrupted; {saved}", file=sys.stderr)
        return 130
    except user_errors() as err:
        if args.debug:
            raise
        print(f"{prefix}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (WorkerStartError, WorkersLostError) as err:
        print(f"kvcompress {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
