#!/usr/bin/env bash
# GPU check: the CUDA tests, the Triton kernels against the torch reference on the GPU, then
# decode speed and memory of DynamicCache vs int4 / int2 (benchmarks/gpu_decode.py).
# Meant to finish in under 8 minutes on one recent GPU (each step has its own time limit).
#
# Set-up, once, with your own CUDA build of torch (kvcompress's `make setup` otherwise installs
# the CPU build):
#   python3.11 -m venv .venv
#   .venv/bin/python -m pip install torch --index-url https://download.pytorch.org/whl/cu128   # your CUDA
#   KVCOMPRESS_SKIP_TORCH=1 make setup      # kvcompress with every extra (gpu = Triton) and dev, keeps that torch
#
# Run:
#   bash benchmarks/gpu_check.sh [OUT_DIR]   (default runs/gpu-check)
# Writes OUT_DIR/tests.log, OUT_DIR/gpu_decode.json and OUT_DIR/gpu_decode.md; exits non-zero
# if a test fails, nothing is measured on a failed check.
#
# Environment: PYTHON (default .venv/bin/python); GPU_DECODE_ARGS (extra flags for
# gpu_decode.py, e.g. "--contexts 8192,32768").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-runs/gpu-check}"
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PYTHON; install a CUDA build of torch (see the top of this script)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import triton' 2>/dev/null; then
    echo "gpu_check: Triton is not importable; run 'KVCOMPRESS_SKIP_TORCH=1 make setup' (installs kvcompress[all], gpu included)" >&2
    exit 2
fi
"$PYTHON" -c 'import torch, triton; print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, Triton {triton.__version__}")'

echo "gpu_check: CUDA tests and Triton kernel tests (compiled on the GPU)"
timeout 180 "$PYTHON" -m pytest -q -rs tests/test_cuda.py tests/test_triton.py tests/test_generation.py -k "cuda or triton or kernel" \
    2>&1 | tee "$OUT/tests.log"

echo "gpu_check: decode speed and memory (benchmarks/gpu_decode.py)"
# shellcheck disable=SC2086  # GPU_DECODE_ARGS is a list of flags
timeout 270 "$PYTHON" benchmarks/gpu_decode.py --out "$OUT" ${GPU_DECODE_ARGS:-}
cat "$OUT/gpu_decode.md"
