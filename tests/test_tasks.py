"""Offline tasks: passkey prompts, passkey on the embedded model, generation agreement, dataset hook."""

import sys
import types

import pytest
import torch

from kvcompress import CompressedCache
from kvcompress.measure.tasks import (TaskDataError, agreement_prompts, dataset_texts, generation_agreement,
                              greedy_continuations, passkey_cases, run_passkey)
from tiny_text import CharTokenizer


def test_passkey_prompts_have_exact_lengths_and_hide_the_key_at_the_depth():
    tok = CharTokenizer()
    filler = "Lorem ipsum dolor sit amet. " * 400
    cases = passkey_cases(tok, lengths=(300, 600), depths=(0.1, 0.9), seed=1, filler_text=filler)
    assert [(c.length, c.depth) for c in cases] == [(300, 0.1), (300, 0.9), (600, 0.1), (600, 0.9)]
    assert all(c.input_ids.shape == (1, c.length) for c in cases)
    assert len({c.key for c in cases}) == 4 and all(len(c.key) == 5 and c.key.isdigit() for c in cases)
    for case in cases:
        needle = tok(f" The pass key is {case.key}.")["input_ids"]
        ids = case.input_ids[0].tolist()
        at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
        # The needle sits at `depth` of the filler, which lies between the instruction and the question.
        assert (at / case.length < 0.5) == (case.depth < 0.5), (at, case.length, case.depth)
    again = passkey_cases(tok, lengths=(300, 600), depths=(0.1, 0.9), seed=1, filler_text=filler)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(cases, again))
    with pytest.raises(ValueError, match="depths"):
        passkey_cases(tok, lengths=(300,), depths=(1.5,), filler_text=filler)
    with pytest.raises(ValueError, match="no room"):
        passkey_cases(tok, lengths=(60,), filler_text=filler)


@pytest.mark.real_model
def test_uncompressed_embedded_model_finds_the_key_at_short_lengths(real_model):
    model, tokenizer = real_model
    cases = passkey_cases(tokenizer, lengths=(256,), depths=(0.1, 0.5, 0.9))
    result = run_passkey(model, tokenizer, cases)
    assert result["by_length"] == {"256": 1.0}, result["cases"]
    assert all(c["answer"].strip().startswith(c["key"]) for c in result["cases"])


def test_generation_agreement_counts_matching_prefixes():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]]
    cand = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9]]
    got = generation_agreement(ref, cand)
    assert got["prefix_lengths"] == [4, 2, 0]
    assert got["mean_prefix"] == pytest.approx(2.0)
    assert got["mean_prefix_fraction"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["exact_match_rate"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        generation_agreement(ref, cand[:2])


def test_agreement_through_the_compressed_cache(tiny_llama):
    tok = CharTokenizer()
    prompts = agreement_prompts(tok, n_prompts=2, prompt_tokens=80, text="abcdefghij klmnop. " * 50)
    assert [p.shape for p in prompts] == [(1, 80), (1, 80)]
    reference = greedy_continuations(tiny_llama, prompts, max_new_tokens=12)
    spec = {"key": {"method": "none"}, "value": {"method": "none"}, "window": 16, "sinks": 4}
    same = greedy_continuations(tiny_llama, prompts, 12, cache_factory=lambda: CompressedCache(tiny_llama, spec))
    assert generation_agreement(reference, same)["exact_match_rate"] == 1.0
    assert all(len(c) == 12 for c in reference)
    assert tiny_llama.config._attn_implementation == "sdpa"  # generation restored the model as it found it


def test_named_dataset_without_the_library_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(TaskDataError, match="not installed"):
        dataset_texts("wikitext", config="wikitext-2-raw-v1")


def test_named_dataset_offline_says_so(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(TaskDataError, match="hub access"):
        dataset_texts("wikitext")


def test_passkey_reports_whether_eviction_kept_the_needle(tiny_llama, fast_attention):
    """Streaming (sinks + recent) at a quarter of the prompt drops a needle at depth 0.5; keeping all keeps it."""
    tok = CharTokenizer()
    case = passkey_cases(tok, lengths=(400,), depths=(0.5,), seed=2, filler_text="Lorem ipsum dolor sit amet. " * 40)[0]
    start, stop = case.needle
    needle_text = f" The pass key is {case.key}. Remember it. {case.key} is the pass key. "
    assert case.input_ids[0, start:stop].tolist() == tok(needle_text)["input_ids"]
    model = fast_attention(tiny_llama)

    def spec(keep):
        return {"key": {"method": "none"}, "value": {"method": "none"}, "window": 16, "sinks": 4, "block_size": 32,
                "eviction": {"policy": "streaming", "keep": keep}}

    assert stop < 400 - 100  # the needle lies before the last quarter of the prompt, which streaming keeps
    dropped = run_passkey(model, tok, [case], lambda: CompressedCache(model, spec(0.25)), max_new_tokens=2)
    kept = run_passkey(model, tok, [case], lambda: CompressedCache(model, spec(1.0)), max_new_tokens=2)
    assert dropped["needle_kept"] == 0.0 and dropped["cases"][0]["needle_kept"] == 0.0
    assert kept["needle_kept"] == 1.0
    assert "needle_kept" not in run_passkey(model, tok, [case], lambda: CompressedCache(model, "int4"),
                                            max_new_tokens=2)
