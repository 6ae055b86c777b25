"""`CompressedLayer`: the compressed cache of one full-attention layer, as transformers calls it.

`update` takes post-RoPE (B, H, T, D) states, stores them (`CompressedStorage`: sinks, codes,
window) and returns what attention reads: the reconstruction, where the tokens of one forward
read each other's full-precision K/V, or at a decode step under kvcompress's attention
(`cache.attention`) the window tagged with the layer, which that attention reads with the codes.
An `Evictor` may drop tokens (prompt or generation time): `get_seq_length` counts tokens seen,
`get_mask_sizes` gives the offset. What the layer waits for from attention is one `State`; an
update while it waits is refused, never continued silently.
"""

from __future__ import annotations

from enum import Enum

import torch

from ..calibration import config_fields
from ..codecs import Codec
from ..spec import EvictionSpec
from .attention import ATTENTION_NAME, hand_observed, hand_prompt, hand_window
from .eviction import Evictor
from .storage import CompressedStorage


class State(Enum):
    """What a layer waits for between `update` and the attention that reads it."""

    READY = "ready"
    AWAITING_PROMPT = "awaiting prompt"  # with eviction: the next multi-token update on an empty layer is the prompt
    PROMPT_HELD = "prompt held"  # the prompt was handed out; waits for `evict_prompt`
    WINDOW_HANDED = "window handed"  # a tagged window was handed out; waits for `mark_consumed`
    QUERY_PENDING = "query pending"  # generation-time eviction waits for `after_attention`


