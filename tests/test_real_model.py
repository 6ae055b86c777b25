"""The core cache on the embedded SmolLM2-135M-Instruct: real behaviour, not just mechanics."""

import pytest
import torch

from kvcompress import CompressedCache
from kvcompress.corpus import corpus_tokens
from kvcompress.measure.evaluate import decode_faithful_eval

pytestmark = pytest.mark.real_model

SMALL_WINDOW = {"window": 32, "sinks": 4, "block_size": 32}


@torch.no_grad()
def test_int8_top1_agreement_over_256_decoded_positions(real_model):
    model, tokenizer = real_model
    tokens = corpus_tokens(tokenizer, "report", n_tokens=292)
    # With a 32-token window, 256 of the positions read int8-compressed keys and values.
    result = decode_faithful_eval(model, tokens, {"name": "int8", **SMALL_WINDOW,
                                                  "key": {"bits": 8, "axis": "channel"},
                                                  "value": {"bits": 8, "axis": "token"}}, progress=False)
    assert result.compressed_tokens >= 224
    assert result.top1 >= 0.99, f"int8 top-1 agreement {result.top1:.4f} (KL {result.kl:.2e})"
    assert result.max_logit_diff > 0  # it really read compressed states


@pytest.mark.parametrize("attention", ["sdpa", "kvcompress"])  # full reconstruction / codes chunk by chunk
@torch.no_grad()
def test_int2_read_path_on_the_real_model(real_model, attention, fast_attention):
    model, tokenizer = real_model
    if attention == "kvcompress":
        fast_attention(model)
    tokens = corpus_tokens(tokenizer, "report", n_tokens=101)
    cache = CompressedCache(model, {"name": "int2", **SMALL_WINDOW, "key": {"bits": 2, "axis": "channel"},
                                    "value": {"bits": 2, "axis": "token"}})
    model(tokens[:, :-1], cache=cache)
    assert cache.layers[0].n_compressed == 64
    from transformers import DynamicCache

    reference = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        reference.update(*layer.reconstruct(), idx)
    compressed = model(tokens[:, -1:], cache=cache).logits
    fed = model(tokens[:, -1:], cache=reference).logits
    exact = model(tokens).logits[:, -1:]
    assert (compressed - fed).abs().max().item() < 1e-4
    assert (compressed - exact).abs().max().item() > 1e-2


@torch.no_grad()
def test_batched_left_padded_generate_equals_single_runs_at_int8(real_model, fast_attention):
    model, tokenizer = real_model
    fast_attention(model)
    prompts = ["The quick brown fox jumps over the lazy dog. In Python, a list comprehension",
               "Exceptions are raised when"]
    spec = {"name": "int8", "window": 8, "sinks": 4, "block_size": 32,
            "key": {"bits": 8, "axis": "channel"}, "value": {"bits": 8, "axis": "token"}}
    kwargs = dict(max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    singles = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, past_key_values=CompressedCache(model, spec), **kwargs)
        singles.append(out[0, enc.input_ids.shape[1]:])
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    cache = CompressedCache(model, spec)
    batched = model.generate(**enc, past_key_values=cache, **kwargs)[:, enc.input_ids.shape[1]:]
    assert cache.layers[0].n_compressed > 0, "the test must reach the compressed region"
    for row, single in zip(batched, singles):
        assert torch.equal(row[: single.shape[0]], single)
