"""Generation features with a CompressedCache: beams, sampling, left padding, assisted
generation (crop), reuse of one compressed prompt, the text-generation pipeline, dtypes, CUDA.

Tiny random models from `tiny_models` (Llama for full attention, Gemma 3 for sliding-window
layers); the pipeline test uses the embedded SmolLM2 (it needs a real tokenizer). Every test
runs the models on kvcompress's attention (the `fast_attention` fixture, as after
`kvcompress.enable_fast_attention` in the README's first example), so decode steps read the
codes chunk by chunk and the guard against window-only attention is live throughout.
"""

import functools

import pytest
import torch
from transformers import DynamicCache

from kvcompress import CompressedCache
from tiny_models import (ARCHITECTURES, NO_COMPRESSION, SEEDS, VOCAB, assert_same_greedy, prompt, quant_spec,
                         tiny_llama)

PROMPT = 100
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
# Prompt seeds whose greedy continuations have clear top-1 margins (checked by assert_same_greedy).
REPETITIVE_SEED = {"llama": 3, "gemma3": 0}
PADDED_SEED = {"llama": 6, "gemma3": 9}
SUFFIX_SEEDS = {"llama": (3, 4), "gemma3": (4, 5)}


@functools.cache
def model_for(arch: str):
    return ARCHITECTURES[arch](seed=SEEDS[arch])


# ---- beam search --------------------------------------------------------------------------

BEAMS = dict(num_beams=3, num_return_sequences=3, max_new_tokens=12, do_sample=False, early_stopping=True,
             return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_beam_search_at_int8_gives_the_uncompressed_beams(arch, fast_attention):
    model, ids = fast_attention(model_for(arch)), prompt(PROMPT)
    exact = model.generate(ids, past_key_values=DynamicCache(config=model.config), **BEAMS)
    int8 = model.generate(ids, past_key_values=CompressedCache(model, quant_spec(8)), **BEAMS)
    assert torch.equal(exact.sequences, int8.sequences)
    max_diff = (exact.sequences_scores - int8.sequences_scores).abs().max().item()
    assert max_diff < 1e-3, f"beam scores: max_diff={max_diff:.3g}"


def spy_on_reorder(cache: CompressedCache) -> list[torch.Tensor]:
    """Wrap `cache.reorder_cache` to check, at every call, that the stored codes themselves moved."""
    calls, original = [], cache.reorder_cache

    def reorder(beam_idx):
        before = [(layer.stored_keys or {}).get("codes") for layer in cache.layers]
        before_values = [(layer.stored_values or {}).get("codes") for layer in cache.layers]
        original(beam_idx)
        for layer, k_codes, v_codes in zip(cache.layers, before, before_values):
            if k_codes is not None:
                assert torch.equal(layer.stored_keys["codes"], k_codes[beam_idx])
                assert torch.equal(layer.stored_values["codes"], v_codes[beam_idx])
        calls.append((beam_idx.clone(), sum(k is not None for k in before)))

    cache.reorder_cache = reorder
    return calls


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_beam_search_at_int4_reorders_the_compressed_storage(arch, fast_attention):
    model = fast_attention(model_for(arch))
    cache = CompressedCache(model, quant_spec(4))
    calls = spy_on_reorder(cache)
    out = model.generate(prompt(PROMPT), past_key_values=cache, **BEAMS)
    assert out.sequences.shape == (3, PROMPT + 12)
    moved = [(idx, n_layers) for idx, n_layers in calls if not torch.equal(idx, torch.arange(len(idx)))]
    assert moved, "beam search never changed the order of the beams"
    assert all(n_layers > 0 for _, n_layers in moved), "reordered while nothing was compressed"


# ---- sampling, left padding ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_sampling(arch, fast_attention):
    model, ids = fast_attention(model_for(arch)), prompt(PROMPT)
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=20, temperature=1.5)
    torch.manual_seed(0)
    exact = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    torch.manual_seed(0)
    same = model.generate(ids, past_key_values=CompressedCache(model, NO_COMPRESSION), **kwargs)
    assert torch.equal(exact, same), "sampling through the cache's bookkeeping changed the draws"
    torch.manual_seed(0)
    cache = CompressedCache(model, quant_spec(2))
    sampled = model.generate(ids, past_key_values=cache, **kwargs)
    assert sampled.shape == (1, PROMPT + 16) and int(sampled.max()) < VOCAB
    assert cache.get_seq_length() == PROMPT + 15 and cache.layers[0].n_compressed > 0


