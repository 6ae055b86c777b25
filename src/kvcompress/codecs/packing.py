"""Bit packing of small unsigned integer codes into uint8 storage.

Codes of `bits` bits (1..8) are packed eight at a time into `bits` bytes, so the
stored size is exactly `n * bits / 8` bytes: 3-bit codes take 3 bytes per 8 codes,
with no padding bits. The packed axis is the last one and its length must be a
multiple of 8. Within each group of `bits` bytes, code i sits at bits [i*bits, (i+1)*bits)
of the little-endian integer that those bytes form.

Unpacking is on the decode hot path (every compressed token is unpacked at every decode
step), so `unpack_codes` takes the shortest route the layout allows: for 1, 2 and 4 bits,
4 consecutive bytes are exactly one little-endian int32 word holding 32/bits codes, so the
bytes are reinterpreted as int32 (no copy) and each code is one shift and one mask away.
Other widths assemble one int32 word per group of `bits` bytes first. `unpack_reference`
is the plain byte-by-byte inverse of `pack`, kept as the specification the fast path is
tested against and as the fallback where the fast path does not apply.

This module does not quantize: it only moves integer codes in and out of bytes.
"""

from __future__ import annotations

import sys

import torch

_SHIFTS_CACHE: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}
_LITTLE_ENDIAN = sys.byteorder == "little"


def _arange_shifts(count: int, step: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(count,) tensor [0, step, 2*step, ...] of `dtype` on `device`, cached."""
    key = (count, step, dtype, device)
    if key not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[key] = torch.arange(count, device=device, dtype=dtype) * step
    return _SHIFTS_CACHE[key]


def packed_length(n: int, bits: int) -> int:
    """Number of bytes that `n` codes of `bits` bits take once packed."""
    if n % 8:
        raise ValueError(f"can only pack a multiple of 8 codes, got {n}")
    return n * bits // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into bytes.

    Args:
        codes: (..., n) integer tensor with values in [0, 2**bits); n % 8 == 0.
        bits: 1..8.

    Returns:
        (..., n * bits // 8) uint8 tensor.
    """
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, n = codes.shape
    packed_length(n, bits)
    # 8 codes of <= 7 bits fit in 56 bits; int32 suffices up to 4 bits, int64 above.
    word_dtype = torch.int32 if bits <= 4 else torch.int64
    code_shifts = _arange_shifts(8, bits, word_dtype, codes.device)
    byte_shifts = _arange_shifts(bits, 8, word_dtype, codes.device)
    groups = codes.to(word_dtype).reshape(*lead, n // 8, 8)  # (..., n/8, 8)
    words = (groups << code_shifts).sum(-1, dtype=word_dtype)  # (..., n/8)
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # (..., n/8, bits)
    return out.to(torch.uint8).reshape(*lead, n * bits // 8)


def unpack_reference(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`, byte by byte (the specification; see `unpack_codes` for the fast path).

    Args:
        packed: (..., m) uint8 tensor, m % bits == 0.
        bits: 1..8.

    Returns:
        (..., m * 8 // bits) uint8 tensor of codes.
    """
    _check_bits(bits)
    if bits == 8:
        return packed
    *lead, m = packed.shape
    word_dtype = torch.int32 if bits <= 4 else torch.int64
    code_shifts = _arange_shifts(8, bits, word_dtype, packed.device)
    byte_shifts = _arange_shifts(bits, 8, word_dtype, packed.device)
    byte_groups = packed.to(word_dtype).reshape(*lead, m // bits, bits)  # (..., n/8, bits)
    words = (byte_groups << byte_shifts).sum(-1, dtype=word_dtype)  # (..., n/8)
    codes = (words.unsqueeze(-1) >> code_shifts) & ((1 << bits) - 1)  # (..., n/8, 8)
    return codes.to(torch.uint8).reshape(*lead, m // bits * 8)


def _int32_view(packed: torch.Tensor) -> torch.Tensor | None:
    """`packed` (..., m) uint8 reinterpreted as (..., m/4) int32 without a copy, or None if it cannot be."""
    if not (_LITTLE_ENDIAN and packed.shape[-1] % 4 == 0 and packed.is_contiguous()
            and packed.data_ptr() % 4 == 0):
        return None
    return packed.view(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`, on the decode hot path: codes as int32 (uint8 for 8 bits), ready to scale.

    Args:
        packed: (..., m) uint8 tensor, m % bits == 0.
        bits: 1..8.

    Returns:
        (..., m * 8 // bits) tensor of codes: int32 for bits < 8, the input itself for bits == 8.
    """
    _check_bits(bits)
    if bits == 8:
        return packed
    if bits > 4:  # 8 codes span more than 32 bits: no int32 route
        return unpack_reference(packed, bits)
    *lead, m = packed.shape
    n = m // bits * 8
    mask = (1 << bits) - 1
    words = _int32_view(packed) if 32 % bits == 0 else None
    if words is not None:  # 1, 2, 4 bits: each int32 word holds 32/bits codes, in order
        shifts = _arange_shifts(32 // bits, bits, torch.int32, packed.device)
    else:  # 3 bits (or an unaligned view): one int32 word per group of `bits` bytes
        groups = packed.reshape(*lead, m // bits, bits)  # (..., n/8, bits)
        words = groups[..., 0].to(torch.int32)
        for i in range(1, bits):
            words |= groups[..., i].to(torch.int32) << (8 * i)
        shifts = _arange_shifts(8, bits, torch.int32, packed.device)
    # Arithmetic right shifts of a negative word bring in ones from the left; the mask drops them.
    codes = (words.unsqueeze(-1) >> shifts).bitwise_and_(mask)  # (..., words, codes per word)
    return codes.reshape(*lead, n)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`.

    Args:
        packed: (..., m) uint8 tensor, m % bits == 0.
        bits: 1..8.

    Returns:
        (..., m * 8 // bits) uint8 tensor of codes.
    """
    return unpack_codes(packed, bits).to(torch.uint8)
