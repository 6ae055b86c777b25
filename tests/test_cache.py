"""CompressedCache on a tiny random Llama: attention reads what is stored, bytes are real bytes."""

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny_llama
from by_hand import expected_compressed_tokens, expected_layer_parts, manual_dequantize
from kvcompress import CompressedCache

SPEC_2BIT = {"key": {"bits": 2, "axis": "channel", "group_size": 32},
             "value": {"bits": 2, "axis": "token", "group_size": 32},
             "window": 16, "sinks": 4, "block_size": 32}


def spec_with(bits: int, **extra) -> dict:
    spec = {"key": {"bits": bits, "axis": "channel", "group_size": 32},
            "value": {"bits": bits, "axis": "token", "group_size": 32},
            "window": 16, "sinks": 4, "block_size": 32}
    spec.update(extra)
    return spec


def ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def filled_dynamic_cache(model, layers_kv) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for idx, (k, v) in enumerate(layers_kv):
        cache.update(k, v, idx)
    return cache


# Both read paths: "sdpa" (the decode step reads the full reconstruction) and "kvcompress"
# (`enable_fast_attention`: the decode step reads the codes chunk by chunk).
READ_PATHS = ["sdpa", "kvcompress"]


def on_read_path(model, attention: str, fast_attention):
    return fast_attention(model) if attention == "kvcompress" else model


@pytest.mark.parametrize("attention", READ_PATHS)
@torch.no_grad()
def test_attention_reads_the_stored_codes(tiny_llama, attention, fast_attention):
    model, tokens = on_read_path(tiny_llama, attention, fast_attention), ids(100)
    cache = CompressedCache(model, SPEC_2BIT)
    model(tokens[:, :-1], cache=cache)
    assert all(layer.n_compressed == 64 for layer in cache.layers)

    # Reference: an uncompressed cache filled with a manual reconstruction of the stored codes.
    manual = []
    for layer in cache.layers:
        k_mid = manual_dequantize(layer.stored_keys, 2, "channel", 32)
        v_mid = manual_dequantize(layer.stored_values, 2, "token", 32)
        manual.append((torch.cat([layer.sink_keys, k_mid, layer.window_keys], dim=2),
                       torch.cat([layer.sink_values, v_mid, layer.window_values], dim=2)))
    reference = filled_dynamic_cache(model, manual)

    logits_compressed = model(tokens[:, -1:], cache=cache).logits
    logits_reference = model(tokens[:, -1:], cache=reference).logits
    logits_exact = model(tokens).logits[:, -1:]
    assert all(layer.n_compressed == 64 for layer in cache.layers), "no flush on this step"
    diff_ref = (logits_compressed - logits_reference).abs().max().item()
    diff_exact = (logits_compressed - logits_exact).abs().max().item()
    assert diff_ref < 1e-5, f"compressed vs reconstruction-fed reference: max_diff={diff_ref:.3g}"
    assert diff_exact > 1e-3, f"2-bit logits equal the uncompressed ones (max_diff={diff_exact:.3g})"


@pytest.mark.parametrize("attention", READ_PATHS)
@torch.no_grad()
def test_changing_stored_codes_changes_the_output(tiny_llama, attention, fast_attention):
    model, tokens = on_read_path(tiny_llama, attention, fast_attention), ids(100)
    outputs = []
    for tamper in (False, True):
        cache = CompressedCache(model, SPEC_2BIT)
        model(tokens[:, :-1], cache=cache)
        if tamper:
            for layer in cache.layers:
                layer.stored_values["codes"] = 255 - layer.stored_values["codes"]
        outputs.append(model(tokens[:, -1:], cache=cache).logits)
    max_diff = (outputs[0] - outputs[1]).abs().max().item()
    assert max_diff > 1e-3, f"tampered codes did not change the logits (max_diff={max_diff:.3g})"