def left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, max_len) ids left-padded with 0 and their attention mask."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = prompt(n, seed=seed * len(lengths) + row)
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_batch_with_left_padding(arch, fast_attention):
    model = fast_attention(model_for(arch))
    ids, mask = left_padded([PROMPT, 70], PADDED_SEED[arch])
    kwargs = dict(attention_mask=mask, max_new_tokens=16, **GREEDY)
    exact = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    same = model.generate(ids, past_key_values=CompressedCache(model, NO_COMPRESSION), **kwargs)
    assert torch.equal(exact.sequences, same.sequences)
    cache = CompressedCache(model, quant_spec(8))
    int8 = model.generate(ids, past_key_values=cache, **kwargs)
    assert cache.batch_size == 2 and all(layer.n_compressed > 0 for layer in cache.layers)
    assert_same_greedy(exact, int8, f"{arch} left-padded batch")


# ---- assisted generation: crop ------------------------------------------------------------

def spy_on_crop(cache: CompressedCache) -> list[int]:
    calls, original = [], cache.crop

    def crop(tokens_to_remove):
        calls.append(tokens_to_remove)
        return original(tokens_to_remove)

    cache.crop = crop
    return calls


def repetitive_prompt(n: int, seed: int) -> torch.Tensor:
    """A prompt made of a repeated 10-token phrase, so that prompt lookup finds candidates."""
    return prompt(10, seed=seed).repeat(1, n // 10 + 1)[:, :n]


@pytest.mark.parametrize("arch, assistant", [("llama", "prompt_lookup"), ("llama", "assistant_model"),
                                             ("gemma3", "prompt_lookup")])
@torch.no_grad()
def test_assisted_generation_crops_the_compressed_cache(arch, assistant, fast_attention):
    model, ids = fast_attention(model_for(arch)), repetitive_prompt(PROMPT, REPETITIVE_SEED[arch])
    exact = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=24, **GREEDY)
    plain = model.generate(ids, past_key_values=CompressedCache(model, quant_spec(8)), max_new_tokens=24, **GREEDY)
    assert_same_greedy(exact, plain, f"{arch} int8 without assistance")
    cache = CompressedCache(model, quant_spec(8))
    crops = spy_on_crop(cache)
    if assistant == "prompt_lookup":
        kwargs = dict(prompt_lookup_num_tokens=4)
    else:
        kwargs = dict(assistant_model=tiny_llama(seed=1), num_assistant_tokens=4)
    assisted = model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False, **kwargs)
    assert torch.equal(assisted, exact.sequences)
    assert any(n < 0 for n in crops), f"no rejected candidate was cropped (crop calls: {crops})"
    assert cache.get_seq_length() == PROMPT + 23


# ---- one compressed prompt, several continuations ------------------------------------------

def snapshot(cache: CompressedCache) -> list[torch.Tensor]:
    tensors = []
    for layer in cache.layers:
        tensors += [layer.sink_keys, layer.window_keys, layer.window_values]
        for stored in (layer.stored_keys or {}, layer.stored_values or {}):
            tensors += list(stored.values())
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_one_compressed_prompt_serves_several_continuations(arch, fast_attention):
    model, ids = fast_attention(model_for(arch)), prompt(PROMPT)
    cache = CompressedCache(model, quant_spec(8))
    model(ids, cache=cache)
    before, length = snapshot(cache), cache.get_seq_length()
    outputs = []
    for seed in SUFFIX_SEEDS[arch]:
        full = torch.cat([ids, prompt(8, seed=seed)], dim=1)
        fork = cache.copy()
        assert fork.layers[0].key_codec is cache.layers[0].key_codec  # immutable parts are shared
        assert fork.layers[0].window_keys.data_ptr() != cache.layers[0].window_keys.data_ptr()
        out = model.generate(full, past_key_values=fork, max_new_tokens=8, **GREEDY)
        exact = model.generate(full, past_key_values=DynamicCache(config=model.config), max_new_tokens=8, **GREEDY)
        assert_same_greedy(exact, out, f"{arch} continuation {seed}")
        outputs.append(out.sequences)
    assert not torch.equal(outputs[0], outputs[1])
    assert cache.get_seq_length() == length
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(cache))), "a continuation changed the original"


