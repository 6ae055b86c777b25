"""Triton kernels (kvcompress.kernels) against the torch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py before Triton is first imported); on a CUDA machine they are compiled and run on the GPU.
The pack kernel's codes, scales and zero points are byte-identical to `QuantCodec.encode`'s
torch path; decode attention equals `kernels.reference.attend_compressed`; and with Triton chosen a
model's decode steps go through both kernels and give the torch path's logits.
Skipped when Triton is not installed (`pip install 'kvcompress[gpu]'`).
"""

import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton", reason="Triton is an optional extra: pip install 'kvcompress[gpu]'")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before Triton's import
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton cannot run here", allow_module_level=True)

from kvcompress import CompressedCache, enable_fast_attention, kernels  # noqa: E402
from kvcompress.kernels.reference import attend_compressed  # noqa: E402
from kvcompress.cache import CompressedLayer  # noqa: E402
from kvcompress.codecs import QuantCodec, packing  # noqa: E402
from kvcompress.codecs.quant import TOKEN_AXIS_ROW_TOKENS  # noqa: E402
from kvcompress.extras import MissingExtraError  # noqa: E402
from kvcompress.kernels.fields import TOKEN_ROW_TOKENS, field_widths  # noqa: E402
from kvcompress.kernels.triton_decode import decode_attention  # noqa: E402
from kvcompress.kernels.triton_pack import quantize_pack  # noqa: E402
from tiny_models import ARCHITECTURES, SEEDS, prompt  # noqa: E402

BITS = (2, 3, 4, 8)


@pytest.fixture
def torch_kernels(monkeypatch):
    """The torch path everywhere (the reference), whatever the device."""
    monkeypatch.setenv(kernels.ENV, "torch")


def states_with_ties(bits: int, axis: str, group: int, shape=(2, 2, 32, 32), dtype=torch.float32) -> torch.Tensor:
    """Random states with an outlier channel, a constant group, and one group whose values fall
    exactly halfway between two codes (min 0, max = levels, so scale 1: round-half-even decides)."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(shape, generator=g) * 2
    x[..., 3] += 40.0  # outlier channel
    levels = (1 << bits) - 1
    if axis == "channel":
        x[:, :, :group, 5] = -1.75  # a constant group: scale 0
        ties = torch.arange(group) % (2 * levels + 1) / 2
        ties[0], ties[1] = 0.0, levels
        x[0, -1, group:2 * group, 7] = ties
    else:
        x[:, :, 4, :group] = 0.625
        ties = torch.arange(group) % (2 * levels + 1) / 2
        ties[0], ties[1] = 0.0, levels
        x[-1, 0, 9, group:2 * group] = ties
    return x.to(dtype=dtype, device=DEVICE)


def test_kernel_field_layout_is_the_packing_layout():
    for bits in BITS:
        widths = [width for width, _ in packing.fields(bits)]
        assert list(field_widths(bits)) == widths + [0] * (2 - len(widths))
    assert TOKEN_ROW_TOKENS == TOKEN_AXIS_ROW_TOKENS


@pytest.mark.parametrize("axis,group", [("channel", 16), ("token", 8)])
@pytest.mark.parametrize("bits", BITS)
def test_pack_kernel_is_byte_identical_to_encode(bits, axis, group, torch_kernels):
    x = states_with_ties(bits, axis, group)
    expected = QuantCodec(bits=bits, axis=axis, group_size=group).encode(x)
    got = quantize_pack(x, bits, axis, group)
    for name in ("codes", "scale", "zero"):
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        differ = (got[name] != expected[name]).sum().item()
        assert differ == 0, f"{name}: {differ} of {expected[name].numel()} entries differ"


@pytest.mark.parametrize("axis,group", [("channel", 32), ("token", 16)])
def test_pack_kernel_reads_bfloat16_and_strided_states(axis, group, torch_kernels):
    x = states_with_ties(4, axis, group, shape=(1, 4, 64, 32), dtype=torch.bfloat16)[:, ::2]  # every other head
    expected = QuantCodec(bits=4, axis=axis, group_size=group).encode(x)
    got = quantize_pack(x, 4, axis, group)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def compressed_layer(key_bits: int, value_bits: int, batch: int, kv_heads: int = 2, tokens: int = 75,
                     key_axis: str = "channel", value_axis: str = "token", sinks: int = 2, window: int = 8,
                     head_dim: int = 32, value_dim: int | None = None, seed: int = 0) -> CompressedLayer:
    """A layer holding `tokens` random tokens: `sinks` sinks, blocks of 16 compressed, the rest in the window."""
    g = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(QuantCodec(bits=key_bits, axis=key_axis, group_size=16),
                            QuantCodec(bits=value_bits, axis=value_axis, group_size=16),
                            window=window, sinks=sinks, block_size=16)
    keys = torch.randn(batch, kv_heads, tokens, head_dim, generator=g) * 2
    keys[..., 1] += 6.0  # an outlier key channel
    values = torch.randn(batch, kv_heads, tokens, value_dim or head_dim, generator=g)
    layer.update(keys.to(DEVICE), values.to(DEVICE))
    assert layer.n_compressed > 0
    return layer


def left_padding(batch: int, seq: int, pad: int) -> torch.Tensor:
    """(B, 1, 1, seq) bool mask, the last row's first `pad` positions not attended (left padding)."""
    mask = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device=DEVICE)
    mask[-1, ..., :pad] = False
    return mask


def assert_decode_matches(layer, rep: int, mask, **kernel_args) -> None:
    B, H = layer.window_keys.shape[:2]
    query = torch.randn(B, H * rep, 1, layer.window_keys.shape[3], generator=torch.Generator().manual_seed(1))
    query = query.to(DEVICE)
    expected = attend_compressed(layer, query, mask, 0.25)
    got = decode_attention(layer, query, mask, 0.25, **kernel_args)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