class CompressedLayer(CompressedStorage):
    """The compressed cache of one attention layer (storage: see `CompressedStorage`).

    Args:
        key_codec, value_codec, window, sinks, block_size, layer_idx, key_space, monitor: the
            storage's (`CompressedStorage`).
        config: the model's (text) config: its attention implementation says whether attention
            reads the codes, its rope is checked against readers of pre-RoPE keys; or None.
        eviction: an `EvictionSpec` (needs kvcompress's attention during the prompt), or None.
    """

    def __init__(self, key_codec: Codec, value_codec: Codec, window: int, sinks: int, block_size: int,
                 layer_idx: int = 0, config=None, key_space=None, eviction: EvictionSpec | None = None,
                 monitor=None):
        self.config = config
        self.evictor = None if eviction is None else Evictor(eviction, sinks=sinks, window=window,
                                                              block_size=block_size)
        self._reader = None  # the last config found to have this layer's rope (`check_reader`)
        super().__init__(key_codec, value_codec, window=window, sinks=sinks, block_size=block_size,
                         layer_idx=layer_idx, key_space=key_space, monitor=monitor)

    def _clear(self) -> None:
        super()._clear()
        self.state = State.AWAITING_PROMPT if self.evictor is not None else State.READY
        if self.evictor is not None:
            self.evictor.reset()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, H, T, D) states (detached) and return the (B, H, seq, D) keys and values
        attention reads; at a decode step under kvcompress's attention, the (B, H, n_window, D)
        window tagged with this layer. RuntimeError if the last hand-off was never taken up."""
        if self.state not in (State.READY, State.AWAITING_PROMPT):
            raise RuntimeError(self._refusal())
        key_states, value_states = key_states.detach(), value_states.detach()  # a cache holds no graph
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[2]
        if self.state is State.AWAITING_PROMPT:
            self.state = State.READY
            if n_new > 1 and self.held_tokens() == 0:
                return self._hold_prompt(key_states, value_states)
        self._append(key_states, value_states)
        self._flush()
        if self.evicts_during_generation():
            self.state = State.QUERY_PENDING
        if n_new == 1 and self._attention_reads_codes():
            self.state = State.WINDOW_HANDED
            return hand_window(self.window_keys, self), self.window_values.view_as(self.window_values)
        keys, values = self.reconstruct()
        if n_new > 1:  # one prompt protocol: tokens of one forward read each other's full-precision K/V
            keys[:, :, -n_new:], values[:, :, -n_new:] = key_states, value_states
        if self.evicts_during_generation():
            keys = hand_observed(keys, self)
        return keys, values

    def _refusal(self) -> str:
        """Why the next update cannot go on: attention did not take up what the layer handed it."""
        fix = "Fix: run the model inside `with kvcompress.enable_fast_attention(model):`"
        if self.state is State.PROMPT_HELD:
            return (f"kvcompress: layer {self.layer_idx} held the prompt for eviction ({self.evictor.describe()}), but "
                    "the attention that ran did not hand it the prompt's queries (it is not kvcompress's attention), so "
                    f"nothing was evicted. {fix}")
        if self.state is State.QUERY_PENDING:
            return (f"kvcompress: layer {self.layer_idx} evicts during generation ({self.evictor.describe()}) with each "
                    "step's query, but the attention that ran did not hand it one (it is not kvcompress's attention), "
                    f"so tokens would pile up uncompressed. {fix}")
        model_type = getattr(self.config, "model_type", "unknown")
        return (f"kvcompress: at the last decode step, attention at layer {self.layer_idx} read only the K/V window "
                f"({self.window_keys.shape[2]} of {self.held_tokens()} tokens): the layer handed kvcompress's attention "
                "a window tagged with the layer, but the attention that ran did not read the layer's compressed tokens "
                "(it copied the tensor, or is not kvcompress's attention), so the model's output for that step was "
                "wrong. Fix: run the model without kvcompress's attention (restore the handle enable_fast_attention "
                f"returned: decode steps then read the full reconstruction); and please report model type "
                f"{model_type!r} to kvcompress.")

    def _attention_reads_codes(self) -> bool:
        """Whether this step's attention is kvcompress's, which reads the codes (no autograd through it)."""
        return (self.n_compressed > 0 and not torch.is_grad_enabled()
                and getattr(self.config, "_attn_implementation", None) == ATTENTION_NAME)

    # ---- what kvcompress's attention calls back -----------------------------------------------

    def mark_consumed(self) -> None:
        """kvcompress's attention reads this layer for the window it was handed."""
        if self.state is State.WINDOW_HANDED:
            self.state = State.QUERY_PENDING if self.evicts_during_generation() else State.READY

    def check_reader(self, config) -> None:
        """ValueError if a model with another rope reads this layer's pre-RoPE keys."""
        if self.key_space is None or config is None or config is self._reader:
            return
        if self.config is not None and config_fields(config)["rope"] != config_fields(self.config)["rope"]:
            raise ValueError(f"layer {self.layer_idx} of this CompressedCache holds pre-RoPE keys of a model with "
                             f"rope {config_fields(self.config)['rope']}, but a model with rope "
                             f"{config_fields(config)['rope']} is reading it; build one cache per model: "
                             "CompressedCache(model, spec)")
        self._reader = config

    def _hold_prompt(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the (B, H, n, D) prompt uncompressed until `evict_prompt`; hand it back tagged."""
        implementation = getattr(self.config, "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"eviction ({self.evictor.describe()}) scores the prompt's tokens with the prompt's queries, which only "
                f"kvcompress's attention passes to the cache, but the model runs attention {implementation!r}. Fix: run "
                "the prompt inside `with kvcompress.enable_fast_attention(model):` (e.g. around model.generate)")
        self.window_keys, self.window_values = key_states, value_states
        self.seen_tokens += key_states.shape[2]
        self.state = State.PROMPT_HELD
        return hand_prompt(key_states, self), value_states

    def evict_prompt(self, query: torch.Tensor, scaling: float) -> None:
        """Keep the prompt tokens the evictor picks with the (B, H_q, n, D) post-RoPE queries of the
        n prompt tokens (q.k factor `scaling`), drop the rest, compress the kept ones."""
        self.state = State.READY
        n = self.window_keys.shape[2]
        kept, keys, values = self.evictor.keep_prompt(query, self.window_keys, self.window_values, scaling)
        if self.key_space is not None and kept.shape[2] < n:
            self.token_positions = kept.to(torch.int32)
        n_sinks = min(self.sinks, kept.shape[2])
        self.sink_keys, self.sink_values = keys[:, :, :n_sinks].clone(), values[:, :, :n_sinks].clone()
        self.window_keys, self.window_values = keys[:, :, n_sinks:].clone(), values[:, :, n_sinks:].clone()
        self._flush()

    def evicts_during_generation(self) -> bool:
        """Whether tokens leaving the window are evicted too (eviction `applies: "generation"`)."""
        return self.evictor is not None and self.evictor.during_generation

    def after_attention(self, query: torch.Tensor, scaling: float) -> None:
        """Generation-time eviction once attention read the layer: select among the tokens that
        left the window with the step's (B, H_q, Q, D) queries, then compress the selected blocks."""
        self.state = State.READY
        if self.evictor.pending(self.window_keys.shape[2]):
            if self.key_space is not None and self.token_positions is None:  # positions until now: consecutive
                B, H = self.window_keys.shape[:2]
                held = torch.arange(self.held_tokens(), dtype=torch.int32, device=self.window_keys.device)
                self.token_positions = held.expand(B, H, -1).clone()
            offset = self.sink_keys.shape[2] + self.n_compressed
            positions = None if self.token_positions is None else self.token_positions[:, :, offset:]
            self.window_keys, self.window_values, positions = self.evictor.select(
                query[:, :, -1:], scaling, self.window_keys, self.window_values, positions)
            if positions is not None:
                self.token_positions = torch.cat([self.token_positions[:, :, :offset], positions], dim=2)
        self._flush()

    # ---- storage ------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Compress the whole blocks that left the window (with generation-time eviction: that it selected)."""
        if self.evictor is None:
            super()._flush()
        else:
            self.evictor.compressed(super()._flush(self.evictor.compressible(self.window_keys.shape[2])))
