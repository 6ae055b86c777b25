"""Low-rank projection of every KV head onto its top-`rank` calibrated directions.

With a per-head orthonormal basis U (D, r) from a calibration artifact (`kvcompress
calibrate`), states x (B, H, T, D) are stored as coefficients c = x U (B, H, T, r) and
reconstructed as c U^T. For uncentered (second-moment) bases, the mean squared error on the
calibration data equals the sum of the discarded eigenvalues. Compose with `Fp16Codec`
(coefficients in fp16) or `QuantCodec` (quantized coefficients) via `ComposedCodec`.

Follows the idea of Palu (Chang et al., 2024, arXiv:2407.21118) of storing a low-rank latent;
departure: the basis comes from PCA of cached K/V (not an SVD of the projection weights), and
the latent is decoded to full K/V before attention rather than fused into the query.

This module does not compute bases (see `kvcompress.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .composed import Transform


@dataclass(frozen=True, eq=False)
class LowRankProjection(Transform):
    """Project (B, H, T, D) onto `basis` (H, D, r) with orthonormal columns per head."""

    basis: torch.Tensor

    def __post_init__(self):
        if self.basis.dim() != 3 or self.basis.shape[2] > self.basis.shape[1]:
            raise ValueError(f"basis must have shape (kv_heads, head_dim, rank) with rank <= head_dim, "
                             f"got {tuple(self.basis.shape)}")
        object.__setattr__(self, "basis", self.basis.detach().float().contiguous())

    @property
    def rank(self) -> int:
        return self.basis.shape[2]

    def _basis_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.basis.device != x.device:  # follow the cache to its device once
            object.__setattr__(self, "basis", self.basis.to(x.device))
        return self.basis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        basis = self._basis_for(x)
        if x.shape[1] != basis.shape[0] or x.shape[3] != basis.shape[1]:
            raise ValueError(f"states of shape {tuple(x.shape)} do not match a basis for {basis.shape[0]} heads "
                             f"of dim {basis.shape[1]}; was the artifact calibrated on this model?")
        return torch.matmul(x, basis.unsqueeze(0))  # (B, H, T, D) @ (1, H, D, r) -> (B, H, T, r)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        basis = self._basis_for(y)
        return torch.matmul(y, basis.transpose(1, 2).unsqueeze(0))  # (B, H, T, r) @ (1, H, r, D)

    def __repr__(self) -> str:
        heads, dim, rank = self.basis.shape
        return f"LowRankProjection(heads={heads}, head_dim={dim}, rank={rank})"
