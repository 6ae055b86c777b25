"""`kvcompress report DIR`: markdown report and PNG plots of a sweep folder (see `kvcompress.experiments.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "report"
HELP = "write DIR/report.md and PNG plots from the JSON records of a sweep folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a folder written by `kvcompress sweep` or `kvcompress analyze`")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="report without record files that cannot be read (listed in the report) instead of "
                             "stopping with an error naming them")


def run(args: argparse.Namespace) -> int:
    from ..experiments.report import write_report
    from .common import UserError

    if not Path(args.dir).is_dir():
        raise UserError(f"{args.dir} is not a folder; pass a folder written by `kvcompress sweep --out DIR`")

    path = write_report(args.dir, skip_unreadable=args.skip_unreadable)
    print(f"wrote {path} (and its PNG plots in {path.parent})")
    return 0
