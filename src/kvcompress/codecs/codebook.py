"""Non-uniform scalar codebook quantization with one fp16 scale per vector (token and head).

Each vector x (D values) is stored as D bit-packed codebook indices and one fp16 scale:
    u = x / rms(x),  idx_d = argmin_j |u_d - c_j|,  s = <x, c[idx]> / <c[idx], c[idx]>,  x^ = s c[idx]
(bits + 16 / D bits per value). After a rotation (`ComposedCodec(RandomizedHadamard(seed),
CodebookCodec(bits))`) with the Gaussian Lloyd-Max codebook this is TurboQuant's recipe (Zandieh et
al., arXiv:2504.19874); departures: a least-squares scale instead of the norm, no QJL residual.
Codes of 8 consecutive tokens share a packed row, so `encode` takes a multiple of 8 tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .base import Codec, Stored, check_finite
from .lloyd_max import ALLOWED_CODEBOOK_BITS, gaussian_codebook
from .packing import pack, unpack

ROW_TOKENS = 8
_FP16_MAX = 65504.0


@functools.lru_cache(maxsize=64)
def _table(bits: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return gaussian_codebook(bits).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class CodebookCodec(Codec):
    """Gaussian Lloyd-Max codebook indices plus one fp16 least-squares scale per (B, H, T) vector.

    Attributes:
        bits: index width, one of 1, 2, 3, 4 (2**bits centroids).
    """

    bits: int = 4

    def __post_init__(self):
        if self.bits not in ALLOWED_CODEBOOK_BITS:
            raise ValueError(f"codebook bits must be one of {ALLOWED_CODEBOOK_BITS}, got {self.bits!r}")

    @property
    def token_multiple(self) -> int:
        return ROW_TOKENS

    def centroids(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(2**bits,) codebook, cached per device and dtype."""
        return _table(self.bits, torch.device(device), dtype)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, H, T, D) int64 and float32 scales (B, H, T, 1) of `x` (B, H, T, D); not packed."""
        x = x.float()
        c = self.centroids(x.device)
        rms = x.square().mean(dim=-1, keepdim=True).sqrt()  # (B, H, T, 1)
        u = x / torch.where(rms > 0, rms, torch.ones_like(rms))
        idx = torch.bucketize(u, (c[1:] + c[:-1]) / 2)  # nearest centroid; ties go to the lower one
        values = c[idx]  # (B, H, T, D)
        energy = values.square().sum(dim=-1, keepdim=True)
        scale = (x * values).sum(dim=-1, keepdim=True) / torch.where(energy > 0, energy, torch.ones_like(energy))
        return idx, scale

    def encode(self, x: torch.Tensor) -> Stored:
        check_finite(x)
        B, H, T, D = x.shape
        if D % 8:
            raise ValueError(f"head_dim must be a multiple of 8 for bit packing, got {D}")
        if T % ROW_TOKENS:
            raise ValueError(f"{self} packs {ROW_TOKENS} tokens per row and needs a multiple of {ROW_TOKENS} "
                             f"tokens, got {T}")
        idx, scale = self.quantize(x)
        if scale.abs().max().item() > _FP16_MAX:
            raise ValueError(f"KV states exceed the fp16 range in which scales are stored "
                             f"(scale up to {scale.abs().max().item():.3g}); this codec cannot represent them.")
        codes = idx.to(torch.uint8).reshape(B, H, T // ROW_TOKENS, ROW_TOKENS * D)  # 8 tokens per row
        return {"codes": pack(codes, self.bits),  # (B, H, T/8, 8*D*bits/8) uint8
                "scale": scale.half()}  # (B, H, T, 1) fp16

    def decoded_shape(self, stored: Stored) -> tuple[int, int, int, int]:
        """(B, H, T, D) of the states that `stored` encodes."""
        B, H, rows, m = stored["codes"].shape
        return B, H, rows * ROW_TOKENS, m * 8 // self.bits // ROW_TOKENS

    def decode(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        """x_hat = scale * c[idx], computed in float32 and returned in `dtype`, (B, H, T, D)."""
        B, H, T, D = self.decoded_shape(stored)
        codes = unpack(stored["codes"], self.bits).reshape(B, H, T, D)
        values = self.centroids(codes.device)[codes.long()]  # (B, H, T, D) float32
        return values.mul_(stored["scale"].float()).to(dtype)
