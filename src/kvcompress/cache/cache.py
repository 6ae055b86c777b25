"""`CompressedCache`: a transformers `Cache` whose attention reads what it stores.

Builds one compressed layer per model layer from a spec: `CompressedLayer` for full-attention
layers, `CompressedSlidingLayer` for sliding-window layers, with the codecs `build` makes and,
where the spec asks for pre-RoPE keys, the model's rotary embedding inverted (see `rope`).
Memory figures come from the tensors held (`memory_report()`).

Only the public `Cache` / `CacheLayerMixin` API of transformers is used. This module does not
patch attention, does not switch the model's attention implementation (see
`kvcompress.enable_fast_attention`; the cache only remembers the model config so that its
decode steps hand attention the codes when, and only when, the model runs kvcompress's
attention) and does not store anything itself (its layers do).
"""

from __future__ import annotations

import copy
import warnings

from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.configuration_utils import PretrainedConfig

from .attention import FAST_ATTENTION_MODEL_TYPES, hint_fast_attention
from .build import build_codec
from .layer import CompressedLayer
from .memory import MemoryReport
from ..calibration import artifact_for, config_fields
from ..compat import cache_layer_types
from ..rope import key_space_for
from ..spec import CacheSpec
from ..presets import load_spec
from .monitor import QualityMonitor
from .sliding import CompressedSlidingLayer


def _text_config(model_or_config) -> PretrainedConfig:
    if not isinstance(model_or_config, (PreTrainedModel, PretrainedConfig)):
        raise TypeError(f"CompressedCache needs the model (a transformers PreTrainedModel) or its config as its "
                        f"first argument, got {type(model_or_config).__name__}; pass CompressedCache(model, spec)")
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


def check_fields(built_for: dict, config) -> None:
    """ValueError listing the fields where `config` differs from `built_for` (`config_fields`)."""
    running = config_fields(config)
    diff = [f"{k}: cache {built_for.get(k)!r} vs model {v!r}" for k, v in running.items() if built_for.get(k) != v]
    if diff:
        raise ValueError(f"this CompressedCache was built for another model ({'; '.join(diff)}); build one cache "
                         "per model: CompressedCache(model, spec)")


def _key_spaces(model, spec: CacheSpec, num_layers: int) -> tuple[list, str | None]:
    """Per layer, a `RopeInverter` where the spec asks for pre-RoPE keys, else None; plus the
    reason (warned once) when pre-RoPE keys were asked for but the model's rope cannot be undone."""
    wanted = [spec.for_layer(idx)[0].key_space == "pre_rope" for idx in range(num_layers)]
    if not any(wanted):
        return [None] * num_layers, None
    if not isinstance(model, PreTrainedModel):
        raise ValueError("pre-RoPE keys (key_space 'pre_rope') need the model itself, not only its config: "
                         "pass the model to CompressedCache")
    inverters, reason = key_space_for(model)
    if inverters is None:
        reason = (f"pre-RoPE keys are not available for model type {model.config.model_type!r}: {reason}; "
                  "keys are compressed post-RoPE instead")
        warnings.warn(reason, stacklevel=3)
        return [None] * num_layers, reason
    return [inv if want else None for inv, want in zip(inverters, wanted)], None


