"""`CompressedCache`: a transformers `Cache` whose attention reads what it stores.

Each model layer gets a `CompressedLayer`. On `update` (called by attention with post-RoPE
keys and values of shape (batch, kv_heads, new_tokens, head_dim)) the layer appends the new
tokens, compresses every whole block of `block_size` tokens that has left the
full-precision window (each token exactly once), and returns the reconstruction of
everything it holds:

    [ sinks (full precision) | decode(compressed blocks) | window (full precision) ]

At a decode step of a model switched to kvcompress's attention function (`fast_attention`),
it returns the window tagged with the layer instead, and that function decodes the blocks
chunk by chunk itself (see `attention`). Either way attention reads the decoded form of the
stored codes, never a hidden uncompressed copy. Memory figures come from the tensors held.

Only the public `Cache` / `CacheLayerMixin` API of transformers is used. This module does not
patch attention and does not keep any full-precision copy of compressed tokens between steps.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.configuration_utils import PretrainedConfig

from .attention import ATTENTION_NAME, FAST_ATTENTION_MODEL_TYPES, LAYER_ATTRIBUTE
from .attention import register as register_attention
from .codecs import Codec, Stored, stored_nbytes, token_slice
from .codecs.factory import build_codec
from .compat import cache_layer_types
from .spec import CacheSpec, load_spec

FP16_BYTES = 2


@dataclass
class LayerMemory:
    """Bytes held by one layer, by part, and what the same tokens would take in fp16."""

    layer: int
    tokens: int
    compressed_tokens: int
    parts: dict[str, int]
    fp16_bytes: int

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
                    "compressed_tokens": m.compressed_tokens,
                    "stored_bytes": m.stored_bytes,
                    "fp16_bytes": m.fp16_bytes,
                    "parts": dict(m.parts),
                }
                for m in self.layers
            ],
        }


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
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, key_codec: Codec, value_codec: Codec, window: int, sinks: int, block_size: int,
                 layer_idx: int = 0, key_space=None):
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
        self.monitor = None  # a kvcompress.monitor.QualityMonitor when the cache is monitored
        # The model config whose attention implementation says whether decode steps may hand
        # attention the codes (kvcompress.attention) instead of a full reconstruction; or None.
        self.attention_config = None
        self._clear()

    def _clear(self) -> None:
        self.sink_keys = self.sink_values = None
        self.window_keys = self.window_values = None
        self.stored_keys: Stored | None = None
        self.stored_values: Stored | None = None
        self.n_compressed = 0
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

        At a decode step (T == 1) of a model running kvcompress's attention function, the
        return value is instead the (B, H, n_window, D) window, tagged with this layer: that
        attention function reads the sinks, the codes and the window from the layer itself
        (see `kvcompress.attention`).
        """
        decode_step = key_states.shape[2] == 1
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        missing_sinks = self.sinks - self.sink_keys.shape[2]
        if missing_sinks > 0 and self.n_compressed == 0 and self.window_keys.shape[2] == 0:
            take = min(missing_sinks, key_states.shape[2])
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=2)
            key_states, value_states = key_states[:, :, take:], value_states[:, :, take:]
        self.window_keys = torch.cat([self.window_keys, key_states], dim=2)
        self.window_values = torch.cat([self.window_values, value_states], dim=2)
        self._flush()
        if decode_step and self._attention_reads_codes():
            keys, values = self.window_keys.view_as(self.window_keys), self.window_values.view_as(self.window_values)
            setattr(keys, LAYER_ATTRIBUTE, self)
            return keys, values
        return self.reconstruct()

    def _attention_reads_codes(self) -> bool:
        """Whether this step's attention is kvcompress's, which reads the codes (no autograd through it)."""
        return (self.attention_config is not None and self.n_compressed > 0
                and getattr(self.attention_config, "_attn_implementation", None) == ATTENTION_NAME
                and not torch.is_grad_enabled())

    def _flush(self) -> None:
        """Compress every whole block that lies before the last `window` tokens."""
        overflow = self.window_keys.shape[2] - self.window
        n_tokens = (overflow // self.block_size) * self.block_size
        if n_tokens <= 0:
            return
        keys = self.window_keys[:, :, :n_tokens]
        if self.key_space is not None:  # positions of these tokens: after sinks and earlier blocks
            keys = self.key_space.unrotate(keys, start=self.sink_keys.shape[2] + self.n_compressed)
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
                keys[:, :, blocks] = self.key_space.rotate(decoded, start=n_sinks)
            self.value_codec.decode_into(self.stored_values, values[:, :, blocks])
        keys[:, :, blocks.stop:], values[:, :, blocks.stop:] = self.window_keys, self.window_values
        return keys, values

    def held_tokens(self) -> int:
        """Tokens this layer holds (sinks + compressed + window)."""
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[2] + self.n_compressed + self.window_keys.shape[2]

    def get_seq_length(self) -> int:
        """Tokens seen so far; a full-attention layer holds all of them."""
        return self.held_tokens()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

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

    def memory(self) -> LayerMemory:
        """Bytes of every stored tensor, by part; fp16 bytes of the same K and V."""
        parts = {}
        if self.is_initialized:
            parts["sinks"] = stored_nbytes({"k": self.sink_keys, "v": self.sink_values})
            parts["window"] = stored_nbytes({"k": self.window_keys, "v": self.window_values})
            for prefix, stored in (("key", self.stored_keys), ("value", self.stored_values)):
                for name, tensor in (stored or {}).items():
                    parts[f"{prefix}_{name}"] = tensor.numel() * tensor.element_size()
            B, H, _, D = self.sink_keys.shape
            fp16 = 2 * B * H * self.held_tokens() * D * FP16_BYTES
        else:
            fp16 = 0
        return LayerMemory(self.layer_idx, self.held_tokens(), self.n_compressed, parts, fp16)


def _text_config(model_or_config) -> PretrainedConfig:
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_UNSUPPORTED_WHY = {
    "dummy": "layers that reuse another layer's K/V (KV sharing) or have no attention",
    "linear_attention": "linear-attention / state-space layers, which keep a recurrent state instead of K/V",
    "conv": "convolution layers, which keep a recurrent state instead of K/V",
    "hybrid": "hybrid state-space + attention layers",
    "hybrid_sliding": "hybrid state-space + sliding-attention layers",
    "chunked_attention": "chunked-attention layers",
}


def check_supported(config: PretrainedConfig) -> list[int | None]:
    """The sliding window of every layer (None for a full-attention layer).

    Raises a ValueError naming the model type when a layer does not keep a standard per-head
    K/V cache (multi-latent attention, linear attention / state-space layers, KV sharing).
    """
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "kv_lora_rank", None):
        raise ValueError(
            f"CompressedCache does not support model type {model_type!r}: it uses multi-latent attention "
            f"(kv_lora_rank={config.kv_lora_rank}), whose keys and values are not a standard per-head K/V cache; "
            "use transformers' DynamicCache for it"
        )
    layer_types, layer_kwargs = cache_layer_types(config)
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        why = "; ".join(f"{kind}: {_UNSUPPORTED_WHY.get(kind, 'not a standard K/V cache layer')}" for kind in unsupported)
        raise ValueError(
            f"CompressedCache does not support model type {model_type!r}: it has {unsupported} layers ({why}). "
            f"Only {list(SUPPORTED_LAYER_TYPES)} layers are supported; use transformers' DynamicCache for this model"
        )
    if not hasattr(config, "num_attention_heads") or not hasattr(config, "num_hidden_layers"):
        raise ValueError(f"model type {model_type!r} has no standard KV cache; CompressedCache cannot hold it")
    return [kwargs["sliding_window"] if kind == "sliding_attention" else None
            for kind, kwargs in zip(layer_types, layer_kwargs)]


