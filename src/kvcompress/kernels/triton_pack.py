"""Quantize and pack one block of K or V states in one Triton kernel (uniform, asymmetric).

Computes exactly what `codecs.quant.QuantCodec.encode` computes, in the same float32 operations
(zero = fp16(min), scale = fp16((max - zero) / levels), code = clamp(round_half_even((x - zero) /
scale))), and packs the codes in the byte-planar layout of `codecs.packing`; the codes are
byte-identical to torch's (tested in Triton's interpreter). One program per packed row. The caller
checks the states first (finite, fp16 range) and falls back to torch for head_dim or groups that
are not powers of two (`kernels.can_pack`). Details: docs/gpu.md.
"""

from __future__ import annotations

import torch

from .backend import triton_or_none
from .fields import TOKEN_ROW_TOKENS, field_widths

triton, tl, jit = triton_or_none()  # without Triton (an optional extra) this module imports, unusable
# 1.5 * 2**23: adding and subtracting it rounds a float32 half to even
_ROUND_MAGIC = tl.constexpr(12582912.0) if tl is not None else None


@jit
def _codes(x, zero, scale, LEVELS: tl.constexpr):
    """Integer codes (int32) of float32 `x` with its broadcast float32 `zero` and `scale`."""
    safe = tl.where(scale > 0, scale, 1.0)
    v = tl.math.div_rn(x - zero, safe)
    v = tl.minimum(tl.maximum(v, -1.0), LEVELS + 1.0)
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    v = tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0)
    return v.to(tl.int32)


@jit
def _store_field(out_ptr, values, N: tl.constexpr, W: tl.constexpr):
    """Pack `values` (N,) of width W byte-planar: byte j = sum_h values[j + h*m] << h*W, m = N*W/8."""
    M: tl.constexpr = N * W // 8
    planes = tl.reshape(values, (8 // W, M))  # value j + h*m at [h, j]
    shifts = tl.arange(0, 8 // W) * W
    byte = tl.sum(planes << shifts[:, None], axis=0)  # fields of one byte do not overlap: sum == or
    tl.store(out_ptr + tl.arange(0, M), byte.to(tl.uint8))


@jit
def _store_row(out_ptr, codes, N: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
    """Pack one row of N int32 codes (any shape with N elements, row-major) into out_ptr."""
    flat = tl.reshape(codes, (N,))
    _store_field(out_ptr, flat & ((1 << W1) - 1), N, W1)
    if W2 > 0:
        _store_field(out_ptr + N * W1 // 8, (flat >> W1) & ((1 << W2) - 1), N, W2)


@jit
def _pack_channel_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, stride_b, stride_h, stride_t, H, n_groups,
                         D: tl.constexpr, GROUP: tl.constexpr, LEVELS: tl.constexpr,
                         W1: tl.constexpr, W2: tl.constexpr, ROW_BYTES: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, head, group of GROUP tokens)
    bh = pid // n_groups
    g = pid % n_groups
    b = bh // H
    h = bh % H
    t = tl.arange(0, GROUP)
    d = tl.arange(0, D)
    x_bh = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    x = tl.load(x_bh + (g * GROUP + t)[:, None] * stride_t + d[None, :]).to(tl.float32)
    zero = tl.min(x, axis=0).to(tl.float16)  # (D,)
    zero_f = zero.to(tl.float32)
    scale = tl.math.div_rn(tl.max(x, axis=0) - zero_f, LEVELS * 1.0).to(tl.float16)
    tl.store(zero_ptr + pid * D + d, zero)
    tl.store(scale_ptr + pid * D + d, scale)
    codes = _codes(x, zero_f[None, :], scale.to(tl.float32)[None, :], LEVELS)  # (GROUP, D)
    _store_row(codes_ptr + pid.to(tl.int64) * ROW_BYTES, codes, GROUP * D, W1, W2)


@jit
def _pack_token_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, stride_b, stride_h, stride_t, H, n_rows,
                       D: tl.constexpr, GROUP: tl.constexpr, LEVELS: tl.constexpr, ROW: tl.constexpr,
                       W1: tl.constexpr, W2: tl.constexpr, ROW_BYTES: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, head, row of ROW tokens)
    bh = pid // n_rows
    row = pid % n_rows
    b = bh // H
    h = bh % H
    t = tl.arange(0, ROW)
    d = tl.arange(0, D)
    x_bh = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    x = tl.load(x_bh + (row * ROW + t)[:, None] * stride_t + d[None, :]).to(tl.float32)
    NG: tl.constexpr = D // GROUP
    xg = tl.reshape(x, (ROW, NG, GROUP))
    zero = tl.min(xg, axis=2).to(tl.float16)  # (ROW, NG)
    zero_f = zero.to(tl.float32)
    scale = tl.math.div_rn(tl.max(xg, axis=2) - zero_f, LEVELS * 1.0).to(tl.float16)
    at = (pid * ROW + t)[:, None] * NG + tl.arange(0, NG)[None, :]  # scale, zero: (B, H, T, NG)
    tl.store(zero_ptr + at, zero)
    tl.store(scale_ptr + at, scale)
    codes = _codes(xg, zero_f[:, :, None], scale.to(tl.float32)[:, :, None], LEVELS)  # (ROW, NG, GROUP)
    _store_row(codes_ptr + pid.to(tl.int64) * ROW_BYTES, codes, ROW * D, W1, W2)


def quantize_pack(x: torch.Tensor, bits: int, axis: str, group_size: int) -> dict[str, torch.Tensor]:
    """Quantize and pack states x (B, H, T, D) as `QuantCodec(bits, axis, group_size).encode` does.

    Returns:
        {"codes": (B, H, T/r, r*D*bits/8) uint8, "scale", "zero": fp16, per channel
        (B, H, T/g, D) or per token (B, H, T, D/g)}, r = g (channel) or 8 (token).
    """
    B, H, T, D = x.shape
    w1, w2 = field_widths(bits)
    levels = (1 << bits) - 1
    if x.stride(-1) != 1:
        x = x.contiguous()
    row = group_size if axis == "channel" else TOKEN_ROW_TOKENS
    if T % row:
        raise ValueError(f"packing {row} tokens per row needs a multiple of {row} tokens, got {T}")
    n_rows = T // row
    row_bytes = row * D * bits // 8
    codes = torch.empty(B, H, n_rows, row_bytes, dtype=torch.uint8, device=x.device)
    stats = (B, H, n_rows, D) if axis == "channel" else (B, H, T, D // group_size)
    scale = torch.empty(stats, dtype=torch.float16, device=x.device)
    zero = torch.empty(stats, dtype=torch.float16, device=x.device)
    if codes.numel() == 0:
        return {"codes": codes, "scale": scale, "zero": zero}
    args = (x, codes, scale, zero, x.stride(0), x.stride(1), x.stride(2), H, n_rows)
    if axis == "channel":
        _pack_channel_kernel[(B * H * n_rows,)](*args, D=D, GROUP=group_size, LEVELS=levels,
                                                W1=w1, W2=w2, ROW_BYTES=row_bytes)
    else:
        _pack_token_kernel[(B * H * n_rows,)](*args, D=D, GROUP=group_size, LEVELS=levels, ROW=row,
                                              W1=w1, W2=w2, ROW_BYTES=row_bytes)
    return {"codes": codes, "scale": scale, "zero": zero}
