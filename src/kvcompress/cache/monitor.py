"""Runtime quality monitor: how faithfully the cache reconstructs what it compresses.

With `CompressedCache(model, spec, monitor=True)` every compressed layer reports each block
it compresses to a `QualityMonitor`. On a sample of those blocks (`sample_every`) the monitor
decodes the fresh codes and compares them with the states they came from: relative error
||x - x_hat|| / ||x|| and mean cosine similarity of the token vectors, per layer, for K and V
separately (keys are compared in the space they were compressed in; RoPE is a rotation, so
pre-RoPE and post-RoPE errors are equal). It keeps running statistics and warns once per
layer and tensor when quality falls below the thresholds.

This module does not change what is stored or returned to attention, and it does not measure
model output quality (see `kvcompress.measure.evaluate`); when the monitor is off it is never called.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..codecs import Codec, Stored


@dataclass
class RunningStats:
    """Running statistics of one (layer, tensor) pair."""

    blocks: int = 0
    tokens: int = 0
    rel_error_sum: float = 0.0
    rel_error_max: float = 0.0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0

    def add(self, rel_error: float, cosine: float, tokens: int) -> None:
        self.blocks += 1
        self.tokens += tokens
        self.rel_error_sum += rel_error
        self.rel_error_max = max(self.rel_error_max, rel_error)
        self.cosine_sum += cosine
        self.cosine_min = min(self.cosine_min, cosine)

    def to_dict(self) -> dict:
        n = max(self.blocks, 1)
        return {"blocks": self.blocks, "tokens": self.tokens, "rel_error_mean": self.rel_error_sum / n,
                "rel_error_max": self.rel_error_max, "cosine_mean": self.cosine_sum / n,
                "cosine_min": self.cosine_min}


def block_quality(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[float, float]:
    """(relative error, mean cosine similarity over token vectors) of (B, H, T, D) states."""
    x, x_hat = x.float(), x_hat.float()
    rel_error = ((x - x_hat).norm() / x.norm().clamp_min(1e-12)).item()
    cosine = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).mean().item()
    return rel_error, cosine


@dataclass
class QualityMonitor:
    """Samples compressed blocks and tracks reconstruction quality per layer, for K and V.

    Attributes:
        sample_every: check one block in this many (per layer); 1 checks every block.
        min_cosine: warn (once per layer and tensor) when a block's mean cosine falls below this.
        max_rel_error: warn when a block's relative error rises above this.
    """

    sample_every: int = 1
    min_cosine: float = 0.95
    max_rel_error: float = 0.35
    stats: dict[tuple[int, str], RunningStats] = field(default_factory=dict)
    _seen: dict[tuple[int, str], int] = field(default_factory=dict)
    _warned: set[tuple[int, str]] = field(default_factory=set)

    def __post_init__(self):
        if not isinstance(self.sample_every, int) or self.sample_every < 1:
            raise ValueError(f"sample_every must be a positive integer, got {self.sample_every!r}")
        if not 0.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in [0, 1], got {self.min_cosine!r}")
        if self.max_rel_error <= 0:
            raise ValueError(f"max_rel_error must be positive, got {self.max_rel_error!r}")

    def observe(self, layer_idx: int, tensor: str, states: torch.Tensor, stored: Stored, codec: Codec,
                block_size: int) -> None:
        """Called by a layer for what it just compressed: (B, H, T, D) `states` (T a multiple of
        `block_size`) and their codes; checks the sampled blocks among them."""
        first = self._seen.get((layer_idx, tensor), 0)
        n_blocks = states.shape[2] // block_size
        self._seen[(layer_idx, tensor)] = first + n_blocks
        sampled = [b for b in range(n_blocks) if (first + b) % self.sample_every == 0]
        if not sampled:
            return
        decoded = codec.decode(stored, torch.float32)  # (B, H, T, D)
        for b in sampled:
            rows = slice(b * block_size, (b + 1) * block_size)
            rel_error, cosine = block_quality(states[:, :, rows], decoded[:, :, rows])
            self.stats.setdefault((layer_idx, tensor), RunningStats()).add(rel_error, cosine, block_size)
            self._maybe_warn(layer_idx, tensor, rel_error, cosine)

    def _maybe_warn(self, layer_idx: int, tensor: str, rel_error: float, cosine: float) -> None:
        bad = cosine < self.min_cosine or rel_error > self.max_rel_error
        if bad and (layer_idx, tensor) not in self._warned:
            self._warned.add((layer_idx, tensor))
            warnings.warn(
                f"kvcompress monitor: layer {layer_idx} {tensor}s reconstruct with cosine {cosine:.3f} and "
                f"relative error {rel_error:.3f} (thresholds: cosine >= {self.min_cosine}, error <= "
                f"{self.max_rel_error}); consider more bits or a higher rank for this layer "
                "(a per-layer override in the spec). Further warnings for this layer are suppressed.",
                RuntimeWarning, stacklevel=4)

    def summary(self) -> dict:
        """{"layers": {layer: {"key": stats, "value": stats}}, "worst": ...} of what was sampled."""
        layers: dict[int, dict[str, dict]] = {}
        for (layer_idx, tensor), stats in sorted(self.stats.items()):
            layers.setdefault(layer_idx, {})[tensor] = stats.to_dict()
        worst = {}
        for tensor in ("key", "value"):
            candidates = [(s.cosine_min, layer) for (layer, t), s in self.stats.items() if t == tensor]
            if candidates:
                cosine, layer = min(candidates)
                worst[tensor] = {"layer": layer, "cosine_min": cosine}
        return {"layers": layers, "worst": worst, "warned": sorted(f"{l}:{t}" for l, t in self._warned)}

    def format_table(self) -> str:
        """A plain-text table of mean cosine and relative error per layer."""
        lines = ["layer  K cos   K err   V cos   V err"]
        for layer_idx, entry in self.summary()["layers"].items():
            k, v = entry.get("key", {}), entry.get("value", {})
            lines.append(f"{layer_idx:5d}  {k.get('cosine_mean', float('nan')):.4f}  "
                         f"{k.get('rel_error_mean', float('nan')):.4f}  {v.get('cosine_mean', float('nan')):.4f}  "
                         f"{v.get('rel_error_mean', float('nan')):.4f}")
        return "\n".join(lines)