def _check_eviction(model, spec: CacheSpec, sliding_windows: list[int | None]) -> None:
    """Refuse eviction where it cannot run: it needs kvcompress's attention (which hands the cache the
    prompt's queries) and at least one full-attention layer (sliding layers keep their window anyway)."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError("eviction needs the model itself, not only its config: pass the model to CompressedCache")
    model_type = model.config.model_type
    if model_type not in FAST_ATTENTION_MODEL_TYPES:  # the attention implementation is checked at the prompt
        raise ValueError(f"eviction ({spec.eviction.describe()}) needs kvcompress's attention, which runs on model "
                         f"types {', '.join(FAST_ATTENTION_MODEL_TYPES)}, not {model_type!r}; use a spec without an "
                         "eviction section")
    if all(window is not None for window in sliding_windows):
        raise ValueError(f"eviction ({spec.eviction.describe()}) applies to full-attention layers and this model has "
                         "only sliding-window layers (they keep only their window already); use a spec without an "
                         "eviction section")


def _make_monitor(monitor):
    """None, a default QualityMonitor, or the one given."""
    if monitor is False or monitor is None:
        return None
    if monitor is True:
        return QualityMonitor()
    if isinstance(monitor, QualityMonitor):
        return monitor
    raise ValueError(f"monitor must be True, False or a QualityMonitor, got {monitor!r}")


class CompressedCache(Cache):
    """A transformers `Cache` that stores compressed K/V and serves their reconstruction.

    Usage:
        kvcompress.enable_fast_attention(model)     # optional: faster decode steps (see below)
        cache = CompressedCache(model, "int4")
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32)
        cache.memory_report().ratio

    The decode path follows the model alone: while it runs kvcompress's attention
    (`kvcompress.enable_fast_attention(model)`: Llama, Mistral, Qwen2, Qwen3, Gemma 3 text models
    on "sdpa"), decode steps hand attention the codes, read chunk by chunk or by a compiled
    kernel (`KVCOMPRESS_KERNELS`, see `kvcompress.kernels`; same result, faster); otherwise
    attention reads the full reconstruction, and the first such cache logs once (INFO, logger
    "kvcompress") how to enable it. The cache never switches the model itself.

    Args:
        model: the model (or its config) the cache is for. Pre-RoPE keys need the model itself
            (its rotary embedding), not only its config.
        spec: a preset name, a spec file path, a dict or a `CacheSpec` (default "int4").
        artifact: a calibration artifact (folder or `CalibrationArtifact`) for low-rank specs;
            for the embedded model it is built on first use when not given.
        monitor: False (default, costs nothing), True, or a `kvcompress.cache.monitor.QualityMonitor`
            with your own thresholds: samples compressed blocks and tracks their reconstruction
            quality per layer (`cache.monitor.summary()`), warning once per layer when it drops.

    Attributes:
        key_space_fallback: why pre-RoPE keys were asked for but keys are compressed post-RoPE
            (also warned once), or None.
        model_fields: the model the cache was built for (`calibration.config_fields`: model type,
            layers, heads, head_dim, rope settings). A model with other layers, KV heads or
            head_dim that calls `update` gets a ValueError (a few integer compares per call); a
            model with other rope settings is refused at its first decode step through
            kvcompress's attention, or by `check_model(model)`.
    """

    def __init__(self, model: PreTrainedModel | PretrainedConfig, spec: str | dict | CacheSpec = "int4",
                 artifact=None, monitor=False):
        config = _text_config(model)
        sliding_windows = check_supported(config)
        num_layers = config.num_hidden_layers
        self.spec = load_spec(spec).at_depth(num_layers)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.spec.validate_for(num_layers, head_dim)
        self.model_fields = config_fields(config)
        self._kv_heads = self.model_fields["num_key_value_heads"]
        self._head_dim = head_dim
        artifact = artifact_for(model, self.spec, artifact)
        key_spaces, self.key_space_fallback = _key_spaces(model, self.spec, num_layers)
        if self.spec.eviction is not None:
            _check_eviction(model, self.spec, sliding_windows)
        self.monitor = _make_monitor(monitor)
        layers = []
        for idx in range(num_layers):
            key_spec, value_spec = self.spec.for_layer(idx)
            kind = "key_pre" if key_spaces[idx] is not None else "key_post"
            codecs = (build_codec(key_spec, layer_idx=idx, kind=kind, artifact=artifact, head_dim=head_dim),
                      build_codec(value_spec, layer_idx=idx, kind="value", artifact=artifact, head_dim=head_dim))
            common = dict(window=self.spec.window, sinks=self.spec.sinks, block_size=self.spec.block_size,
                          layer_idx=idx, config=config, key_space=key_spaces[idx], monitor=self.monitor)
            if sliding_windows[idx] is not None:  # keeps only the window, as transformers does
                layers.append(CompressedSlidingLayer(*codecs, sliding_window=sliding_windows[idx], **common))
            else:
                layers.append(CompressedLayer(*codecs, eviction=self.spec.eviction, **common))
        super().__init__(layers=layers)
        hint_fast_attention(model)

    @property
    def is_croppable(self) -> bool:
        """False for a spec with eviction: a crop cannot bring back tokens eviction dropped, and the
        first forward of assisted / prompt-lookup decoding holds the candidate tokens with the prompt,
        so eviction would score and budget them as prompt. transformers refuses those generation
        modes for a cache that is not croppable (a ValueError after the first forward pass)."""
        return self.spec.eviction is None and super().is_croppable

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store (B, H, T, D) states of layer `layer_idx` (see `CompressedLayer.update`), after
        checking that they come from the model the cache was built for."""
        if (not 0 <= layer_idx < len(self.layers) or key_states.dim() != 4
                or key_states.shape[1] != self._kv_heads or key_states.shape[3] != self._head_dim):
            raise ValueError(self._wrong_model_message(key_states, layer_idx))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _wrong_model_message(self, key_states, layer_idx: int) -> str:
        fields = self.model_fields
        built = (f"{fields['model_type']!r} with {len(self.layers)} layers, {self._kv_heads} KV heads, "
                 f"head_dim {self._head_dim}")
        shape = tuple(key_states.shape)
        return (f"this CompressedCache was built for a model of type {built}, but layer {layer_idx} handed it "
                f"keys of shape {shape} (batch, kv_heads, tokens, head_dim): another model is using it. "
                "Build one cache per model: CompressedCache(model, spec)")

    def check_model(self, model) -> None:
        """Raise ValueError naming the differences if `model` (or its config) is not the kind of
        model this cache was built for (type, shapes or rope settings)."""
        check_fields(self.model_fields, _text_config(model))

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
                           layer.config):
                if shared is not None:
                    memo[id(shared)] = shared
        return copy.deepcopy(self, memo)
