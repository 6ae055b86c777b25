"""`CompressedSlidingLayer`: the compressed cache of one sliding-window attention layer.

Keeps transformers' semantics (`DynamicSlidingWindowLayer`, transformers 5.24): at most
`sliding_window - 1` tokens held between forward passes (older ones dropped, not stored),
`get_seq_length` counts every token seen, and after `activate_past_recording` everything is
kept until the next `crop`. Within the window storage is `CompressedLayer`'s; when the window's
left edge cuts a compressed block, the block's visible tokens move to the head in decoded form
(what attention was reading), so the layer never holds more bytes than transformers' own
sliding layer. Attention always reads the reconstruction; sinks are not kept beyond the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer import CompressedLayer
from .memory import LayerMemory
from ..codecs import Codec, token_slice


@dataclass(eq=False)
class ShiftedKeySpace:
    """A pre-RoPE key space whose positions start `offset` tokens later.

    A sliding layer's first held token is not position 0 once tokens have expired; the layer
    keeps `offset` equal to the number of expired tokens so that keys are un-rotated and
    re-rotated at their absolute positions.
    """

    inner: object  # a kvcompress.rope.RopeInverter
    offset: int = 0

    def rotate(self, k: torch.Tensor, start: int) -> torch.Tensor:
        return self.inner.rotate(k, start + self.offset)

    def unrotate(self, k: torch.Tensor, start: int) -> torch.Tensor:
        return self.inner.unrotate(k, start + self.offset)


class CompressedSlidingLayer(CompressedLayer):
    """A `CompressedLayer` that keeps only the last `sliding_window - 1` tokens.

    Args:
        key_codec, value_codec, window, sinks, block_size, layer_idx, config, key_space, monitor:
            as for `CompressedLayer` (no eviction: a sliding layer keeps only its window).
        sliding_window: the model's sliding window for this layer (tokens a query may see,
            itself included).
    """

    is_sliding = True

    def __init__(self, key_codec: Codec, value_codec: Codec, window: int, sinks: int, block_size: int,
                 sliding_window: int, layer_idx: int = 0, config=None, key_space=None, monitor=None):
        if not isinstance(sliding_window, int) or sliding_window < 2:
            raise ValueError(f"sliding_window must be an integer >= 2, got {sliding_window!r}")
        if key_space is not None:
            key_space = ShiftedKeySpace(key_space)
        super().__init__(key_codec, value_codec, window=window, sinks=sinks, block_size=block_size,
                         layer_idx=layer_idx, config=config, key_space=key_space, monitor=monitor)
        self.sliding_window = sliding_window
        self.record_past = False

    def _clear(self) -> None:
        super()._clear()
        self.cumulative_length = 0
        self.n_dropped = 0
        if getattr(self, "key_space", None) is not None:
            self.key_space.offset = 0

    # ---- transformers sliding-layer API ---------------------------------------------------

    def activate_past_recording(self) -> None:
        """Keep every token until the next `crop` (assisted generation rolls back rejected tokens)."""
        self.record_past = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, H, T, D) states; return the (B, H, visible, D) keys and values attention reads.

        visible = min(tokens seen before, sliding_window - 1) + T, as `get_mask_sizes` said.
        """
        visible = min(self.cumulative_length, self.sliding_window - 1) + key_states.shape[2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.cumulative_length += key_states.shape[2]
        if not self.record_past:
            self._expire()
        return keys[:, :, -visible:], values[:, :, -visible:]

    def _attention_reads_codes(self) -> bool:
        return False  # kvcompress's attention reads full-attention layers only

    def get_seq_length(self) -> int:
        """Tokens seen so far (the position of the next token), including expired ones."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens, then restrict the layer to the window.

        As in transformers, once the window has been filled only a layer that records its past
        can roll back; `crop(0)` just restricts the layer to the window.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if not self.is_initialized:
            return
        n_remove = min(-tokens_to_remove, self.cumulative_length)
        if n_remove:
            still_needed = min(self.cumulative_length - n_remove, self.sliding_window - 1)
            if self.held_tokens() - n_remove < still_needed:
                raise RuntimeError(
                    f"layer {self.layer_idx}: cannot remove {n_remove} tokens from a sliding layer that has already "
                    "dropped the tokens before them; call `cache.activate_past_recording()` before the forward "
                    "passes you may want to roll back"
                )
            super().crop(-n_remove)
            self.cumulative_length -= n_remove
        self._expire()

    # ---- expiry ---------------------------------------------------------------------------

    def _expire(self) -> None:
        """Drop the tokens that are left of the last `sliding_window - 1` ones."""
        drop = self.held_tokens() - (self.sliding_window - 1)
        if drop <= 0:
            return
        n_head = min(drop, self.sink_keys.shape[2])
        self.sink_keys, self.sink_values = self.sink_keys[:, :, n_head:], self.sink_values[:, :, n_head:]
        self._count_dropped(n_head)
        drop -= n_head
        if drop and self.n_compressed:
            drop = self._expire_compressed(drop)
        if drop:
            self.window_keys, self.window_values = self.window_keys[:, :, drop:], self.window_values[:, :, drop:]
            self._count_dropped(drop)

    def _count_dropped(self, n_tokens: int) -> None:
        """Record that the first `n_tokens` held tokens were dropped (held positions shift)."""
        self.n_dropped += n_tokens
        if self.key_space is not None:
            self.key_space.offset = self.n_dropped

    def _expire_compressed(self, drop: int) -> int:
        """Drop `drop` tokens from the start of the compressed blocks (the head is empty).

        Whole blocks are dropped as codes; the visible rest of a partly expired block moves to
        the head in decoded form. Returns how many tokens are still to drop from the window.
        """
        if drop >= self.n_compressed:
            rest = drop - self.n_compressed
            self._count_dropped(self.n_compressed)
            self.stored_keys = self.stored_values = None
            self.n_compressed = 0
            return rest
        n_codes = drop // self.block_size * self.block_size  # compressed tokens whose codes go
        if drop > n_codes:
            # The cut block: what attention read for its visible tokens, before any code goes.
            keys, values = self.reconstruct()  # (B, H, held, D); the head is empty here
            end = n_codes + self.block_size
            self.sink_keys, self.sink_values = keys[:, :, drop:end].clone(), values[:, :, drop:end].clone()
            n_codes = end
        if n_codes == self.n_compressed:
            self.stored_keys = self.stored_values = None
        else:
            self.stored_keys = token_slice(self.stored_keys, self.n_compressed, n_codes, self.n_compressed)
            self.stored_values = token_slice(self.stored_values, self.n_compressed, n_codes, self.n_compressed)
        self.n_compressed -= n_codes
        # The head now holds tokens that were compressed; positions after it are unchanged.
        self._count_dropped(drop)
        return 0

    # ---- memory ---------------------------------------------------------------------------

    def baseline_tokens(self) -> int:
        """An uncompressed sliding layer holds the tokens this one holds (the window), not all seen."""
        return self.held_tokens()

    def memory(self) -> LayerMemory:
        """As `CompressedLayer.memory`, for the tokens held; the sink slot is reported as "head"."""
        report = super().memory()
        if "sinks" in report.parts:
            report.parts["head"] = report.parts.pop("sinks")
        return report