@torch.no_grad()
def test_one_forward_reads_its_own_full_precision_kv_and_the_next_reads_the_codes(tiny_llama):
    """The one prompt protocol: the prompt's forward attends to its own tokens in full precision (as a
    serving engine's prefill does), even where their blocks are already compressed; the next forward
    reads those blocks from their codes."""
    model, tokens = tiny_llama, ids(101)
    cache = CompressedCache(model, SPEC_2BIT)
    prompt = model(tokens[:, :-1], cache=cache).logits
    exact = model(tokens).logits
    assert cache.layers[0].n_compressed > 0, "the prompt must have compressed blocks for this to test anything"
    torch.testing.assert_close(prompt, exact[:, :-1], atol=1e-5, rtol=1e-5)
    step = model(tokens[:, -1:], cache=cache).logits
    assert (step - exact[:, -1:]).abs().max() > 1e-3, "the next token must read the 2-bit codes"


def stored_tensors(cache: CompressedCache):
    for layer in cache.layers:
        yield from (layer.sink_keys, layer.sink_values, layer.window_keys, layer.window_values)
        for stored in (layer.stored_keys or {}, layer.stored_values or {}):
            yield from stored.values()


@pytest.mark.parametrize("bits, tokens, dtype", [(8, 150, torch.float32), (4, 150, torch.float32),
                                                 (3, 150, torch.float32), (2, 150, torch.float32),
                                                 (4, 150, torch.float16), (2, 150, torch.bfloat16),
                                                 (2, 1024, torch.float16), (3, 1000, torch.float32)])
@torch.no_grad()
def test_memory_report_equals_the_bytes_the_spec_implies(bits, tokens, dtype):
    """Every part of every layer, to the byte, from bits, group sizes, tokens and dtype (exact_memory)."""
    model = make_tiny_llama(dtype=dtype)
    spec = spec_with(bits)
    cache = CompressedCache(model, spec)
    model(ids(tokens), cache=cache)
    report = cache.memory_report()
    config = model.config
    dtype_bytes = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}[dtype]
    want = expected_layer_parts(spec, tokens, config.num_key_value_heads, config.head_dim, dtype_bytes)
    assert [m.parts for m in report.layers] == [want] * config.num_hidden_layers
    assert [m.compressed_tokens for m in report.layers] == [expected_compressed_tokens(spec, tokens)] * 2
    fp16 = 2 * config.num_hidden_layers * config.num_key_value_heads * tokens * config.head_dim * 2
    assert report.fp16_bytes == fp16  # K+V, layers, kv_heads, tokens, head_dim, 2 bytes
    assert report.stored_bytes == config.num_hidden_layers * sum(want.values())
    assert report.ratio == fp16 / (config.num_hidden_layers * sum(want.values()))
    # and the report is what the cache really holds
    assert report.stored_bytes == sum(t.numel() * t.element_size() for t in stored_tensors(cache))


@torch.no_grad()
def test_each_token_is_compressed_exactly_once(tiny_llama, fast_attention):
    fast_attention(tiny_llama)
    cache = CompressedCache(tiny_llama, SPEC_2BIT)
    tiny_llama(ids(40), cache=cache)
    layer = cache.layers[0]
    seen_codes = None
    for step in range(60):
        tiny_llama(ids(1, seed=step), cache=cache)
        if layer.stored_keys is not None:
            codes = layer.stored_keys["codes"]
            if seen_codes is not None:
                # earlier blocks are never re-quantized: their codes stay bit-identical
                assert torch.equal(codes[:, :, :seen_codes.shape[2]], seen_codes)
            seen_codes = codes.clone()
        assert 16 <= layer.window_keys.shape[2] < 16 + 32
    assert layer.n_compressed == 64 and cache.get_seq_length() == 100  # 4 sinks + 64 + 32 in window


