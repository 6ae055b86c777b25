"""Token eviction composed with the codecs: evicted tokens are not stored and not read, kept
tokens keep their positions, memory counts only what is kept, and bad specs are refused.

The reference for "attention reads exactly the kept tokens" is transformers' own DynamicCache
filled with the kept keys and values (each KV head its own tokens, as the layer holds them),
then fed the next tokens one at a time at their true positions (`position_ids`): no kvcompress
code runs in the reference's forward passes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcompress import CompressedCache
from kvcompress.cache.eviction import choose_kept, kept_count
from kvcompress.rope import RopeInverter, find_rotary_emb
from kvcompress.spec import CacheSpec, EvictionSpec
from tiny_models import tiny_gemma3, tiny_mistral

N_PROMPT = 96
N_NEXT = 8
FULL = {"method": "none"}


def _spec(policy="tova", keep=0.5, key=FULL, value=FULL, **extra) -> dict:
    return {"key": key, "value": value, "window": 16, "sinks": 4, "block_size": 16,
            "eviction": {"policy": policy, "keep": keep, **extra}}


def _ids(n=N_PROMPT + N_NEXT, seed=0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _prefill(model, spec, ids):
    cache = CompressedCache(model, spec)
    model(ids[:, :N_PROMPT], cache=cache)
    return cache


@torch.no_grad()
def _uncompressed_prompt(model, ids) -> DynamicCache:
    full = DynamicCache(config=model.config)
    model(ids[:, :N_PROMPT], cache=full)
    return full


def _kept_positions(layer_keys: torch.Tensor, full_keys: torch.Tensor) -> torch.Tensor:
    """(B, H, n_kept) prompt positions of held keys, found by matching them to the uncompressed prompt's keys."""
    distance = torch.cdist(layer_keys[0].float(), full_keys[0].float())  # (H, n_kept, n)
    assert distance.min(-1).values.max() < 1e-2, "every held key is one of the prompt's keys"
    return distance.argmin(-1)[None]


