"""Bit packing of small unsigned integer codes into uint8 storage, in a "byte-planar" layout.

A row of n codes of `bits` bits (n a multiple of 8) packs into n * bits / 8 bytes. A code is split
into bit fields whose widths are the binary expansion of `bits`, widest first (3 = [2 @ 0, 1 @ 2]);
each field's n values take m = n * width / 8 bytes, byte j holding values j, j + m, j + 2m, ... So
unpacking a 4-bit row is `bytes & 15` and `bytes >> 4` over contiguous runs (writing codes into
every other byte is about 20x slower on a CPU). `unpack_reference` decodes one code at a time
from this definition; `unpack` is tested against it.
"""

from __future__ import annotations

import torch


def fields(bits: int) -> list[tuple[int, int]]:
    """(width, bit offset) of each field of a `bits`-bit code, widest first: 3 -> [(2, 0), (1, 2)]."""
    _check_bits(bits)
    out, offset = [], 0
    for width in (8, 4, 2, 1):
        if bits - offset >= width:
            out.append((width, offset))
            offset += width
    return out


def packed_length(n: int, bits: int) -> int:
    """Number of bytes that `n` codes of `bits` bits take once packed."""
    if n % 8:
        raise ValueError(f"can only pack a multiple of 8 codes, got {n}")
    return n * bits // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into bytes (layout in the module docstring).

    Args:
        codes: (..., n) integer tensor with values in [0, 2**bits); n % 8 == 0.
        bits: 1..8.

    Returns:
        (..., n * bits // 8) uint8 tensor.
    """
    _check_bits(bits)
    *lead, n = codes.shape
    packed_length(n, bits)
    codes = codes.to(torch.int32)
    parts = []
    for width, offset in fields(bits):
        values = (codes >> offset) & ((1 << width) - 1)  # (..., n)
        m = n * width // 8
        planes = values.reshape(*lead, 8 // width, m)  # value j + h*m at [..., h, j]
        byte = torch.zeros(*lead, m, dtype=torch.int32, device=codes.device)
        for h in range(8 // width):
            byte |= planes[..., h, :] << (h * width)
        parts.append(byte.to(torch.uint8))
    return torch.cat(parts, dim=-1)


def unpack_reference(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`, one code at a time, straight from the layout's definition (slow).

    Args:
        packed: (..., m) uint8 tensor, m % bits == 0.
        bits: 1..8.

    Returns:
        (..., m * 8 // bits) uint8 tensor of codes.
    """
    _check_bits(bits)
    *lead, total = packed.shape
    n = total * 8 // bits
    codes = torch.zeros(*lead, n, dtype=torch.int32, device=packed.device)
    start = 0
    for width, offset in fields(bits):
        m = n * width // 8
        for index in range(n):
            h, j = divmod(index, m)
            value = (packed[..., start + j].to(torch.int32) >> (h * width)) & ((1 << width) - 1)
            codes[..., index] |= value << offset
        start += m
    return codes.to(torch.uint8)


def _unpack_field(source: torch.Tensor, width: int, out: torch.Tensor) -> None:
    """Write the (..., m * 8/width) values of one byte-planar field held in `source` (..., m) into `out`."""
    m = source.shape[-1]
    count = 8 // width
    mask = (1 << width) - 1
    for h in range(count):
        target = out[..., h * m:(h + 1) * m]
        if h == 0:
            torch.bitwise_and(source, mask, out=target)
        elif h == count - 1:  # the top value of a byte needs no mask
            torch.bitwise_right_shift(source, h * width, out=target)
        else:
            torch.bitwise_right_shift(source, h * width, out=target)
            target.bitwise_and_(mask)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`, on the decode hot path (a few whole-run operations per field).

    Args:
        packed: (..., m) uint8 tensor, m % bits == 0.
        bits: 1..8.

    Returns:
        (..., m * 8 // bits) uint8 tensor of codes (for 8 bits, `packed` itself).
    """
    _check_bits(bits)
    if bits == 8:
        return packed
    *lead, total = packed.shape
    n = total * 8 // bits
    codes = torch.empty(*lead, n, dtype=torch.uint8, device=packed.device)
    scratch = None
    start = 0
    for index, (width, offset) in enumerate(fields(bits)):
        m = n * width // 8
        source = packed[..., start:start + m]
        start += m
        if index == 0:  # the widest field, at offset 0, is written straight into the codes
            _unpack_field(source, width, codes)
            continue
        if scratch is None:
            scratch = torch.empty_like(codes)
        _unpack_field(source, width, scratch)
        codes |= scratch.bitwise_left_shift_(offset)
    return codes

