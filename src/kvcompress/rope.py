"""Pre-RoPE keys: undo the model's rotary embedding before compression, redo it after decoding.

Attention hands the cache post-RoPE keys k_p = R(p) k = k cos(p) + rotate_half(k) sin(p), a
rotation per channel pair (i, i + D/2) scaled by the rope's attention factor, so the exact inverse
is k = (k_p cos(p) - rotate_half(k_p) sin(p)) / (cos^2 + sin^2). cos/sin come from the model's own
`rotary_emb` at each token's cache index, so scaled and per-layer-type ropes use the frequencies
attention used. `key_space_for(model)` checks the convention on random data; where it cannot hold
(no rotary module, partial rotary, "dynamic"/"longrope"), it returns the reason and the cache keeps
post-RoPE keys with one warning. The cos/sin tables cached here are constants of the model.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .fingerprint import text_config

# Ropes whose frequencies depend on the current sequence length: a key rotated at one length
# could not be re-rotated identically later.
_LENGTH_DEPENDENT_ROPES = ("dynamic", "longrope")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(eq=False)
class RopeInverter:
    """Rotates and un-rotates (B, H, T, D) keys at consecutive absolute positions, or at given ones.

    Attributes:
        rotary_emb: the model's rotary embedding module.
        layer_type: passed to `rotary_emb` when it takes one (Gemma 3), else None.
    """

    rotary_emb: nn.Module
    layer_type: str | None = None
    _cos: torch.Tensor | None = field(default=None, repr=False)
    _sin: torch.Tensor | None = field(default=None, repr=False)
    _half: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def tables(self, start: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (n, D) float32 for positions start .. start + n - 1."""
        need = start + n
        self._ensure(need, device)
        return self._cos[start:need], self._sin[start:need]

    def _ensure(self, need: int, device: torch.device) -> None:
        if self._cos is None or self._cos.shape[0] < need or self._cos.device != torch.device(device):
            size = max(need, 2 * (self._cos.shape[0] if self._cos is not None else 0), 256)
            self._cos, self._sin = rope_tables(self.rotary_emb, size, device, self.layer_type)
            half = self._cos.shape[-1] // 2
            equal = torch.equal(self._cos[:, :half], self._cos[:, half:]) and torch.equal(self._sin[:, :half],
                                                                                          self._sin[:, half:])
            self._half = (self._cos[:, :half].contiguous(), self._sin[:, :half].contiguous()) if equal else None

    def half_tables(self, start: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin (n, D/2) for positions start .. start + n - 1 when both halves of every row of
        the tables are equal (the rotate_half convention's cat([f, f]), checked when the tables are
        built), so a reader may load half the bytes; else None."""
        need = start + n
        self._ensure(need, device)
        if self._half is None:
            return None
        return self._half[0][start:need], self._half[1][start:need]

    def _tables_at(self, positions: int | torch.Tensor, n: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `n` tokens: (n, D) for consecutive positions from an int, or (B, H, n, D)
        for a (B, H, n) tensor of absolute positions (tokens kept after eviction)."""
        if isinstance(positions, int):
            return self.tables(positions, n, device)
        if positions.shape[-1] != n:
            raise ValueError(f"{positions.shape[-1]} positions for {n} tokens")
        self._ensure(int(positions.max()) + 1 if positions.numel() else 1, device)
        index = positions.to(device=device, dtype=torch.long)
        return self._cos[index], self._sin[index]

    def rotate(self, k: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Pre-RoPE (B, H, T, D) keys -> post-RoPE keys (computed in float32), at positions
        start .. start + T - 1 (an int) or at the (B, H, T) positions given (a tensor)."""
        cos, sin = self._tables_at(start, k.shape[2], k.device)
        x = k.float()
        return (x * cos + rotate_half(x) * sin).to(k.dtype)

    def unrotate(self, k: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Post-RoPE (B, H, T, D) keys -> pre-RoPE keys (computed in float32), positions as in `rotate`."""
        cos, sin = self._tables_at(start, k.shape[2], k.device)
        x = k.float()
        return ((x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)).to(k.dtype)


def find_rotary_emb(model: nn.Module) -> nn.Module | None:
    """The model-level rotary embedding module (shallowest module named `rotary_emb`), or None."""
    best = None
    for name, module in model.named_modules():
        if name.split(".")[-1] == "rotary_emb" and (best is None or name.count(".") < best[0].count(".")):
            best = (name, module)
    return best[1] if best else None


def _takes_layer_type(rotary_emb: nn.Module) -> bool:
    try:
        return "layer_type" in inspect.signature(rotary_emb.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def rope_tables(rotary_emb: nn.Module, n: int, device, layer_type: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n, rotary_dim) float32 for positions 0 .. n - 1, from the model's module."""
    dummy = torch.zeros(1, 1, 1, device=device, dtype=torch.float32)
    positions = torch.arange(n, device=device)[None]  # (1, n)
    args = (layer_type,) if layer_type is not None else ()
    cos, sin = rotary_emb(dummy, positions, *args)
    return cos[0].float(), sin[0].float()


def _rope_types(rotary_emb: nn.Module) -> list[str]:
    rope_type = getattr(rotary_emb, "rope_type", "default")
    return list(rope_type.values()) if isinstance(rope_type, dict) else [rope_type]


@torch.no_grad()
def _check_convention(rotary_emb: nn.Module, head_dim: int, layer_type: str | None) -> str | None:
    """None if the model's apply_rotary_pos_emb matches `RopeInverter.rotate`, else the reason why not."""
    module = sys.modules.get(type(rotary_emb).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is None:
        return f"its modeling module {type(rotary_emb).__module__} has no apply_rotary_pos_emb to check against"
    try:
        cos, sin = rope_tables(rotary_emb, 1100, "cpu", layer_type)
    except Exception as exc:  # any failure means we cannot use this module
        return f"its rotary embedding could not be evaluated ({type(exc).__name__}: {exc})"
    if cos.shape[-1] != head_dim:
        return f"it uses partial rotary embedding (rotary dim {cos.shape[-1]} < head_dim {head_dim})"
    positions = torch.tensor([0, 1, 7, 513, 1099])
    k = torch.randn(1, 2, len(positions), head_dim, generator=torch.Generator().manual_seed(0))
    c, s = cos[positions][None], sin[positions][None]  # (1, T, D)
    try:
        _, reference = apply(k, k, c, s)
    except Exception as exc:
        return f"its apply_rotary_pos_emb could not be called as (q, k, cos, sin) ({type(exc).__name__}: {exc})"
    ours = k * c[:, None] + rotate_half(k) * s[:, None]
    if reference.shape != ours.shape or not torch.allclose(reference, ours, atol=1e-5, rtol=1e-5):
        return "its rotary convention differs from transformers' rotate_half convention"
    return None


def key_space_for(model: nn.Module, layer_types: list[str] | None = None
                  ) -> tuple[list[RopeInverter] | None, str | None]:
    """One `RopeInverter` per layer (shared by layers of the same type), or (None, reason).

    Args:
        model: the transformers model whose attention produced the keys.
        layer_types: the config's `layer_types` (one per layer) when its rotary embedding takes
            a layer type; None otherwise.
    """
    config = text_config(model)
    rotary_emb = find_rotary_emb(model)
    if rotary_emb is None:
        return None, "no rotary embedding module (`rotary_emb`) was found in the model"
    bad = sorted(set(_rope_types(rotary_emb)) & set(_LENGTH_DEPENDENT_ROPES))
    if bad:
        return None, f"its rope type {bad[0]!r} changes frequencies with sequence length"
    num_layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if _takes_layer_type(rotary_emb):
        layer_types = layer_types or getattr(config, "layer_types", None)
        if not layer_types:
            return None, "its rotary embedding needs a layer type but the config has no layer_types"
    else:
        layer_types = [None] * num_layers
    inverters: dict[str | None, RopeInverter] = {}
    for layer_type in dict.fromkeys(layer_types):
        reason = _check_convention(rotary_emb, head_dim, layer_type)
        if reason:
            return None, reason
        inverters[layer_type] = RopeInverter(rotary_emb, layer_type)
    return [inverters[t] for t in layer_types[:num_layers]], None