@pytest.mark.parametrize("policy", ["tova", "snapkv", "expected", "streaming", "knorm"])
def test_attention_reads_exactly_the_kept_tokens(tiny_llama, fast_attention, policy):
    model = fast_attention(tiny_llama)
    ids = _ids()
    cache = _prefill(model, _spec(policy), ids)
    full = _uncompressed_prompt(model, ids)
    reference = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.reconstruct()
        assert layer.held_tokens() < N_PROMPT and layer.get_seq_length() == N_PROMPT
        kept = _kept_positions(keys, full.layers[idx].keys)
        assert (kept.diff(dim=-1) > 0).all(), "kept tokens stay in prompt order"
        assert (kept[..., :4] == torch.arange(4)).all() and (kept[..., -16:] == torch.arange(80, 96)).all()
        reference.update(keys, values, idx)
    with torch.no_grad():
        # Several new tokens in one forward: the mask must give them their true positions (causal among them).
        logits = model(ids[:, N_PROMPT:], cache=cache).logits
        expected = torch.cat([model(ids[:, N_PROMPT + j:N_PROMPT + j + 1], cache=reference,
                                    position_ids=torch.tensor([[N_PROMPT + j]])).logits for j in range(N_NEXT)], 1)
        uncompressed = model(ids, cache=DynamicCache(config=model.config)).logits[:, N_PROMPT:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert (logits - uncompressed).abs().max() > 1e-3, "dropping half the prompt changes the output"


def test_decode_steps_read_kept_compressed_tokens(tiny_llama, fast_attention):
    """int4 codecs on the kept tokens: decode steps through kvcompress's attention equal SDPA over
    the layer's own reconstruction (what is stored), one token at a time at the true positions."""
    model = fast_attention(tiny_llama)
    ids = _ids()
    spec = _spec("snapkv", keep=0.6, key={"method": "quant", "bits": 4, "axis": "channel", "group_size": 16},
                 value={"method": "quant", "bits": 4, "axis": "token", "group_size": 16})
    cache = _prefill(model, spec, ids)
    assert all(layer.n_compressed > 0 for layer in cache.layers)
    reference = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        reference.update(*layer.reconstruct(), idx)
    with torch.no_grad():
        for j in range(4):
            token, position = ids[:, N_PROMPT + j:N_PROMPT + j + 1], torch.tensor([[N_PROMPT + j]])
            ours = model(token, cache=cache).logits
            theirs = model(token, cache=reference, position_ids=position).logits
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == N_PROMPT + 4


def test_memory_counts_only_kept_tokens(tiny_llama, fast_attention):
    model = fast_attention(tiny_llama)
    ids = _ids()
    cache = _prefill(model, _spec("tova", keep=0.5), ids)
    config = model.config
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    report = cache.memory_report()
    n_kept = kept_count(EvictionSpec("tova", 0.5), N_PROMPT, sinks=4, protected=16, block_size=16)
    for layer, memory in zip(cache.layers, report.layers):
        assert memory.tokens == n_kept and memory.seen_tokens == N_PROMPT
        # Method "none" keeps compressed tokens in the model dtype (fp32), like the sinks and the window.
        stored = 2 * kv_heads * head_dim * n_kept * 4
        assert memory.stored_bytes == stored
        assert memory.fp16_bytes == 2 * kv_heads * N_PROMPT * head_dim * 2
    assert report.ratio == pytest.approx(report.fp16_bytes / report.stored_bytes)


def test_pre_rope_keys_are_rotated_at_their_kept_positions(tiny_llama, fast_attention):
    model = fast_attention(tiny_llama)
    ids = _ids()
    spec = _spec("tova", keep=0.5, key={"method": "quant", "bits": 8, "axis": "channel", "group_size": 16,
                                         "key_space": "pre_rope"})
    cache = _prefill(model, spec, ids)
    full = _uncompressed_prompt(model, ids)
    for idx, layer in enumerate(cache.layers):
        assert layer.token_positions is not None
        assert layer.memory().parts["positions"] == layer.token_positions.numel() * 4
        keys, _ = layer.reconstruct()
        positions = layer.token_positions.long()
        original = full.layers[idx].keys.gather(2, positions[..., None].expand(-1, -1, -1, keys.shape[3]))
        error = (keys - original).abs().max()
        scale = original.abs().max()
        assert error < 0.02 * scale, f"layer {idx}: re-rotated keys far from the originals ({error} vs {scale})"
        # The same codes re-rotated at consecutive positions (what a layer ignoring eviction would do) are far off.
        n_sinks = layer.sink_keys.shape[2]
        compressed = slice(n_sinks, n_sinks + layer.n_compressed)
        wrong = layer.key_space.rotate(layer.key_codec.decode(layer.stored_keys, torch.float32), start=n_sinks)
        assert (wrong - original[:, :, compressed]).abs().max() > 10 * error


def test_rope_inverter_tensor_positions_equal_consecutive_ones(tiny_llama):
    inverter = RopeInverter(find_rotary_emb(tiny_llama))
    keys = torch.randn(1, 2, 5, 32, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[[3, 9, 10, 40, 41], [0, 1, 2, 77, 78]]])
    rotated = inverter.rotate(keys, positions)
    for head in range(2):
        for t in range(5):
            one = inverter.rotate(keys[:, head:head + 1, t:t + 1], int(positions[0, head, t]))
            torch.testing.assert_close(rotated[:, head:head + 1, t:t + 1], one)
    torch.testing.assert_close(inverter.unrotate(rotated, positions), keys, atol=1e-5, rtol=1e-5)


