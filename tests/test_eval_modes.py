"""Decode-faithful evaluation: chunked equals token-by-token, a cache that does not serve its
stored codes is caught, and the model leaves the evaluation as it entered it."""

import pytest
import torch

from conftest import make_tiny_llama
from kvcompress import CompressedCache, CompressedLayer
from kvcompress.cache import attention as attention_module
from kvcompress.cache.attention import ATTENTION_NAME
from kvcompress.measure.evaluate import decode_faithful_eval

TINY_SPEC = {"key": {"bits": 2, "axis": "channel", "group_size": 32},
             "value": {"bits": 2, "axis": "token", "group_size": 32}, "window": 16, "sinks": 4, "block_size": 32}
# Small blocks so a few real tokens already cross several flushes. 8 bits: chunked and
# token-by-token forwards differ by float rounding (~1e-6), and such a difference can flip a
# code. With 4-bit codes one flip moved the PPL by 1.6e-4 on one CPU (2e-6 on another); at 8
# bits a flip moves it by ~2e-6.
REAL_SPEC = {"key": {"bits": 8, "axis": "token", "group_size": 32},
             "value": {"bits": 8, "axis": "token", "group_size": 32}, "window": 8, "sinks": 2, "block_size": 8}


def assert_modes_agree(model, ids, spec):
    chunked = decode_faithful_eval(model, ids, spec, progress=False)
    token = decode_faithful_eval(model, ids, spec, mode="token", progress=False)
    assert chunked.chunks < token.chunks == ids.shape[1]
    assert chunked.compressed_tokens == token.compressed_tokens > 0
    for name in ("ppl", "ppl_baseline"):
        a, b = getattr(chunked, name), getattr(token, name)
        assert abs(a - b) / b < 1e-4, f"{name}: chunked {a} vs token {b} (rel diff {abs(a - b) / b:.3g})"
    assert abs(chunked.kl - token.kl) < 1e-4 + 1e-3 * token.kl
    assert chunked.ppl != chunked.ppl_baseline, "a lossy cache must change the perplexity"


def test_chunked_equals_token_by_token_tiny(tiny_llama):
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(3))
    assert_modes_agree(tiny_llama, ids, TINY_SPEC)


@pytest.mark.real_model
def test_chunked_equals_token_by_token_real(real_model):
    from kvcompress.corpus import corpus_tokens

    model, tokenizer = real_model
    assert_modes_agree(model, corpus_tokens(tokenizer, "report", n_tokens=24), REAL_SPEC)


def test_baseline_store_reuses_the_uncompressed_run(tiny_llama):
    ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(4))
    store = {}
    first = decode_faithful_eval(tiny_llama, ids, TINY_SPEC, progress=False, baseline_store=store)
    assert len(store) == 1
    again = decode_faithful_eval(tiny_llama, ids, TINY_SPEC, progress=False, baseline_store=store)
    fresh = decode_faithful_eval(tiny_llama, ids, TINY_SPEC, progress=False)
    assert again.ppl_baseline == first.ppl_baseline == fresh.ppl_baseline
    assert again.kl == fresh.kl and again.ppl == fresh.ppl


class BypassLayer(CompressedLayer):
    """The read-path bug: stores codes like a CompressedLayer but serves a hidden full-precision copy."""

    def update(self, key_states, value_states, *args, **kwargs):
        keys = torch.cat([self._shadow[0], key_states], 2) if hasattr(self, "_shadow") else key_states
        values = torch.cat([self._shadow[1], value_states], 2) if hasattr(self, "_shadow") else value_states
        self._shadow = (keys, values)
        super().update(key_states, value_states, *args, **kwargs)  # codes are stored...
        return keys, values  # ...but never read


def bypass_cache(model, spec):
    cache = CompressedCache(model, spec)
    for layer in cache.layers:
        layer.__class__ = BypassLayer
    return cache


def test_evaluation_fails_loudly_when_attention_does_not_read_the_codes(tiny_llama):
    ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(5))
    honest = decode_faithful_eval(tiny_llama, ids, TINY_SPEC, progress=False)
    assert honest.max_logit_diff > 1e-3
    with pytest.raises(RuntimeError, match="not reading the compressed"):
        decode_faithful_eval(tiny_llama, ids, TINY_SPEC, progress=False, cache_factory=bypass_cache)


def test_evaluation_reads_the_codes_and_leaves_the_model_as_it_found_it(tiny_llama, monkeypatch, fast_attention):
    reads = []
    original = attention_module.attend  # the decode step over the codes: the CPU kernel or the torch path
    monkeypatch.setattr(attention_module, "attend",
                        lambda layer, *args: reads.append(layer.layer_idx) or original(layer, *args))
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(6))
    assert tiny_llama.config._attn_implementation == "sdpa"
    decode_faithful_eval(tiny_llama, ids, TINY_SPEC, mode="token", progress=False)
    # Token t (0-based) finds t + 1 tokens held; the first block is compressed once sinks 4 +
    # window 16 + block 32 = 52 are held, so the steps of tokens 51..59 read the codes in both
    # layers, as evaluations always have; the model is back on sdpa afterwards.
    assert len(reads) == 9 * 2
    assert tiny_llama.config._attn_implementation == "sdpa"
    eager = make_tiny_llama()
    eager.set_attn_implementation("eager")  # a model kvcompress's attention cannot replace
    reads.clear()
    decode_faithful_eval(eager, ids, TINY_SPEC, mode="token", progress=False)
    assert not reads and eager.config._attn_implementation == "eager"
    fast_attention(tiny_llama)  # switched by its user: stays switched
    decode_faithful_eval(tiny_llama, ids, TINY_SPEC, progress=False)
    assert tiny_llama.config._attn_implementation == ATTENTION_NAME
