"""The compiled CPU decode kernel (kvcompress.kernels.cpu): equals the pure-torch
`attend_compressed` for every bit width, GQA ratio, head_dim, dtype and mask; reads the stored
codes (tampering changes the output); never decodes into tensors, also after token eviction (fewer
tokens held than seen); falls back to the torch path, with one warning, when it cannot be built.

The extension is built once per machine into the user's cache (about a minute cold), then
loaded in milliseconds."""

import warnings

import pytest
import torch

from kvcompress import CompressedCache, kernels
from kvcompress.cache.attention import attend
from kvcompress.cache.layer import CompressedLayer
from kvcompress.codecs import ComposedCodec, HadamardRotation, QuantCodec
from kvcompress.kernels import cpu, reference
from kvcompress.kernels.reference import attend_compressed
from tiny_models import ARCHITECTURES, SEEDS


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if kernels.mode() == "torch":
        pytest.skip("KVCOMPRESS_KERNELS=torch is set: the kernel is disabled")
    module = cpu.load()
    assert module is not None, f"the CPU kernel did not build: {cpu.unavailable_reason()}"
    return module


def tolerance(dtype: torch.dtype, logits: float = 1.0) -> dict:
    """fp32 accumulation in a different order plus one rounding of the output to `dtype`: 64 ulp of
    the largest |scaled logit| (`logits`, at least 1), the error a reordered sum of q.k terms of that
    size can leave in a score, which the softmax passes on to the output."""
    fp32 = 64 * torch.finfo(torch.float32).eps * max(1.0, logits)
    tol = fp32 + (torch.finfo(dtype).eps if dtype != torch.float32 else 0.0)
    return {"atol": tol, "rtol": tol}


def filled_layer(bits: int, D: int, dtype=torch.float32, B: int = 2, H: int = 2, tokens: int = 1200,
                 key=("channel", 32), value=("token", 32), sinks: int = 4, window: int = 40, seed: int = 0):
    """A layer holding `tokens` random tokens: sinks, several kernel blocks of codes, a window."""
    gen = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(QuantCodec(bits, key[0], key[1]), QuantCodec(bits, value[0], value[1]),
                            window=window, sinks=sinks, block_size=64)
    keys = torch.randn(B, H, tokens, D, generator=gen) * 2 + torch.randn(1, H, 1, D, generator=gen)
    values = torch.randn(B, H, tokens, D, generator=gen)
    layer.update(keys.to(dtype), values.to(dtype))
    assert layer.n_compressed > 2 * cpu.BLOCK_TOKENS  # several blocks, and the last one partial
    return layer


def query_for(layer, rep: int, seed: int = 1) -> torch.Tensor:
    B, H, _, D = layer.window_keys.shape
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H * rep, 1, D, generator=gen) * 2).to(layer.window_keys.dtype)


def left_padding_mask(layer, padded: int, additive: bool) -> torch.Tensor:
    """(B, 1, 1, seq): the second row has `padded` left-padding positions."""
    B, seq = layer.window_keys.shape[0], layer.held_tokens()
    keep = torch.ones(B, 1, 1, seq, dtype=torch.bool)
    keep[1, ..., :padded] = False
    if not additive:
        return keep
    return torch.zeros(B, 1, 1, seq).masked_fill(~keep, torch.finfo(torch.float32).min)


def largest_logit(layer, query, scale: float) -> float:
    """max |scale q.k| over the window's full-precision keys, drawn like the compressed ones here."""
    B, H, _, D = layer.window_keys.shape
    q = query.float().reshape(B, H, -1, D)
    return (scale * q @ layer.window_keys.float().transpose(-1, -2)).abs().max().item()


