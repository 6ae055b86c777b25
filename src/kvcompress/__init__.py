"""kvcompress: real KV-cache compression for HuggingFace transformers.

    from kvcompress import load_model, CompressedCache, enable_fast_attention
    model, tokenizer = load_model()                # embedded SmolLM2-135M-Instruct
    enable_fast_attention(model)                   # decode steps read the codes (undo: .restore())
    cache = CompressedCache(model, "int4")
    model.generate(ids, cache=cache)
    cache.memory_report().ratio

Importing kvcompress changes nothing global. The names below load their module on first use, so
`kvcompress.spec`, `kvcompress.codecs` or `kvcompress.paged` import without transformers (the vLLM
plugin relies on it).
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "CompressedCache": ".cache", "CompressedLayer": ".cache", "MemoryReport": ".cache",
    "enable_fast_attention": ".cache", "QualityMonitor": ".cache",
    "PRESETS": ".presets", "load_spec": ".presets",
    "CacheSpec": ".spec", "EvictionSpec": ".spec", "TensorSpec": ".spec",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def load_model(name=None, **kwargs):
    """Load (model, tokenizer); with no name, the embedded SmolLM2-135M-Instruct. See `kvcompress.models`."""
    from .models import load_model as _load_model

    return _load_model(name, **kwargs)


__all__ = ["CompressedCache", "CompressedLayer", "MemoryReport", "QualityMonitor", "CacheSpec", "EvictionSpec", "TensorSpec",
           "enable_fast_attention", "load_spec", "PRESETS", "load_model", "__version__"]
