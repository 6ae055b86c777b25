"""Every transformers detail kvcompress depends on beyond the documented Cache API, in one place.

Tested with transformers 5.24. This module does not patch transformers.
"""

from __future__ import annotations

import transformers

# transformers 5.x renamed the `past_key_values=` argument of forward/generate to `cache=`
# (the old name warns and works until 5.40). kvcompress passes caches under the new name.
CACHE_KWARG = "cache"

TRANSFORMERS_VERSION = transformers.__version__


def cache_layer_types(config) -> tuple[list[str], list[dict]]:
    """Per decoder layer, the kind of cache layer transformers builds for it, and its settings.

    Kinds include "full_attention", "sliding_attention" (settings {"sliding_window": N}),
    "chunked_attention", "linear_attention", "conv", "hybrid" and "dummy" (a layer that keeps
    no cache of its own: it reuses another layer's K/V, or has no attention). Uses
    `transformers.cache_utils.get_layer_types_and_kwargs`, which `DynamicCache` itself uses.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(config)


def quantized_layer_storage(layer) -> dict[str, object]:
    """What one layer of transformers' `QuantizedCache` holds, by part, as stored.

    "residual_keys"/"residual_values": the full-precision residual window (tensors);
    "quantized_keys"/"quantized_values": the backend's quantized object (a quanto
    `WeightQBitsTensor`, or HQQ's `(packed codes, meta dict)`), or None before the first update.
    Reads the private `_quantized_keys`/`_quantized_values` attributes of `QuantizedLayer`.
    """
    return {"residual_keys": getattr(layer, "keys", None), "residual_values": getattr(layer, "values", None),
            "quantized_keys": getattr(layer, "_quantized_keys", None),
            "quantized_values": getattr(layer, "_quantized_values", None)}


def register_attention_function(name: str, function) -> None:
    """Make `name` a valid `attn_implementation` running `function`, with sdpa's mask.

    Uses the public `AttentionInterface.register` and the mask registry
    `transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS` (without a mask function under the
    same name, transformers would build no mask at all for the new implementation).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own sdpa attention function (`integrations.sdpa_attention`), unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
