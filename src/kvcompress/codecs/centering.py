"""Subtract a calibrated per-head mean before another transform: x -> inner(x - m).

Keys carry a large mean (52-74% of the post-RoPE and 77-94% of the pre-RoPE key energy on the
embedded model), which a per-vector scale would spend its codes on. The per-layer, per-KV-head mean
m (H, D) comes from the calibration artifact and is stored once per layer; decode adds it back, and
attention can fold it out: q.(k_c + m) = q.k_c + q.m, sum_t p_t (v_t + m) = sum_t p_t v_t + (sum_t
p_t) m (`ComposedCodec.offset`). Like KVQuant's per-channel normalisation (arXiv:2401.18079);
departure: only the mean, added back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .composed import Transform


@dataclass(frozen=True, eq=False)
class Centered(Transform):
    """forward(x) = inner.forward(x - mean), inverse(y) = inner.inverse(y) + mean, per head.

    Attributes:
        mean: (kv_heads, head_dim) float32 mean of the states, from a calibration artifact.
        inner: the transform applied to the centred states (e.g. `RandomizedHadamard`).
    """

    mean: torch.Tensor
    inner: Transform
    _on_device: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mean.dim() != 2:
            raise ValueError(f"mean must have shape (kv_heads, head_dim), got {tuple(self.mean.shape)}")
        if not torch.isfinite(self.mean).all():
            raise ValueError("the calibrated mean holds NaN or inf; re-run `kvcompress calibrate`")
        object.__setattr__(self, "mean", self.mean.detach().float().contiguous())

    def offset(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The mean (H, D) float32 on `device` (moved once per device, then cached)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.mean.to(device)
        return self._on_device[device]

    def _broadcast(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[0] or x.shape[-1] != self.mean.shape[1]:
            raise ValueError(f"states (B, H, T, D) = {tuple(x.shape)} do not match the calibrated mean "
                             f"(H, D) = {tuple(self.mean.shape)}; use an artifact calibrated on this model")
        return self.offset(x.device)[None, :, None, :].to(x.dtype)  # (1, H, 1, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(x - self._broadcast(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        x = self.inner.inverse(y)
        return x + self._broadcast(x)

    def matrix(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> torch.Tensor | None:
        return self.inner.matrix(dim, device, dtype)