def test_generate_with_eviction_keeps_positions(tiny_llama, fast_attention):
    """generate() continues from the true position (tokens seen), not from the tokens held."""
    model = fast_attention(tiny_llama)
    ids = _ids(N_PROMPT)
    cache = CompressedCache(model, _spec("snapkv", keep=0.5))
    out = model.generate(ids, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == N_PROMPT + 5
    assert cache.get_seq_length() == N_PROMPT + 4  # the last generated token is not fed back
    assert cache.layers[0].held_tokens() < cache.get_seq_length()


# ---- policies on hand-made tensors -----------------------------------------------------

def _needle_case(needle: int, n: int = 64, D: int = 8):
    """Keys orthogonal to the queries except the needle's, which every query attends to strongly."""
    keys = torch.zeros(1, 1, n, D)
    keys[..., 1] = torch.linspace(0.1, 1.0, n)  # growing norm, no attention (queries are along dim 0)
    keys[0, 0, needle, 0] = 10.0
    query = torch.zeros(1, 2, n, D)
    query[..., 0] = 1.0
    values = torch.ones(1, 1, n, D)
    return query, keys, values


@pytest.mark.parametrize("policy", ["snapkv", "tova", "expected"])
def test_attention_policies_keep_the_needle(policy):
    query, keys, values = _needle_case(needle=30)
    kept = choose_kept(EvictionSpec(policy, keep_tokens=12, pooling=1), query, keys, values, 1.0,
                       sinks=2, protected=4, block_size=2)
    assert 30 in kept[0, 0].tolist()
    assert kept.shape == (1, 1, 12)


def test_streaming_keeps_sinks_and_most_recent():
    query, keys, values = _needle_case(needle=30)
    kept = choose_kept(EvictionSpec("streaming", keep_tokens=12), query, keys, values, 1.0,
                       sinks=2, protected=4, block_size=2)
    assert kept[0, 0].tolist() == [0, 1] + list(range(54, 64))


def test_knorm_keeps_small_norm_keys():
    query, keys, values = _needle_case(needle=30)
    kept = choose_kept(EvictionSpec("knorm", keep_tokens=10), query, keys, values, 1.0,
                       sinks=2, protected=4, block_size=2)
    assert kept[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 60, 61, 62, 63]


def test_kept_count_is_the_budget_with_sinks_and_window_always_in():
    spec = EvictionSpec("tova", keep=0.2)
    assert kept_count(spec, 1536, sinks=4, protected=128, block_size=32) == 308  # ceil(0.2 * 1536)
    assert kept_count(EvictionSpec("tova", keep=0.01), 1536, sinks=4, protected=128, block_size=32) == 132
    assert kept_count(EvictionSpec("tova", keep=1.0), 100, sinks=4, protected=16, block_size=16) == 100


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("eviction, message", [
    ({"policy": "h2o", "keep": 0.5}, "allowed: ['snapkv', 'tova', 'expected', 'streaming', 'knorm']"),
    ({"policy": "tova", "keep": 0.0}, "fraction in (0, 1]"),
    ({"policy": "tova", "keep": 1.5}, "fraction in (0, 1]"),
    ({"policy": "tova", "keep": 0.5, "keep_tokens": 100}, "exactly one of keep"),
    ({"policy": "tova", "keep": 0.5, "applies": "always"}, "allowed: ['prompt', 'generation']"),
    ({"policy": "snapkv", "keep": 0.5, "pooling": 4}, "pooling must be odd"),
    ({"policy": "tova", "fraction": 0.5}, "allowed: ['policy', 'keep'"),
])
def test_bad_eviction_specs_name_the_allowed_values(eviction, message):
    with pytest.raises(ValueError, match="eviction") as err:
        CacheSpec.from_dict({"eviction": eviction})
    assert message in str(err.value)


def test_spec_round_trip_and_describe():
    spec = CacheSpec.from_dict({**CacheSpec().to_dict(), "eviction": {"policy": "snapkv", "keep_tokens": 300}})
    assert CacheSpec.from_dict(spec.to_dict()) == spec
    assert "evict snapkv keep 300 tokens observing 32" in spec.describe()
    # the observation window is part of the description for the policies that read it (`kvcompress presets`)
    wide = CacheSpec.from_dict({**CacheSpec().to_dict(),
                                "eviction": {"policy": "expected", "keep": 0.5, "observation": 128}})
    assert wide.describe().endswith("evict expected keep 50% observing 128")
    recency = CacheSpec.from_dict({**CacheSpec().to_dict(), "eviction": {"policy": "streaming", "keep": 0.5}})
    assert recency.describe().endswith("evict streaming keep 50%")
    assert "eviction" not in CacheSpec().to_dict()  # specs without eviction serialise as before


def test_prompt_without_kvcompress_attention_is_refused(tiny_llama):
    cache = CompressedCache(tiny_llama, _spec())
    with pytest.raises(ValueError, match="enable_fast_attention"), torch.no_grad():
        tiny_llama(_ids(N_PROMPT), cache=cache)


def test_padded_prompt_is_refused_naming_the_eviction(tiny_llama, fast_attention):
    model = fast_attention(tiny_llama)
    ids = _ids(N_PROMPT).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # left padding: the last query of row 1 does not see every prompt token
    with pytest.raises(ValueError, match=r"layer 0: eviction \(evict tova keep 50%\) needs prompts without padding"):
        with torch.no_grad():
            model(ids, cache=CompressedCache(model, _spec()), attention_mask=mask)


def test_only_sliding_layers_is_refused():
    model = tiny_mistral(sliding_window=32)
    with pytest.raises(ValueError, match="only sliding-window layers"):
        CompressedCache(model, _spec())


def test_gemma3_evicts_full_layers_only(fast_attention):
    model = fast_attention(tiny_gemma3())
    ids = _ids(N_PROMPT)
    cache = CompressedCache(model, _spec("tova"))
    with torch.no_grad():
        model(ids, cache=cache)
        model(_ids(4, seed=3), cache=cache)
    for layer in cache.layers:
        if layer.is_sliding:  # keeps its window as transformers does, nothing evicted by the policy
            assert layer.evictor is None and layer.held_tokens() == min(N_PROMPT + 4, layer.sliding_window - 1)
        else:
            assert layer.held_tokens() < layer.get_seq_length() == N_PROMPT + 4


# ---- eviction during generation ----------------------------------------------------------

@pytest.mark.parametrize("key", [FULL, {"method": "quant", "bits": 8, "axis": "channel", "group_size": 16,
                                        "key_space": "pre_rope"}])
def test_generation_eviction_keeps_a_fraction_and_attention_reads_exactly_it(tiny_llama, fast_attention, key):
    model = fast_attention(tiny_llama)
    n_decode = 96
    ids = _ids(N_PROMPT + n_decode + 2)
    spec = _spec("tova", keep=0.5, key=key, applies="generation")
    cache = _prefill(model, spec, ids)
    held_after_prompt = cache.layers[0].held_tokens()
    with torch.no_grad():
        for j in range(N_PROMPT, N_PROMPT + n_decode):  # one token at a time, as generation does
            model(ids[:, j:j + 1], cache=cache)
    for layer in cache.layers:
        assert layer.get_seq_length() == N_PROMPT + n_decode
        # Of 96 generated tokens, 80 left the 16-token window: two whole 32-token spans, each keeping 16.
        assert layer.held_tokens() == held_after_prompt + n_decode - 2 * 16
    reference = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        reference.update(*layer.reconstruct(), idx)
    with torch.no_grad():
        for j in range(N_PROMPT + n_decode, N_PROMPT + n_decode + 2):
            ours = model(ids[:, j:j + 1], cache=cache).logits
            theirs = model(ids[:, j:j + 1], cache=reference, position_ids=torch.tensor([[j]])).logits
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_generation_eviction_with_streaming_keeps_the_most_recent_of_each_span(tiny_llama, fast_attention):
    model = fast_attention(tiny_llama)
    ids = _ids(N_PROMPT + 64)
    cache = _prefill(model, _spec("streaming", keep=0.5, applies="generation"), ids)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=full)
        model(ids[:, N_PROMPT:], cache=cache)  # 64 new tokens in one forward: one 32-token span leaves the window
    layer = cache.layers[0]
    keys, _ = layer.reconstruct()
    positions = _kept_positions(keys, full.layers[0].keys)[0, 0].tolist()
    prompt_kept = [p for p in positions if p < N_PROMPT]
    assert prompt_kept == [0, 1, 2, 3] + list(range(N_PROMPT - 44, N_PROMPT))  # streaming kept 48 of the prompt
    new = [p for p in positions if p >= N_PROMPT]
    # The 48 new tokens before the window form one span (32) + 16 waiting; of the span the last 16 stay.
    assert new == list(range(N_PROMPT + 16, N_PROMPT + 64))


