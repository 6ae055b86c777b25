"""`kvcompress bench` end to end on a tiny model, stored-bytes accounting, and the fast decode path.

No timing is asserted here: speed is judged by the benchmark itself, never by the test suite.
"""

import json
import os
import re

import pytest
import torch
from transformers import DynamicCache, PreTrainedTokenizerFast

from conftest import make_tiny_llama
from by_hand import expected_layer_parts
from kvcompress.bench.kinds import baseline_unavailable, make_cache, parse_cache_name
from kvcompress.bench.nbytes import cache_stored_bytes, predicted_stored_bytes, tensor_bytes
from kvcompress.bench.run import BenchConfig
from kvcompress.cache.cache import CompressedCache
from kvcompress.cli.main import main
from kvcompress.codecs import QuantCodec
from kvcompress.codecs.packing import fields, pack, unpack, unpack_reference
from kvcompress.compat import quantized_layer_storage


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with a small word-level tokenizer, loadable by `load_model(path)`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    folder = tmp_path_factory.mktemp("tiny-bench-model")
    words = ["<unk>", "<pad>", "<s>", "</s>"] + "the a of to and is in that it for as with be on or by".split()
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    make_tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _baselines_present() -> list[str]:
    """At most one transformers baseline (each costs a warm-up), "hqq-4" if installed."""
    return [f"{b}-4" for b in ("hqq", "quanto") if baseline_unavailable(b) is None][:1]


