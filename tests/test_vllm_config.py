"""What KVCOMPRESS_VLLM_SPEC may name (kvcompress.integrations.vllm.config; no vLLM needed).

A spec that does not exist or that a paged pool cannot store per token is refused in one line naming
the spec, what stands in the way and what to use instead; a servable one gives the page layout.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvcompress.integrations.vllm import config
from kvcompress.integrations.vllm.config import ENV, ServingSpecError


@pytest.fixture
def spec_env(monkeypatch):
    def set_spec(value):
        monkeypatch.setenv(ENV, value)
        config.resolve.cache_clear()
        config.serving_layout.cache_clear()
    yield set_spec
    config.resolve.cache_clear()
    config.serving_layout.cache_clear()


def refusal(set_spec, value: str) -> str:
    set_spec(value)
    with pytest.raises(ServingSpecError) as info:
        config.configured_spec()
    message = str(info.value)
    assert "\n" not in message and message.startswith("kvcompress vLLM plugin: KVCOMPRESS_VLLM_SPEC=")
    return message


def test_unset_or_empty_means_off(monkeypatch, spec_env):
    monkeypatch.delenv(ENV, raising=False)
    assert config.configured_spec() is None
    spec_env("  ")
    assert config.configured_spec() is None


def test_a_kivi_preset_is_refused_naming_what_a_slot_cannot_hold_and_the_paged_preset(spec_env):
    message = refusal(spec_env, "int4")
    assert "'int4' cannot be served" in message
    for part in ("window of 128 tokens", "4 full-precision sink tokens", "keys quantized per channel",
                 "use 'paged-int4'"):
        assert part in message, part
    assert "use 'paged-bits3'" in refusal(spec_env, "bits3")  # pre-RoPE calibrated keys
    assert "use 'paged-hadamard-int4'" in refusal(spec_env, "hadamard-int4")
    assert "token eviction" in refusal(spec_env, "paged-int4@snapkv:0.5")


def test_a_misspelt_spec_lists_the_servable_presets(spec_env):
    message = refusal(spec_env, "paged-int5")
    assert "'paged-int5' is neither a preset nor a spec file" in message
    assert "paged-int8, paged-int4, paged-int3, paged-int2, paged-hadamard-int4, paged-bits4" in message
    assert "does not exist" in refusal(spec_env, "missing-spec.json")


def test_a_spec_file_with_token_wise_codecs_is_served_with_its_layout(spec_env, tmp_path):
    path = tmp_path / "k8v4.json"
    path.write_text(json.dumps({"key": {"method": "quant", "bits": 8, "axis": "token", "group_size": 32},
                                "value": {"method": "quant", "bits": 4, "axis": "token", "group_size": 32},
                                "window": 0, "sinks": 0}))
    spec_env(str(path))
    assert config.configured_spec().key.bits == 8
    layout = config.serving_layout(30, 64, torch.bfloat16)
    assert layout.slot_bytes == config.serving_slot_bytes(64, torch.bfloat16) == 72 + 40
    with pytest.raises(ServingSpecError, match="does not fit this model .* group_size 32 does not divide"):
        config.serving_layout(30, 48, torch.bfloat16)
    path.write_text(json.dumps({"key": {"axis": "token"}, "value": {"axis": "token"}}))  # default window 128
    config.resolve.cache_clear()
    assert "window of 128 tokens" in refusal(spec_env, str(path))
