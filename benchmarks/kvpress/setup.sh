#!/usr/bin/env bash
# Create a separate virtual environment with kvpress, for the kvpress rows of the side-by-side
# table (benchmarks/side_by_side.py). kvpress is never a kvcompress dependency: it pins
# transformers < 5.3, older than kvcompress needs, so it lives in its own environment and the
# kvcompress side only reads the JSON records that run_kvpress.py writes.
#
# Steps, each safe to repeat:
#   1. python3.11 -m venv $KVPRESS_VENV          (default .venv-kvpress at the repository root)
#   2. pip install torch==2.13.0                 (pinned: the CPU build, as in scripts/setup.sh; an
#                                                 unpinned torch pulls a multi-GB CUDA build)
#   3. pip install kvpress==0.5.5 transformers==5.2.0
#                                                (5.2.0: the newest transformers kvpress 0.5.5 accepts)
#
# Environment: PYTHON (default python3.11), KVPRESS_VENV (default .venv-kvpress).
# The model is not downloaded: run_kvpress.py reads the local transformers copy of the model
# that the exporter names (see benchmarks/kvpress/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PYTHON="${PYTHON:-python3.11}"
VENV="${KVPRESS_VENV:-.venv-kvpress}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "kvpress setup: '$PYTHON' not found; install Python 3.11 or pass PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "kvpress setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
echo "kvpress setup: installing torch==2.13.0 (CPU build)"
"${PIP[@]}" 'torch==2.13.0'
echo "kvpress setup: installing kvpress==0.5.5 with transformers==5.2.0"
"${PIP[@]}" 'torch==2.13.0' 'kvpress==0.5.5' 'transformers==5.2.0'
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress setup: done (kvpress', \
kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__, \
'torch', torch.__version__, ')')"