def test_bench_end_to_end_writes_valid_json_markdown_and_png(tiny_folder, tmp_path, capsys):
    out = tmp_path / "bench"
    caches = ",".join(["dynamic", "int4", "int2"] + _baselines_present())
    code = main(["bench", "--model", str(tiny_folder), "--contexts", "200,264", "--steps", "3", "--repeats", "2",
                 "--caches", caches, "--peak-contexts", "264", "--budget-mb", "0.5", "--capacity-context", "200", "--capacity-steps", "2",
                 "--max-batch", "2", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    names = set(result["caches"])
    assert {"dynamic", "int4", "int2"} <= names
    assert result["attn_implementation"] == "kvcompress"  # kvcompress rows decode over the codes
    assert len(result["runs"]) == 2 * 2 * len(names)  # repeats x contexts x caches, all interleaved
    for name in ("quanto-4", "hqq-4"):
        assert (name in names) != (name in result["skipped"]) or name not in caches
    for row in result["summary"]:
        assert row["tokens_per_s"]["min"] <= row["tokens_per_s"]["median"] <= row["tokens_per_s"]["max"]
        assert row["tokens_per_s"]["n"] == 2
        assert row["stored_bytes"] > 0 and (row["peak_bytes"] is not None) == (row["context"] == 264)
        if row["cache"] == "dynamic":
            assert row["speed_vs_dynamic"]["median"] == pytest.approx(1.0)
            assert row["stored_bytes"] == 2 * row["fp16_bytes"]  # float32 model
        if row["cache"] in ("int4", "int2"):
            assert row["stored_bytes"] == row["predicted_bytes"]
            assert row["stored_bytes"] < 2 * row["fp16_bytes"]  # below DynamicCache (float32)
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"int4", "crossover:", "stored", "peak"}
    cap = result["capacity"]["caches"]
    assert cap["int2"]["largest_batch"] >= cap["dynamic"]["largest_batch"]
    assert all(row.get("fits", True) for row in cap.values())
    markdown = (out / "bench.md").read_text()
    assert re.search(r"\| 264 \| int4 \| [\d.]+ \[", markdown)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = capsys.readouterr()
    assert "Targets:" in printed.out
    assert re.search(r"264 tokens  int4 +round 2/2 +decode", printed.out)  # progress: logging, printed by the CLI


def test_bench_rejects_bad_settings():
    with pytest.raises(ValueError, match="exceed --steps"):
        BenchConfig(contexts=(8,), steps=4, repeats=2).validate()
    with pytest.raises(ValueError, match="must be among --contexts"):
        BenchConfig(contexts=(64,), steps=4, peak_contexts=(32,)).validate()
    with pytest.raises(ValueError, match="quanto-<bits>"):
        parse_cache_name("quanto4")
    with pytest.raises(ValueError, match="supports bits"):
        parse_cache_name("quanto-3")
    with pytest.raises(ValueError, match="unknown preset"):
        parse_cache_name("int5")


def test_missing_baseline_package_is_reported(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("optimum") else real(name, *a))
    assert "optimum-quanto" in baseline_unavailable("quanto")


def _fill(cache, model, tokens=200):
    ids = torch.randint(3, 128, (2, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids, cache=cache)
        for _ in range(3):
            model(ids[:, :1], cache=cache)
    return cache


def test_stored_bytes_of_dynamic_and_compressed_caches_equal_their_tensors(tiny_llama):
    dyn = _fill(DynamicCache(), tiny_llama)
    expected = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in dyn.layers)
    assert cache_stored_bytes(dyn) == expected == 2 * 2 * 2 * 2 * 203 * 32 * 4  # K+V, layers, B, H, T, D, fp32
    comp = _fill(CompressedCache(tiny_llama, "int4"), tiny_llama)
    spec = {"key": {"bits": 4, "group_size": 32}, "value": {"bits": 4, "group_size": 32},  # the int4 preset
            "window": 128, "sinks": 4, "block_size": 32}
    config = tiny_llama.config
    exact = config.num_hidden_layers * sum(expected_layer_parts(spec, 203, config.num_key_value_heads,
                                                                config.head_dim, 4, batch=2).values())
    assert cache_stored_bytes(comp) == exact
    assert predicted_stored_bytes("int4", config, 203, torch.float32, batch=2) == exact


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_stored_bytes_of_quantized_cache_equal_its_tensors(tiny_llama, backend):
    if baseline_unavailable(backend):
        pytest.skip(baseline_unavailable(backend))
    cache = _fill(make_cache(parse_cache_name(f"{backend}-4"), tiny_llama), tiny_llama)
    total = 0
    for layer in cache.layers:
        parts = quantized_layer_storage(layer)
        total += parts["residual_keys"].numel() * 4 + parts["residual_values"].numel() * 4
        for q in (parts["quantized_keys"], parts["quantized_values"]):
            if backend == "hqq":
                codes, meta = q
                total += codes.numel() + sum(meta[k].numel() * meta[k].element_size() for k in ("scale", "zero"))
            else:  # quanto: packed 4-bit data (2 codes per byte) plus float scale and shift per group
                total += q._data._data.numel() + q._scale.numel() * 4 + q._shift.numel() * 4
    assert cache_stored_bytes(cache) == total
    quantized_values = sum(layer.cumulative_length - layer.keys.shape[2] for layer in cache.layers) * 2 * 2 * 32
    assert quantized_values // 2 <= total  # at least half a byte per quantized value


def test_tensor_bytes_walks_nested_containers():
    t = torch.zeros(3, 4, dtype=torch.float16)
    assert tensor_bytes((t, {"a": t, "b": 5, "c": [t]})) == 3 * 24


# ---- the fast decode path equals the reference decode --------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_fast_unpack_equals_reference_also_for_unaligned_views(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (2, 3, 5, 64), generator=gen)
    packed = pack(codes, bits)
    assert torch.equal(unpack_reference(packed, bits).long(), codes)
    assert torch.equal(unpack(packed, bits).long(), codes)
    shifted = torch.cat([torch.zeros(2, 3, 5, 1, dtype=torch.uint8), packed], -1)[..., 1:]  # a strided view
    assert torch.equal(unpack(shifted, bits).long(), codes)


def test_byte_planar_layout_as_documented():
    # 4 bits: byte j holds code j in its low nibble and code j + 32 in its high nibble (64 codes).
    codes = torch.arange(64) % 16
    packed = pack(codes, 4)
    assert packed.shape == (32,)
    assert torch.equal(packed.long(), codes[:32] | (codes[32:] << 4))
    # 3 bits = a 2-bit field (low bits, 16 bytes) then a 1-bit field (bit 2, 8 bytes).
    assert fields(3) == [(2, 0), (1, 2)] and fields(7) == [(4, 0), (2, 4), (1, 6)] and fields(8) == [(8, 0)]
    codes = torch.randint(0, 8, (64,), generator=torch.Generator().manual_seed(0))
    packed = pack(codes, 3).long()
    low, high = codes & 3, codes >> 2
    assert torch.equal(packed[:16], low[:16] | low[16:32] << 2 | low[32:48] << 4 | low[48:] << 6)
    assert torch.equal(packed[16:], sum(high[8 * h:8 * h + 8] << h for h in range(8)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fast_decode_equals_reference_decode(bits, axis, dtype):
    gen = torch.Generator().manual_seed(7)
    codec = QuantCodec(bits=bits, axis=axis, group_size=32)
    stored = codec.encode(torch.randn(2, 3, 64, 64, generator=gen) * 3)
    # Reference: the code-by-code unpack, then code * scale + zero with the scale and zero point
    # in the target dtype, computed exactly (float32). Rows of the packed codes hold whole tokens
    # in order, so the unpacked codes reshape to (B, H, T, D).
    codes = unpack_reference(stored["codes"], bits).float().reshape(2, 3, 64, 64)
    scale, zero = stored["scale"].to(dtype).float(), stored["zero"].to(dtype).float()
    if axis == "token":
        product = (codes.reshape(2, 3, 64, 2, 32) * scale.unsqueeze(-1)).reshape(2, 3, 64, 64)
        ref = (codes.reshape(2, 3, 64, 2, 32) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(2, 3, 64, 64)
    else:
        product = (codes.reshape(2, 3, 2, 32, 64) * scale.unsqueeze(-2)).reshape(2, 3, 64, 64)
        ref = (codes.reshape(2, 3, 2, 32, 64) * scale.unsqueeze(-2) + zero.unsqueeze(-2)).reshape(2, 3, 64, 64)
    fast = codec.decode(stored, dtype)
    # Two roundings in the target dtype (code * scale, then + zero): each within half an ulp.
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    diff = (fast.float() - ref).abs()
    assert fast.dtype == dtype
    assert (diff <= ulp / 2 * (ref.abs() + product.abs()) * 1.001 + 1e-6).all(), f"max_diff {diff.max().item():.3g}"
    # decode_into a strided slice of a larger buffer writes exactly that slice
    out = torch.full((2, 3, 70, 64), 123.0, dtype=dtype)
    codec.decode_into(stored, out[:, :, 4:68])
    assert torch.equal(out[:, :, 4:68], fast)
    assert (out[:, :, :4] == 123).all() and (out[:, :, 68:] == 123).all()


def test_cache_reconstruction_is_sinks_blocks_window_in_order(tiny_llama):
    cache = _fill(CompressedCache(tiny_llama, "int4"), tiny_llama)
    layer = cache.layers[1]
    keys, values = layer.reconstruct()
    n_sinks = layer.sink_keys.shape[2]
    expected_k = torch.cat([layer.sink_keys, layer.key_codec.decode(layer.stored_keys, torch.float32),
                            layer.window_keys], 2)
    expected_v = torch.cat([layer.sink_values, layer.value_codec.decode(layer.stored_values, torch.float32),
                            layer.window_values], 2)
    assert n_sinks == 4 and layer.n_compressed > 0
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)


@torch.no_grad()
def test_monitor_suffix_benchmarks_the_same_cache_with_its_monitor_on(tiny_llama):
    kind = parse_cache_name("int4+monitor")
    assert kind.family == "kvcompress" and kind.monitor
    cache = make_cache(kind, tiny_llama)
    plain = make_cache(parse_cache_name("int4"), tiny_llama)
    assert cache.monitor is not None and plain.monitor is None
    assert cache.spec == plain.spec
    with pytest.raises(ValueError, match="unknown preset"):
        parse_cache_name("int5+monitor")


def _decode_reads(model, name: str, monkeypatch) -> list[str]:
    """Prefill and decode a cache of kind `name`; the KVCOMPRESS_KERNELS mode of every decode step
    that read the codes (kvcompress's attention over a layer)."""
    from tiny_models import prompt

    from kvcompress import kernels
    from kvcompress.bench.timing import decode, prefill
    from kvcompress.cache import attention as attention_module

    reads, original = [], attention_module.attend
    monkeypatch.setattr(attention_module, "attend", lambda layer, *a: reads.append(kernels.mode()) or original(layer, *a))
    kind = parse_cache_name(name)
    cache, token, _ = prefill(model, kind, prompt(200))
    decode(model, kind, cache, token, 2)
    monkeypatch.setattr(attention_module, "attend", original)
    return reads


def test_reconstruct_suffix_benchmarks_the_same_cache_without_attention_over_codes(tiny_llama, fast_attention,
                                                                                  monkeypatch):
    kind = parse_cache_name("int4+monitor+reconstruct")
    assert kind.spec_name == "int4" and kind.monitor and kind.reconstruct
    assert "full reconstruction" in kind.describe()
    model = fast_attention(tiny_llama)
    assert _decode_reads(model, "int4+monitor+reconstruct", monkeypatch) == []  # attention read reconstructions
    assert model.config._attn_implementation == "kvcompress"  # switched back after that cache's steps
    assert len(_decode_reads(model, "int4", monkeypatch)) == 2 * model.config.num_hidden_layers


# ---- a fair baseline on sliding-window models ------------------------------------------------


def test_dynamic_baseline_keeps_only_the_window_in_sliding_layers_as_transformers_does():
    """On Gemma 3 the benchmark's DynamicCache is built from the config, as `generate` builds it:
    its sliding layers hold at most the window after a longer prompt, its full layers every token."""
    from tiny_models import GEMMA3_WINDOW, prompt, tiny_gemma3

    from kvcompress.bench.timing import decode, prefill

    gemma = tiny_gemma3()
    n_prompt, steps = 2 * GEMMA3_WINDOW + 40, 3
    cache, token, _ = prefill(gemma, parse_cache_name("dynamic"), prompt(n_prompt))
    decode(gemma, parse_cache_name("dynamic"), cache, token, steps)
    held = [layer.keys.shape[2] for layer in cache.layers]
    sliding = [t == "sliding_attention" for t in gemma.config.layer_types]
    assert any(sliding) and not all(sliding)
    for tokens, is_sliding in zip(held, sliding):
        if is_sliding:
            assert tokens <= GEMMA3_WINDOW, f"sliding layers hold {held} tokens, window {GEMMA3_WINDOW}"
        else:
            assert tokens == n_prompt + steps
    # the same as `generate` would store for this prompt (its own cache, built by transformers)
    with torch.inference_mode():
        out = gemma.generate(prompt(n_prompt), max_new_tokens=steps + 1, do_sample=False, return_dict_in_generate=True)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == held
    assert cache_stored_bytes(cache) == sum(tensor_bytes([layer.keys, layer.values])
                                            for layer in out.past_key_values.layers)


def test_torch_suffix_benchmarks_the_same_cache_without_the_cpu_kernel(tiny_llama, fast_attention, monkeypatch):
    kind = parse_cache_name("int4+torch")
    assert kind.spec_name == "int4" and kind.torch_only and not kind.reconstruct
    assert "KVCOMPRESS_KERNELS=torch" in kind.describe()
    monkeypatch.delenv("KVCOMPRESS_KERNELS", raising=False)
    model = fast_attention(tiny_llama)
    layers = model.config.num_hidden_layers
    assert _decode_reads(model, "int4+torch", monkeypatch) == ["torch"] * 2 * layers
    assert "KVCOMPRESS_KERNELS" not in os.environ  # restored after that cache's steps
    assert _decode_reads(model, "int4", monkeypatch) == ["auto"] * 2 * layers
