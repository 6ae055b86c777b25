"""Orthonormal Hadamard rotation of every head before quantization (QuaRot / llama.cpp style).

The rotation H / sqrt(D) (Sylvester construction, D a power of two) spreads an outlier
channel over all channels, so per-token groups quantize with smaller ranges. It is
orthonormal and symmetric, so its inverse is itself and attention scores are unchanged by it.
Departure from QuaRot (Ashkboos et al., 2024, arXiv:2404.00456): no random sign flips and no
fusing into weights; the rotation is applied to the stored states and undone at decode.

This module does not quantize (compose it with `QuantCodec` via `ComposedCodec`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .composed import Transform


@functools.lru_cache(maxsize=8)
def hadamard_matrix(dim: int) -> torch.Tensor:
    """(dim, dim) float32 orthonormal Sylvester-Hadamard matrix; dim must be a power of two."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs head_dim to be a power of two, got {dim}; "
                         "use method 'quant' without rotation for this model")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / dim ** 0.5).float()


@functools.lru_cache(maxsize=16)
def _hadamard_on(dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`hadamard_matrix(dim)` on `device` in `dtype`, built and copied once per (dim, device, dtype)."""
    return hadamard_matrix(dim).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class HadamardRotation(Transform):
    """x (B, H, T, D) -> x @ Hd with Hd = Hadamard(D) / sqrt(D); its own inverse."""

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x.shape[-1], x.device, x.dtype)

    def matrix(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        """Hd (dim, dim), symmetric and orthogonal; built once per (dim, device, dtype), so shared: do not modify."""
        return _hadamard_on(dim, torch.device(device), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._matrix(x)  # (B, H, T, D)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self._matrix(y)  # symmetric and orthonormal: Hd^-1 = Hd
