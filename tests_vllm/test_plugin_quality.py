"""The plugin serves packed pages: the pool grows by the spec's ratio, int8 matches vLLM's own cache,
a lossy spec differs from it and equals attention over its stored codes decoded by hand, prefix-cache
hits read pages written by another request, every layer attends through the compiled CPU paged kernel,
and without KVCOMPRESS_VLLM_SPEC nothing changes.

Teacher forcing: the first 384 tokens of the report text in prefill chunks of 32 (so every scored
token reads the codes of every token more than one chunk back); KL as `integrations.vllm.measure`
computes it from vLLM's top-64 prompt logprobs.
"""

from __future__ import annotations

import os

import pytest
from conftest import BLOCK, LOSSY, TEACHER_TOKENS

from kvcompress.integrations.vllm.measure import Position, compare

FULL_SLOT = 2 * 64 * 4  # float32 K and V of one token and KV head, head_dim 64 (the engines run in float32)
SLOTS = {"paged-int8": 144, "paged-int4": 80}


def positions(run: list) -> list[Position]:
    return [Position(dict((int(t), lp) for t, lp in entries), top1) for top1, entries in run[1]["positions"]]


def test_without_the_setting_vllm_runs_its_own_backend_and_pool(auto_run):
    info = auto_run[0]
    assert info["impl"] == "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl"
    assert info["cpu_attn_path"] == "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"
    assert info["slot_bytes"] == FULL_SLOT
    assert info["tokens"] == 23_296  # vLLM's figure for this model in float32 in 1 GiB
    assert "kvcompress.integrations.vllm.backend" not in info["kvcompress_modules"]
    assert "kvcompress.integrations.vllm" in info["kvcompress_modules"]  # the plugin was loaded, and did nothing


def test_every_layer_attends_through_the_compiled_cpu_kernel(int8_run, lossy_run):
    """On CPU the plugin's layers all run the compiled paged kernel (every step: the same path throughout)."""
    if os.environ.get("KVCOMPRESS_KERNELS", "").strip().lower() == "torch":
        pytest.skip("KVCOMPRESS_KERNELS=torch is set: the torch paged path runs")
    for run in (int8_run, lossy_run):
        assert run[0]["kernel"] and all(k is True for k in run[0]["kernel"]), run[0]["kernel"]


def test_the_plugin_needs_no_transformers_based_kvcompress_module(int8_run, lossy_run):
    for run in (int8_run, lossy_run):
        modules = run[0]["kvcompress_modules"]
        assert run[0]["impl"] == "kvcompress.integrations.vllm.backend.KvcompressAttentionImpl"
        assert not [m for m in modules if m.startswith(("kvcompress.cache", "kvcompress.compat",
                                                        "kvcompress.measure"))], modules


def test_the_pool_grows_by_the_spec_ratio_in_vllms_own_accounting(auto_run, int8_run, lossy_run):
    """vLLM cuts the same 1 GiB into pages of slot_bytes per token, KV head and layer (30 layers, 3 heads).
    (In bfloat16 the full slot is 256 bytes: benchmarks/vllm_serving.py capacity measures that.)"""
    for run, slot in ((auto_run, FULL_SLOT), (int8_run, SLOTS["paged-int8"]), (lossy_run, SLOTS[LOSSY])):
        assert run[0]["slot_bytes"] == slot
        assert run[0]["num_blocks"] == (1 << 30) // (30 * 3 * BLOCK * slot)
    assert lossy_run[0]["tokens"] / auto_run[0]["tokens"] >= 6.39  # 512 / 80 = 6.4, less the last block
    assert int8_run[0]["tokens"] / auto_run[0]["tokens"] >= 3.55  # 512 / 144 = 3.56


def test_int8_teacher_forced_distributions_match_vllms_own_cache(auto_run, int8_run):
    result = compare(positions(auto_run), positions(int8_run))
    assert result.positions == TEACHER_TOKENS - 1
    assert result.kl < 0.005 and result.top1 >= 0.98, result


def test_a_lossy_spec_differs_from_vllms_own_cache(auto_run, lossy_run):
    result = compare(positions(auto_run), positions(lossy_run))
    assert result.kl > 0.002, result  # int4 codes change the distributions (int8's KL is far smaller)
    assert result.top1 < 1.0, result


def test_attention_equals_softmax_over_the_page_bytes_decoded_by_hand(lossy_run):
    """At the last decode step of layers 0, 15 and 29 the backend's output equals attention (float64) over
    the stored slots decoded field by field, the step's own token's slot included, and not attention over
    the full-precision keys and values (which nothing kept: the test recorded them on the way in)."""
    captured = lossy_run[2]
    assert len(captured) == 3
    for name, c in captured.items():
        assert c["stored"] == 100 + 12 - 1, name  # prompt + generated - the unsampled last (this step's included)
        assert c["written_tokens"] == 100 + 11, name  # every token fed to the model got a slot, once
        assert c["rel_err_codes"] < 1e-4, (name, c)  # float32 rounding (measured: ~3e-7)
        assert c["codes_vs_fp"] > 0.02, (name, c)  # int4 codes move the output (measured: 8-11%) ...
        assert c["rel_err_fp"] > 100 * c["rel_err_codes"], (name, c)  # ... and the output follows the codes


def test_prefix_cache_hits_read_pages_another_request_wrote(lossy_run):
    """With prefill chunks and blocks of 32 tokens, B after A (hit on A's first 64 tokens) and B again (hit
    on its own first 96) compute exactly what B alone computes: its later chunks read those pages' codes."""
    prefix = lossy_run[3]
    assert prefix["cold"]["cached"] == 0 and prefix["after_a"]["cached"] == 2 * BLOCK
    assert prefix["again"]["cached"] == 3 * BLOCK
    for run in ("after_a", "again"):
        assert prefix[run]["tokens"] == prefix["cold"]["tokens"], run
        assert prefix[run]["logprobs"] == prefix["cold"]["logprobs"], run
