"""Compiled kernels (optional: every one has a pure-torch fallback), and the switch for Triton's.

`cpu` builds `cpu_decode.cpp` (uniform codes) and `cpu_codebook.cpp` (codebook codes, described
by `cpu_codebook`) into one extension through torch's C++ extension mechanism on first use (the
decode step on CPU; see `kvcompress.cache.attention`). On CUDA, when Triton is importable (the
optional extra `kvcompress[gpu]`), two Triton kernels replace torch code:

- `quantize_pack` (`triton_pack`): uniform quantization of one block of K or V states and
  its byte-planar packing in one pass; byte-identical codes and the same fp16 scales and zero
  points as `QuantCodec.encode`.
- `decode_attention` (`triton_decode`): split-K ("flash-decoding") attention of one decode
  step over the packed codes of a layer, its sinks and its window; the same result as
  `kvcompress.cache.attention.attend_compressed`.

The choice is made per call from the tensor's device and the environment variable
`KVCOMPRESS_KERNELS`:
    auto   (default) Triton on CUDA tensors when Triton is importable, torch otherwise;
    torch  never a compiled kernel, Triton or the CPU one (e.g. to compare with the torch path);
    triton always Triton; on CPU tensors this needs TRITON_INTERPRET=1 set before Triton
           is first imported, which importing transformers does when Triton is installed
           (Triton's interpreter, slow: for tests only).

This package does not import Triton until a kernel is used (`backend`), and its Triton modules do not know
codecs or caches: callers (`codecs.quant`, `cache.attention`) decide which codecs a kernel can
read and pass their parameters (a layer is read only through its attributes).
"""

from __future__ import annotations

import os

import torch

from .backend import load_triton, triton_installed
from .fields import PACK_BITS

ENV = "KVCOMPRESS_KERNELS"
MODES = ("auto", "torch", "triton")


def mode() -> str:
    """The value of KVCOMPRESS_KERNELS ("auto" when unset); a ValueError names the valid ones."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not valid; use one of {', '.join(MODES)}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the hot path for `tensor` runs a Triton kernel (see the module docstring)."""
    chosen = mode()
    if chosen == "torch":
        return False
    if chosen == "auto":
        return tensor.device.type == "cuda" and triton_installed()
    load_triton()  # MissingExtraError naming kvcompress[gpu] when Triton is not installed
    if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{ENV}=triton on {tensor.device.type} tensors needs TRITON_INTERPRET=1 "
                         "(Triton's interpreter); unset it or use a CUDA device")
    return True


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def can_pack(head_dim: int, bits: int, axis: str, group_size: int) -> bool:
    """Whether `quantize_pack` handles this uniform quantizer (power-of-two head_dim and groups)."""
    if bits not in PACK_BITS or not _power_of_two(head_dim) or not _power_of_two(group_size):
        return False
    return axis == "channel" or (axis == "token" and group_size <= head_dim)


def quantize_pack(x: torch.Tensor, bits: int, axis: str, group_size: int) -> dict[str, torch.Tensor]:
    """`QuantCodec(bits, axis, group_size).encode(x)` in one Triton kernel (see `triton_pack`)."""
    load_triton()
    from .triton_pack import quantize_pack as impl  # imported on first use: Triton loads with it

    return impl(x, bits, axis, group_size)


def decode_attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
                     ) -> torch.Tensor:
    """`cache.attention.attend_compressed(layer, query, attention_mask, scaling)` in Triton (see `triton_decode`)."""
    load_triton()
    from .triton_decode import decode_attention as impl  # imported on first use: Triton loads with it

    return impl(layer, query, attention_mask, scaling)
