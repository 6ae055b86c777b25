"""Bit fields of the byte-planar packing (`codecs.packing`) for the widths the kernels handle.

Pure Python, no Triton: both the dispatch (`kernels.can_pack`) and the kernels read it. This
module does not pack anything.
"""

from __future__ import annotations

PACK_BITS = (2, 3, 4, 8)
TOKEN_ROW_TOKENS = 8  # per-token codes are packed 8 tokens to a row (codecs.quant.TOKEN_AXIS_ROW_TOKENS)
_WIDTHS = {2: (2, 0), 3: (2, 1), 4: (4, 0), 8: (8, 0)}


def field_widths(bits: int) -> tuple[int, int]:
    """Widths (first, second) of the bit fields of a `bits`-bit code, 0 if there is no second:
    3 -> (2, 1): bits 0-1 in the first field's planes, bit 2 in the second's."""
    if bits not in _WIDTHS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits}")
    return _WIDTHS[bits]