def _key_spaces(model, spec: CacheSpec, num_layers: int) -> tuple[list, str | None]:
    """Per layer, a `RopeInverter` where the spec asks for pre-RoPE keys, else None; plus the
    reason (warned once) when pre-RoPE keys were asked for but the model's rope cannot be undone."""
    wanted = [spec.for_layer(idx)[0].key_space == "pre_rope" for idx in range(num_layers)]
    if not any(wanted):
        return [None] * num_layers, None
    if not isinstance(model, PreTrainedModel):
        raise ValueError("pre-RoPE keys (key_space 'pre_rope') need the model itself, not only its config: "
                         "pass the model to CompressedCache")
    from .rope import key_space_for

    inverters, reason = key_space_for(model)
    if inverters is None:
        reason = (f"pre-RoPE keys are not available for model type {model.config.model_type!r}: {reason}; "
                  "keys are compressed post-RoPE instead")
        warnings.warn(reason, stacklevel=3)
        return [None] * num_layers, reason
    return [inv if want else None for inv, want in zip(inverters, wanted)], None


def _make_monitor(monitor):
    """None, a default QualityMonitor, or the one given."""
    from .monitor import QualityMonitor

    if monitor is False or monitor is None:
        return None
    if monitor is True:
        return QualityMonitor()
    if isinstance(monitor, QualityMonitor):
        return monitor
    raise ValueError(f"monitor must be True, False or a QualityMonitor, got {monitor!r}")


