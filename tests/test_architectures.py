"""Every supported architecture x every codec family, on tiny random models built from configs.

Per architecture (Llama, Mistral, Qwen2, Qwen3, Gemma 3) and codec family:
- int8: greedy tokens equal the uncompressed cache's for 32 steps (with the margin premise
  checked, see `tiny_models.assert_same_greedy`);
- int2: logits differ from the uncompressed ones and equal those of a reference cache filled
  with each layer's `reconstruct()` (attention reads exactly the decoded stored codes).
Gemma 3's sliding layers keep transformers' window semantics and never hold more than the
window; models without a standard KV cache get a clear error.
"""

import functools

import pytest
import torch
from transformers import DynamicCache

from kvcompress import CompressedCache
from kvcompress.cache.sliding import CompressedSlidingLayer
from tiny_models import (ARCHITECTURES, GEMMA3_WINDOW, NO_COMPRESSION, SEEDS, assert_same_greedy, prompt,
                         quant_spec, tiny_gemma3, tiny_mistral)

ARCHS = list(ARCHITECTURES)
# Codec families that need no calibration, as extra key settings of `quant_spec`.
FAMILIES = {
    "quant": {},
    "hadamard+quant": {"method": "hadamard+quant"},
    "quant pre-RoPE": {"key_space": "pre_rope"},
}
# Low-rank families need a calibration artifact: each tiny model is calibrated on 256 random
# tokens (seed 99, not the test prompts), as a user would calibrate on their own text.
PROMPT = 100
GREEDY_KW = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
GREEDY = dict(max_new_tokens=32, **GREEDY_KW)


@functools.cache
def model_for(arch: str, **overrides):
    return ARCHITECTURES[arch](seed=SEEDS[arch], **overrides)


@functools.cache
def exact_greedy(arch: str):
    """The uncompressed greedy run (transformers' own cache) that every int8 family is compared with."""
    model = model_for(arch)
    return model.generate(prompt(PROMPT), past_key_values=DynamicCache(config=model.config), **GREEDY)


@functools.cache
def artifact_for(arch: str):
    from kvcompress.calibration import calibrate

    return calibrate(model_for(arch), prompt(256, seed=99), seq_len=64, progress=False)


def lowrank_spec(bits: int, rank: int, key_space: str = "post_rope") -> dict:
    """K and V as `rank` calibrated coefficients per head, quantized to `bits` (K per-channel)."""
    return {"key": {"method": "lowrank+quant", "rank": rank, "bits": bits, "axis": "channel", "group_size": 32,
                    "key_space": key_space},
            "value": {"method": "lowrank+quant", "rank": rank, "bits": bits, "axis": "token", "group_size": 16},
            "window": 16, "sinks": 4, "block_size": 32}


def test_tiny_models_have_their_architecture_features():
    qwen2_attn = model_for("qwen2").model.layers[0].self_attn
    assert qwen2_attn.q_proj.bias is not None and qwen2_attn.k_proj.bias is not None
    assert qwen2_attn.v_proj.bias is not None
    assert hasattr(model_for("qwen3").model.layers[0].self_attn, "k_norm")
    mistral = model_for("mistral").config
    assert mistral.num_key_value_heads < mistral.num_attention_heads
    gemma = model_for("gemma3").config
    assert {"sliding_attention", "full_attention"} == set(gemma.layer_types) and gemma.num_key_value_heads == 1
    cache = CompressedCache(model_for("gemma3"), quant_spec(8))
    assert cache.is_sliding == [t == "sliding_attention" for t in gemma.layer_types]
    assert all(isinstance(layer, CompressedSlidingLayer) == layer.is_sliding for layer in cache.layers)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_int8_greedy_equals_uncompressed(arch, family, fast_attention):
    model = fast_attention(model_for(arch))
    cache = CompressedCache(model, quant_spec(8, **FAMILIES[family]))
    compressed = model.generate(prompt(PROMPT), past_key_values=cache, **GREEDY)
    assert all(layer.n_compressed > 0 for layer in cache.layers), "some layer compressed nothing"
    assert cache.key_space_fallback is None
    assert_same_greedy(exact_greedy(arch), compressed, f"{arch} {family}")


def reference_cache(model, cache: CompressedCache) -> DynamicCache:
    """A transformers cache holding, per layer, exactly what `cache` reconstructs."""
    reference = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.reconstruct()
        reference.layers[idx].update(keys, values)
        if layer.is_sliding:  # positions seen, not tokens held (the rest left the window)
            reference.layers[idx].cumulative_length = layer.get_seq_length()
    return reference


