"""What a compressed cache holds, in bytes: per layer by part, and the fp16 bytes of the same tokens.

Figures come from the tensors a layer holds (`numel() * element_size()`), never from a formula.
This module does not walk a cache (each layer reports its own `LayerMemory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FP16_BYTES = 2


@dataclass
class LayerMemory:
    """Bytes held by one layer, by part, and what the same tokens would take in fp16."""

    layer: int
    tokens: int
    compressed_tokens: int
    parts: dict[str, int]
    fp16_bytes: int
    seen_tokens: int = -1  # tokens the layer has seen (>= tokens after eviction); -1: same as tokens
    # Tokens whose K and V `fp16_bytes` counts (an uncompressed layer's: every token seen by a
    # full-attention layer, evicted ones included; the window a sliding layer holds); -1: tokens.
    fp16_tokens: int = -1

    def __post_init__(self):
        if self.seen_tokens < 0:
            self.seen_tokens = self.tokens
        if self.fp16_tokens < 0:
            self.fp16_tokens = self.tokens

    @property
    def stored_bytes(self) -> int:
        return sum(self.parts.values())


@dataclass
class MemoryReport:
    """Stored bytes of a whole cache vs the same cache in fp16."""

    layers: list[LayerMemory] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers)

    @property
    def fp16_bytes(self) -> int:
        return sum(layer.fp16_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """fp16 bytes / stored bytes (0.0 for an empty cache)."""
        return self.fp16_bytes / self.stored_bytes if self.stored_bytes else 0.0

    def to_dict(self) -> dict:
        return {
            "stored_bytes": self.stored_bytes,
            "fp16_bytes": self.fp16_bytes,
            "ratio": self.ratio,
            "layers": [
                {
                    "layer": m.layer,
                    "tokens": m.tokens,
                    "seen_tokens": m.seen_tokens,
                    "compressed_tokens": m.compressed_tokens,
                    "stored_bytes": m.stored_bytes,
                    "fp16_bytes": m.fp16_bytes,
                    "parts": dict(m.parts),
                }
                for m in self.layers
            ],
        }
