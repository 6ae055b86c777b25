"""Compiled kernels (optional: each has the pure-torch reference, `reference`), and the one switch.

`cpu`: the CPU decode kernel (`cpu_decode.cpp`, `cpu_codebook.cpp` over the split-K driver
`cpu_split_k.h`; `cpu_paged.cpp` for a paged pool, `cpu_paged`), built on first use. On
CUDA with Triton installed (extra `kvcompress[gpu]`): `quantize_pack` (`triton_pack`, the same
codes as `QuantCodec.encode`) and `decode_attention` (`triton_decode`, split-K attention of one
decode step over a layer's codes); `triton_paged` (store and attention over a paged pool of packed
slots) serves the vLLM backend, which calls it directly. The environment variable `KVCOMPRESS_KERNELS` chooses:
    auto   (default) Triton on CUDA tensors when installed, the CPU kernel on CPU tensors;
    torch  never a compiled kernel (the pure-torch path);
    triton Triton wherever it applies (CPU tensors need TRITON_INTERPRET=1: tests only);
    cpu    the CPU kernel wherever it applies, an error if it cannot be built; never Triton.
Kernels read a layer through its attributes only; Triton is imported on first use (`backend`).
"""

from __future__ import annotations

import os

import torch

from .backend import load_triton, triton_installed
from .fields import PACK_BITS

ENV = "KVCOMPRESS_KERNELS"
MODES = ("auto", "torch", "triton", "cpu")


def mode() -> str:
    """The value of KVCOMPRESS_KERNELS ("auto" when unset); a ValueError names the valid ones."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not valid; use one of {', '.join(MODES)}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the hot path for `tensor` runs a Triton kernel (see the module docstring)."""
    chosen = mode()
    if chosen in ("torch", "cpu"):
        return False
    if chosen == "auto":
        return tensor.device.type == "cuda" and triton_installed()
    load_triton()  # MissingExtraError naming kvcompress[gpu] when Triton is not installed
    if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{ENV}=triton on {tensor.device.type} tensors needs TRITON_INTERPRET=1 "
                         "(Triton's interpreter); unset it or use a CUDA device")
    return True


def use_cpu_kernel(tensor: torch.Tensor) -> bool:
    """Whether a decode step on `tensor` may run the compiled CPU kernel (`cpu`, where it applies)."""
    return tensor.device.type == "cpu" and mode() in ("auto", "cpu")


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
    """`reference.attend_compressed(layer, query, attention_mask, scaling)` in Triton (see `triton_decode`)."""
    load_triton()
    from .triton_decode import decode_attention as impl  # imported on first use: Triton loads with it

    return impl(layer, query, attention_mask, scaling)
