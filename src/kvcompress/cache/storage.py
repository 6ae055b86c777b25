"""`CompressedStorage`: what one compressed layer holds, and the operations that only touch it.

Per layer, with batch at dim 0 and kv_heads at dim 1: [ sinks | compressed blocks | window ],
the sinks and window (B, H, n, D) in the model dtype, the blocks as codec tensors. New tokens
fill the sinks, then the window; every whole `block_size` block before the last `window`
tokens is compressed (each token once) and read back decoded (`reconstruct`). Crop, beam
reordering, offloading and byte counts work on the stored form; no full-precision copy of a
compressed token is kept. `CompressedLayer` adds the transformers `update` and attention's hand-offs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from ..codecs import Codec, Stored, stored_nbytes, token_slice
from .memory import FP16_BYTES, LayerMemory


def _cat_stored(stored: Stored | None, new: Stored) -> Stored:
    """Concatenate two encodings along their token-ish dim 2."""
    return new if stored is None else {name: torch.cat([stored[name], new[name]], dim=2) for name in stored}


class CompressedStorage(CacheLayerMixin):
    """The storage of one compressed layer.

    Attributes: `sink_keys` / `sink_values` and `window_keys` / `window_values` (B, H, n, D);
    `stored_keys` / `stored_values`, the codec tensors of `n_compressed` tokens; `seen_tokens`;
    `token_positions` (B, H, held) int32 positions of the held tokens, kept only for pre-RoPE keys
    after eviction made them non-consecutive (else None: token i sits at position i).

    Args:
        key_codec, value_codec: codecs for compressed K and V.
        window, sinks: most recent and first tokens kept in full precision.
        block_size: tokens compressed together (a multiple of the codecs' token groups).
        layer_idx: index of the layer in the model (for reports and errors).
        key_space: a `kvcompress.rope.RopeInverter` to compress keys pre-RoPE (un-rotated at their
            positions before encoding, re-rotated after decoding), or None.
        monitor: a `kvcompress.cache.monitor.QualityMonitor` told of every compressed block, or None.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, key_codec: Codec, value_codec: Codec, window: int, sinks: int, block_size: int,
                 layer_idx: int = 0, key_space=None, monitor=None):
        super().__init__()
        for codec in (key_codec, value_codec):
            if block_size % codec.token_multiple:
                raise ValueError(f"block_size {block_size} is not a multiple of {codec.token_multiple} "
                                 f"needed by {codec}")
        self.key_codec, self.value_codec = key_codec, value_codec
        self.window, self.sinks, self.block_size, self.layer_idx = window, sinks, block_size, layer_idx
        self.key_space, self.monitor = key_space, monitor
        self._clear()

    def _clear(self) -> None:
        self.sink_keys = self.sink_values = self.window_keys = self.window_values = None
        self.stored_keys: Stored | None = None
        self.stored_values: Stored | None = None
        self.n_compressed = self.seen_tokens = 0
        self.token_positions: torch.Tensor | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.sink_keys, self.window_keys = key_states[:, :, :0].clone(), key_states[:, :, :0].clone()
        self.sink_values, self.window_values = value_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        self.is_initialized = True

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Count (B, H, n, D) new tokens as seen; the first tokens fill the sinks, the rest the window."""
        n_new = keys.shape[2]
        self.seen_tokens += n_new
        if self.token_positions is not None:
            new = torch.arange(self.seen_tokens - n_new, self.seen_tokens, dtype=torch.int32,
                               device=self.token_positions.device)
            self.token_positions = torch.cat([self.token_positions,
                                              new.expand(*self.token_positions.shape[:2], n_new)], dim=2)
        missing_sinks = self.sinks - self.sink_keys.shape[2]
        if missing_sinks > 0 and self.n_compressed == 0 and self.window_keys.shape[2] == 0:
            take = min(missing_sinks, n_new)
            self.sink_keys = torch.cat([self.sink_keys, keys[:, :, :take]], dim=2)
            self.sink_values = torch.cat([self.sink_values, values[:, :, :take]], dim=2)
            keys, values = keys[:, :, take:], values[:, :, take:]
        self.window_keys = torch.cat([self.window_keys, keys], dim=2)
        self.window_values = torch.cat([self.window_values, values], dim=2)

    def key_positions(self, start: int, stop: int) -> int | torch.Tensor:
        """Positions of compressed tokens [start, stop): the first one (an int) when consecutive,
        else a (B, H, stop - start) tensor (after eviction with pre-RoPE keys)."""
        n_sinks = self.sink_keys.shape[2]
        if self.token_positions is None:
            return n_sinks + start
        return self.token_positions[:, :, n_sinks + start:n_sinks + stop]

    def _flush(self, limit: int | None = None) -> int:
        """Compress every whole block before the last `window` tokens (of the first `limit` window
        tokens only, when given); return how many tokens were compressed."""
        overflow = self.window_keys.shape[2] - self.window
        if limit is not None:
            overflow = min(overflow, limit)
        n_tokens = (overflow // self.block_size) * self.block_size
        if n_tokens <= 0:
            return 0
        keys, values = self.window_keys[:, :, :n_tokens], self.window_values[:, :, :n_tokens]
        if self.key_space is not None:  # positions of these tokens: after sinks and earlier blocks
            keys = self.key_space.unrotate(keys, start=self.key_positions(self.n_compressed,
                                                                          self.n_compressed + n_tokens))
        new_keys, new_values = self.key_codec.encode(keys), self.value_codec.encode(values)
        if self.monitor is not None:
            self.monitor.observe(self.layer_idx, "key", keys, new_keys, self.key_codec, self.block_size)
            self.monitor.observe(self.layer_idx, "value", values, new_values, self.value_codec, self.block_size)
        self.stored_keys = _cat_stored(self.stored_keys, new_keys)
        self.stored_values = _cat_stored(self.stored_values, new_values)
        self.window_keys = self.window_keys[:, :, n_tokens:].clone()
        self.window_values = self.window_values[:, :, n_tokens:].clone()
        self.n_compressed += n_tokens
        return n_tokens

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of shape (B, H, seq, D) in the model dtype: what attention reads. Codecs
        decode straight into their slice of one preallocated output (`decode_into`)."""
        n_sinks, n_window = self.sink_keys.shape[2], self.window_keys.shape[2]
        B, H, _, D = self.window_keys.shape
        seq = n_sinks + self.n_compressed + n_window
        keys = torch.empty(B, H, seq, D, dtype=self.dtype, device=self.device)
        values = torch.empty(B, H, seq, self.window_values.shape[3], dtype=self.dtype, device=self.device)
        keys[:, :, :n_sinks], values[:, :, :n_sinks] = self.sink_keys, self.sink_values
        blocks = slice(n_sinks, n_sinks + self.n_compressed)
        if self.stored_keys is not None:
            if self.key_space is None:
                self.key_codec.decode_into(self.stored_keys, keys[:, :, blocks])
            else:  # decode and re-rotate in float32, then cast once
                decoded = self.key_codec.decode(self.stored_keys, torch.float32)
                keys[:, :, blocks] = self.key_space.rotate(decoded, start=self.key_positions(0, self.n_compressed))
            self.value_codec.decode_into(self.stored_values, values[:, :, blocks])
        keys[:, :, blocks.stop:], values[:, :, blocks.stop:] = self.window_keys, self.window_values
        return keys, values

    def held_tokens(self) -> int:
        """Tokens this layer holds (sinks + compressed + window)."""
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[2] + self.n_compressed + self.window_keys.shape[2]

    def evicted_tokens(self) -> int:
        """Tokens seen that this layer no longer holds (dropped by eviction)."""
        return self.seen_tokens - self.held_tokens() if self.is_initialized else 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (the position of the next token); without eviction the layer holds all of them."""
        return self.seen_tokens if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys attention reads, offset): the held tokens plus the new ones; the offset (tokens
        evicted) gives the new tokens their true positions in transformers' mask."""
        return self.held_tokens() + query_length, self.evicted_tokens()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative number, as in transformers). The
        surviving tokens of a cut compressed block go back to the window in their decoded form."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        new_length = max(self.held_tokens() + tokens_to_remove, 0)
        n_sinks = self.sink_keys.shape[2]
        if self.evicted_tokens() and new_length < n_sinks + self.n_compressed:
            raise ValueError(f"layer {self.layer_idx}: cannot crop into the prompt after eviction dropped tokens from "
                             f"it; crop at most the {self.window_keys.shape[2]} tokens of the full-precision window")
        self.seen_tokens -= self.held_tokens() - new_length
        if self.token_positions is not None:
            self.token_positions = self.token_positions[:, :, :new_length]
        if new_length >= n_sinks + self.n_compressed:
            keep = new_length - n_sinks - self.n_compressed
            self.window_keys, self.window_values = self.window_keys[:, :, :keep], self.window_values[:, :, :keep]
            return
        if new_length <= n_sinks:
            self.sink_keys, self.sink_values = self.sink_keys[:, :, :new_length], self.sink_values[:, :, :new_length]
            self.stored_keys = self.stored_values = None
            self.n_compressed = 0
            self.window_keys, self.window_values = self.window_keys[:, :, :0], self.window_values[:, :, :0]
            return
        keys, values = self.reconstruct()
        whole = ((new_length - n_sinks) // self.block_size) * self.block_size  # compressed tokens kept as codes
        self.window_keys = keys[:, :, n_sinks + whole:new_length].clone()
        self.window_values = values[:, :, n_sinks + whole:new_length].clone()
        self.stored_keys = token_slice(self.stored_keys, self.n_compressed, 0, whole) if whole else None
        self.stored_values = token_slice(self.stored_values, self.n_compressed, 0, whole) if whole else None
        self.n_compressed = whole

    def _map_storage(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `fn` to every stored tensor (all have batch at dim 0)."""
        if not self.is_initialized:
            return
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.window_keys, self.window_values = fn(self.window_keys), fn(self.window_values)
        if self.token_positions is not None:
            self.token_positions = fn(self.token_positions)
        if self.stored_keys is not None:
            self.stored_keys = {name: fn(t) for name, t in self.stored_keys.items()}
            self.stored_values = {name: fn(t) for name, t in self.stored_values.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beams) of the stored codes themselves: no decode/re-encode."""
        self._map_storage(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_storage(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_storage(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map_storage(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_storage(lambda t: t.to(self.device, non_blocking=True))

    @property
    def batch_size(self) -> int:
        return self.sink_keys.shape[0]

    # ---- memory ---------------------------------------------------------------------------

    def baseline_tokens(self) -> int:
        """Tokens an uncompressed cache would hold in this layer's place: every token seen."""
        return self.get_seq_length()

    def memory(self) -> LayerMemory:
        """Bytes of every stored tensor, by part; fp16 bytes of the K and V of `baseline_tokens()`."""
        parts, fp16 = {}, 0
        if self.is_initialized:
            parts["sinks"] = stored_nbytes({"k": self.sink_keys, "v": self.sink_values})
            parts["window"] = stored_nbytes({"k": self.window_keys, "v": self.window_values})
            for prefix, stored in (("key", self.stored_keys), ("value", self.stored_values)):
                for name, tensor in (stored or {}).items():
                    parts[f"{prefix}_{name}"] = tensor.numel() * tensor.element_size()
            if self.token_positions is not None:
                parts["positions"] = self.token_positions.numel() * self.token_positions.element_size()
            B, H, _, D = self.sink_keys.shape
            fp16 = 2 * B * H * self.baseline_tokens() * D * FP16_BYTES
        return LayerMemory(self.layer_idx, self.held_tokens(), self.n_compressed, parts, fp16,
                           seen_tokens=self.get_seq_length(), fp16_tokens=self.baseline_tokens())
