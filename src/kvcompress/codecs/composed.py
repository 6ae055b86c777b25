"""Composition of a linear per-head transform with a codec that stores its output.

A `Transform` maps states (B, H, T, D) to a per-head linear image (B, H, T, D') and back
(`forward` / `inverse`). `ComposedCodec(transform, inner)` encodes `inner.encode(forward(x))` and
decodes `inverse(inner.decode(...))`; stored tensors keep the inner codec's (B, H, n, ...) layout.
A transform that is an orthogonal rotation exposes `matrix`, so attention can work in the rotated
space (`ComposedCodec.rotation`, `decode_rotated`).
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

    def matrix(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> torch.Tensor | None:
        """The orthogonal (dim, dim) R with forward(x) = (x - offset) @ R, if the transform is one; else None."""
        return None

    def offset(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The per-head (H, D) vector subtracted before `matrix` applies (None: nothing subtracted)."""
        return None


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

    def rotation(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor | None:
        """R (dim, dim) if the transform is an orthogonal rotation x -> x @ R, else None.

        Attention can then stay in the rotated space: q.k = (q @ R).(k @ R) and
        p @ V = (p @ (V @ R)) @ R^T, reading `decode_rotated` and never un-rotating stored tokens.
        """
        return self.transform.matrix(dim, device, dtype)

    def offset(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """(H, D) m with decode(stored) = decode_rotated(stored) @ R^T + m, or None when m = 0."""
        return self.transform.offset(device)

    def decode_rotated(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        """The stored states still rotated, (B, H, T, D): (decode(stored) - offset) @ R up to rounding."""
        return self.inner.decode(stored, dtype)
