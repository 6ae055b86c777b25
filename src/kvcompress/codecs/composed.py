"""Composition of a linear per-head transform with a codec that stores its output.

A `Transform` maps states (B, H, T, D) to a per-head linear image (B, H, T, D') and back
(`forward` / `inverse`). `ComposedCodec(transform, inner)` encodes `inner.encode(forward(x))`
and decodes `inverse(inner.decode(...))`, so stored tensors keep the (B, H, n, ...) layout
of the inner codec and the cache can append and reorder them as for any codec.

This module does not know any particular transform (see `hadamard`, `lowrank`) and does not
quantize (the inner codec does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .base import Codec, Stored, check_finite


class Transform(ABC):
    """A linear map applied to every head: (B, H, T, D) <-> (B, H, T, D')."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) float32 -> (B, H, T, D') float32."""

    @abstractmethod
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D') float32 -> (B, H, T, D) float32 (exact inverse if D' == D)."""


@dataclass(frozen=True)
class ComposedCodec(Codec):
    """`inner` applied to the image of the states under `transform`.

    Attributes:
        transform: the per-head linear map (computed in float32).
        inner: the codec that stores the transformed states, e.g. `QuantCodec` or `Fp16Codec`.
    """

    transform: Transform
    inner: Codec

    @property
    def token_multiple(self) -> int:
        return self.inner.token_multiple

    def encode(self, x: torch.Tensor) -> Stored:
        check_finite(x)
        return self.inner.encode(self.transform.forward(x.float()))

    def decode(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        return self.transform.inverse(self.inner.decode(stored, torch.float32)).to(dtype)
