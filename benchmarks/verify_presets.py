"""Re-measure the measured presets (lossless ... extreme) on their verification text; exit 1 if one misses its target.

    python benchmarks/verify_presets.py [--json runs/verify_presets.json]

The same as `kvcompress measure-presets --verify`: every preset of the shipped
`measured_presets.json` is evaluated decode-faithfully on the tokens it was verified on when it
was chosen (the part and tokens recorded in the file: the start of the selection part, or of the
report part for files made before the corpus had a selection part), and its mean KL is compared
with its target. Not a timed test: a few minutes on two CPU cores.

This script measures nothing itself; it only calls the command.
"""

from __future__ import annotations

import sys

from kvcompress.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["measure-presets", "--verify", *sys.argv[1:]]))
