#!/usr/bin/env bash
# GPU check: the CUDA tests, the Triton kernels against the torch reference on the GPU, then
# decode speed and memory of DynamicCache vs int4 / int2 (benchmarks/gpu_decode.py), then the vLLM
# plugin's Triton paged kernels: correctness against the torch path and one layer's decode time of
# paged-int4 vs SDPA over a dense bf16 cache (benchmarks/gpu_paged.py).
# Meant to finish in under 12 minutes on one recent GPU (each step has its own time limit).
#
# Set-up, once, with your own CUDA build of torch (kvcompress's `make setup` otherwise installs
# the CPU build):
#   python3.11 -m venv .venv
#   .venv/bin/python -m pip install torch --index-url https://download.pytorch.org/whl/cu128   # your CUDA
#   KVCOMPRESS_SKIP_TORCH=1 make setup      # kvcompress with every extra (gpu = Triton) and dev, keeps that torch
#
# Run:
#   bash benchmarks/gpu_check.sh [OUT_DIR]   (default runs/gpu-check)
# Writes OUT_DIR/tests.log, OUT_DIR/gpu_decode.{json,md} and OUT_DIR/gpu_paged.{json,md}; exits non-zero
# if a test or a check fails; nothing is measured after a failed check.
#
# Environment: PYTHON (default .venv/bin/python); GPU_DECODE_ARGS (extra flags for
# gpu_decode.py, e.g. "--contexts 8192,32768"); GPU_PAGED_ARGS (extra flags for gpu_paged.py).
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
timeout 300 "$PYTHON" -m pytest -q -rs tests/test_cuda.py tests/test_triton.py tests/test_triton_paged.py \
    tests/test_generation.py -k "cuda or triton or kernel" \
    2>&1 | tee "$OUT/tests.log"

echo "gpu_check: decode speed and memory (benchmarks/gpu_decode.py)"
# shellcheck disable=SC2086  # GPU_DECODE_ARGS is a list of flags
timeout 270 "$PYTHON" benchmarks/gpu_decode.py --out "$OUT" ${GPU_DECODE_ARGS:-}
cat "$OUT/gpu_decode.md"

echo "gpu_check: the vLLM plugin's Triton paged kernels: correctness, decode speed (benchmarks/gpu_paged.py)"
# shellcheck disable=SC2086  # GPU_PAGED_ARGS is a list of flags
timeout 240 "$PYTHON" benchmarks/gpu_paged.py --out "$OUT" ${GPU_PAGED_ARGS:-}
cat "$OUT/gpu_paged.md"
