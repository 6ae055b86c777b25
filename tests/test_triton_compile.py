"""The Triton kernels compile for a CUDA GPU (sm_90) on a machine without one.

Triton's interpreter, which runs tests/test_triton.py on CPU, accepts code that the compiler
refuses; `scripts/triton_compile_check.py` compiles every kernel down to a cubin with the ptxas
shipped in the Triton wheel, in a subprocess without TRITON_INTERPRET (the kernels are defined
when their module is imported). Skipped when Triton is not installed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvcompress

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile_check.py"
pytest.importorskip("triton", reason="Triton is an optional extra: pip install 'kvcompress[gpu]'")


def test_kernels_compile_for_a_cuda_gpu():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(kvcompress.__file__).parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert done.stdout.count("compiled for sm_90") == 19, done.stdout  # 7 decode and pack, 12 paged
