"""Codecs: how a block of key or value states becomes stored tensors and back."""

from .base import Codec, Stored, check_finite, stored_nbytes
from .identity import IdentityCodec
from .quant import ALLOWED_BITS, QuantCodec

__all__ = ["Codec", "Stored", "check_finite", "stored_nbytes", "IdentityCodec", "QuantCodec", "ALLOWED_BITS"]
