"""kvcompress: real KV-cache compression for HuggingFace transformers.

    from kvcompress import load_model, CompressedCache, enable_fast_attention
    model, tokenizer = load_model()                # embedded SmolLM2-135M-Instruct
    enable_fast_attention(model)                   # decode steps read the codes (undo: .restore())
    cache = CompressedCache(model, "int4")
    model.generate(ids, past_key_values=cache)
    cache.memory_report().ratio

Importing kvcompress changes nothing global: no attention function is registered and no model
is switched until `enable_fast_attention` is called.
"""

from ._version import __version__
from .cache import CompressedCache, CompressedLayer, MemoryReport, enable_fast_attention
from .cache import QualityMonitor
from .presets import PRESETS
from .spec import CacheSpec, EvictionSpec, TensorSpec
from .presets import load_spec



def load_model(name=None, **kwargs):
    """Load (model, tokenizer); with no name, the embedded SmolLM2-135M-Instruct. See `kvcompress.models`."""
    from .models import load_model as _load_model

    return _load_model(name, **kwargs)


__all__ = ["CompressedCache", "CompressedLayer", "MemoryReport", "QualityMonitor", "CacheSpec", "EvictionSpec", "TensorSpec",
           "enable_fast_attention", "load_spec", "PRESETS", "load_model", "__version__"]
