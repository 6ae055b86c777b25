"""Codec round trips: packing is lossless, quantization error is bounded by half a step."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.codecs import IdentityCodec, QuantCodec
from kvcompress.codecs.packing import pack, unpack


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), groups=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_pack_unpack_is_lossless_and_exact_size(bits, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (2, 3, groups * 8), generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == groups * bits  # exactly bits/8 bytes per code, no padding
    assert torch.equal(unpack(packed, bits).long(), codes)


def _bound(codec: QuantCodec, x: torch.Tensor) -> torch.Tensor:
    """Half a quantization step per value, plus fp16 rounding of scale and zero point."""
    stored = codec.encode(x)
    scale = stored["scale"].float()
    if codec.axis == "token":
        step = scale.repeat_interleave(codec.group_size, dim=-1)
    else:
        step = scale.repeat_interleave(codec.group_size, dim=-2)
    return step / 2 + 1e-3 * x.abs().amax() + 1e-6


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), magnitude=st.sampled_from([1e-3, 1.0, 50.0]))
def test_quant_error_within_half_step(axis, bits, seed, magnitude):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=gen) * magnitude
    codec = QuantCodec(bits=bits, axis=axis, group_size=32)
    err = (codec.roundtrip(x) - x).abs()
    bound = _bound(codec, x)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quant_constant_groups_are_exact(axis):
    x = torch.full((1, 2, 32, 64), 3.25)
    codec = QuantCodec(bits=2, axis=axis, group_size=32)
    assert torch.equal(codec.roundtrip(x), x)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quant_huge_outlier_keeps_bound(axis):
    x = torch.randn(1, 2, 32, 64)
    x[0, 1, 5, 7] = 3000.0
    codec = QuantCodec(bits=4, axis=axis, group_size=32)
    err = (codec.roundtrip(x) - x).abs()
    assert (err <= _bound(codec, x)).all()
    assert err[0, 1, 5, 7] <= 3000.0 * 1e-3 + 200  # the outlier itself is reproduced to its step


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quant_rejects_non_finite_with_clear_error(bad):
    x = torch.randn(1, 2, 32, 64)
    x[0, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="NaN|inf"):
        QuantCodec(bits=4).encode(x)


def test_quant_rejects_values_beyond_fp16():
    x = torch.randn(1, 1, 32, 64)
    x[0, 0, 0, 0] = 1e6
    with pytest.raises(ValueError, match="fp16 range"):
        QuantCodec(bits=8).encode(x)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 5}, r"bits must be one of \(2, 3, 4, 8\)"),
    ({"axis": "row"}, "axis must be one of"),
    ({"group_size": 0}, "group_size must be a positive integer"),
])
def test_quant_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantCodec(**kwargs)


def test_quant_stored_sizes_follow_bit_widths():
    x = torch.randn(2, 3, 64, 64)
    for bits in (2, 3, 4, 8):
        stored = QuantCodec(bits=bits, axis="token", group_size=32).encode(x)
        assert stored["codes"].numel() * stored["codes"].element_size() == 2 * 3 * 64 * 64 * bits // 8
        assert stored["scale"].dtype == torch.float16 and stored["zero"].dtype == torch.float16
        assert stored["scale"].shape == (2, 3, 64, 2)


def test_decode_of_concatenation_is_concatenation_of_decodes():
    codec = QuantCodec(bits=3, axis="channel", group_size=16)
    a, b = torch.randn(1, 2, 32, 64), torch.randn(1, 2, 16, 64)
    sa, sb = codec.encode(a), codec.encode(b)
    joined = {k: torch.cat([sa[k], sb[k]], dim=2) for k in sa}
    expected = torch.cat([codec.decode(sa, torch.float32), codec.decode(sb, torch.float32)], dim=2)
    assert torch.equal(codec.decode(joined, torch.float32), expected)


def test_identity_codec_is_exact():
    x = torch.randn(1, 2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(IdentityCodec().roundtrip(x), x)