def check_equal(layer, query, mask=None, scale=None):
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    ref = attend_compressed(layer, query, mask, scale)
    out = cpu.attend(layer, query, mask, scale)
    assert out is not None and out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tolerance(query.dtype, largest_logit(layer, query, scale)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rep", [1, 2, 4, 8])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_equals_torch_path_for_every_bit_width_and_gqa_ratio(bits, rep, dtype):
    layer = filled_layer(bits, 64, dtype)
    check_equal(layer, query_for(layer, rep), left_padding_mask(layer, 700, additive=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256, 96])
def test_kernel_equals_torch_path_for_head_dims_and_dtypes(D, dtype):
    layer = filled_layer(4, D, dtype)
    check_equal(layer, query_for(layer, 3), None)


@pytest.mark.parametrize("key, value", [(("channel", 64), ("token", 64)), (("token", 32), ("channel", 32)),
                                        (("channel", 32), ("channel", 32)), (("token", 16), ("token", 16))])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_equals_torch_path_for_every_grouping(key, value, bits):
    layer = filled_layer(bits, 64, key=key, value=value, sinks=0)
    check_equal(layer, query_for(layer, 2), left_padding_mask(layer, 300, additive=True), scale=0.3)


@pytest.mark.parametrize("padded", [0, 5, 600, 1100])
def test_left_padding_masks_bool_and_additive(padded):
    layer = filled_layer(4, 64, tokens=1200)
    query = query_for(layer, 4)
    bool_out = check_equal(layer, query, left_padding_mask(layer, padded, additive=False))
    add_out = check_equal(layer, query, left_padding_mask(layer, padded, additive=True))
    torch.testing.assert_close(add_out, bool_out, **tolerance(torch.float32))


def test_result_does_not_depend_on_the_thread_count():
    layer = filled_layer(4, 64)
    query = query_for(layer, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.attend(layer, query, None, 0.125)
        torch.set_num_threads(2)
        two = cpu.attend(layer, query, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # the split into tasks is fixed; threads only run them


@pytest.mark.parametrize("part", ["key codes", "value codes", "key scale", "value zero"])
def test_tampered_codes_change_the_output(part):
    layer = filled_layer(4, 64)
    query = query_for(layer, 3)
    before = cpu.attend(layer, query, None, 0.125)
    kind, name = part.split()
    stored = layer.stored_keys if kind == "key" else layer.stored_values
    tensor = stored[{"codes": "codes", "scale": "scale", "zero": "zero"}[name]]
    if name == "codes":
        tensor[:, :, 3:9].copy_(255 - tensor[:, :, 3:9])  # a few rows of one block
    else:
        tensor[:, :, 10:20] += 0.5
    after = cpu.attend(layer, query, None, 0.125)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, attend_compressed(layer, query, None, 0.125), **tolerance(torch.float32))


def test_layers_the_kernel_does_not_read_fall_back_to_the_torch_path():
    layer = filled_layer(4, 64)
    query = query_for(layer, 2)
    rotated = CompressedLayer(QuantCodec(4, "channel", 32), ComposedCodec(HadamardRotation(), QuantCodec(4, "token", 32)),
                              window=40, sinks=4, block_size=64)
    rotated.update(torch.randn(2, 2, 400, 64), torch.randn(2, 2, 400, 64))
    assert cpu.attend(rotated, query, None, 0.125) is None  # Hadamard values: not a plain QuantCodec
    layer.key_space = object()  # pre-RoPE keys need the rotation the kernel does not do
    assert cpu.attend(layer, query, None, 0.125) is None
    layer.key_space = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVCOMPRESS_KERNELS", "torch")
        patch.setattr(cpu, "attend", lambda *a: pytest.fail("KVCOMPRESS_KERNELS=torch must not call the kernel"))
        attend(layer, query, None, 0.125)


@torch.no_grad()
def test_decode_step_with_the_kernel_never_decodes_or_reconstructs(monkeypatch, fast_attention):
    model = fast_attention(ARCHITECTURES["mistral"](seed=SEEDS["mistral"]))
    spec = {"key": {"bits": 4, "axis": "channel", "group_size": 32}, "value": {"bits": 2, "axis": "token", "group_size": 32},
            "window": 16, "sinks": 4, "block_size": 32}
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :40] = 0  # left padding in the first row
    cache = CompressedCache(model, spec)
    model(ids, cache=cache, attention_mask=mask)
    torch_cache = cache.copy()
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVCOMPRESS_KERNELS", "torch")
        expected = model(torch.tensor([[7], [9]]), cache=torch_cache, attention_mask=step_mask).logits

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step with the kernel decoded the codes into a tensor")

    for target, name in ((QuantCodec, "decode"), (QuantCodec, "decode_into"), (CompressedLayer, "reconstruct"),
                         (reference, "attend_compressed")):
        monkeypatch.setattr(target, name, refuse)
    got = model(torch.tensor([[7], [9]]), cache=cache, attention_mask=step_mask).logits
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))


