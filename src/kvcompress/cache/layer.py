"""`CompressedLayer`: the compressed cache of one full-attention layer.

On `update` (called by attention with post-RoPE keys and values of shape (batch, kv_heads,
new_tokens, head_dim)) the layer appends the new tokens, compresses every whole block of
`block_size` tokens that has left the full-precision window (each token exactly once), and
returns the reconstruction of everything it holds:

    [ sinks (full precision) | decode(compressed blocks) | window (full precision) ]

One prompt protocol for every spec: the tokens of one forward pass (a prompt, a chunk) read each
other's full-precision K/V, as a serving engine's prefill does, and every later token reads the
stored codes; with or without eviction.

At a decode step of a model running kvcompress's attention function (switched by
`kvcompress.enable_fast_attention`; see `kvcompress.cache.attention`), it returns the window
tagged with the layer instead, and that function decodes the blocks chunk by chunk itself and
marks the layer consumed. Either way attention reads the decoded form of the stored codes, never
a hidden uncompressed copy.

With an eviction spec (`kvcompress.spec.EvictionSpec`), the first forward pass on an empty layer
(the prompt) is stored without compression and handed back tagged (attribute `PROMPT_ATTRIBUTE`);
kvcompress's attention computes the prompt's attention over all of it, then hands the layer the
prompt's queries (`evict_prompt`), and the layer keeps the tokens `eviction.choose_kept` picks
per KV head, drops the others and compresses the kept ones as usual. The layer then holds fewer
tokens than it has seen: `get_seq_length` counts tokens seen (the next token's position) and
`get_mask_sizes` gives transformers the offset (tokens dropped) so that new tokens keep their
true positions and see every kept token. Pre-RoPE keys are un-rotated and re-rotated at each
kept token's own position (`token_positions`, stored and counted in `memory()`).

The guard, twice: the window handed out is a `HandedWindow`, which raises on any read but its
shape (so an attention that does not know the tag fails at that step, see `attention`); and if
no kvcompress attention consumed it, the layer's next `update` raises a RuntimeError saying so
instead of continuing silently.

This module does not build codecs (see `build`), does not choose layers (see `cache`) and keeps
no full-precision copy of compressed tokens between steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from ..codecs import Codec, Stored, stored_nbytes, token_slice
from ..spec import EvictionSpec
from .attention import ATTENTION_NAME, hand_observed, hand_prompt, hand_window
from .eviction import choose_in_segment, choose_kept
from .memory import FP16_BYTES, LayerMemory


def _append(stored: Stored | None, new: Stored) -> Stored:
    """Concatenate two encodings along their token-ish dim 2."""
    if stored is None:
        return new
    return {name: torch.cat([stored[name], new[name]], dim=2) for name in stored}


class CompressedLayer(CacheLayerMixin):
    """The compressed cache of one attention layer.

    Storage, all with batch at dim 0 and kv_heads at dim 1:
        sink_keys / sink_values:     (B, H, <=sinks, D) in the model dtype
        stored_keys / stored_values: codec tensors for `n_compressed` tokens
        window_keys / window_values: (B, H, n, D) in the model dtype, n < window + block_size

    Args:
        key_codec, value_codec: codecs for compressed K and V.
        window: most recent tokens kept in full precision.
        sinks: first tokens kept in full precision.
        block_size: tokens compressed together (a multiple of the codecs' token groups).
        layer_idx: index of the layer in the model (for reports and errors).
        key_space: a `kvcompress.rope.RopeInverter` to compress keys pre-RoPE (it un-rotates the
            tokens being compressed at their positions and re-rotates them after decoding;
            sinks and window stay post-RoPE), or None to compress keys as attention gives them.
        eviction: an `EvictionSpec` to drop prompt tokens before compression (needs kvcompress's
            attention during the prompt's forward pass), or None.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, key_codec: Codec, value_codec: Codec, window: int, sinks: int, block_size: int,
                 layer_idx: int = 0, key_space=None, eviction: EvictionSpec | None = None):
        super().__init__()
        for codec in (key_codec, value_codec):
            if block_size % codec.token_multiple:
                raise ValueError(f"block_size {block_size} is not a multiple of {codec.token_multiple} "
                                 f"needed by {codec}")
        self.key_codec = key_codec
        self.value_codec = value_codec
        self.window = window
        self.sinks = sinks
        self.block_size = block_size
        self.layer_idx = layer_idx
        self.key_space = key_space
        self.eviction = eviction
        self.monitor = None  # a kvcompress.cache.monitor.QualityMonitor when the cache is monitored
        # The model config whose attention implementation says whether decode steps may hand
        # attention the codes (kvcompress.cache.attention) instead of a full reconstruction; or None
        # (always the full reconstruction).
        self.attention_config = None
        # `calibration.config_fields` of the model the cache was built for (set by the cache), and
        # the last model config found to match it (checked by kvcompress's attention function).
        self.model_fields = None
        self.checked_config = None
        # Whether decode steps may use the compiled CPU kernel (kvcompress.kernels.cpu) where it applies.
        self.use_kernel = True
        # Diagnostics (tasks): when True, eviction keeps the (B, H, n_kept) prompt positions it kept in
        # `kept_positions` (not counted in memory(): a measurement aid, off by default).
        self.record_kept = False
        # The model config, for eviction to check that the prompt runs kvcompress's attention (set by the cache).
        self.model_config = None
        self._clear()

    def _clear(self) -> None:
        self._window_unconsumed = False  # a tagged window was handed out and no attention read the layer yet
        self.sink_keys = self.sink_values = None
        self.window_keys = self.window_values = None
        self.stored_keys: Stored | None = None
        self.stored_values: Stored | None = None
        self.n_compressed = 0
        self.seen_tokens = 0
        # (B, H, held) int32 absolute positions of the held tokens [sinks | compressed | window],
        # kept only for pre-RoPE keys once eviction made them non-consecutive; else None (token i of
        # the layer sits at position i).
        self.token_positions: torch.Tensor | None = None
        self._awaiting_prompt = self.eviction is not None  # the next multi-token update is the prompt
        self._prompt_unscored = False  # the prompt was handed out and no attention scored it yet
        self.kept_positions: torch.Tensor | None = None  # see record_kept
        # Generation-time eviction: tokens at the window's start already chosen (compressed next), and
        # whether keys were handed out whose attention has not called `after_attention` yet.
        self._selected = 0
        self._query_pending = False
        self.is_initialized = False

    # ---- transformers CacheLayerMixin API -------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.sink_keys = key_states[:, :, :0].clone()
        self.sink_values = value_states[:, :, :0].clone()
        self.window_keys = key_states[:, :, :0].clone()
        self.window_values = value_states[:, :, :0].clone()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, H, T, D) states and return the (B, H, seq, D) keys and values attention reads.

        The states are stored detached: gradients do not flow through the cache.

        At a decode step (T == 1) of a model running kvcompress's attention function, the
        return value is instead the (B, H, n_window, D) window, tagged with this layer: that
        attention function reads the sinks, the codes and the window from the layer itself
        (see `kvcompress.cache.attention`).

        Raises:
            RuntimeError: if the window handed out at the previous decode step was never consumed
                by kvcompress's attention (attention read only the window: see the module docstring).
        """
        if self._window_unconsumed:
            self._refuse_unconsumed_window()
        if self._prompt_unscored:
            self._refuse_unscored_prompt()
        if self._query_pending:
            raise RuntimeError(
                f"kvcompress: layer {self.layer_idx} evicts during generation ({self.eviction.describe()}) with each "
                "step's query, but the attention that ran did not hand it one (it is not kvcompress's attention), so "
                "tokens would pile up uncompressed. Fix: run the model inside "
                "`with kvcompress.enable_fast_attention(model):`")
        # The cache is for inference: what it stores carries no autograd history, so a cache filled
        # with gradients enabled can still be copied (`CompressedCache.copy`) and holds no graph.
        key_states, value_states = key_states.detach(), value_states.detach()
        fresh_keys, fresh_values = key_states, value_states
        decode_step = key_states.shape[2] == 1
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[2]
        if self._awaiting_prompt:
            self._awaiting_prompt = False
            if n_new > 1 and self.held_tokens() == 0:
                return self._hold_prompt(key_states, value_states)
        self.seen_tokens += n_new
        if self.token_positions is not None:
            new_positions = torch.arange(self.seen_tokens - n_new, self.seen_tokens, dtype=torch.int32,
                                         device=self.token_positions.device)
            self.token_positions = torch.cat(
                [self.token_positions, new_positions.expand(*self.token_positions.shape[:2], n_new)], dim=2)
        missing_sinks = self.sinks - self.sink_keys.shape[2]
        if missing_sinks > 0 and self.n_compressed == 0 and self.window_keys.shape[2] == 0:
            take = min(missing_sinks, key_states.shape[2])
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=2)
            key_states, value_states = key_states[:, :, take:], value_states[:, :, take:]
        self.window_keys = torch.cat([self.window_keys, key_states], dim=2)
        self.window_values = torch.cat([self.window_values, value_states], dim=2)
        self._flush()
        self._query_pending = self.evicts_during_generation()
        if decode_step and self._attention_reads_codes():
            self._window_unconsumed = True
            return hand_window(self.window_keys, self), self.window_values.view_as(self.window_values)
        keys, values = self.reconstruct()
        if n_new > 1:  # one prompt protocol: tokens of one forward read each other's full-precision K/V
            keys[:, :, -n_new:], values[:, :, -n_new:] = fresh_keys, fresh_values
        if self.evicts_during_generation():
            keys = hand_observed(keys, self)
        return keys, values

    # ---- eviction ---------------------------------------------------------------------------

    def _hold_prompt(self, key_states: torch.Tensor, value_states: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the (B, H, n, D) prompt uncompressed until `evict_prompt`; hand it back tagged."""
        implementation = getattr(self.model_config, "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"eviction ({self.eviction.describe()}) scores the prompt's tokens with the prompt's queries, which only "
                f"kvcompress's attention passes to the cache, but the model runs attention {implementation!r}. Fix: run "
                "the prompt inside `with kvcompress.enable_fast_attention(model):` (e.g. around model.generate)")
        self.window_keys, self.window_values = key_states, value_states
        self.seen_tokens += key_states.shape[2]
        self._prompt_unscored = True
        return hand_prompt(key_states, self), value_states

    def evict_prompt(self, query: torch.Tensor, scaling: float) -> None:
        """Keep the prompt tokens the eviction policy picks, drop the rest, compress the kept ones.

        Args:
            query: (B, H_q, n, D) post-RoPE queries of the n prompt tokens the layer holds.
            scaling: the attention's q.k factor.
        """
        self._prompt_unscored = False
        keys, values = self.window_keys, self.window_values  # (B, H, n, D): the whole prompt
        kept = choose_kept(self.eviction, query, keys, values, scaling, sinks=self.sinks, protected=self.window,
                           block_size=self.block_size)  # (B, H, n_kept) sorted positions
        n, n_kept = keys.shape[2], kept.shape[2]
        if self.record_kept:
            self.kept_positions = kept
        if n_kept < n:
            index = kept[..., None]
            keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[3]))
            values = values.gather(2, index.expand(-1, -1, -1, values.shape[3]))
            if self.key_space is not None:
                self.token_positions = kept.to(torch.int32)
        n_sinks = min(self.sinks, n_kept)
        self.sink_keys, self.sink_values = keys[:, :, :n_sinks].clone(), values[:, :, :n_sinks].clone()
        self.window_keys, self.window_values = keys[:, :, n_sinks:].clone(), values[:, :, n_sinks:].clone()
        self._selected = self.window_keys.shape[2]  # every prompt token went through eviction once
        self._flush()

    def evicts_during_generation(self) -> bool:
        """Whether tokens leaving the window are evicted too (eviction `applies: "generation"`)."""
        return self.eviction is not None and self.eviction.applies == "generation"

    def after_attention(self, query: torch.Tensor, scaling: float) -> None:
        """Generation-time eviction, called by kvcompress's attention once this step's attention has
        read the layer: select among the tokens that left the window with the step's (B, H_q, Q, D)
        queries, then compress the selected blocks."""
        self._query_pending = False
        self._select_leaving(query[:, :, -1:], scaling)
        self._flush()

    def _select_leaving(self, query: torch.Tensor, scaling: float) -> None:
        """While a whole span of unselected tokens has left the window, keep `block_size` of them
        per KV head (scored with the (B, H_q, 1, D) query) and drop the rest."""
        span = self.eviction.generation_span(self.block_size)
        while self.window_keys.shape[2] - self.window - self._selected >= span:
            start, stop = self._selected, self._selected + span
            segment_k, segment_v = self.window_keys[:, :, start:stop], self.window_values[:, :, start:stop]
            kept = choose_in_segment(self.eviction, query, segment_k, segment_v, scaling,
                                     self.block_size) + start  # (B, H, block_size) window indices
            if self.key_space is not None and self.token_positions is None:  # positions until now: consecutive
                B, H = segment_k.shape[:2]
                held = torch.arange(self.held_tokens(), dtype=torch.int32, device=segment_k.device)
                self.token_positions = held.expand(B, H, -1).clone()
            keep = torch.cat([torch.arange(start, device=kept.device).expand(*kept.shape[:2], start), kept,
                              torch.arange(stop, self.window_keys.shape[2], device=kept.device).expand(
                                  *kept.shape[:2], -1)], dim=2)
            self.window_keys = self.window_keys.gather(2, keep[..., None].expand(-1, -1, -1, segment_k.shape[3]))
            self.window_values = self.window_values.gather(2, keep[..., None].expand(-1, -1, -1, segment_v.shape[3]))
            if self.token_positions is not None:
                offset = self.sink_keys.shape[2] + self.n_compressed
                window_positions = self.token_positions[:, :, offset:].gather(2, keep.to(torch.long))
                self.token_positions = torch.cat([self.token_positions[:, :, :offset], window_positions], dim=2)
            self._selected += self.block_size

    def _refuse_unscored_prompt(self) -> None:
        raise RuntimeError(
            f"kvcompress: layer {self.layer_idx} held the prompt for eviction ({self.eviction.describe()}), but the "
            "attention that ran did not hand it the prompt's queries (it is not kvcompress's attention), so nothing "
            "was evicted. Fix: run the prompt inside `with kvcompress.enable_fast_attention(model):`")

    def key_positions(self, start: int, stop: int) -> int | torch.Tensor:
        """Positions of compressed tokens [start, stop): the first one (an int) when consecutive,
        else a (B, H, stop - start) tensor (after eviction with pre-RoPE keys)."""
        n_sinks = self.sink_keys.shape[2]
        if self.token_positions is None:
            return n_sinks + start
        return self.token_positions[:, :, n_sinks + start:n_sinks + stop]

    def evicted_tokens(self) -> int:
        """Tokens seen that this layer no longer holds (dropped by eviction)."""
        return self.seen_tokens - self.held_tokens() if self.is_initialized else 0

    def mark_consumed(self) -> None:
        """Called by kvcompress's attention when it reads this layer for the window it was handed."""
        self._window_unconsumed = False

    def _refuse_unconsumed_window(self) -> None:
        model_type = getattr(self.attention_config, "model_type", "unknown")
        raise RuntimeError(
            f"kvcompress: at the last decode step, attention at layer {self.layer_idx} read only the K/V window "
            f"({self.window_keys.shape[2]} of {self.held_tokens()} tokens): the layer handed kvcompress's attention "
            "a window tagged with the layer, but the attention that ran did not read the layer's compressed tokens "
            "(it copied the tensor, or is not kvcompress's attention), so the model's output for that step was "
            "wrong. Fix: build the cache with CompressedCache(..., fast_attention=False), or restore the model's "
            f"attention (the handle enable_fast_attention returned); and please report model type {model_type!r} "
            "to kvcompress."
        )

    def _attention_reads_codes(self) -> bool:
        """Whether this step's attention is kvcompress's, which reads the codes (no autograd through it)."""
        return (self.attention_config is not None and self.n_compressed > 0
                and getattr(self.attention_config, "_attn_implementation", None) == ATTENTION_NAME
                and not torch.is_grad_enabled())

    def _flush(self) -> None:
        """Compress every whole block that lies before the last `window` tokens (with generation-time
        eviction: every whole block of the tokens it selected)."""
        overflow = self.window_keys.shape[2] - self.window
        self._selected = min(self._selected, self.window_keys.shape[2])  # a crop may have cut selected tokens
        if self.evicts_during_generation():  # only tokens eviction selected (`after_attention`) are compressed
            overflow = min(overflow, self._selected)
        n_tokens = (overflow // self.block_size) * self.block_size
        if n_tokens <= 0:
            return
        keys = self.window_keys[:, :, :n_tokens]
        if self.key_space is not None:  # positions of these tokens: after sinks and earlier blocks
            keys = self.key_space.unrotate(keys, start=self.key_positions(self.n_compressed,
                                                                          self.n_compressed + n_tokens))
        values = self.window_values[:, :, :n_tokens]
        new_keys, new_values = self.key_codec.encode(keys), self.value_codec.encode(values)
        if self.monitor is not None:
            self.monitor.observe(self.layer_idx, "key", keys, new_keys, self.key_codec, self.block_size)
            self.monitor.observe(self.layer_idx, "value", values, new_values, self.value_codec, self.block_size)
        self.stored_keys = _append(self.stored_keys, new_keys)
        self.stored_values = _append(self.stored_values, new_values)
        self.window_keys = self.window_keys[:, :, n_tokens:].clone()
        self.window_values = self.window_values[:, :, n_tokens:].clone()
        self.n_compressed += n_tokens
        self._selected = max(0, self._selected - n_tokens)

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of shape (B, H, seq, D) in the model dtype: what attention reads."""
        # One preallocated (B, H, seq, D) output per call: codecs decode straight into their
        # slice (`decode_into`), so decoded blocks are written once and never concatenated.
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
        """Remove the last `-tokens_to_remove` tokens (a negative number, as in transformers).

        Cropping inside the compressed region drops the blocks after the new end and puts the
        surviving tokens of the cut block back into the window in their decoded form (exactly
        what attention read), so they are compressed again when they next leave the window.
        """
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
            self.window_keys = self.window_keys[:, :, :keep]
            self.window_values = self.window_values[:, :, :keep]
            return
        if new_length <= n_sinks:
            self.sink_keys = self.sink_keys[:, :, :new_length]
            self.sink_values = self.sink_values[:, :, :new_length]
            self.stored_keys = self.stored_values = None
            self.n_compressed = 0
            self.window_keys = self.window_keys[:, :, :0]
            self.window_values = self.window_values[:, :, :0]
            return
        keep_compressed = new_length - n_sinks
        keys, values = self.reconstruct()
        whole = (keep_compressed // self.block_size) * self.block_size
        self.window_keys = keys[:, :, n_sinks + whole:new_length].clone()
        self.window_values = values[:, :, n_sinks + whole:new_length].clone()
        if whole:  # keep the first `whole` (a multiple of block_size) compressed tokens
            self.stored_keys = token_slice(self.stored_keys, self.n_compressed, 0, whole)
            self.stored_values = token_slice(self.stored_values, self.n_compressed, 0, whole)
        else:
            self.stored_keys = self.stored_values = None
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
        """Bytes of every stored tensor, by part; fp16 bytes of the K and V of `baseline_tokens()`
        (all tokens seen: evicted tokens cost fp16 bytes in the baseline and none here)."""
        parts = {}
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
        else:
            fp16 = 0
        return LayerMemory(self.layer_idx, self.held_tokens(), self.n_compressed, parts, fp16,
                           seen_tokens=self.get_seq_length(), fp16_tokens=self.baseline_tokens())
