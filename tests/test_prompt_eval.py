"""Prompt-compression evaluation (`kvcompress eval --context N`): its figures come from reading the
compressed cache, its ratios from the bytes the cache holds, and its command line refuses bad
counts in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvcompress import CompressedCache, enable_fast_attention
from kvcompress.cli import eval as eval_cli
from kvcompress.cli.main import main
from kvcompress.experiments.settings import SweepSettings
from kvcompress.experiments.sweep import run_sweep
from kvcompress.experiments.grid import load_grid
from kvcompress.measure.evaluate import NothingCompressedError
from kvcompress.measure.prompt import min_context_tokens, prompt_eval
from kvcompress.presets import load_spec
from test_eval_modes import bypass_cache
from tiny_models import tiny_gemma3
from tiny_text import CharTokenizer

SPEC = {"key": {"bits": 2, "axis": "channel", "group_size": 32},
        "value": {"bits": 2, "axis": "token", "group_size": 32}, "window": 16, "sinks": 4, "block_size": 32}
CONTEXT, TOKENS = 100, 45  # 45: a last chunk of 13 after one of 32
EVICT = dict(SPEC, eviction={"policy": "snapkv", "keep": 0.6})  # keeps 60 of the 100 context tokens, 32 compressed


def text_ids(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def hand_loop(model, ids, cache, context, tokens, chunk=32):
    """The protocol written out: prefill, then chunks with explicit true positions; logits of the continuation."""
    out = []
    with torch.no_grad(), enable_fast_attention(model, strict=False):
        model(input_ids=ids[:, :context], cache=cache, position_ids=torch.arange(context)[None])
        for start in range(context, context + tokens, chunk):
            stop = min(start + chunk, context + tokens)
            out.append(model(input_ids=ids[:, start:stop], cache=cache,
                             position_ids=torch.arange(start, stop)[None]).logits[0].float())
    return torch.cat(out)


@pytest.mark.parametrize("spec", [SPEC, EVICT], ids=["int2", "int2+evict"])
def test_figures_are_those_of_a_hand_written_loop_over_the_compressed_cache(tiny_llama, spec):
    ids = text_ids(CONTEXT + TOKENS + 1)
    result = prompt_eval(tiny_llama, ids, spec, CONTEXT, progress=False)
    base = F.log_softmax(hand_loop(tiny_llama, ids, DynamicCache(config=tiny_llama.config), CONTEXT, TOKENS), -1)
    comp = F.log_softmax(hand_loop(tiny_llama, ids, CompressedCache(tiny_llama, spec), CONTEXT, TOKENS), -1)
    targets = ids[0, CONTEXT + 1:]
    kl = (base.exp() * (base - comp)).sum(-1).double().mean().item()
    nll_b = -base.gather(1, targets[:, None]).double().mean().item()
    nll_c = -comp.gather(1, targets[:, None]).double().mean().item()
    assert kl > 1e-5, "the hand loop must read a lossy cache"
    assert result.kl == pytest.approx(kl, rel=1e-5, abs=1e-9)
    assert result.ppl_change == pytest.approx(math.exp(nll_c - nll_b) - 1, rel=1e-5, abs=1e-9)
    assert result.top1 == pytest.approx((base.argmax(-1) == comp.argmax(-1)).double().mean().item())
    assert (result.context_tokens, result.tokens, result.chunks) == (CONTEXT, TOKENS, 2)
    # another context changes the figures: they depend on what the cache stored, not only on the continuation
    other = ids.clone()
    other[0, 10:60] = text_ids(50, seed=9)[0]
    assert prompt_eval(tiny_llama, other, spec, CONTEXT, progress=False).kl != result.kl


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor held by `obj`'s attributes (tensors and dicts of tensors)."""
    total = 0
    for value in vars(obj).values():
        tensors = value.values() if isinstance(value, dict) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