def assert_reads_reconstruction(model, spec: dict, n_tokens: int = PROMPT, what: str = "") -> CompressedCache:
    """int2: the next-token logits equal the reconstruction-fed reference and differ from exact."""
    return assert_reads_reconstruction_with(model, lambda: CompressedCache(model, spec), n_tokens, what)


def assert_reads_reconstruction_with(model, make_cache, n_tokens: int = PROMPT, what: str = "") -> CompressedCache:
    ids = prompt(n_tokens + 1)
    cache = make_cache()
    model(ids[:, :-1], cache=cache)
    assert all(layer.n_compressed > 0 for layer in cache.layers), f"{what}: some layer compressed nothing"
    reference = reference_cache(model, cache)
    held = [(layer.n_compressed, layer.held_tokens()) for layer in cache.layers]
    logits = model(ids[:, -1:], cache=cache).logits
    assert [layer.n_compressed for layer in cache.layers] == [n for n, _ in held], "no flush on this step"
    logits_reference = model(ids[:, -1:], cache=reference).logits
    logits_exact = model(ids).logits[:, -1:]
    diff_ref = (logits - logits_reference).abs().max().item()
    diff_exact = (logits - logits_exact).abs().max().item()
    assert diff_ref < 1e-5, f"{what}: compressed vs reconstruction-fed reference: max_diff={diff_ref:.3g}"
    assert diff_exact > 1e-3, f"{what}: 2-bit logits equal the uncompressed ones (max_diff={diff_exact:.3g})"
    return cache


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_int2_attention_reads_the_reconstruction(arch, family, fast_attention):
    assert_reads_reconstruction(fast_attention(model_for(arch)), quant_spec(2, **FAMILIES[family]),
                                what=f"{arch} {family}")


@pytest.mark.parametrize("key_space", ["pre_rope"])  # post-RoPE low rank: the int2 read-path test
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_lowrank_int8_full_rank_greedy_equals_uncompressed(arch, key_space, fast_attention):
    model = fast_attention(model_for(arch))
    cache = CompressedCache(model, lowrank_spec(8, rank=32, key_space=key_space), artifact=artifact_for(arch))
    compressed = model.generate(prompt(PROMPT), past_key_values=cache, **GREEDY)
    assert cache.key_space_fallback is None and all(layer.n_compressed > 0 for layer in cache.layers)
    assert_same_greedy(exact_greedy(arch), compressed, f"{arch} lowrank32+int8 {key_space}")


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_lowrank_int2_attention_reads_the_reconstruction(arch, key_space, fast_attention):
    model, spec = fast_attention(model_for(arch)), lowrank_spec(2, rank=16, key_space=key_space)
    cache = assert_reads_reconstruction_with(model, lambda: CompressedCache(model, spec, artifact=artifact_for(arch)),
                                             what=f"{arch} lowrank16+int2 {key_space}")
    assert cache.key_space_fallback is None


@torch.no_grad()
def test_gemma3_head_dim_256(fast_attention):
    model = fast_attention(tiny_gemma3(seed=0, head_dim=256))
    assert model.config.head_dim == 256
    cache = assert_reads_reconstruction(model, quant_spec(2), what="gemma3 head_dim 256")
    assert cache.layers[2].reconstruct()[0].shape == (1, 1, PROMPT + 1, 256)
    assert_reads_reconstruction(model, quant_spec(2, key_space="pre_rope"), what="gemma3 head_dim 256 pre-RoPE")


@torch.no_grad()
def test_no_compression_is_bit_identical_to_transformers_cache_on_sliding_layers():
    # The "none" codec isolates the window bookkeeping: held tokens, mask sizes and returned
    # states must be exactly those of transformers' DynamicSlidingWindowLayer. (The model stays on
    # sdpa: attention over the codes chunk by chunk is equal only up to float rounding.)
    model = model_for("gemma3")
    same = model.generate(prompt(PROMPT), past_key_values=CompressedCache(model, NO_COMPRESSION), **GREEDY)
    for a, b in zip(exact_greedy("gemma3").logits, same.logits):
        assert torch.equal(a, b)


