"""Attention over the codes (kvcompress.cache.attention): same result as attention over the full
reconstruction, reads the stored codes, never builds the full decoded copy, refuses what it
cannot do."""

import pytest
import torch
from transformers import DynamicCache

from kvcompress import CompressedCache
from kvcompress.cache import attention as attention_module
from kvcompress.cache.attention import ATTENTION_NAME, LAYER_ATTRIBUTE, attend_compressed, kvcompress_attention
from kvcompress.cache.cache import CompressedLayer
from tiny_models import ARCHITECTURES, SEEDS

SPEC = {"key": {"bits": 4, "axis": "channel", "group_size": 32},
        "value": {"bits": 2, "axis": "token", "group_size": 32},
        "window": 16, "sinks": 4, "block_size": 32}
PRE_ROPE = {**SPEC, "key": {**SPEC["key"], "key_space": "pre_rope"}}


def prompt(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, cache, ids: torch.Tensor, steps: int, attention_mask=None) -> torch.Tensor:
    """Prefill `ids`, then feed `steps` fixed tokens one at a time; (steps, B, vocab) logits."""
    out = model(ids, cache=cache, attention_mask=attention_mask)
    logits = []
    for step in range(steps):
        token = torch.full((ids.shape[0], 1), 5 + step)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], 1)
        out = model(token, cache=cache, attention_mask=attention_mask)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
@torch.no_grad()
def test_attention_over_codes_equals_attention_over_reconstruction(arch):
    model = ARCHITECTURES[arch](seed=SEEDS[arch])
    slow = decode_logits(model, CompressedCache(model, SPEC, fast_attention=False), prompt(90), 12)
    fast_cache = CompressedCache(model, SPEC)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert any(layer.attention_config is not None for layer in fast_cache.layers)
    fast = decode_logits(model, fast_cache, prompt(90), 12)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_pre_rope_keys_and_left_padding_batches():
    model = ARCHITECTURES["llama"](seed=SEEDS["llama"])
    ids = prompt(100, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :23] = 0  # left padding in the second row
    for spec in (SPEC, PRE_ROPE):
        slow = decode_logits(model, CompressedCache(model, spec, fast_attention=False), ids, 8, mask)
        fast = decode_logits(model, CompressedCache(model, spec), ids, 8, mask)
        torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_decode_step_reads_the_codes_and_never_reconstructs(monkeypatch):
    model = ARCHITECTURES["llama"](seed=SEEDS["llama"])
    cache = CompressedCache(model, SPEC)
    model(prompt(120), cache=cache)

    def refuse_full_reconstruction(self):
        raise AssertionError("a decode step built the full reconstruction")

    monkeypatch.setattr(CompressedLayer, "reconstruct", refuse_full_reconstruction)
    before = model(torch.tensor([[7]]), cache=cache.copy()).logits
    tampered = cache.copy()
    codes = tampered.layers[1].stored_values["codes"]
    codes.copy_(255 - codes)  # every stored 2-bit value code of layer 1 changes
    after = model(torch.tensor([[7]]), cache=tampered).logits
    assert (after - before).abs().max() > 1e-3


@torch.no_grad()
def test_chunks_cover_every_compressed_token(monkeypatch):
    # With chunks smaller than the compressed region, the result is the same as in one chunk.
    model = ARCHITECTURES["qwen3"](seed=SEEDS["qwen3"])
    whole = decode_logits(model, CompressedCache(model, SPEC), prompt(200), 4)
    monkeypatch.setattr(attention_module, "CHUNK_TOKENS", 64)
    chunked = decode_logits(model, CompressedCache(model, SPEC), prompt(200), 4)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_other_caches_on_a_switched_model_get_transformers_sdpa_exactly():
    model = ARCHITECTURES["mistral"](seed=SEEDS["mistral"])
    before = model.generate(prompt(40), cache=DynamicCache(config=model.config), max_new_tokens=6,
                            do_sample=False, output_logits=True, return_dict_in_generate=True)
    CompressedCache(model, SPEC)  # switches the model to kvcompress's attention
    assert model.config._attn_implementation == ATTENTION_NAME
    after = model.generate(prompt(40), cache=DynamicCache(config=model.config), max_new_tokens=6,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits))


def test_models_not_on_sdpa_are_left_alone():
    model = ARCHITECTURES["llama"](seed=0)
    model.set_attn_implementation("eager")
    cache = CompressedCache(model, SPEC)
    assert model.config._attn_implementation == "eager"
    assert all(layer.attention_config is None for layer in cache.layers)
    with torch.no_grad():
        model(prompt(80), cache=cache)
        keys, _ = cache.layers[0].update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert keys.shape[2] == cache.layers[0].held_tokens()  # the full reconstruction


