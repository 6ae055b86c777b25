"""Bit packing of small unsigned integer codes into uint8 storage.

Codes of `bits` bits (1..8) are packed eight at a time into `bits` bytes, so the
stored size is exactly `n * bits / 8` bytes: 3-bit codes take 3 bytes per 8 codes,
with no padding bits. The packed axis is the last one and its length must be a
multiple of 8.

This module does not quantize: it only moves integer codes in and out of bytes.
"""

from __future__ import annotations

import torch

_SHIFTS_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _shifts(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code shifts (8,), byte shifts (bits,)) as int32 tensors on `device`."""
    key = (bits, device)
    if key not in _SHIFTS_CACHE:
        code_shifts = torch.arange(8, device=device, dtype=torch.int32) * bits
        byte_shifts = torch.arange(bits, device=device, dtype=torch.int32) * 8
        _SHIFTS_CACHE[key] = (code_shifts, byte_shifts)
    return _SHIFTS_CACHE[key]


def packed_length(n: int, bits: int) -> int:
    """Number of bytes that `n` codes of `bits` bits take once packed."""
    if n % 8:
        raise ValueError(f"can only pack a multiple of 8 codes, got {n}")
    return n * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into bytes.

    Args:
        codes: (..., n) integer tensor with values in [0, 2**bits); n % 8 == 0.
        bits: 1..8.

    Returns:
        (..., n * bits // 8) uint8 tensor.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, n = codes.shape
    packed_length(n, bits)
    code_shifts, byte_shifts = _shifts(bits, codes.device)
    groups = codes.to(torch.int32).reshape(*lead, n // 8, 8)  # (..., n/8, 8)
    # 8 codes of <= 7 bits fit in 56 bits; int32 suffices up to 4 bits, int64 above.
    word_dtype = torch.int32 if bits <= 4 else torch.int64
    words = (groups.to(word_dtype) << code_shifts.to(word_dtype)).sum(-1, dtype=word_dtype)  # (..., n/8)
    out = (words.unsqueeze(-1) >> byte_shifts.to(word_dtype)) & 0xFF  # (..., n/8, bits)
    return out.to(torch.uint8).reshape(*lead, n * bits // 8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`.

    Args:
        packed: (..., m) uint8 tensor, m % bits == 0.
        bits: 1..8.

    Returns:
        (..., m * 8 // bits) uint8 tensor of codes.
    """
    if bits == 8:
        return packed
    *lead, m = packed.shape
    code_shifts, byte_shifts = _shifts(bits, packed.device)
    word_dtype = torch.int32 if bits <= 4 else torch.int64
    byte_groups = packed.to(word_dtype).reshape(*lead, m // bits, bits)  # (..., n/8, bits)
    words = (byte_groups << byte_shifts.to(word_dtype)).sum(-1, dtype=word_dtype)  # (..., n/8)
    mask = (1 << bits) - 1
    codes = (words.unsqueeze(-1) >> code_shifts.to(word_dtype)) & mask  # (..., n/8, 8)
    return codes.to(torch.uint8).reshape(*lead, m // bits * 8)