@torch.no_grad()
def test_crop_inside_window_and_inside_compressed_blocks(tiny_llama):
    for remove in (5, 40, 97, 100):
        cache = CompressedCache(tiny_llama, SPEC_2BIT)
        tiny_llama(ids(100), cache=cache)
        before = [layer.reconstruct() for layer in cache.layers]
        cache.crop(-remove)
        assert cache.get_seq_length() == 100 - remove
        for layer, (k, v) in zip(cache.layers, before):
            k2, v2 = layer.reconstruct()
            assert torch.equal(k2, k[:, :, :100 - remove]) and torch.equal(v2, v[:, :, :100 - remove])
        # generation goes on after the crop
        tiny_llama(ids(30, seed=1), cache=cache)
        assert cache.get_seq_length() == 130 - remove


@torch.no_grad()
def test_reset_empties_the_cache(tiny_llama):
    cache = CompressedCache(tiny_llama, SPEC_2BIT)
    tiny_llama(ids(80), cache=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_report().stored_bytes == 0
    first = tiny_llama(ids(80), cache=cache).logits
    again = tiny_llama(ids(80), cache=CompressedCache(tiny_llama, SPEC_2BIT)).logits
    assert torch.equal(first, again)


@torch.no_grad()
def test_reorder_moves_the_codes_themselves(tiny_llama):
    cache = CompressedCache(tiny_llama, SPEC_2BIT)
    tiny_llama(ids(100, batch=3), cache=cache)
    layer = cache.layers[1]
    codes = layer.stored_keys["codes"].clone()
    recon = layer.reconstruct()[0]
    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    assert torch.equal(layer.stored_keys["codes"], codes[order])
    assert torch.equal(layer.reconstruct()[0], recon[order])


@torch.no_grad()
def test_non_finite_states_raise_a_clear_error(tiny_llama):
    cache = CompressedCache(tiny_llama, SPEC_2BIT)
    k = torch.randn(1, 2, 60, 32)
    k[0, 0, 10, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cache.update(k, torch.randn(1, 2, 60, 32), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_generate_in_each_dtype(dtype, fast_attention):
    model = fast_attention(make_tiny_llama(dtype=dtype))
    cache = CompressedCache(model, spec_with(4))
    out = model.generate(ids(60), past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert out.shape == (1, 80)
    assert cache.get_seq_length() == 79
    k, _ = cache.layers[0].reconstruct()
    assert k.dtype == dtype and cache.layers[0].n_compressed > 0


@torch.no_grad()
def test_int8_generation_scores_stay_close_and_sampling_runs(tiny_llama, fast_attention):
    # A random tiny model has near-tied logits, so token equality is tested on the real model
    # (test_real_model.py); here the int8 scores must stay within a small distance of exact.
    fast_attention(tiny_llama)
    prompt = ids(60)
    kwargs = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    exact = tiny_llama.generate(prompt, **kwargs)
    int8 = tiny_llama.generate(prompt, past_key_values=CompressedCache(tiny_llama, spec_with(8)), **kwargs)
    first_divergence = next((i for i in range(24) if exact.sequences[0, 60 + i] != int8.sequences[0, 60 + i]), 24)
    for step in range(first_divergence):
        max_diff = (exact.logits[step] - int8.logits[step]).abs().max().item()
        assert max_diff < 2e-3, f"step {step}: int8 logits off by {max_diff:.3g}"
    assert first_divergence >= 8
    torch.manual_seed(0)
    sampled = tiny_llama.generate(prompt, past_key_values=CompressedCache(tiny_llama, spec_with(2)),
                                  max_new_tokens=24, do_sample=True, top_k=20)
    assert sampled.shape == (1, 84)


def test_unsupported_layer_types_are_refused():
    # Sliding-window layers are supported (tests/test_architectures.py); linear attention is not.
    from transformers import Qwen3NextConfig

    config = Qwen3NextConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    with pytest.raises(ValueError, match="does not support model type 'qwen3_next'"):
        CompressedCache(config, "int4")
