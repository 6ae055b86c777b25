"""Codecs: how a block of key or value states becomes stored tensors and back."""

from .base import Codec, Stored, check_finite, stored_nbytes, token_slice
from .composed import ComposedCodec, Transform
from .fp16 import Fp16Codec
from .hadamard import HadamardRotation
from .identity import IdentityCodec
from .lowrank import LowRankProjection
from .quant import ALLOWED_BITS, QuantCodec

__all__ = ["Codec", "Stored", "check_finite", "stored_nbytes", "token_slice", "IdentityCodec", "QuantCodec", "ALLOWED_BITS",
           "ComposedCodec", "Transform", "Fp16Codec", "HadamardRotation", "LowRankProjection"]
