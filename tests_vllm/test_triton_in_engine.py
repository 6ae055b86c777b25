"""The plugin's Triton path inside a real engine: vLLM's CPU platform with KVCOMPRESS_KERNELS=triton runs
the Triton paged kernels in Triton's interpreter (TRITON_INTERPRET=1), the same backend calls that serve
CUDA. Every store and every attention call the engine makes (a prefill of two requests, then decode
steps) is compared in the engine process with the torch path on the same inputs: the stored bytes are
those of `SlotLayout.write`, the attention output within 1e-4 of `paged_attention_torch`. Slow (the
interpreter runs 30 layers: about two minutes), so the prompts are short; the kernels' own tests
(tests/test_triton_paged.py) cover block boundaries, splits and every part.
"""

from __future__ import annotations

import json
import subprocess
import sys

from test_plugin_startup import child_env

SCRIPT = """
import json
from kvcompress.kernels import triton_paged
from kvcompress.kernels.paged_attention import paged_attention_torch

calls = []
kernel_write, kernel_attend = triton_paged.write, triton_paged.attend


def write(pages, key, value, slot_mapping, layout):
    reference = pages.clone()
    layout.write(reference, key, value, slot_mapping)
    kernel_write(pages, key, value, slot_mapping, layout)
    calls.append({"write_bytes_differing": int((reference != pages).sum()), "tokens": int((slot_mapping >= 0).sum())})


def attend(query, pages, block_table, seq_lens, query_start_loc, layout, scale, **options):
    out, lse = kernel_attend(query, pages, block_table, seq_lens, query_start_loc, layout, scale, **options)
    ref, _ = paged_attention_torch(query, pages, block_table, seq_lens, query_start_loc, layout, scale)
    calls.append({"attend_max_abs": float((out - ref).abs().max()), "queries": int(query.shape[0])})
    return out, lse


triton_paged.write, triton_paged.attend = write, attend

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from kvcompress.models import embedded_model_folder

llm = LLM(model=str(embedded_model_folder()), dtype="float32", max_model_len=256, enforce_eager=True, block_size=32)
ids = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog near the river bank.",
                                 add_special_tokens=False)
params = SamplingParams(max_tokens=2, min_tokens=2, temperature=0, detokenize=False)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in (ids[:6], ids[6:9])], params, use_tqdm=False)
impls = [layer.impl for layer in llm.llm_engine.vllm_config.compilation_config.static_forward_context.values()]
print(json.dumps({"calls": calls, "use_triton": [impl.use_triton for impl in impls],
                  "generated": [len(o.outputs[0].token_ids) for o in outs]}))
"""


def test_the_engine_stores_and_attends_through_the_triton_kernels_as_the_torch_path_does():
    env = child_env("paged-int4")
    env.update(KVCOMPRESS_KERNELS="triton", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(result["use_triton"]) and len(result["use_triton"]) == 30
    assert result["generated"] == [2, 2]
    writes = [c for c in result["calls"] if "write_bytes_differing" in c]
    attends = [c for c in result["calls"] if "attend_max_abs" in c]
    # in each of the 30 layers: the prompts' 9 tokens (prefill), then the first generated token of each
    # request (a decode step; the second generated token is sampled, never stored)
    assert len(writes) == len(attends) >= 2 * 30
    assert sum(c["tokens"] for c in writes) == 30 * (9 + 2)
    assert all(c["write_bytes_differing"] == 0 for c in writes)
    assert max(c["attend_max_abs"] for c in attends) < 1e-4