def test_generation_eviction_needs_a_fraction():
    with pytest.raises(ValueError, match="give keep"):
        EvictionSpec("tova", keep_tokens=100, applies="generation")


def test_spec_names_with_eviction():
    from kvcompress import load_spec

    spec = load_spec("int4@snapkv:0.5")
    assert spec.key == load_spec("int4").key and spec.eviction == EvictionSpec("snapkv", keep=0.5)
    assert load_spec("none@tova:300").eviction == EvictionSpec("tova", keep_tokens=300)
    with pytest.raises(ValueError, match="allowed: \\['snapkv'"):
        load_spec("int4@h2o:0.5")
    with pytest.raises(ValueError, match="POLICY:KEEP"):
        load_spec("int4@snapkv")
    with pytest.raises(ValueError, match="POLICY:KEEP"):
        load_spec("int4@snapkv:2.5")


def test_generate_command_runs_eviction_specs(tmp_path):
    """`kvcompress generate` runs kvcompress's attention (the prompt's queries reach the cache) and
    puts the model back as it found it."""
    import json

    from kvcompress.generate import GenerateSettings, generate_file
    from tiny_loader import tiny_llama_loader

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "long", "prompt": "Lorem ipsum dolor sit amet. " * 6}) + "\n")
    model, tokenizer = tiny_llama_loader(None)
    settings = GenerateSettings(spec="int8@snapkv:0.5", max_new_tokens=4)
    generate_file(prompts, tmp_path / "out.jsonl", settings, loader=lambda _settings: (model, tokenizer))
    line = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert line["status"] == "ok", line
    assert line["prompt_tokens"] == 168 and line["ratio"] > 0
    assert model.config._attn_implementation == "sdpa"


