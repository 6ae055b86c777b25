"""Direct reconstruction: the capture reproduces the model's attention, the reconstruction is
what the cache really decodes, and the figures order specs as they must."""

import dataclasses

import pytest
import torch

from kvcompress.cache.build import build_codec
from kvcompress.measure.reconstruction import (attention_output, capture_states, codec_only_spec, direct_reconstruction,
                                       reconstruct)
from kvcompress.presets import load_spec


def spec_bits(bits: int) -> dict:
    return {"key": {"bits": bits, "axis": "channel", "group_size": 32},
            "value": {"bits": bits, "axis": "token", "group_size": 32}, "window": 16, "sinks": 4, "block_size": 32}


@pytest.fixture(scope="module")
def capture(tiny_llama):
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    return capture_states(tiny_llama, ids)


def naive_attention(q, k, v, scaling):
    """Per query head, per query position: softmax over visible keys of its KV head."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                kk, vv = k[b, h // group, : i + 1].double(), v[b, h // group, : i + 1].double()
                w = torch.softmax(kk @ q[b, h, i].double() * scaling, dim=0)
                out[b, h, i] = w @ vv
    return out


def test_attention_output_is_causal_gqa_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 7, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen),
               torch.randn(2, 2, 7, 8, generator=gen))
    ours, ref = attention_output(q, k, v, 0.3), naive_attention(q, k, v, 0.3)
    assert (ours.double() - ref).abs().max().item() < 1e-5


def test_capture_reproduces_the_models_own_attention(capture, tiny_llama):
    cfg = tiny_llama.config
    assert capture.num_layers == cfg.num_hidden_layers and capture.tokens == 100
    assert capture.queries[0].shape == (1, cfg.num_attention_heads, 100, cfg.head_dim)
    assert capture.keys[0].shape == capture.values[0].shape == (1, cfg.num_key_value_heads, 100, cfg.head_dim)
    assert max(capture.check_errors) < 1e-4, capture.check_errors


class _WrongRotation:
    """Wraps a key space so that queries are rotated wrongly: not at all, or one position late."""

    def __init__(self, inner, shift):
        self.inner, self.shift = inner, shift

    def rotate(self, x, start=0):
        return x if self.shift is None else self.inner.rotate(x, start=start + self.shift)

    def unrotate(self, x, start=0):
        return self.inner.unrotate(x, start=start)


@pytest.mark.parametrize("shift", [None, 1], ids=["unrotated", "one-position-late"])
def test_capture_check_catches_a_wrongly_rotated_query(tiny_llama, monkeypatch, shift):
    import kvcompress.rope as rope

    right = rope.key_space_for

    def wrong(model):
        inverters, reason = right(model)
        return [_WrongRotation(inv, shift) for inv in inverters], reason

    monkeypatch.setattr(rope, "key_space_for", wrong)
    with pytest.raises(RuntimeError, match="differs from the model's own output"):
        capture_states(tiny_llama, torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0)))


def test_reconstruction_is_what_the_codecs_store_and_decode(capture, tiny_llama):
    spec = load_spec(spec_bits(2))
    pairs, memory = reconstruct(tiny_llama, spec, capture)
    sinks, n, blocks = spec.sinks, 100, 3  # 4 sinks + 3 whole blocks of 32 (window 0)
    key_codec, value_codec = (build_codec(t) for t in spec.for_layer(0))
    for layer, (k_hat, v_hat) in enumerate(pairs):
        k, v = capture.keys[layer][:, :, :n], capture.values[layer][:, :, :n]
        assert k_hat.shape == k.shape
        assert torch.equal(k_hat[:, :, :sinks], k[:, :, :sinks]), "sinks stay in full precision"
        expected_k = torch.cat([key_codec.roundtrip(k[:, :, sinks + 32 * b: sinks + 32 * (b + 1)]) for b in range(blocks)], 2)
        expected_v = torch.cat([value_codec.roundtrip(v[:, :, sinks + 32 * b: sinks + 32 * (b + 1)]) for b in range(blocks)], 2)
        assert torch.equal(k_hat[:, :, sinks:], expected_k)
        assert torch.equal(v_hat[:, :, sinks:], expected_v)
        assert not torch.equal(k_hat, k)
    assert memory["ratio"] > 1.0
    assert codec_only_spec(spec) == dataclasses.replace(spec, window=0)


def test_no_compression_is_exact(capture, tiny_llama):
    result = direct_reconstruction(tiny_llama, "none", capture)
    for layer in result["layers"]:
        for part in ("key", "value"):
            assert layer[part]["mse"] == 0.0 and layer[part]["rel_error"] == 0.0
            assert layer[part]["cosine"] == pytest.approx(1.0, abs=1e-12)
        for variant in layer["attention"].values():
            assert variant["rel_error"] == 0.0


def test_fewer_bits_reconstruct_worse(capture, tiny_llama):
    results = {bits: direct_reconstruction(tiny_llama, spec_bits(bits), capture)["mean"] for bits in (8, 4, 2)}
    for part in ("key", "value"):
        cos = [results[b][part]["cosine"] for b in (8, 4, 2)]
        err = [results[b][part]["rel_error"] for b in (8, 4, 2)]
        assert cos[0] > cos[1] > cos[2], cos
        assert err[0] < err[1] < err[2], err
    attn = [results[b]["attention"]["both"]["rel_error"] for b in (8, 4, 2)]
    assert attn[0] < attn[1] < attn[2], attn
    # K-only and V-only variants each keep the other tensor exact, so each is below "both" or equal.
    assert results[2]["attention"]["value_only"]["rel_error"] <= results[2]["attention"]["both"]["rel_error"] + 1e-9


def test_too_few_tokens_is_a_clear_error(tiny_llama):
    small = capture_states(tiny_llama, torch.randint(3, 128, (1, 20)))
    with pytest.raises(ValueError, match="capture more tokens"):
        reconstruct(tiny_llama, spec_bits(4), small)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_capture_on_other_architectures(arch):
    """Qwen3 and Gemma 3 normalise queries before RoPE (the hook takes q_norm's output; Gemma 3
    transposes first); Gemma 3 also has sliding-window layers, which the codec-only
    reconstruction refuses rather than measuring the wrong thing."""
    from tiny_models import ARCHITECTURES, prompt

    model = ARCHITECTURES[arch]()
    capture = capture_states(model, prompt(100))
    assert max(capture.check_errors) < 1e-4
    spec = {"key": {"bits": 4, "axis": "token", "group_size": 32}, "value": {"bits": 4, "axis": "token", "group_size": 32},
            "window": 16, "sinks": 4, "block_size": 32}
    if arch == "gemma3":
        assert any(w is not None for w in capture.sliding_windows)
        with pytest.raises(ValueError, match="full-attention layers"):
            direct_reconstruction(model, spec, capture)
    else:
        assert 0.99 < direct_reconstruction(model, spec, capture)["mean"]["key"]["cosine"] < 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_capture_works_for_half_precision_models(dtype):
    from conftest import make_tiny_llama

    model = make_tiny_llama(dtype=dtype)
    capture = capture_states(model, torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0)))
    assert max(capture.check_errors) < 3e-2  # rounding of the model's own half-precision attention, nothing more