@pytest.mark.parametrize("spec, kept", [(SPEC, CONTEXT), (EVICT, 60)], ids=["int2", "int2+evict"])
def test_ratios_are_fp16_bytes_over_the_bytes_the_cache_holds_after_the_prefill(tiny_llama, spec, kept):
    ids = text_ids(CONTEXT + TOKENS + 1)
    result = prompt_eval(tiny_llama, ids, spec, CONTEXT, progress=False)
    cache = CompressedCache(tiny_llama, spec)
    with torch.no_grad(), enable_fast_attention(tiny_llama, strict=False):
        tiny_llama(input_ids=ids[:, :CONTEXT], cache=cache)
    config = tiny_llama.config
    layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    fp16 = 2 * layers * heads * CONTEXT * dim * 2  # K and V of every context token, 2 bytes each
    stored = sum(_tensor_bytes(layer) for layer in cache.layers)  # evicted tokens cost nothing
    assert (result.fp16_bytes, result.stored_bytes) == (fp16, stored)
    assert result.whole_cache_ratio == pytest.approx(fp16 / stored)
    compressed = (kept - 4 - 16) // 32 * 32  # whole blocks past the sinks and the window
    code_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                     for t in [*layer.stored_keys.values(), *layer.stored_values.values()])
    bits = 8 * code_bytes / (2 * layers * heads * compressed * dim)
    assert result.bits_per_value == pytest.approx(bits)
    assert result.kept_fraction == kept / CONTEXT and result.evicted_tokens == CONTEXT - kept
    assert result.context_compression == pytest.approx(16 / bits * CONTEXT / kept)  # codec ratio x eviction
    assert result.layers == [{"layer": i, "seen": CONTEXT, "held": kept, "compressed": compressed,
                              "sliding": False} for i in range(layers)]


def test_guards_refuse_a_cache_that_is_not_read_and_a_context_that_compresses_nothing(tiny_llama):
    ids = text_ids(CONTEXT + TOKENS + 1)
    with pytest.raises(RuntimeError, match="not reading the compressed cache"):
        prompt_eval(tiny_llama, ids, SPEC, CONTEXT, progress=False, cache_factory=bypass_cache)
    need = min_context_tokens(load_spec(SPEC))
    with pytest.raises(NothingCompressedError, match=f"at least {need} tokens"):
        prompt_eval(tiny_llama, ids, SPEC, need - 1, progress=False)


def test_a_cache_that_counts_held_tokens_as_its_length_is_refused_for_wrong_positions(tiny_llama):
    class HeldLength(CompressedCache):  # what a pruned DynamicCache reports: the continuation would be misplaced
        def get_seq_length(self, layer_idx=0):
            return self.layers[layer_idx].held_tokens()

    with pytest.raises(RuntimeError, match="wrong positions"):
        prompt_eval(tiny_llama, text_ids(CONTEXT + TOKENS + 1), EVICT, CONTEXT, progress=False,
                    cache_factory=lambda model, spec: HeldLength(model, spec))


def test_sliding_layers_dropping_their_window_count_as_neither_eviction_nor_loss():
    model = tiny_gemma3()  # interleaved sliding (window 80) and full-attention layers
    ids = text_ids(CONTEXT + TOKENS + 1)
    lossless = prompt_eval(model, ids, "none", CONTEXT, progress=False)  # no guard mistakes drops for loss
    assert lossless.kl == 0.0 and lossless.kept_fraction == 1.0 and lossless.evicted_tokens == 0
    sliding = [x for x in lossless.layers if x["sliding"]]
    assert sliding and all(x["held"] < x["seen"] == CONTEXT for x in sliding)
    lossy = prompt_eval(model, ids, SPEC, CONTEXT, progress=False)
    assert lossy.kl > 0 and lossy.kept_fraction == 1.0


def test_baseline_store_reuses_the_uncompressed_run(tiny_llama):
    ids = text_ids(CONTEXT + TOKENS + 1)
    store = {}
    first = prompt_eval(tiny_llama, ids, SPEC, CONTEXT, progress=False, baseline_store=store)
    again = prompt_eval(tiny_llama, ids, SPEC, CONTEXT, progress=False, baseline_store=store)
    assert len(store) == 1
    assert (again.kl, again.ppl, again.ppl_baseline) == (first.kl, first.ppl, first.ppl_baseline)


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def tiny_cli(tiny_llama, tmp_path, monkeypatch):
    """`kvcompress eval` on the tiny model and a character tokenizer, reading a small text file."""
    monkeypatch.setattr(eval_cli, "load_model_from_args", lambda args: (tiny_llama, CharTokenizer()))
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(chr(32 + (i * 7919) % 90) for i in range(1000)))  # report part: ~600 tokens
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    return tmp_path, ["eval", "--spec", str(spec), "--corpus", str(corpus), "--no-progress"]


