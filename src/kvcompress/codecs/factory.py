"""Turn a `TensorSpec` into the codec instance that one layer uses for K or V.

This module does not decide which layers get which spec (see `CacheSpec.for_layer`).
"""

from __future__ import annotations

from ..spec import TensorSpec
from .base import Codec
from .identity import IdentityCodec
from .quant import QuantCodec


def build_codec(spec: TensorSpec) -> Codec:
    """The codec for `spec`."""
    if spec.method == "none":
        return IdentityCodec()
    if spec.method == "quant":
        return QuantCodec(bits=spec.bits, axis=spec.axis, group_size=spec.group_size)
    raise ValueError(f"no codec for method {spec.method!r}")
