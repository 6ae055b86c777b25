"""`CompressedCache`: a transformers `Cache` whose attention reads what it stores.

Each model layer gets a `CompressedLayer`. On `update` (called by attention with post-RoPE
keys and values of shape (batch, kv_heads, new_tokens, head_dim)) the layer appends the new
tokens, compresses every whole block of `block_size` tokens that has left the
full-precision window (each token exactly once), and returns the reconstruction of
everything it holds:

    [ sinks (full precision) | decode(compressed blocks) | window (full precision) ]

so attention always reads the decoded form of the stored codes, never a hidden
uncompressed copy. Memory figures come from the tensors actually held.

Only the public `Cache` / `CacheLayerMixin` API of transformers is used. This module does not
patch attention and does not keep any full-precision copy of compressed tokens between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.configuration_utils import PretrainedConfig

from .codecs import Codec, Stored, stored_nbytes
from .codecs.factory import build_codec
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
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, key_codec: Codec, value_codec: Codec, window: int, sinks: int, block_size: int,
                 layer_idx: int = 0):
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
        """Store new (B, H, T, D) states and return the (B, H, seq, D) keys and values attention reads."""
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
        return self.reconstruct()

    def _flush(self) -> None:
        """Compress every whole block that lies before the last `window` tokens."""
        overflow = self.window_keys.shape[2] - self.window
        n_tokens = (overflow // self.block_size) * self.block_size
        if n_tokens <= 0:
            return
        self.stored_keys = _append(self.stored_keys, self.key_codec.encode(self.window_keys[:, :, :n_tokens]))
        self.stored_values = _append(self.stored_values, self.value_codec.encode(self.window_values[:, :, :n_tokens]))
        self.window_keys = self.window_keys[:, :, n_tokens:].clone()
        self.window_values = self.window_values[:, :, n_tokens:].clone()
        self.n_compressed += n_tokens

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of shape (B, H, seq, D) in the model dtype: what attention reads."""
        keys, values = [self.sink_keys], [self.sink_values]
        if self.stored_keys is not None:
            keys.append(self.key_codec.decode(self.stored_keys, self.dtype))
            values.append(self.value_codec.decode(self.stored_values, self.dtype))
        keys.append(self.window_keys)
        values.append(self.window_values)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[2] + self.n_compressed + self.window_keys.shape[2]

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
        new_length = max(self.get_seq_length() + tokens_to_remove, 0)
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
        self.stored_keys = self._keep_tokens(self.stored_keys, self.key_codec, whole)
        self.stored_values = self._keep_tokens(self.stored_values, self.value_codec, whole)
        self.n_compressed = whole

    def _keep_tokens(self, stored: Stored | None, codec: Codec, n_tokens: int) -> Stored | None:
        """Keep the first `n_tokens` (a multiple of block_size) compressed tokens."""
        if stored is None or n_tokens == 0:
            return None
        total = self.n_compressed
        return {name: t[:, :, : t.shape[2] * n_tokens // total] for name, t in stored.items()}

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
            fp16 = 2 * B * H * self.get_seq_length() * D * FP16_BYTES
        else:
            fp16 = 0
        return LayerMemory(self.layer_idx, self.get_seq_length(), self.n_compressed, parts, fp16)


def _text_config(model_or_config) -> PretrainedConfig:
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_supported(config: PretrainedConfig) -> None:
    """Raise a ValueError naming the model type if its layers are not plain full attention."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    unsupported = sorted(set(layer_types) - {"full_attention"})
    if unsupported or getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"CompressedCache does not support model type {config.model_type!r}: it has "
            f"{unsupported or ['sliding_attention']} layers; only full-attention layers are supported."
        )
    if not hasattr(config, "num_key_value_heads") and not hasattr(config, "num_attention_heads"):
        raise ValueError(f"model type {config.model_type!r} has no standard KV cache; CompressedCache cannot hold it")


class CompressedCache(Cache):
    """A transformers `Cache` that stores compressed K/V and serves their reconstruction.

    Usage:
        cache = CompressedCache(model, "int4")
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32)
        cache.memory_report().ratio

    Args:
        model: the model (or its config) the cache is for.
        spec: a preset name, a spec file path, a dict or a `CacheSpec` (default "int4").
    """

    def __init__(self, model: PreTrainedModel | PretrainedConfig, spec: str | dict | CacheSpec = "int4"):
        config = _text_config(model)
        check_supported(config)
        self.spec = load_spec(spec)
        num_layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.spec.validate_for(num_layers, head_dim)
        layers = []
        for idx in range(num_layers):
            key_spec, value_spec = self.spec.for_layer(idx)
            layers.append(CompressedLayer(build_codec(key_spec), build_codec(value_spec),
                                          window=self.spec.window, sinks=self.spec.sinks,
                                          block_size=self.spec.block_size, layer_idx=idx))
        super().__init__(layers=layers)

    def memory_report(self) -> MemoryReport:
        """Stored bytes (codes, scales, zero points, window, sinks) per layer and in total."""
        return MemoryReport([layer.memory() for layer in self.layers])
