"""A spec the plugin cannot serve stops vLLM at start-up, before the model loads, in one line that
names the spec, what stands in the way and what to use instead: from Python (LLM) and from the OpenAI server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

START = """
import json, sys
from vllm import LLM
from kvcompress.models import embedded_model_folder
try:
    LLM(model=str(embedded_model_folder()), dtype="bfloat16", max_model_len=2048, enforce_eager=True)
except Exception as err:
    print(json.dumps({"type": type(err).__name__, "message": str(err)}))
    sys.exit(0)
sys.exit("the engine started")
"""


def child_env(spec: str) -> dict:
    env = dict(os.environ, KVCOMPRESS_VLLM_SPEC=spec, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def test_llm_refuses_a_kivi_preset_in_one_line_before_loading_the_model():
    proc = subprocess.run([sys.executable, "-c", START], env=child_env("int4"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])
    assert error["type"] == "ServingSpecError" and "\n" not in error["message"]
    for part in ("KVCOMPRESS_VLLM_SPEC='int4' cannot be served", "keys quantized per channel", "window of 128",
                 "use 'paged-int4'"):
        assert part in error["message"], part
    assert "Starting to load model" not in proc.stderr


def test_the_openai_server_stops_on_a_misspelt_spec_with_the_line_last(tmp_path):
    """(vllm-cpu 0.32's `vllm` command fails on its own version lookup, it asks for the distribution
    'vllm'; the server module is what `vllm serve` runs.)"""
    proc = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "unused-model",
                           "--host", "127.0.0.1", "--port", "0"],
                          env=child_env("paged-int5"), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "KVCOMPRESS_VLLM_SPEC='paged-int5' is neither a preset nor a spec file; servable presets: paged-int8" \
        in last, proc.stderr[-2000:]
