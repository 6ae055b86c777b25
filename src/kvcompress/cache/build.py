"""Turn a `TensorSpec` into the codec instance that one layer uses for K or V.

This module does not decide which layers get which spec (see `CacheSpec.for_layer`), nor
whether keys are compressed pre- or post-RoPE (the cache decides and says so via `kind`).
"""

from __future__ import annotations

from ..spec import TensorSpec
from ..codecs.base import Codec
from ..codecs.composed import ComposedCodec
from ..codecs.fp16 import Fp16Codec
from ..codecs.hadamard import HadamardRotation
from ..codecs.identity import IdentityCodec
from ..codecs.lowrank import LowRankProjection
from ..codecs.quant import QuantCodec

KINDS = ("key_post", "key_pre", "value")


def build_codec(spec: TensorSpec, *, layer_idx: int = 0, kind: str = "value", artifact=None) -> Codec:
    """The codec for `spec`.

    Args:
        spec: what to do to the tensor.
        layer_idx: the model layer (selects the calibrated basis of low-rank methods).
        kind: which calibrated statistics apply: "key_post" (keys as attention gives them),
            "key_pre" (keys with the rotary embedding undone) or "value".
        artifact: a `kvcompress.calibration.CalibrationArtifact`; needed by low-rank methods.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    quant = QuantCodec(bits=spec.bits, axis=spec.axis, group_size=spec.group_size) if spec.is_quantized else None
    if spec.method == "none":
        return IdentityCodec()
    if spec.method == "quant":
        return quant
    if spec.method == "hadamard+quant":
        return ComposedCodec(HadamardRotation(), quant)
    if spec.is_lowrank:
        if artifact is None:
            raise ValueError(f"method {spec.method!r} needs a calibration artifact (run `kvcompress calibrate`)")
        projection = LowRankProjection(artifact.basis(kind, layer_idx, spec.rank))
        return ComposedCodec(projection, quant if quant is not None else Fp16Codec())
    raise ValueError(f"no codec for method {spec.method!r}")
