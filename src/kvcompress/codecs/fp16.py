"""Store states (or low-rank coefficients) as fp16, whatever the model dtype.

fp16 is the reference dtype of every compression ratio, so a tensor stored by this codec
counts as uncompressed per value: the low-rank codec without quantization uses it for its
coefficients, whose saving then comes from the rank alone.

This module does not project or quantize anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Codec, Stored, check_finite

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class Fp16Codec(Codec):
    """Keeps (B, H, T, D) values as fp16 tensors of the same shape."""

    def encode(self, x: torch.Tensor) -> Stored:
        check_finite(x)
        peak = x.abs().max().item() if x.numel() else 0.0
        if peak > _FP16_MAX:
            raise ValueError(f"values up to {peak:.3g} exceed the fp16 range this codec stores them in")
        return {"coefficients": x.to(torch.float16).contiguous()}  # (B, H, T, D)

    def decode(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        return stored["coefficients"].to(dtype)
