"""Attention over the codes (kvcompress.cache.attention): same result as attention over the full
reconstruction, reads the stored codes, never builds the full decoded copy, refuses what it
cannot do; the switch (`enable_fast_attention`) is explicit and undone by its handle; the guard
refuses to go on after attention read only the window."""

import logging
import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import kvcompress
from kvcompress import CompressedCache, enable_fast_attention
from kvcompress.cache import attention as attention_module
from kvcompress.cache.attention import ATTENTION_NAME, LAYER_ATTRIBUTE, kvcompress_attention, register
from kvcompress.cache.layer import CompressedLayer, State
from kvcompress.kernels import reference
from kvcompress.kernels.reference import attend_compressed
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


@pytest.mark.parametrize("kernels", ["auto", "torch"], ids=["cpu-kernel", "torch"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
@torch.no_grad()
def test_attention_over_codes_equals_attention_over_reconstruction(arch, kernels, fast_attention, monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_KERNELS", kernels)
    model = ARCHITECTURES[arch](seed=SEEDS[arch])
    slow = decode_logits(model, CompressedCache(model, SPEC), prompt(90), 12)  # on sdpa: reconstructions
    fast_attention(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    fast = decode_logits(model, CompressedCache(model, SPEC), prompt(90), 12)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_pre_rope_keys_and_left_padding_batches(fast_attention):
    model = ARCHITECTURES["llama"](seed=SEEDS["llama"])
    ids = prompt(100, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :23] = 0  # left padding in the second row
    slow = [decode_logits(model, CompressedCache(model, spec), ids, 8, mask) for spec in (SPEC, PRE_ROPE)]
    fast_attention(model)
    for spec, expected in zip((SPEC, PRE_ROPE), slow):
        fast = decode_logits(model, CompressedCache(model, spec), ids, 8, mask)
        torch.testing.assert_close(fast, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kernels", ["auto", "torch"], ids=["cpu-kernel", "torch"])
@torch.no_grad()
def test_decode_step_reads_the_codes_and_never_reconstructs(monkeypatch, kernels, fast_attention):
    monkeypatch.setenv("KVCOMPRESS_KERNELS", kernels)
    model = fast_attention(ARCHITECTURES["llama"](seed=SEEDS["llama"]))
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
def test_chunks_cover_every_compressed_token(monkeypatch, fast_attention):
    # With chunks smaller than the compressed region, the result is the same as in one chunk
    # (the pure-torch path: the CPU kernel does not chunk by CHUNK_TOKENS).
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    model = fast_attention(ARCHITECTURES["qwen3"](seed=SEEDS["qwen3"]))
    whole = decode_logits(model, CompressedCache(model, SPEC), prompt(200), 4)
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 64)
    chunked = decode_logits(model, CompressedCache(model, SPEC), prompt(200), 4)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_other_caches_on_a_switched_model_get_transformers_sdpa_exactly():
    model = ARCHITECTURES["mistral"](seed=SEEDS["mistral"])
    before = model.generate(prompt(40), cache=DynamicCache(config=model.config), max_new_tokens=6,
                            do_sample=False, output_logits=True, return_dict_in_generate=True)
    with enable_fast_attention(model):
        assert model.config._attn_implementation == ATTENTION_NAME
        after = model.generate(prompt(40), cache=DynamicCache(config=model.config), max_new_tokens=6,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits))


def test_models_not_on_sdpa_are_refused_and_left_alone():
    model = ARCHITECTURES["llama"](seed=0)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="uses attn_implementation 'eager'.*set_attn_implementation"):
        enable_fast_attention(model)
    handle = enable_fast_attention(model, strict=False)  # what measuring code does: switches nothing
    assert not handle.active and "eager" in handle.reason
    cache = CompressedCache(model, SPEC)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        model(prompt(80), cache=cache)
        keys, _ = cache.layers[0].update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert keys.shape[2] == cache.layers[0].held_tokens()  # the full reconstruction
    assert not hasattr(keys, LAYER_ATTRIBUTE)
    handle.restore()
    assert model.config._attn_implementation == "eager"


def test_unsupported_model_types_are_refused_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="model type 'gpt2' is not one whose attention"):
        enable_fast_attention(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="PreTrainedModel, got LlamaConfig"):
        enable_fast_attention(ARCHITECTURES["llama"](seed=0).config)


@torch.no_grad()
def test_unsupported_attention_options_are_refused_with_advice(fast_attention):
    model = fast_attention(ARCHITECTURES["llama"](seed=0))
    cache = CompressedCache(model, SPEC)
    model(prompt(80), cache=cache)
    layer = cache.layers[0]
    keys, values = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert getattr(keys, LAYER_ATTRIBUTE) is layer
    query = torch.randn(1, 4, 1, 32)
    with pytest.raises(ValueError, match="leave the model on sdpa"):
        kvcompress_attention(None, query, keys, values, None, scaling=0.1, softcap=30.0)
    wrong_mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention mask covers 5 positions"):
        kvcompress_attention(None, query, keys, values, wrong_mask, scaling=0.1)


# ---- the switch: explicit, undone by its handle, nothing global on import ------------------

@torch.no_grad()
def test_the_cache_does_not_switch_the_model_and_reads_codes_only_while_it_is_switched():
    model = ARCHITECTURES["llama"](seed=SEEDS["llama"])
    cache = CompressedCache(model, SPEC)
    assert model.config._attn_implementation == "sdpa"
    model(prompt(80), cache=cache)
    layer = cache.layers[0]
    keys, _ = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert keys.shape[2] == layer.held_tokens() and not hasattr(keys, LAYER_ATTRIBUTE)
    handle = enable_fast_attention(model)
    assert handle.active and model.config._attn_implementation == ATTENTION_NAME
    keys, values = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert getattr(keys, LAYER_ATTRIBUTE) is layer and keys.shape[2] == layer.window_keys.shape[2] < layer.held_tokens()
    kvcompress_attention(None, torch.randn(1, 4, 1, 32), keys, values, None, scaling=0.1)  # consumes it
    handle.restore()
    assert not handle.active and model.config._attn_implementation == "sdpa"
    keys, _ = layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert keys.shape[2] == layer.held_tokens() and not hasattr(keys, LAYER_ATTRIBUTE)


def test_handles_nest_and_restore_what_they_found():
    model = ARCHITECTURES["qwen2"](seed=0)
    with enable_fast_attention(model) as outer:
        assert outer.previous == "sdpa"
        with enable_fast_attention(model) as inner:  # already enabled: nothing to undo
            assert inner.previous == ATTENTION_NAME
        assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config._attn_implementation == "sdpa"
    outer.restore()  # idempotent
    assert model.config._attn_implementation == "sdpa"


def test_the_cache_says_once_how_to_get_the_faster_decode_path(monkeypatch, caplog):
    monkeypatch.setattr(attention_module, "_hint_logged", False)
    model = ARCHITECTURES["llama"](seed=0)
    with caplog.at_level(logging.INFO, logger="kvcompress"):
        with enable_fast_attention(model):
            CompressedCache(model, SPEC)  # switched: nothing to say
        assert not caplog.records
        CompressedCache(model, SPEC)
        CompressedCache(model, SPEC)
    hints = [r for r in caplog.records if "enable_fast_attention(model)" in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelno == logging.INFO


def test_importing_kvcompress_registers_nothing_global():
    code = """
import kvcompress, kvcompress.cache, kvcompress.measure.evaluate, kvcompress.measure.tasks, kvcompress.bench.run
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
before = ("kvcompress" in AttentionInterface(), "kvcompress" in ALL_MASK_ATTENTION_FUNCTIONS)
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))  # head_dim 32
kvcompress.CompressedCache(model, "int4")
after_cache = ("kvcompress" in AttentionInterface(), model.config._attn_implementation)
kvcompress.enable_fast_attention(model)
after_enable = ("kvcompress" in AttentionInterface(), "kvcompress" in ALL_MASK_ATTENTION_FUNCTIONS)
print(before, after_cache, after_enable)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.split("\n")
    # Nothing on import or from building a cache; the explicit switch registers both (the check can see it).
    assert out[0] == "(False, False) (False, 'sdpa') (True, True)", out


# ---- the guard: attention may never read only the window silently ---------------------------

def copying_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa after copying the key tensor, as an attention (or a transformers release) might: the
    copy would drop the tag, and sdpa would attend to the window alone."""
    key = key.clone()
    return attention_module.sdpa_attention(module, query, key, value, attention_mask, **kwargs)


def ignoring_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention that never looks at the key tensor it is given (zeros out): the handed window
    is not read, so only the layer's consumed flag can tell."""
    B, H, Q, D = query.shape
    return query.new_zeros(B, Q, H, D), None


def _run_with(attention, steps):
    """Prefill 90 tokens, then decode `steps` tokens with `attention` registered as kvcompress's name."""
    model = ARCHITECTURES["llama"](seed=SEEDS["llama"])
    cache = CompressedCache(model, SPEC)
    with enable_fast_attention(model):
        AttentionInterface.register(ATTENTION_NAME, attention)
        try:
            model(prompt(90), cache=cache)  # prefill: full reconstruction, nothing handed out
            assert cache.layers[0].n_compressed > 0
            for token in steps:
                model(torch.tensor([[token]]), cache=cache)
        finally:
            register()  # kvcompress's own function again under its name


@torch.no_grad()
def test_attention_that_reads_the_handed_window_raises_at_that_step():
    # batch 1 and no mask: without the guard, sdpa on the copied window runs silently on the window alone
    with pytest.raises(RuntimeError) as caught:
        _run_with(copying_attention, steps=[5])
    message = str(caught.value)
    assert "tried to read the K/V window that layer 0 handed" in message and "clone" in message
    assert "restore the handle enable_fast_attention returned" in message


@torch.no_grad()
def test_attention_that_never_reads_the_layer_is_caught_at_the_next_step():
    _run_with(ignoring_attention, steps=[])  # no decode step: nothing handed out, nothing to refuse
    with pytest.raises(RuntimeError) as caught:
        _run_with(ignoring_attention, steps=[5, 6])
    message = str(caught.value)
    assert "attention at layer 0 read only the K/V window" in message
    assert "output for that step was wrong" in message
    assert "restore the handle enable_fast_attention returned" in message and "'llama'" in message


@torch.no_grad()
def test_generation_over_many_decode_steps_never_trips_the_guard(monkeypatch, fast_attention):
    model = fast_attention(ARCHITECTURES["llama"](seed=SEEDS["llama"]))
    reads = []
    original = attention_module.attend  # the decode step over the codes: the CPU kernel or the torch path

    def counting(layer, *args):
        reads.append(layer.layer_idx)
        return original(layer, *args)

    monkeypatch.setattr(attention_module, "attend", counting)
    cache = CompressedCache(model, SPEC)
    out = model.generate(prompt(40), cache=cache, max_new_tokens=80, min_new_tokens=80, do_sample=False)
    assert out.shape[1] == 40 + 80
    layers = len(cache.layers)
    # Decode steps with at least one compressed block read the codes at every layer (the prompt's
    # 40 tokens fill sinks + window + a block only after a few steps).
    assert len(reads) >= 60 * layers and set(reads) == set(range(layers))
    assert all(layer.state is State.READY for layer in cache.layers)  # the last step's windows were read too


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
    cache = CompressedCache(model, SPEC)  # fills the cache (the model stays on sdpa)
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
