"""Turn a `TensorSpec` into the codec instance that one layer uses for K or V.

This module does not decide which layers get which spec (see `CacheSpec.for_layer`), nor
whether keys are compressed pre- or post-RoPE (the cache decides and says so via `kind`).
"""

from __future__ import annotations

import warnings

import torch

from ..calibration import KINDS  # the tensors a calibration artifact describes
from ..codecs.allocated import AllocatedCodebookCodec, allocate_bits
from ..codecs.base import Codec
from ..codecs.centering import Centered
from ..codecs.codebook import CodebookCodec
from ..codecs.composed import ComposedCodec
from ..codecs.fp16 import Fp16Codec
from ..codecs.hadamard import HadamardRotation
from ..codecs.identity import IdentityCodec
from ..codecs.lowrank import LowRankProjection
from ..codecs.quant import QuantCodec
from ..codecs.rotation import RandomizedHadamard, layer_seed
from ..spec import CODEBOOK_BITS, TensorSpec


def pca_codebook(bits: float, basis: torch.Tensor, spectrum: torch.Tensor, mean: torch.Tensor,
                 query_energy: torch.Tensor | None = None, scale_bits: int = 16) -> Codec:
    """Centred projection on the principal directions of the calibrated covariance, then codebooks
    with bits allocated by variance.

    The calibrated uncentred second moment is M = U diag(lambda) U^T (basis U (H, D, D), spectrum
    lambda (H, D)); `bits` x D code bits per vector in all (a whole number); the centred covariance C = M - m m^T (mean m (H, D)) is diagonalised per head,
    and the bit allocation uses its eigenvalues averaged over heads (largest first). With
    `query_energy` (H, D) each direction's importance is its variance times the mean squared query
    along it, and each head's directions are put in its own order of importance before the
    head-averaged importances set the widths (one width per rank, shared by the heads: the stored
    codes keep their layout; each head gives its widest codes to its own most important directions).
    """
    u, lam, m = basis.double(), spectrum.double(), mean.double()
    cov = u @ torch.diag_embed(lam) @ u.transpose(-1, -2) - m[:, :, None] * m[:, None, :]  # (H, D, D)
    variance, vectors = torch.linalg.eigh(cov)  # ascending
    variance, vectors = variance.flip(-1), vectors.flip(-1)  # (H, D), (H, D, D) largest first
    variance = variance.clamp_min(variance.amax() * 1e-10 + 1e-30)
    importance = variance
    if query_energy is not None:  # keys: an error along u moves logits by q.u; weigh by E[(q.u)^2]
        weight = _pair_averaged(query_energy.double())  # (H, D) per dimension
        importance = variance * (vectors.square() * weight[:, :, None]).sum(1)  # (H, D) per direction
        importance = importance / importance.sum(-1, keepdim=True) * variance.sum(-1, keepdim=True)
        order = importance.argsort(dim=-1, descending=True, stable=True)  # (H, D) per head
        importance, variance = importance.gather(-1, order), variance.gather(-1, order)
        vectors = vectors.gather(-1, order[:, None, :].expand_as(vectors))
    widths = allocate_bits(importance.mean(0), round(bits * basis.shape[1]))
    return ComposedCodec(Centered(mean, LowRankProjection(vectors.float())),
                         AllocatedCodebookCodec(widths=widths, std=variance.sqrt().float(), scale_bits=scale_bits))


def mixed_codebook(bits: float, head_dim: int, std: torch.Tensor | None = None,
                   scale_bits: int = 16) -> AllocatedCodebookCodec:
    """Codebooks of floor(bits) and ceil(bits) bits over the head_dim rotated coordinates (equal
    variances, so the allocation only sets how many get the wider one): `bits` x head_dim code bits.
    `std` (H, 1) or None (1): each head's coordinates are coded relative to it (what an 8-bit scale needs)."""
    widths = allocate_bits(torch.ones(head_dim), round(bits * head_dim))
    std = torch.ones(1, head_dim) if std is None else std.float().expand(-1, head_dim)
    return AllocatedCodebookCodec(widths=widths, std=std, scale_bits=scale_bits)