# every bit width and GQA ratio at batch 1 without a mask and batch 2 with left padding; the
# other two pairings once
DECODE_CASES = ([(bits, rep, 1, False) for bits in BITS for rep in (1, 2, 4)]
                + [(bits, rep, 2, True) for bits in BITS for rep in (1, 2, 4)]
                + [(4, 2, 2, False), (4, 2, 1, True)])


@pytest.mark.parametrize("bits,rep,batch,padded", DECODE_CASES)
def test_decode_kernel_equals_torch_reference(bits, rep, batch, padded, torch_kernels):
    layer = compressed_layer(bits, bits, batch)
    # 36 padded positions: the two sinks and the first two tiles of compressed tokens, so that
    # the first split (two tiles) attends to nothing
    mask = left_padding(batch, layer.held_tokens(), 36) if padded else None
    assert_decode_matches(layer, rep, mask, split_tiles=2, block_tokens=16)


@pytest.mark.parametrize("case", ["k4v2", "k2v8", "axes swapped", "no sinks", "empty window", "value_dim 16",
                                  "several tiles per split", "default splits", "additive mask"])
def test_decode_kernel_variants(case, torch_kernels):
    layer_args, kernel_args, mask = {}, {"split_tiles": 1, "block_tokens": 16}, None
    if case == "k4v2":
        layer_args = {"key_bits": 4, "value_bits": 2}
    elif case == "k2v8":
        layer_args = {"key_bits": 2, "value_bits": 8}
    elif case == "axes swapped":
        layer_args = {"key_axis": "token", "value_axis": "channel"}
    elif case == "no sinks":
        layer_args = {"sinks": 0, "tokens": 70}
    elif case == "empty window":
        layer_args = {"window": 0, "tokens": 66}
    elif case == "value_dim 16":
        layer_args = {"value_dim": 16}
    elif case == "several tiles per split":
        layer_args, kernel_args = {"tokens": 120}, {"split_tiles": 3, "block_tokens": 16}
    elif case == "default splits":
        kernel_args = {}
    layer = compressed_layer(**{"key_bits": 4, "value_bits": 4, "batch": 2, **layer_args})
    assert case != "empty window" or layer.window_keys.shape[2] == 0
    if case == "additive mask":
        mask = torch.zeros(2, 1, 1, layer.held_tokens(), device=DEVICE)
        mask[0, ..., 30:37] = torch.finfo(torch.float32).min
        mask[1, ..., 5:9] = -3.0
    assert_decode_matches(layer, 2, mask, **kernel_args)


def test_decode_kernel_refuses_a_mask_of_the_wrong_length(torch_kernels):
    layer = compressed_layer(4, 4, 1)
    query = torch.randn(1, 2, 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="attention mask covers"):
        decode_attention(layer, query, left_padding(1, layer.held_tokens() - 1, 0), 0.25)


@torch.no_grad()
def test_model_decode_steps_run_both_kernels_and_match_the_torch_path(monkeypatch):
    model = ARCHITECTURES["llama"](seed=SEEDS["llama"]).to(DEVICE)
    spec = {"key": {"bits": 4, "axis": "channel", "group_size": 32},
            "value": {"bits": 2, "axis": "token", "group_size": 32}, "window": 16, "sinks": 4, "block_size": 32}
    ids = prompt(70, batch=2).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0

    def run() -> torch.Tensor:
        cache = CompressedCache(model, spec)
        model(ids, cache=cache, attention_mask=mask)
        step_mask, logits = mask, []
        for step in range(3):  # the third step flushes a block (70 + 3 - 16 = 57 > 32 + 16)
            token = torch.full((2, 1), 5 + step, device=DEVICE)
            step_mask = torch.cat([step_mask, torch.ones_like(token)], 1)
            logits.append(model(token, cache=cache, attention_mask=step_mask).logits[:, -1])
        return torch.stack(logits)

    monkeypatch.setenv(kernels.ENV, "torch")
    with enable_fast_attention(model):  # decode steps read the codes: attend_compressed
        expected = run()
    calls = {"decode_attention": 0, "quantize_pack": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    monkeypatch.setenv(kernels.ENV, "triton")
    with enable_fast_attention(model):  # the same steps through the Triton kernel
        got = run()
    assert calls["decode_attention"] == 3 * model.config.num_hidden_layers
    assert calls["quantize_pack"] > 0
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_kernel_choice_follows_the_environment(monkeypatch):
    cpu = torch.zeros(1)
    other = torch.zeros(1, device="meta")  # not a CPU tensor
    monkeypatch.setenv(kernels.ENV, "auto")
    assert not kernels.use_triton(cpu)  # auto: Triton only on CUDA tensors
    assert kernels.use_cpu_kernel(cpu) and not kernels.use_cpu_kernel(other)  # the CPU kernel on CPU tensors
    monkeypatch.setenv(kernels.ENV, "torch")
    assert not kernels.use_triton(cpu) and not kernels.use_cpu_kernel(cpu)
    monkeypatch.setenv(kernels.ENV, "cpu")
    assert not kernels.use_triton(cpu) and kernels.use_cpu_kernel(cpu) and not kernels.use_cpu_kernel(other)
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="KVCOMPRESS_KERNELS='fast' is not valid; use one of auto, torch, triton, cpu"):
        kernels.use_triton(cpu)
    monkeypatch.setenv(kernels.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        kernels.use_triton(cpu)
    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'kvcompress\[gpu\]'"):
        kernels.use_triton(cpu)
    with pytest.raises(MissingExtraError, match=r"pip install 'kvcompress\[gpu\]'"):
        kernels.quantize_pack(cpu.reshape(1, 1, 1, 1), 4, "token", 1)
