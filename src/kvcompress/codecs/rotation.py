"""Seeded randomized Hadamard rotation of every head: random signs, then Hadamard.

R = diag(s) Hd, s random signs from `seed`, Hd = Hadamard(D) / sqrt(D) (Sylvester; D = 64, 128,
256). R is orthogonal, so q.k = (qR).(kR), and after R a vector's coordinates are close to Gaussian
whatever its channel outliers, which a fixed Lloyd-Max codebook needs. TurboQuant (Zandieh et al.,
arXiv:2504.19874) uses a random rotation; departure: a randomized Hadamard instead of a dense random
orthogonal matrix. R is built once per (head_dim, seed, device, dtype) and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .composed import Transform
from .hadamard import hadamard_matrix


def layer_seed(seed: int, layer_idx: int) -> int:
    """The rotation seed of one layer: each layer draws its own signs from the spec's seed."""
    return seed * 1_000_003 + layer_idx


@functools.lru_cache(maxsize=512)
def randomized_hadamard_matrix(dim: int, seed: int, device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(dim, dim) orthogonal diag(signs) @ Hadamard(dim) / sqrt(dim); the signs come from `seed`."""
    gen = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).double() * 2 - 1  # (D,)
    h = hadamard_matrix(dim).double()
    return (signs[:, None] * h).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class RandomizedHadamard(Transform):
    """x (B, H, T, D) -> x @ R, R = diag(signs(seed)) @ Hadamard(D) / sqrt(D); inverse y @ R^T.

    Attributes:
        seed: non-negative integer that draws the signs (the factory derives one per layer).
    """

    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def matrix(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        """R (dim, dim), cached per (dim, seed, device, dtype)."""
        return randomized_hadamard_matrix(dim, self.seed, torch.device(device), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix(x.shape[-1], x.device, x.dtype)  # (B, H, T, D)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix(y.shape[-1], y.device, y.dtype).T  # R orthogonal: R^-1 = R^T
