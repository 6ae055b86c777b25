"""Codecs: how a block of key or value states becomes stored tensors and back."""

from .allocated import AllocatedCodebookCodec, allocate_bits
from .base import Codec, Stored, check_finite, stored_nbytes, token_slice
from .centering import Centered
from .codebook import CodebookCodec
from .composed import ComposedCodec, Transform
from .fp16 import Fp16Codec
from .hadamard import HadamardRotation
from .identity import IdentityCodec
from .lowrank import LowRankProjection
from .quant import ALLOWED_BITS, QuantCodec
from .rotation import RandomizedHadamard

__all__ = ["Codec", "Stored", "check_finite", "stored_nbytes", "token_slice", "IdentityCodec", "QuantCodec", "ALLOWED_BITS",
           "ComposedCodec", "Transform", "Fp16Codec", "HadamardRotation", "LowRankProjection", "RandomizedHadamard",
           "Centered", "CodebookCodec", "AllocatedCodebookCodec", "allocate_bits"]
