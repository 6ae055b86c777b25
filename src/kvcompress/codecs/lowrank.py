"""Low-rank projection of every KV head onto its top-`rank` calibrated directions.

With a per-head orthonormal basis U (H, D, r) from a calibration artifact, states x (B, H, T, D) are
stored as coefficients c = x U (B, H, T, r) and reconstructed as c U^T; for uncentered bases the
mean squared error on the calibration data is the sum of the discarded eigenvalues. Compose with
`Fp16Codec` or `QuantCodec` through `ComposedCodec`. Follows Palu (Chang et al., arXiv:2407.21118);
departures: the basis is a PCA of cached K/V (not an SVD of the projection weights) and the latent
is decoded before attention.
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
