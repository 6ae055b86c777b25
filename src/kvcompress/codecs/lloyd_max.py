"""Lloyd-Max codebooks for a standard Gaussian: the MSE-optimal scalar quantizer at 1-4 bits.

A vector rotated by a random orthogonal matrix and divided by its rms has coordinates close to
N(0, 1) (see `rotation`), so one fixed codebook per bit width serves every layer. The codebook
is computed here, deterministically, by Lloyd's iteration on the exact Gaussian density (no
sampling): boundaries are midpoints of neighbouring centroids, and each centroid is the mean of
N(0, 1) on its cell, (phi(a) - phi(b)) / (Phi(b) - Phi(a)). Max (1960) tabulates the result
(2 bits: +-0.4528, +-1.510), which the tests check.

This module only computes codebooks; `codebook.CodebookCodec` uses them.
"""

from __future__ import annotations

import functools
import math

import torch

ALLOWED_CODEBOOK_BITS = (1, 2, 3, 4)
MAX_ALLOCATED_BITS = 6  # widest codebook a bit allocation may give one coordinate (see `allocated`)


def _pdf(t: float) -> float:
    return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi) if math.isfinite(t) else 0.0


def _cdf(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


@functools.lru_cache(maxsize=None)
def _centroids(bits: int) -> tuple[float, ...]:
    n = 1 << bits
    # Start at the cell medians of equal-probability cells, then iterate to the fixed point.
    c = [math.sqrt(2.0) * _erfinv(2.0 * (i + 0.5) / n - 1.0) for i in range(n)]
    for _ in range(100_000):
        edges = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [math.inf]
        new = [(_pdf(edges[i]) - _pdf(edges[i + 1])) / (_cdf(edges[i + 1]) - _cdf(edges[i])) for i in range(n)]
        done = max(abs(a - b) for a, b in zip(new, c)) < 1e-10
        c = new
        if done:
            break
    return tuple(c)


def _erfinv(y: float) -> float:
    """Inverse error function by Newton's method (only seeds the iteration above)."""
    x = 0.0
    for _ in range(100):
        step = (math.erf(x) - y) / (2.0 / math.sqrt(math.pi) * math.exp(-x * x))
        x -= step
        if abs(step) < 1e-15:
            break
    return x


def gaussian_codebook(bits: int) -> torch.Tensor:
    """(2**bits,) float32 Lloyd-Max centroids for N(0, 1), ascending and symmetric about 0 (bits 1..6)."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_ALLOCATED_BITS:
        raise ValueError(f"codebook bits must be in 1..{MAX_ALLOCATED_BITS}, got {bits!r}")
    return torch.tensor(_centroids(bits), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def gaussian_mse(bits: int) -> float:
    """Mean squared error of the `bits`-bit codebook on N(0, 1): 1 - E[c^2] (1.0 for 0 bits)."""
    if bits == 0:
        return 1.0
    c = _centroids(bits)
    edges = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(len(c) - 1)] + [math.inf]
    return 1.0 - sum(ci * ci * (_cdf(edges[i + 1]) - _cdf(edges[i])) for i, ci in enumerate(c))