@torch.no_grad()
def test_gemma3_sliding_layers_never_exceed_the_window(fast_attention):
    model = fast_attention(model_for("gemma3"))
    cache, plain = CompressedCache(model, quant_spec(8)), DynamicCache(config=model.config)
    ids = prompt(150)
    sliding = [idx for idx, s in enumerate(cache.is_sliding) if s]
    saw_compressed_sliding = False
    # A 60-token prefill, single tokens across the first expiries, then 5-token chunks.
    steps = [(0, 60)] + [(t, t + 1) for t in range(60, 100)] + [(t, t + 5) for t in range(100, 150, 5)]
    for start, stop in steps:
        model(ids[:, start:stop], cache=cache)
        model(ids[:, start:stop], cache=plain)
        report = cache.memory_report()
        for idx in sliding:
            layer, reference = cache.layers[idx], plain.layers[idx]
            assert layer.held_tokens() <= GEMMA3_WINDOW - 1
            assert layer.held_tokens() == reference.keys.shape[2], f"layer {idx} after token {stop}"
            assert layer.get_seq_length() == reference.get_seq_length() == stop
            assert layer.get_mask_sizes(1) == reference.get_mask_sizes(1)
            reference_bytes = 2 * reference.keys.numel() * reference.keys.element_size()
            assert report.layers[idx].stored_bytes <= reference_bytes
            saw_compressed_sliding |= layer.n_compressed > 0
        assert report.layers[2].tokens == stop  # the full-attention layer keeps everything
    assert saw_compressed_sliding, "the sliding layers never held compressed blocks"
    # The report counts every stored tensor of every layer, sliding and full.
    stored = 0
    for layer in cache.layers:
        stored += sum(t.numel() * t.element_size() for t in (layer.sink_keys, layer.sink_values,
                                                            layer.window_keys, layer.window_values))
        for part in (layer.stored_keys or {}, layer.stored_values or {}):
            stored += sum(t.numel() * t.element_size() for t in part.values())
    assert cache.memory_report().stored_bytes == stored
    assert cache.memory_report().fp16_bytes == 2 * 2 * 32 * (3 * (GEMMA3_WINDOW - 1) + 150)


@torch.no_grad()
def test_sliding_layer_crop_needs_past_recording():
    model = model_for("gemma3")
    cache = CompressedCache(model, quant_spec(4))
    model(prompt(PROMPT), cache=cache)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-3)
    cache.activate_past_recording()
    model(prompt(5, seed=1), cache=cache)
    assert cache.layers[0].held_tokens() == GEMMA3_WINDOW - 1 + 5  # kept until the crop
    cache.crop(-3)
    assert cache.get_seq_length() == PROMPT + 2
    assert cache.layers[0].held_tokens() == GEMMA3_WINDOW - 1


UNSUPPORTED = {
    "deepseek_v3": ("DeepseekV3Config", {}, "multi-latent attention"),
    "mamba": ("MambaConfig", {}, "linear_attention"),
    "qwen3_next": ("Qwen3NextConfig", {}, "linear_attention"),
    "gemma3n_text": ("Gemma3nTextConfig", {}, "KV sharing"),
    "llama4_text": ("Llama4TextConfig", {}, "chunked_attention"),
}


@pytest.mark.parametrize("model_type", list(UNSUPPORTED))
def test_unsupported_models_get_a_clear_error(model_type):
    import transformers

    config_name, kwargs, reason = UNSUPPORTED[model_type]
    config = getattr(transformers, config_name)(**kwargs)
    with pytest.raises(ValueError, match=f"model type '{model_type}'") as err:
        CompressedCache(config, "int4")
    assert reason in str(err.value)


@torch.no_grad()
def test_mistral_sliding_window_layers(fast_attention):
    # Mistral's own default config has sliding_window=4096, which makes every layer sliding.
    model = fast_attention(tiny_mistral(seed=SEEDS["mistral"], sliding_window=40))
    cache = CompressedCache(model, NO_COMPRESSION)
    assert all(layer.is_sliding and layer.sliding_window == 40 for layer in cache.layers)
    ids = prompt(PROMPT)
    exact = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=8, **GREEDY_KW)
    same = model.generate(ids, past_key_values=cache, max_new_tokens=8, **GREEDY_KW)
    assert all(torch.equal(a, b) for a, b in zip(exact.logits, same.logits))
    assert all(layer.held_tokens() == 39 for layer in cache.layers)
    cache = assert_reads_reconstruction(model, quant_spec(2, window=0), what="mistral sliding_window=40")
    assert all(layer.held_tokens() == 39 for layer in cache.layers)