@torch.no_grad()
def test_unsupported_attention_options_are_refused_with_advice():
    model = ARCHITECTURES["llama"](seed=0)
    cache = CompressedCache(model, SPEC)
    model(prompt(80), cache=cache)
    layer = cache.layers[0]
    keys, values = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert getattr(keys, LAYER_ATTRIBUTE) is layer
    query = torch.randn(1, 4, 1, 32)
    with pytest.raises(ValueError, match="fast_attention=False"):
        kvcompress_attention(None, query, keys, values, None, scaling=0.1, softcap=30.0)
    wrong_mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention mask covers 5 positions"):
        kvcompress_attention(None, query, keys, values, wrong_mask, scaling=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_attention_over_codes_matches_the_reconstruction_path(dtype):
    """Decode steps read `attend_compressed` (float32 inside); evaluation chunks read the
    reconstruction in the model dtype through SDPA. In half precision the two may differ only by
    rounding: both are compared with a float64 attention over the exactly decoded codes, within a
    tolerance derived from the dtype's epsilon (derivation below)."""
    from conftest import make_tiny_llama
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    model = make_tiny_llama(seed=3, dtype=dtype)
    cache = CompressedCache(model, SPEC, fast_attention=False)  # fills the cache; leaves the model as it is
    model(prompt(150), cache=cache)
    layer = cache.layers[1]
    assert layer.n_compressed > 0
    gen = torch.Generator().manual_seed(0)
    heads, dim = model.config.num_attention_heads, model.config.head_dim
    query = torch.randn(1, heads, 1, dim, generator=gen).to(dtype)
    scaling = dim ** -0.5

    fast = attend_compressed(layer, query, None, scaling)  # (1, Hq, 1, D) in dtype
    keys, values = layer.reconstruct()  # in dtype
    group = heads // keys.shape[1]
    slow = sdpa(query, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), scale=scaling)

    # Reference: float64 attention over [sinks | codes decoded exactly | window].
    n_sinks = layer.sink_keys.shape[2]
    exact_k = torch.cat([layer.sink_keys.double(), layer.key_codec.decode(layer.stored_keys, torch.float64),
                         layer.window_keys.double()], 2).repeat_interleave(group, 1)
    exact_v = torch.cat([layer.sink_values.double(), layer.value_codec.decode(layer.stored_values, torch.float64),
                         layer.window_values.double()], 2).repeat_interleave(group, 1)
    assert exact_k.shape[2] == n_sinks + layer.n_compressed + layer.window_keys.shape[2]
    scores = (query.double() @ exact_k.transpose(-1, -2)) * scaling
    reference = torch.softmax(scores, -1) @ exact_v

    # Tolerance, with u = eps / 2 the unit roundoff of the dtype. Rounding a key to the dtype
    # moves its score by at most u * |q| |k| * scaling (Cauchy-Schwarz), and rounding the score
    # itself adds u * |score|: call the largest such change d. A change of at most d in every
    # score changes the softmax weights by at most 2 d in L1 norm, so the output by at most
    # 2 d max|V|; rounding V and then the output add u max|V| each.
    u = torch.finfo(dtype).eps / 2
    v_max = exact_v.abs().max().item()
    qk = (query.double().norm(dim=-1, keepdim=True) * exact_k.norm(dim=-1).unsqueeze(2) * scaling).max().item()
    d = u * (qk + scores.abs().max().item())
    tol = v_max * (2 * d + 2 * u)
    assert tol < 0.1 * v_max  # the bound is tight enough to mean something
    fast_err = (fast.double() - reference).abs().max().item()
    slow_err = (slow.double() - reference).abs().max().item()
    assert fast_err <= tol, (fast_err, tol)
    assert slow_err <= tol, (slow_err, tol)
    assert (fast.double() - slow.double()).abs().max().item() <= 2 * tol
    # and the check can fail: attention over a cache missing one compressed block is far outside it
    dropped = torch.cat([exact_k[:, :, :n_sinks], exact_k[:, :, n_sinks + 32:]], 2)
    dropped_v = torch.cat([exact_v[:, :, :n_sinks], exact_v[:, :, n_sinks + 32:]], 2)
    wrong = torch.softmax((query.double() @ dropped.transpose(-1, -2)) * scaling, -1) @ dropped_v
    assert (wrong - reference).abs().max().item() > tol