def test_cli_json_records_the_protocol_the_text_and_the_token_ranges(tiny_cli, capsys):
    folder, argv = tiny_cli
    out = folder / "r.json"
    assert main([*argv, "--context", "100", "--tokens", "45", "--offset", "7", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "whole cache" in printed and "kvpress-style" in printed
    record = json.loads(out.read_text())
    assert record["protocol"]["name"] == "prompt"
    assert (record["protocol"]["context_tokens"], record["protocol"]["continuation_tokens"]) == (100, 45)
    assert record["text"]["part"] == "report" and record["text"]["tokens"] == [7, 7 + 146]
    assert record["ranges"] == {"context": [7, 107], "continuation": [107, 152], "targets": [108, 153]}
    for field in ("kl", "kl_ci95", "ppl_change", "top1", "whole_cache_ratio", "context_compression",
                  "bits_per_value", "layers", "compressed_tokens", "evicted_tokens"):
        assert field in record, field
    assert record["layers"][0]["seen"] == 100


@pytest.mark.parametrize("extra, words", [
    (["--context", "20"], ["--context 20", "--context 52"]),  # sinks 4 + window 16 + block 32
    (["--context", "100", "--tokens", "0"], ["--tokens 0"]),
    (["--context", "100", "--mode", "token"], ["--mode token", "--context"]),
    (["--context", "100", "--tokens", "5000"], ["--context 100 --tokens 5000", "5101"]),
])
def test_cli_errors_exit_2_with_one_line(tiny_cli, capsys, extra, words):
    _, argv = tiny_cli
    assert main([*argv, *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvcompress eval: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_sweep_runs_the_same_protocol_and_says_so_in_its_settings(tiny_llama, tmp_path):
    entries = load_grid({"specs": [dict(SPEC, name="q2")]})
    settings = SweepSettings(eval_tokens=TOKENS, recon_tokens=72, context_tokens=CONTEXT)
    record, = run_sweep(entries, tmp_path, settings, model=tiny_llama, tokenizer=CharTokenizer())
    assert record["status"] == "ok", record.get("error")
    assert record["eval"]["protocol"]["name"] == "prompt" and record["settings"]["context_tokens"] == CONTEXT
    assert record["texts"]["eval"]["tokens"] == [0, CONTEXT + TOKENS + 1]
    assert "context_tokens" not in SweepSettings().to_dict()  # sweeps without it keep their record keys


def test_sweep_cli_refuses_a_context_too_short_for_a_spec_before_loading_a_model(tmp_path, capsys):
    assert main(["sweep", "--specs", "int4", "--out", str(tmp_path / "s"), "--context", "100"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvcompress sweep: error: --context 100 is too few"), lines
    assert "--context 164" in lines[0]  # int4: sinks 4 + window 128 + block 32


@pytest.mark.parametrize("base, policy", [(SPEC, "snapkv"), (SPEC, "streaming"),
                                          (dict(SPEC, key={"bits": 3, "axis": "token", "group_size": 32}), "snapkv")],
                         ids=["int2-snapkv", "int2-streaming", "int3-snapkv"])
def test_one_prompt_protocol_eviction_that_keeps_everything_changes_nothing(tiny_llama, base, policy):
    """Keeping every prompt token stores the same codes as no eviction, so every figure is the same:
    with or without an eviction section, the prompt's forward reads the full-precision K/V of its own
    tokens and later tokens read the codes."""
    ids = text_ids(CONTEXT + TOKENS + 1)
    plain = prompt_eval(tiny_llama, ids, base, CONTEXT, progress=False)
    kept = prompt_eval(tiny_llama, ids, dict(base, eviction={"policy": policy, "keep": 1.0}), CONTEXT, progress=False)
    assert plain.kl > 1e-5, "the spec must be lossy for the check to mean anything"
    assert kept.kl == pytest.approx(plain.kl, abs=1e-6)
    assert kept.ppl_change == pytest.approx(plain.ppl_change, abs=1e-6)
    assert kept.stored_bytes == plain.stored_bytes and kept.whole_cache_ratio == plain.whole_cache_ratio


@pytest.mark.real_model
@pytest.mark.parametrize("base, evicting", [("int4", "int4@snapkv:1.0"), ("bits3", "bits3@streaming:1.0")])
def test_one_prompt_protocol_on_the_embedded_model(real_model, base, evicting):
    """issue 25's check, on real text: keep-everything eviction and no eviction give the same KL and bytes."""
    from kvcompress.corpus import corpus_tokens

    model, tokenizer = real_model
    ids = corpus_tokens(tokenizer, "report", n_tokens=512 + 64 + 1)
    plain = prompt_eval(model, ids, base, 512, progress=False)
    kept = prompt_eval(model, ids, evicting, 512, progress=False)
    assert plain.kl > 1e-4
    assert kept.kl == pytest.approx(plain.kl, abs=1e-6) and kept.stored_bytes == plain.stored_bytes
