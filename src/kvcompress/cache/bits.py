"""Bits per compressed value: what a spec stores per K or V value of a compressed token.

    bits/value = 8 x (bytes of every tensor a codec stores for compressed tokens: codes, scales,
                      zero points, anything else) / (number of K and V values of those tokens)

The full-precision window and sinks are not in this count (they are reported apart). Both
functions count the bytes of real stored tensors, never a formula: `report_bits_per_value` reads
a filled cache's memory report; `spec_bits_per_value` encodes one block of random states per
layer with the codecs the spec builds.

This module does not measure quality and does not load models.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..codecs import stored_nbytes
from ..presets import load_spec
from ..spec import CacheSpec
from .build import build_codec, mixed_codebook, pca_codebook

FP16_BYTES = 2
_COMPRESSED_PARTS = ("key_", "value_")


def report_bits_per_value(report) -> float:
    """Bits per compressed K/V value of a `MemoryReport` (0.0 if nothing is compressed)."""
    stored = sum(v for m in report.layers for k, v in m.parts.items() if k.startswith(_COMPRESSED_PARTS))
    # fp16_bytes / 2 is the number of K and V values of the `fp16_tokens` it counts; compressed ones are a share.
    values = sum(m.fp16_bytes // FP16_BYTES * m.compressed_tokens // m.fp16_tokens
                 for m in report.layers if m.fp16_tokens)
    return 8.0 * stored / values if values else 0.0


@functools.lru_cache(maxsize=16)
def _standin_pca(bits: int, head_dim: int, scale_bits: int = 16):
    """A pca+codebook codec on an identity basis with a flat spectrum and zero mean (for sizing only)."""
    return pca_codebook(bits, torch.eye(head_dim)[None], torch.ones(1, head_dim), torch.zeros(1, head_dim),
                        scale_bits=scale_bits)


def spec_bits_per_value(spec: str | dict | CacheSpec, num_layers: int, head_dim: int) -> float | None:
    """Bits per compressed value of `spec` on a model with `num_layers` layers of `head_dim`.

    Encodes one block (`block_size` tokens, one head) of random states per layer and K/V with the
    codecs the cache would build. None for low-rank specs (their size needs a calibration artifact);
    a centred codebook stores the same tensors per token as an uncentred one, so it is sized as one,
    and a pca+codebook spec is sized with a stand-in basis (its total code bits do not depend on it),
    a rotated codebook with one-byte scales with unit standard deviations (same).
    """
    spec = load_spec(spec).at_depth(num_layers)
    if any(s.is_lowrank for layer in range(num_layers) for s in spec.for_layer(layer)):
        return None
    spec.validate_for(num_layers, head_dim)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, spec.block_size, head_dim, generator=gen)
    stored, values = 0, 0
    for layer in range(num_layers):
        for kind, tensor_spec in zip(("key_post", "value"), spec.for_layer(layer)):
            if tensor_spec.method == "none":
                stored += x.numel() * FP16_BYTES
            elif tensor_spec.method == "pca+codebook":
                # The allocation moves bits between directions, never their total: size it with
                # a stand-in basis (identity, flat spectrum, zero mean).
                stored += stored_nbytes(_standin_pca(tensor_spec.bits, head_dim, tensor_spec.scale_bits).encode(x))
            elif tensor_spec.method == "rotated+codebook" and tensor_spec.scale_bits == 8:
                # relative to calibrated rms per head (not stored per token): sized with unit ones
                stored += stored_nbytes(mixed_codebook(tensor_spec.bits, head_dim, scale_bits=8).encode(x))
            else:
                tensor_spec = dataclasses.replace(tensor_spec, center=False)  # the mean is not stored per token
                stored += stored_nbytes(build_codec(tensor_spec, layer_idx=layer, kind=kind,
                                                          head_dim=head_dim).encode(x))
            values += x.numel()
    return 8.0 * stored / values
