"""One-byte logarithmic scales: what `scale_bits=8` codebook codecs store instead of an fp16 scale.

A positive scale s is stored as the byte c = clamp(round(16 log2 s) + 192, 1, 255) and read back as
2^((c - 192) / 16) rounded to fp16 (c = 0 is a zero scale): 1/16 of an octave per step (4.4%),
covering 2^-11.94 .. 2^3.94. The codecs that use it divide their coordinates by calibrated standard
deviations first, so their scales sit near 1 on any model. Coding the scale this way saves 8 bits
per vector, which the presets spend on codes (bitsN: N + 1/8 code bits per value).

This module only maps scales to bytes and back; `allocated.AllocatedCodebookCodec` chooses them.
"""

from __future__ import annotations

import torch

STEPS_PER_OCTAVE = 16
ONE = 192  # the byte of scale 1.0
SCALE8_MAX = 2.0 ** ((255 - ONE) / STEPS_PER_OCTAVE)
SCALE8_MIN = 2.0 ** ((1 - ONE) / STEPS_PER_OCTAVE)


def encode_scale8(scale: torch.Tensor) -> torch.Tensor:
    """uint8 bytes of non-negative scales (any shape); 0 stays 0, others are clamped to the range."""
    s = scale.float()
    code = (torch.log2(s.clamp_min(SCALE8_MIN)) * STEPS_PER_OCTAVE).round() + ONE
    return torch.where(s > 0, code.clamp(1, 255), torch.zeros_like(code)).to(torch.uint8)


def decode_scale8(code: torch.Tensor) -> torch.Tensor:
    """fp16 scales (same shape) of the bytes `code` (uint8)."""
    c = code.to(torch.float32)
    s = torch.exp2((c - ONE) / STEPS_PER_OCTAVE)
    return torch.where(code > 0, s, torch.zeros_like(s)).half()


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp16 scales of a stored `scale` tensor: fp16 as they are, uint8 bytes decoded."""
    return decode_scale8(scale) if scale.dtype == torch.uint8 else scale