def rotated_rms(artifact, kind: str, layer_idx: int, centred: bool) -> torch.Tensor:
    """(H, 1) calibrated root mean square of each head's coordinates (what a rotation leaves unchanged),
    of the centred states when `centred`."""
    rms, mean = artifact.stat(kind, "rms", layer_idx).double(), artifact.mean(kind, layer_idx).double()
    square = rms.square() - (mean.square() if centred else 0)  # (H, D)
    return square.mean(-1, keepdim=True).clamp_min(1e-12).sqrt().float()


def _pair_averaged(energy: torch.Tensor) -> torch.Tensor:
    """(H, D) energies averaged over each rotary pair (d, d + D/2): relative positions turn a query
    within its pair, so over many of them each dimension of a pair sees the pair's mean energy."""
    half = energy.shape[-1] // 2
    pair = (energy[..., :half] + energy[..., half:2 * half]) / 2
    return torch.cat([pair, pair], dim=-1) if energy.shape[-1] == 2 * half else energy


def build_codec(spec: TensorSpec, *, layer_idx: int = 0, kind: str = "value", artifact=None,
                head_dim: int | None = None) -> Codec:
    """The codec for `spec`.

    Args:
        spec: what to do to the tensor.
        layer_idx: the model layer (selects the calibrated basis of low-rank methods).
        kind: which calibrated statistics apply: "key_post" (keys as attention gives them),
            "key_pre" (keys with the rotary embedding undone) or "value".
        artifact: a `kvcompress.calibration.CalibrationArtifact`; needed by low-rank methods.
        head_dim: the model's head_dim; needed by rotated+codebook with bits not in CODEBOOK_BITS.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    quant = QuantCodec(bits=spec.bits, axis=spec.axis, group_size=spec.group_size) if spec.is_quantized else None
    if spec.method == "none":
        return IdentityCodec()
    if spec.method == "quant":
        return quant
    if spec.method == "hadamard+quant":
        return ComposedCodec(HadamardRotation(), quant)
    if spec.method == "rotated+codebook":
        rotation = RandomizedHadamard(seed=layer_seed(spec.seed, layer_idx))
        if spec.center:
            if artifact is None:
                raise ValueError("a centred rotated+codebook spec needs a calibration artifact: run "
                                 "`kvcompress calibrate --out DIR` and pass --artifact DIR (built "
                                 "automatically for the embedded model)")
            rotation = Centered(artifact.mean(kind, layer_idx), rotation)
        if spec.bits in CODEBOOK_BITS and spec.scale_bits == 16:
            return ComposedCodec(rotation, CodebookCodec(bits=spec.bits))
        if head_dim is None:
            raise ValueError(f"rotated+codebook with {spec.bits} bits (not a whole width) or scale_bits 8 needs "
                             "head_dim")
        if spec.scale_bits == 16:
            return ComposedCodec(rotation, mixed_codebook(spec.bits, head_dim))
        if artifact is None:
            raise ValueError("a rotated+codebook spec with scale_bits 8 needs a calibration artifact: run "
                             "`kvcompress calibrate --out DIR` and pass --artifact DIR (built automatically for "
                             "the embedded model)")
        return ComposedCodec(rotation, mixed_codebook(spec.bits, head_dim, rotated_rms(artifact, kind, layer_idx,
                                                                                       spec.center),
                                                      scale_bits=8))
    if spec.method == "pca+codebook":
        if artifact is None:
            raise ValueError("method 'pca+codebook' needs a calibration artifact: run `kvcompress calibrate "
                             "--out DIR` and pass --artifact DIR (built automatically for the embedded model)")
        weighted = kind != "value" and spec.weight == "query"
        if weighted and artifact.query_energy(layer_idx) is None:
            warnings.warn("the calibration artifact has no query energies (made by an older kvcompress), so "
                          "weight 'query' allocates key bits by variance alone; re-run `kvcompress calibrate`",
                          stacklevel=2)
        return pca_codebook(spec.bits, artifact.basis(kind, layer_idx), artifact.spectrum(kind, layer_idx),
                            artifact.mean(kind, layer_idx),
                            query_energy=artifact.query_energy(layer_idx) if weighted else None,
                            scale_bits=spec.scale_bits)
    if spec.is_lowrank:
        if artifact is None:
            raise ValueError(f"method {spec.method!r} needs a calibration artifact (run `kvcompress calibrate`)")
        projection = LowRankProjection(artifact.basis(kind, layer_idx, spec.rank))
        return ComposedCodec(projection, quant if quant is not None else Fp16Codec())
    raise ValueError(f"no codec for method {spec.method!r}")