@torch.no_grad()
@pytest.mark.parametrize("applies", ["prompt", "generation"])
def test_evicted_cache_decodes_through_the_kernel(applies, monkeypatch, fast_attention):
    """Post-RoPE uniform codes after snapkv eviction (at prefill, or also during generation): the
    layer holds fewer tokens than it has seen, the step's mask covers the held ones, and every
    decode step runs the kernel (never `attend_compressed`) with the torch path's logits."""
    model = fast_attention(ARCHITECTURES["mistral"](seed=SEEDS["mistral"]))
    spec = {"key": {"bits": 4, "axis": "channel", "group_size": 32}, "value": {"bits": 4, "axis": "token", "group_size": 32},
            "window": 16, "sinks": 4, "block_size": 32, "eviction": {"policy": "snapkv", "keep": 0.5, "applies": applies}}
    ids = torch.randint(3, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)  # eviction refuses padded prompts
    cache = CompressedCache(model, spec)
    model(ids, cache=cache, attention_mask=mask)
    torch_cache = CompressedCache(model, spec)  # its decode steps run with KVCOMPRESS_KERNELS=torch
    model(ids, cache=torch_cache, attention_mask=mask)
    evicted_after_prompt = [layer.evicted_tokens() for layer in cache.layers]
    assert all(evicted > 0 for evicted in evicted_after_prompt)

    calls = []
    kernel_attend = cpu.attend

    def spy(layer, *args):
        out = kernel_attend(layer, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu, "attend", spy)
    torch_path = reference.attend_compressed

    def only_torch_cache(layer, *args):
        assert kernels.mode() == "torch", "a decode step of the kernel cache ran attend_compressed"
        return torch_path(layer, *args)

    monkeypatch.setattr(reference, "attend_compressed", only_torch_cache)
    steps = 90 if applies == "generation" else 4  # generation: 64-token spans leave the 16-token window
    for step in range(steps):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        token = torch.tensor([[7 + step % 50], [9 + step % 50]])
        monkeypatch.setenv("KVCOMPRESS_KERNELS", "auto")
        got = model(token, cache=cache, attention_mask=mask).logits
        monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
        expected = model(token, cache=torch_cache, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, **tolerance(torch.float32))
    assert calls and all(calls) and len(calls) == steps * len(cache.layers)
    for layer, evicted in zip(cache.layers, evicted_after_prompt):
        assert layer.held_tokens() + layer.evicted_tokens() == 200 + steps
        assert (layer.evicted_tokens() > evicted) == (applies == "generation")


def test_disabled_by_environment_gives_the_torch_result_without_warning(monkeypatch):
    layer = filled_layer(3, 64)
    query = query_for(layer, 4)
    with_kernel = attend(layer, query, None, 0.125)
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.attend(layer, query, None, 0.125) is None
        without = attend(layer, query, None, 0.125)
    torch.testing.assert_close(without, with_kernel, **tolerance(torch.float32))
    assert torch.equal(without, attend_compressed(layer, query, None, 0.125))


def test_failed_build_warns_once_and_gives_the_same_result(monkeypatch):
    layer = filled_layer(4, 64)
    query = query_for(layer, 3)
    with_kernel = attend(layer, query, None, 0.125)

    def failing_build():
        raise RuntimeError("Error building extension 'kvcompress_cpu_decode':\n"
                           "cpu_decode.cpp:1:10: fatal error: torch/extension.h: No such file or directory")

    monkeypatch.setattr(cpu, "_build", failing_build)
    monkeypatch.setattr(cpu, "_state", {"tried": False, "module": None, "reason": None})
    with pytest.warns(RuntimeWarning) as caught:
        outs = [attend(layer, query, None, 0.125) for _ in range(3)]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "could not be built" in message and "No such file or directory" in message
    assert "KVCOMPRESS_KERNELS=torch" in message and "No such file" in cpu.unavailable_reason()
    for out in outs:
        torch.testing.assert_close(out, with_kernel, **tolerance(torch.float32))
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "cpu")  # asked for by name: no silent fallback
    with pytest.raises(RuntimeError, match="KVCOMPRESS_KERNELS=cpu asks for the CPU decode kernel.*No such file"):
        attend(layer, query, None, 0.125)


def test_a_real_build_failure_warns_once_with_the_compiler_error(monkeypatch, tmp_path):
    layer = filled_layer(2, 64)
    query = query_for(layer, 2)
    broken = tmp_path / "cpu_decode.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_state", {"tried": False, "module": None, "reason": None})
    with pytest.warns(RuntimeWarning, match="could not be built") as caught:
        first, second = (attend(layer, query, None, 0.125) for _ in range(2))
    assert len(caught) == 1 and "error" in cpu.unavailable_reason()
    assert torch.equal(first, attend_compressed(layer, query, None, 0.125)) and torch.equal(first, second)
