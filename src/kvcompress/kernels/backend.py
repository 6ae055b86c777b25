"""Triton, when installed: the one place the kernels get it from (through `extras.require_extra`).

Triton is the optional extra `gpu`. Without it every kernel module still imports (their
`@jit` functions stay plain Python functions, never launched), and `load_triton` raises a
MissingExtraError naming the extra when a kernel is actually asked for.

This module does not import Triton by itself: `load_triton` does, when called.
"""

from __future__ import annotations

import functools
import importlib.util

from ..extras import require_extra

FEATURE = "kvcompress's Triton kernels (CUDA tensors, or KVCOMPRESS_KERNELS=triton)"


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """Whether the `triton` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def load_triton():
    """The `triton` module, or MissingExtraError naming `kvcompress[gpu]`."""
    return require_extra("gpu", "triton", FEATURE)


def triton_or_none():
    """(triton, triton.language, triton.jit) when Triton is installed, else (None, None, a no-op decorator)."""
    if not triton_installed():
        return None, None, lambda fn: fn
    triton = load_triton()
    return triton, triton.language, triton.jit
