"""Fixtures of the vLLM plugin tests: each engine runs once, in a child process (`child.py`), with its spec.

Run in the vLLM environment (`make vllm-test`, scripts/setup_vllm.sh). A child process per engine
because vLLM loads plugins and registers backends once per process; each engine is started once per
session and its results shared by the tests that read them. Pools are 1 GiB (VLLM_CPU_KVCACHE_SPACE=1)
unless a test needs a small one; block size 32 everywhere, so capacities compare at the same rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM environment (make vllm-test)")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOCK = 32
CHUNK = 32  # prefill chunk of the teacher-forced runs: every scored token reads codes of all tokens > 1 chunk back
TEACHER_TOKENS = 384
TOP_K = 64


def run_engine(tmp: Path, spec: str | None, engine: dict, tasks: list[dict], space_gib: int = 1,
               timeout: int = 2400, one_row_at_a_time: bool = False) -> list:
    """Start one engine with KVCOMPRESS_VLLM_SPEC=`spec` (unset if None) in a child process; its task results.
    `one_row_at_a_time`: the model's matrix products compute one row at a time (`child.one_row_at_a_time`)."""
    env = {k: v for k, v in os.environ.items() if k != "KVCOMPRESS_VLLM_SPEC"}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(space_gib), PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p))
    if spec is not None:
        env["KVCOMPRESS_VLLM_SPEC"] = spec
    job, out = tmp / "job.json", tmp / "out.json"
    job.write_text(json.dumps({"engine": engine, "tasks": tasks, "one_row_at_a_time": one_row_at_a_time}))
    proc = subprocess.run([sys.executable, str(HERE / "child.py"), str(job), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


TEACHER = {"name": "teacher_forced", "tokens": TEACHER_TOKENS, "top_k": TOP_K}
# float32: in bfloat16 vLLM's CPU_ATTN and this backend round differently enough to disagree on 3.4% of
# top-1 tokens with identical K/V (KL 0.0014: measured with a spec storing raw bf16, `none`), which would
# hide what the codes change; in float32 the comparison sees the codec.
QUALITY_ENGINE = {"block_size": BLOCK, "max_num_batched_tokens": CHUNK, "max_logprobs": TOP_K, "dtype": "float32"}


@pytest.fixture(scope="session")
def auto_run(tmp_path_factory):
    """vLLM's own bf16 cache (the plugin installed, KVCOMPRESS_VLLM_SPEC unset): [info, teacher-forced]."""
    return run_engine(tmp_path_factory.mktemp("auto"), None, QUALITY_ENGINE, [{"name": "info"}, TEACHER])


@pytest.fixture(scope="session")
def int8_run(tmp_path_factory):
    """paged-int8: [info, teacher-forced]."""
    return run_engine(tmp_path_factory.mktemp("int8"), "paged-int8", QUALITY_ENGINE, [{"name": "info"}, TEACHER])


LOSSY = "paged-int4"
LOSSY_PARTS = {"method": "quant", "bits": 4, "group": 32}


@pytest.fixture(scope="session")
def lossy_run(tmp_path_factory):
    """paged-int4: [info, teacher-forced, capture of layers 0/15/29 at a decode step, prefix caching]."""
    tasks = [{"name": "info"}, TEACHER,
             {"name": "capture", "layers": [0, 15, 29], "prompt": 100, "max_tokens": 12, "spec": LOSSY_PARTS},
             {"name": "prefix", "length": 100, "shared": 2 * BLOCK, "max_tokens": 12}]
    return run_engine(tmp_path_factory.mktemp("lossy"), LOSSY, QUALITY_ENGINE, tasks)


SCHEDULING_BLOCKS = 14  # 448 tokens: the 4 requests of the batch fit (11 blocks), the 6 of the crowd do not (18)
SCHEDULING_BUDGET = 64  # tokens per step: prompts are prefilled in chunks, cut differently alone and together
BATCH = [[20, 0], [45, 700], [77, 1400], [101, 2100]]  # (prompt tokens, offset in the report text)
CROWD = [[60, 3500 + 100 * i] for i in range(6)]  # 60 + 32 new tokens: 3 blocks each, 2 when admitted


@pytest.fixture(scope="session")
def scheduling_run(tmp_path_factory):
    """paged-int4 on a 14-block pool, 64 tokens per step, float32: [batch solo, batch together, crowd solo,
    crowd together (preempts), prefix hits of one block (chunks cut elsewhere than in the cold run)].
    The model's matrix products compute one row at a time: vLLM's CPU products round a row differently
    with the number of rows in the batch, which int4 codes turn into other codes at rounding boundaries
    and other greedy paths (measured without it: the batched requests' logprobs differ from alone by up to
    0.13); with it, what remains is the plugin's own attention, which must not depend on the batch."""
    engine = {"block_size": BLOCK, "num_gpu_blocks_override": SCHEDULING_BLOCKS, "max_model_len": 256,
              "max_num_batched_tokens": SCHEDULING_BUDGET, "dtype": "float32"}
    tasks = [{"name": "generate", "mode": "solo", "prompts": BATCH, "max_tokens": 16},
             {"name": "generate", "mode": "batch", "prompts": BATCH, "max_tokens": 16},
             {"name": "generate", "mode": "solo", "prompts": CROWD, "max_tokens": 32},
             {"name": "generate", "mode": "batch", "prompts": CROWD, "max_tokens": 32},
             {"name": "prefix", "length": 100, "shared": BLOCK, "max_tokens": 12}]
    return run_engine(tmp_path_factory.mktemp("scheduling"), LOSSY, engine, tasks, one_row_at_a_time=True)