def test_eviction_on_a_model_kvcompress_attention_cannot_run_is_refused():
    from tiny_models import tiny_llama as build_llama

    model = build_llama()
    with pytest.raises(ValueError, match="needs the model itself"):
        CompressedCache(model.config, _spec())
    model.config.model_type = "someothermodel"  # a type whose attention kvcompress does not know
    with pytest.raises(ValueError, match="needs kvcompress's attention, which runs on model types"):
        CompressedCache(model, _spec())


def test_evaluations_refuse_eviction_figures_that_would_say_nothing(tiny_llama):
    """Decode-faithful chunks never form a prompt to evict; a context too short to evict anything
    gives the baseline's figures. Both are refused rather than reported under the spec's name."""
    from kvcompress.measure.evaluate import NothingCompressedError, decode_faithful_eval
    from kvcompress.measure.prompt import prompt_eval

    ids = _ids(200)
    with pytest.raises(ValueError, match="--context N"):
        decode_faithful_eval(tiny_llama, ids, _spec("tova"), progress=False)
    short = {**_spec("tova"), "window": 64}  # a 40-token context fits in sinks + window: nothing is dropped
    with pytest.raises(NothingCompressedError, match="compressed or dropped no token"):
        prompt_eval(tiny_llama, ids[:, :80], short, 40, progress=False)
