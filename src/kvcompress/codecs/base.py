"""The codec contract: turn a block of key or value states into stored tensors and back.

A codec sees states of shape (batch, kv_heads, tokens, head_dim) and returns a dict of
named tensors, each laid out as (batch, kv_heads, n, ...) so that the cache can append
the encodings of later blocks along dim 2 and reorder beams along dim 0 without decoding.
`decode` of the concatenation of two encodings equals the concatenation of their decodes.

This module does not decide which tokens are compressed or when (the cache layer does),
and it does not measure memory (sizes come from the stored tensors themselves).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

Stored = dict[str, torch.Tensor]


class Codec(ABC):
    """Base class of all codecs.

    Subclasses are small dataclasses whose fields are their hyperparameters; they implement
    `encode` and `decode` and may set `token_multiple` when they group statistics over
    tokens (the number of tokens given to `encode` must then be a multiple of it).
    """

    @property
    def token_multiple(self) -> int:
        """`encode` needs a number of tokens that is a multiple of this."""
        return 1

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Stored:
        """Compress `x` of shape (B, H, T, D); returns tensors laid out (B, H, n, ...)."""

    @abstractmethod
    def decode(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        """Reconstruct states of shape (B, H, T, D) in `dtype` from what `encode` returned."""

    def decode_into(self, stored: Stored, out: torch.Tensor) -> None:
        """Write `decode(stored, out.dtype)` into `out` (B, H, T, D), which may be a strided view.

        The cache decodes every layer into one preallocated (sinks | blocks | window) tensor
        through this. The default decodes then copies; codecs on the hot path override it to
        write their result straight into `out`.
        """
        out.copy_(self.decode(stored, out.dtype))

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) in the dtype of `x`; what attention reads for compressed tokens."""
        return self.decode(self.encode(x), x.dtype)


def token_slice(stored: Stored, n_tokens: int, start: int, stop: int) -> Stored:
    """Tokens [start, stop) of an encoding of `n_tokens` tokens.

    Every codec keeps tokens (or whole groups or rows of tokens) in order along dim 2 of each
    stored tensor, so the slice is proportional; `start` and `stop` must fall on the codec's
    `token_multiple`. Returns views, not copies.
    """
    return {name: t[:, :, t.shape[2] * start // n_tokens: t.shape[2] * stop // n_tokens] for name, t in stored.items()}


def stored_nbytes(stored: Stored) -> int:
    """Bytes actually held by the stored tensors (numel * element_size of each)."""
    return sum(t.numel() * t.element_size() for t in stored.values())


def check_finite(x: torch.Tensor, what: str = "KV states") -> None:
    """Raise a ValueError if `x` holds NaN or inf; compressing them would hide the fault.

    On CUDA the check stays on the device (no host synchronisation on the hot path): a NaN or
    inf trips a device-side assertion, which surfaces as a CUDA error ("device-side assert
    triggered") at the next synchronisation, and the CUDA context cannot be used afterwards.
    Run on CPU (or with CUDA_LAUNCH_BLOCKING=1) to see where it happened.
    """
    if x.device.type == "cuda":
        torch._assert_async(torch.isfinite(x).all(), f"{what} contain NaN or inf values; they cannot be compressed")
        return
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{what} contain {n_nan} NaN and {n_inf} inf values; they cannot be compressed. "
            "This usually means the model overflowed in its dtype (try float32 or bfloat16 "
            "instead of float16) or its inputs are invalid."
        )
