"""Bytes a cache stores, counted from its tensors, and what a kvcompress spec should store.

Stored bytes are `numel * element_size` of what each cache holds: `memory_report()` for kvcompress;
the key and value tensors of a `DynamicCache`; every tensor of a `QuantizedCache`'s quantized
objects plus its full-precision residual. `predicted_stored_bytes` is the closed form they are
checked against, `fp16_cache_bytes` the size of an uncompressed fp16 cache.
"""

from __future__ import annotations

import torch

from ..compat import quantized_layer_storage
from ..fingerprint import text_config


def tensor_bytes(obj) -> int:
    """Bytes held by every tensor in `obj`: a tensor, a tensor subclass made of inner tensors
    (quanto's quantized tensors: their inner data, scales and shifts), or a tuple/list/dict of
    such (HQQ's `(codes, meta)`). Non-tensor values count 0."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item) for item in obj.values())
    return 0


def cache_stored_bytes(cache) -> int:
    """Bytes a cache holds, from its stored tensors (see module docstring)."""
    from transformers import QuantizedCache

    from ..cache.cache import CompressedCache

    if isinstance(cache, CompressedCache):
        return cache.memory_report().stored_bytes
    if isinstance(cache, QuantizedCache):
        return sum(tensor_bytes(quantized_layer_storage(layer)) for layer in cache.layers)
    return sum(tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
               for layer in cache.layers)


def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a model config."""
    config = text_config(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def fp16_cache_bytes(config, tokens: int, batch: int = 1) -> int:
    """Bytes of K and V for `tokens` tokens in fp16, all layers: the reference size."""
    layers, kv_heads, head_dim = _kv_shape(config)
    return 2 * layers * batch * kv_heads * tokens * head_dim * 2


def held_tokens(spec, tokens: int, prompt_tokens: int | None = None) -> int | None:
    """Tokens each KV head holds after a `prompt_tokens`-token prompt (default: all `tokens`) and the
    `tokens - prompt_tokens` tokens after it: every one without eviction; with eviction of the prompt,
    the prompt's kept tokens (`cache.eviction.kept_count`) plus the later ones; None for
    generation-time eviction (no closed form here)."""
    from ..cache.eviction import kept_count

    if spec.eviction is None:
        return tokens
    if spec.eviction.applies != "prompt":
        return None
    prompt = tokens if prompt_tokens is None else prompt_tokens
    return kept_count(spec.eviction, prompt, spec.sinks, spec.window, spec.block_size) + tokens - prompt


def predicted_stored_bytes(spec_name: str, config, tokens: int, dtype: torch.dtype, batch: int = 1,
                           prompt_tokens: int | None = None) -> int | None:
    """What a kvcompress spec should store for `tokens` tokens, the first `prompt_tokens` of them
    (default: all) in one forward pass, from bit widths and overheads.

    Sinks and window in `dtype`; compressed tokens (whole blocks that left the window) as
    `bits/8` bytes per value plus an fp16 scale and zero point per group; a spec that evicts
    prompt tokens holds fewer (`held_tokens`). None for specs with methods other than
    "quant"/"none" or with generation-time eviction (no closed form here).
    """
    from ..presets import load_spec

    layers, kv_heads, head_dim = _kv_shape(config)
    spec = load_spec(spec_name).at_depth(layers)
    tokens = held_tokens(spec, tokens, prompt_tokens)
    if tokens is None:
        return None
    elem = torch.empty(0, dtype=dtype).element_size()
    sinks = min(spec.sinks, tokens)
    rest = tokens - sinks
    compressed = max((rest - spec.window) // spec.block_size * spec.block_size, 0)
    full = sinks + rest - compressed
    total = 0
    for layer in range(layers):
        per_layer = 2 * full * head_dim * elem
        for tensor_spec in spec.for_layer(layer):
            if tensor_spec.method == "none":
                per_layer += compressed * head_dim * elem
            elif tensor_spec.method == "quant":
                groups = compressed * head_dim // tensor_spec.group_size
                per_layer += compressed * head_dim * tensor_spec.bits // 8 + groups * 2 * 2
            else:
                return None
        total += per_layer
    return total * batch * kv_heads
