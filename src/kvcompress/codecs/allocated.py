"""Transform coding of calibrated principal components: bits allocated by variance, one scale per vector.

Composed after a centred projection on the calibrated basis (`Centered(mean, LowRankProjection(...))`),
coefficient j (variance sigma_j^2) gets b_j bits of a Gaussian Lloyd-Max codebook, b_j chosen once
per layer by greedy reverse water-filling (b_j = 0 drops it). Per vector: z_j = y_j / sigma_j,
idx_j = nearest centroid of z_j / rms(z), and a least-squares fp16 scale s for
y^_j = s sigma_j c[idx_j]; codes of equal width are packed together (8 tokens per row). With
`scale_bits=8` the scale is one logarithmic byte (`scalecode`) and the codes are chosen for the
coded scale: a few rounds of re-picking the nearest centroids of z / s^ and re-fitting s, keeping
each vector's round of least error. Classic
transform coding (KLT + bit allocation) in the spirit of KVQuant (Hooper et al., arXiv:2401.18079);
departure: one allocation per layer, not per head (by variance, or by variance times query energy:
`cache.build.pca_codebook`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from .base import Codec, Stored, check_finite
from .codebook import ROW_TOKENS
from .lloyd_max import MAX_ALLOCATED_BITS, gaussian_codebook, gaussian_mse
from .packing import pack, unpack
from .scalecode import decode_scale8, encode_scale8, stored_scale

SCALE_BITS = (16, 8)
SCALE8_ROUNDS = 4  # rounds of (nearest centroids of z / s^, least-squares s, coded s^) per vector
_FP16_MAX = 65504.0


def allocate_bits(variances: torch.Tensor, total_bits: int, max_bits: int = MAX_ALLOCATED_BITS) -> tuple[int, ...]:
    """Greedy integer reverse water-filling: widths b_j (sum = total_bits) for coordinate variances (D,).

    Each step gives one bit to the coordinate whose expected error var_j * mse(b_j) drops most.
    """
    var = [float(v) for v in variances]
    if total_bits > max_bits * len(var):
        raise ValueError(f"{total_bits} bits cannot be spread over {len(var)} coordinates of at most {max_bits}")
    widths = [0] * len(var)
    heap = [(-(v * (gaussian_mse(0) - gaussian_mse(1))), j) for j, v in enumerate(var)]
    heapq.heapify(heap)
    for _ in range(total_bits):
        _, j = heapq.heappop(heap)
        widths[j] += 1
        if widths[j] < max_bits:
            gain = var[j] * (gaussian_mse(widths[j]) - gaussian_mse(widths[j] + 1))
            heapq.heappush(heap, (-gain, j))
    return tuple(widths)


@dataclass(frozen=True, eq=False)
class AllocatedCodebookCodec(Codec):
    """Per-coordinate Lloyd-Max codebooks of `widths[j]` bits on coefficients scaled by `std` (H, D).

    Attributes:
        widths: bits of each of the D coordinates (0 = not stored), shared by all heads.
        std: (kv_heads, D) calibrated standard deviation of each coordinate, per head, or (1, D)
            shared by every head.
        scale_bits: 16 (an fp16 scale per vector) or 8 (one logarithmic byte, `scalecode`).
    """

    widths: tuple[int, ...]
    std: torch.Tensor
    mix: bool = True
    scale_bits: int = 16
    _groups: dict = field(default_factory=dict, repr=False)
    _mixers: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.std.dim() != 2 or self.std.shape[1] != len(self.widths):
            raise ValueError(f"std must have shape (kv_heads, {len(self.widths)}), got {tuple(self.std.shape)}")
        if self.scale_bits not in SCALE_BITS:
            raise ValueError(f"scale_bits must be one of {SCALE_BITS}, got {self.scale_bits!r}")
        if any(not 0 <= w <= MAX_ALLOCATED_BITS for w in self.widths):
            raise ValueError(f"widths must be in 0..{MAX_ALLOCATED_BITS}, got {self.widths}")
        if not torch.isfinite(self.std).all() or (self.std <= 0).any():
            raise ValueError("calibrated standard deviations must be positive and finite; re-run `kvcompress calibrate`")
        object.__setattr__(self, "std", self.std.detach().float().contiguous())
        groups = {}
        for j, w in enumerate(self.widths):
            if w:
                groups.setdefault(w, []).append(j)
        object.__setattr__(self, "_groups", {w: torch.tensor(js) for w, js in sorted(groups.items())})
        if self.mix:
            gen = torch.Generator().manual_seed(0)
            mixers = {}
            for w, js in self._groups.items():
                q, r = torch.linalg.qr(torch.randn(len(js), len(js), generator=gen, dtype=torch.float64))
                mixers[w] = (q * torch.sign(torch.diagonal(r))).float()  # Haar-random orthogonal
            object.__setattr__(self, "_mixers", mixers)

    @property
    def token_multiple(self) -> int:
        return ROW_TOKENS

    def code_groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(width w, coordinate indices js (n_w,), mixer M (n_w, n_w) or None) per stored tensor
        `codes{w}`, in storage order: the decoded coefficients are y[js] = book_w[codes] @ M^T."""
        return [(w, js, self._mixers.get(w)) for w, js in self._groups.items()]

    def _check(self, shape) -> None:
        if self.std.shape[0] not in (1, shape[1]) or shape[-1] != len(self.widths):
            raise ValueError(f"states (B, H, T, D) = {tuple(shape)} do not match the calibrated statistics "
                             f"(H, D) = {tuple(self.std.shape)}; use an artifact calibrated on this model")

    def encode(self, y: torch.Tensor) -> Stored:
        check_finite(y)
        self._check(y.shape)
        B, H, T, D = y.shape
        if T % ROW_TOKENS:
            raise ValueError(f"{type(self).__name__} packs {ROW_TOKENS} tokens per row and needs a multiple of "
                             f"{ROW_TOKENS} tokens, got {T}")
        y = y.float()
        std = self.std.to(y.device)[None, :, None, :]  # (1, H, 1, D)
        z = y / std
        coded = torch.zeros(D, dtype=torch.bool, device=y.device)
        for js in self._groups.values():
            coded[js.to(y.device)] = True
        rms = z[..., coded].square().mean(-1, keepdim=True).sqrt()  # (B, H, T, 1)
        norm = torch.where(rms > 0, rms, torch.ones_like(rms))
        best = None
        for _ in range(1 if self.scale_bits == 16 else SCALE8_ROUNDS):
            idx, values = self._nearest(z / norm, std)
            energy = values.square().sum(-1, keepdim=True)
            scale = (y * values).sum(-1, keepdim=True) / torch.where(energy > 0, energy, torch.ones_like(energy))
            if self.scale_bits == 16:
                best = idx, scale
                break
            code = encode_scale8(scale)  # clamped to SCALE8_MAX: the next round re-picks codes for it
            coded_scale = decode_scale8(code).float()
            err = (y - coded_scale * values).square().sum(-1, keepdim=True)  # (B, H, T, 1)
            if best is None:
                best = idx, code, err
            else:
                better = err < best[2]
                best = ({w: torch.where(better, i, best[0][w]) for w, i in idx.items()},
                        torch.where(better, code, best[1]), torch.where(better, err, best[2]))
            norm = torch.where(coded_scale > 0, coded_scale, norm)
        idx = best[0]
        stored = {f"codes{w}": pack(i.to(torch.uint8).reshape(B, H, T // ROW_TOKENS, ROW_TOKENS * i.shape[-1]), w)
                  for w, i in idx.items()}
        if self.scale_bits == 8:
            stored["scale"] = best[1]  # (B, H, T, 1) uint8
            return stored
        scale = best[1]
        if scale.abs().max().item() > _FP16_MAX:
            raise ValueError("KV states exceed the fp16 range in which scales are stored; "
                             "this codec cannot represent them.")
        stored["scale"] = scale.half()  # (B, H, T, 1)
        return stored

    def _nearest(self, u: torch.Tensor, std: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Codes {width: (B, H, T, n_w) int64} of the nearest centroids of the normalized coefficients
        u (B, H, T, D), and the coefficients they decode to at scale 1, (B, H, T, D) float32."""
        values = torch.zeros_like(u)
        codes = {}
        for w, js in self._groups.items():
            js = js.to(u.device)
            c = gaussian_codebook(w).to(u.device)
            mixer = self._mixers.get(w)
            group = u[..., js] @ mixer.to(u.device) if mixer is not None else u[..., js]
            idx = torch.bucketize(group, (c[1:] + c[:-1]) / 2)  # (B, H, T, n_w)
            centroids = c[idx] @ mixer.to(u.device).T if mixer is not None else c[idx]
            values[..., js] = centroids * std[..., js]
            codes[w] = idx
        return codes, values

    def decode(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        scale = stored_scale(stored["scale"]).float()  # (B, H, T, 1)
        B, H, T, _ = scale.shape
        D = len(self.widths)
        std = self.std.to(scale.device)[None, :, None, :]
        out = torch.zeros(B, H, T, D, dtype=torch.float32, device=scale.device)
        for w, js in self._groups.items():
            js = js.to(scale.device)
            idx = unpack(stored[f"codes{w}"], w).reshape(B, H, T, len(js)).long()
            centroids = gaussian_codebook(w).to(scale.device)[idx]
            mixer = self._mixers.get(w)
            out[..., js] = centroids @ mixer.to(scale.device).T if mixer is not None else centroids
        return (out * std * scale).to(dtype)
