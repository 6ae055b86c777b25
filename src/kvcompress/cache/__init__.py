"""The compressed cache: a transformers `Cache` whose attention reads what it stores.

- `cache`: `CompressedCache`, one compressed layer per model layer, built from a spec.
- `storage`: what one layer holds ([sinks | codes | window]) and the operations on it.
- `layer`, `sliding`: the compressed layers (full attention, sliding window) transformers calls.
- `eviction`: which tokens a layer keeps (scores, `Evictor`).
- `build`: the codec of one layer's K or V from its `TensorSpec`.
- `attention`: kvcompress's attention function (decode steps read the codes) and
  `enable_fast_attention`, the switch (with its undo) that lets a model use it.
- `memory`: what a cache holds, in bytes.
- `monitor`: optional sampling of reconstruction quality while generating.

This package is core: it imports nothing from `measure`, `experiments`, `tuning`, `bench` or `cli`.
"""

from .attention import FastAttention, enable_fast_attention
from .cache import CompressedCache, check_supported
from .layer import CompressedLayer
from .memory import LayerMemory, MemoryReport
from .monitor import QualityMonitor
from .sliding import CompressedSlidingLayer

__all__ = ["CompressedCache", "CompressedLayer", "CompressedSlidingLayer", "FastAttention", "LayerMemory",
           "MemoryReport", "QualityMonitor", "check_supported", "enable_fast_attention"]