@torch.no_grad()
def test_forked_prompt_cache_expanded_for_beam_search(fast_attention):
    model, ids = fast_attention(model_for("llama")), prompt(PROMPT)
    cache, plain = CompressedCache(model, quant_spec(8)), DynamicCache(config=model.config)
    model(ids[:, :-1], cache=cache)
    model(ids[:, :-1], cache=plain)
    fork = cache.copy()
    fork.batch_repeat_interleave(3)  # generate does not expand a cache it is given
    plain.batch_repeat_interleave(3)
    assert fork.batch_size == 3 and cache.batch_size == 1
    assert torch.equal(fork.layers[0].stored_keys["codes"][2], cache.layers[0].stored_keys["codes"][0])
    exact = model.generate(ids, past_key_values=plain, **BEAMS)
    int8 = model.generate(ids, past_key_values=fork, **BEAMS)
    assert torch.equal(exact.sequences, int8.sequences)


# ---- pipeline --------------------------------------------------------------------------------

@pytest.mark.real_model
@torch.no_grad()
def test_text_generation_pipeline_passes_the_cache(real_model, fast_attention):
    from transformers import pipeline

    model, tokenizer = real_model
    fast_attention(model)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = ("The quick brown fox jumps over the lazy dog. " * 6).strip()
    kwargs = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    exact = pipe(text, **kwargs)[0]["generated_text"]
    cache = CompressedCache(model, quant_spec(8))
    compressed = pipe(text, cache=cache, **kwargs)[0]["generated_text"]
    n_prompt = len(tokenizer(text)["input_ids"])
    assert cache.get_seq_length() == n_prompt + 7, "the pipeline did not use the cache it was given"
    assert all(layer.n_compressed > 0 for layer in cache.layers)
    assert compressed == exact


# ---- dtypes and devices -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
@torch.no_grad()
def test_half_precision_models(arch, dtype, fast_attention):
    model, ids = ARCHITECTURES[arch](seed=SEEDS[arch], dtype=dtype), prompt(60)
    kwargs = dict(max_new_tokens=4, **GREEDY)
    exact = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    same = model.generate(ids, past_key_values=CompressedCache(model, NO_COMPRESSION), **kwargs)  # sdpa: bit-exact
    assert all(torch.equal(a, b) for a, b in zip(exact.logits, same.logits))
    fast_attention(model)
    cache = CompressedCache(model, quant_spec(4))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 60 + 4)
    for layer in cache.layers:
        keys, values = layer.reconstruct()
        assert keys.dtype == values.dtype == dtype and layer.n_compressed > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_cuda_cache_follows_the_model(arch, fast_attention):
    model = ARCHITECTURES[arch](seed=SEEDS[arch]).to("cuda")  # its own copy: the CPU one is shared
    ids = prompt(PROMPT).to("cuda")
    exact = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=16, **GREEDY)
    same = model.generate(ids, past_key_values=CompressedCache(model, NO_COMPRESSION), max_new_tokens=16, **GREEDY)
    assert torch.equal(exact.sequences, same.sequences)  # on sdpa: the reconstruction, bit-exact
    fast_attention(model)
    cache = CompressedCache(model, quant_spec(8))
    int8 = model.generate(ids, past_key_values=cache, max_new_tokens=16, **GREEDY)
    assert_same_greedy(exact, int8, f"{arch} on CUDA")
    for layer in cache.layers:
        assert all(t.device.type == "cuda" for t in (layer.window_keys, *layer.stored_keys.values()))
