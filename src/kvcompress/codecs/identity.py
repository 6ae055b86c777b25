"""The no-op codec: stores states as they are, in their own dtype.

Used for the tensor (K or V) that a spec leaves uncompressed, so that the other one can be
measured alone. It saves nothing and claims nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Codec, Stored


@dataclass(frozen=True)
class IdentityCodec(Codec):
    """Keeps (B, H, T, D) states unchanged."""

    def encode(self, x: torch.Tensor) -> Stored:
        return {"states": x.contiguous()}  # (B, H, T, D)

    def decode(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        return stored["states"].to(dtype)