def _use_fast_attention(model) -> bool:
    """Switch a supported model from "sdpa" to kvcompress's attention; True if it now uses it."""
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in FAST_ATTENTION_MODEL_TYPES:
        return False
    current = model.config._attn_implementation
    if current == ATTENTION_NAME:
        return True
    if current != "sdpa":
        return False
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    return model.config._attn_implementation == ATTENTION_NAME


class CompressedCache(Cache):
    """A transformers `Cache` that stores compressed K/V and serves their reconstruction.

    Usage:
        cache = CompressedCache(model, "int4")
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32)
        cache.memory_report().ratio

    Args:
        model: the model (or its config) the cache is for. Pre-RoPE keys need the model itself
            (its rotary embedding), not only its config.
        spec: a preset name, a spec file path, a dict or a `CacheSpec` (default "int4").
        artifact: a calibration artifact (folder or `CalibrationArtifact`) for low-rank specs;
            for the embedded model it is built on first use when not given.
        monitor: False (default, costs nothing), True, or a `kvcompress.monitor.QualityMonitor`
            with your own thresholds: samples compressed blocks and tracks their reconstruction
            quality per layer (`cache.monitor.summary()`), warning once per layer when it drops.
        fast_attention: True (default): if `model` is a Llama, Mistral, Qwen2, Qwen3 or Gemma 3
            (text) model that uses "sdpa" attention, switch it to kvcompress's attention
            function ("kvcompress", see `kvcompress.attention`), which is transformers' sdpa for
            every call except a decode step on this cache, where it reads the codes chunk by
            chunk instead of a full decoded copy (same result, faster). The switch stays on the
            model; undo it with `model.set_attn_implementation("sdpa")`. False: leave the model
            alone; attention reads the full reconstruction every step.

    Attributes:
        key_space_fallback: why pre-RoPE keys were asked for but keys are compressed post-RoPE
            (also warned once), or None.
    """

    def __init__(self, model: PreTrainedModel | PretrainedConfig, spec: str | dict | CacheSpec = "int4",
                 artifact=None, monitor=False, fast_attention: bool = True):
        config = _text_config(model)
        sliding_windows = check_supported(config)
        self.spec = load_spec(spec)
        num_layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.spec.validate_for(num_layers, head_dim)
        if self.spec.needs_artifact(num_layers):
            from .calibration import resolve_artifact

            artifact = resolve_artifact(model, artifact)
        key_spaces, self.key_space_fallback = _key_spaces(model, self.spec, num_layers)
        layers = []
        for idx in range(num_layers):
            key_spec, value_spec = self.spec.for_layer(idx)
            kind = "key_pre" if key_spaces[idx] is not None else "key_post"
            layer_cls, extra = CompressedLayer, {}
            if sliding_windows[idx] is not None:  # keeps only the window, as transformers does
                from .sliding import CompressedSlidingLayer

                layer_cls, extra = CompressedSlidingLayer, {"sliding_window": sliding_windows[idx]}
            layers.append(layer_cls(build_codec(key_spec, layer_idx=idx, kind=kind, artifact=artifact),
                                    build_codec(value_spec, layer_idx=idx, kind="value", artifact=artifact),
                                    window=self.spec.window, sinks=self.spec.sinks,
                                    block_size=self.spec.block_size, layer_idx=idx,
                                    key_space=key_spaces[idx], **extra))
        super().__init__(layers=layers)
        self.monitor = _make_monitor(monitor)
        for layer in self.layers:
            layer.monitor = self.monitor
        if fast_attention and _use_fast_attention(model):
            for layer in self.layers:
                if not layer.is_sliding:
                    layer.attention_config = model.config

    def memory_report(self) -> MemoryReport:
        """Stored bytes (codes, scales, zero points, window, sinks) per layer and in total."""
        return MemoryReport([layer.memory() for layer in self.layers])

    def copy(self) -> CompressedCache:
        """An independent copy of the cache and its stored codes, e.g. to continue one prompt several ways.

            cache = CompressedCache(model, "int4")
            model(prompt_ids, cache=cache)                 # compress the prompt once
            for suffix in suffixes:
                model.generate(torch.cat([prompt_ids, suffix], 1), cache=cache.copy(), ...)

        Continuing from the copy leaves this cache untouched. The immutable parts (codecs, the
        model's rotary embedding, the model config) are shared, not duplicated. `copy.deepcopy` gives the same
        result but duplicates those too.
        """
        memo: dict[int, object] = {}
        for layer in self.layers:
            for shared in (layer.key_codec, layer.value_codec, getattr(layer.key_space, "inner", layer.key_space),
                           layer.attention_config):
                if shared is not None:
                    memo[id(shared)] = shared
        return copy.deepcopy(self, memo)
