"""kvcompress's attention function and its wiring: a decode step reads a layer's codes.

`enable_fast_attention(model)` registers the attention function "kvcompress" (transformers'
public `AttentionInterface`) and switches an "sdpa" model to it; its handle switches back.
That function is sdpa for every call but three, recognised by a tag on the key tensor the
layer returned: a decode step on a `CompressedLayer` (a `HandedWindow`: the function reads the
layer through `attend`: Triton, CPU kernel or `kernels.reference`), a prompt held for eviction
(sdpa, then `evict_prompt`) and a step of generation-time eviction (sdpa, then
`after_attention`). The handed window raises on any read, so an attention that does not know
the tag fails at that step. No prefill, dropout, soft-capping or sink logits at decode steps.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from .. import kernels
from ..codecs import QuantCodec
from ..compat import register_attention_function, sdpa_attention
from ..kernels import cpu as cpu_kernel
from ..kernels import reference

logger = logging.getLogger(__name__)


ATTENTION_NAME = "kvcompress"
LAYER_ATTRIBUTE = "_kvcompress_layer"
PROMPT_ATTRIBUTE = "_kvcompress_prompt_layer"
OBSERVED_ATTRIBUTE = "_kvcompress_observed_layer"
# Model types whose attention passes the tensors `Cache.update` returns straight to the
# attention function (checked by tests/test_attention.py for each).
FAST_ATTENTION_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# The attention implementation "kvcompress" stands in for: it is that function for every call
# but a decode step on a compressed layer.
REPLACED_IMPLEMENTATION = "sdpa"


def register() -> None:
    """Make "kvcompress" a valid `attn_implementation` (idempotent). Switches no model."""
    register_attention_function(ATTENTION_NAME, kvcompress_attention)


def fast_attention_unavailable(model) -> str | None:
    """Why `model` cannot run kvcompress's attention, or None if it can (it uses "sdpa" or already
    "kvcompress", and is of a type in `FAST_ATTENTION_MODEL_TYPES`)."""
    if not isinstance(model, PreTrainedModel):
        return f"kvcompress's attention switches a transformers PreTrainedModel, got {type(model).__name__}"
    model_type = model.config.model_type
    if model_type not in FAST_ATTENTION_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose attention is known to hand the cache's tensors "
                f"straight to the attention function (supported: {', '.join(FAST_ATTENTION_MODEL_TYPES)})")
    current = model.config._attn_implementation
    if current not in (REPLACED_IMPLEMENTATION, ATTENTION_NAME):
        return (f"the model uses attn_implementation {current!r}; kvcompress's attention replaces "
                f"{REPLACED_IMPLEMENTATION!r} only (call model.set_attn_implementation({REPLACED_IMPLEMENTATION!r}) "
                "first, or load the model with it)")
    return None


class FastAttention:
    """What `enable_fast_attention` returns: `restore()` puts back the model's previous attention
    implementation (idempotent); as a context manager it restores on exit.

    Attributes:
        model: the model, or None when nothing was switched.
        previous: the implementation the model had before ("sdpa", or "kvcompress" when it was
            already enabled, in which case `restore()` leaves it enabled), or None.
        reason: why nothing was switched (non-strict call on an unsupported model), or None.
    """

    def __init__(self, model=None, previous: str | None = None, reason: str | None = None):
        self.model, self.previous, self.reason = model, previous, reason

    @property
    def active(self) -> bool:
        """Whether the model runs kvcompress's attention through this handle."""
        return self.model is not None and self.model.config._attn_implementation == ATTENTION_NAME

    def restore(self) -> None:
        """Switch the model back to the implementation it had before `enable_fast_attention`."""
        model, self.model = self.model, None
        if model is not None and model.config._attn_implementation != self.previous:
            model.set_attn_implementation(self.previous)

    def __enter__(self) -> FastAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


_reasons_logged: set[str] = set()


def enable_fast_attention(model, *, strict: bool = True) -> FastAttention:
    """Let decode steps of a `CompressedCache` read the stored codes chunk by chunk (faster, same result).

    Registers the attention function "kvcompress" (idempotent) and switches `model` from "sdpa"
    to it. For every call but a decode step on a `CompressedLayer` that function is
    transformers' sdpa, so other caches and prefill are unaffected (tested bit-identical).

        handle = enable_fast_attention(model)     # ... later: handle.restore()
        with enable_fast_attention(model):        # or only for a block
            model.generate(ids, cache=CompressedCache(model, "int4"))

    Args:
        model: a Llama, Mistral, Qwen2, Qwen3 or Gemma 3 (text) `PreTrainedModel` using "sdpa"
            (or already "kvcompress": then nothing changes and `restore()` keeps it).
        strict: True (default): raise a ValueError saying why when the model cannot be switched.
            False: return a handle that switches nothing (and restores nothing), logging the
            reason once at INFO; for code that runs on any model, such as measurements, where the
            cache then hands attention the full reconstruction as before.

    Returns:
        a `FastAttention` handle (`restore()`, context manager).
    """
    reason = fast_attention_unavailable(model)
    if reason is None:
        register()
        previous = model.config._attn_implementation
        if previous != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation == ATTENTION_NAME:
            return FastAttention(model, previous)
        reason = f"{type(model).__name__} did not accept attn_implementation {ATTENTION_NAME!r}"
    if strict:
        raise ValueError(f"enable_fast_attention: {reason}; decode steps of a CompressedCache on this model "
                         "read the full reconstruction instead (same result, slower)")
    if reason not in _reasons_logged:
        _reasons_logged.add(reason)
        logger.info("attention over the codes not enabled: %s; decode steps read the full reconstruction", reason)
    return FastAttention(reason=reason)


_hint_logged = False


def hint_fast_attention(model) -> None:
    """Log once per process, at INFO, how to get the faster decode path for a model that could have it."""
    global _hint_logged
    if _hint_logged or fast_attention_unavailable(model) is not None:
        return
    if model.config._attn_implementation == ATTENTION_NAME:
        return
    _hint_logged = True
    logger.info("decode steps of this CompressedCache read the full reconstruction of the cache; call "
                "kvcompress.enable_fast_attention(model) (returns a handle to undo it; also a context manager) "
                "to let attention read the codes chunk by chunk instead: same result, faster decode")


class HandedWindow(torch.Tensor):
    """The (B, H, n_window, D) key window a `CompressedLayer` hands kvcompress's attention at a decode step.

    It carries the layer (attribute `LAYER_ATTRIBUTE`) and refuses to be read: any torch
    operation on it but asking its shape, size, dtype or device raises. kvcompress's attention
    never reads it (it reads the layer), so the only code that could read it is an attention
    that does not know about the layer, which would attend to the window alone: that raises
    here, at the step where it happens, instead of returning a wrong output silently.
    """

    _ALLOWED = (torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
                torch.Tensor.size, torch.Tensor.dim)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        window = next((a for a in args if isinstance(a, HandedWindow)), None)
        layer = getattr(window, LAYER_ATTRIBUTE, None)
        where = f"layer {layer.layer_idx}" if layer is not None else "a layer"
        raise RuntimeError(
            f"kvcompress: an attention other than kvcompress's tried to read the K/V window that {where} handed "
            f"to kvcompress's attention ({getattr(func, '__name__', func)} on it); it would have attended to the "
            "window alone, without the compressed tokens. Fix: run the model without kvcompress's attention "
            "(restore the handle enable_fast_attention returned); and please report the model type to kvcompress.")


def hand_window(keys: torch.Tensor, layer) -> HandedWindow:
    """`keys` (B, H, n_window, D) as a `HandedWindow` tagged with `layer` (no copy)."""
    window = keys.as_subclass(HandedWindow)
    setattr(window, LAYER_ATTRIBUTE, layer)
    return window


def hand_prompt(keys: torch.Tensor, layer) -> torch.Tensor:
    """`keys` (B, H, n, D) of a prompt held for eviction, as a view tagged with `layer` (readable)."""
    tagged = keys.view_as(keys)
    setattr(tagged, PROMPT_ATTRIBUTE, layer)
    return tagged


def hand_observed(keys: torch.Tensor, layer) -> torch.Tensor:
    """`keys` (B, H, seq, D) as a view tagged with `layer`, which wants this step's query after
    attention (generation-time eviction scores the tokens that left the window with it)."""
    tagged = keys.view_as(keys)
    setattr(tagged, OBSERVED_ATTRIBUTE, layer)
    return tagged


def _check_unpadded(attention_mask: torch.Tensor | None, layer) -> None:
    """Refuse a prompt whose last query does not see every token (padding): eviction would score pads."""
    if attention_mask is None:
        return
    last = attention_mask[..., -1, :]
    sees_all = bool(last.all()) if last.dtype == torch.bool else bool((last == 0).all())
    if not sees_all:
        raise ValueError(f"layer {layer.layer_idx}: eviction ({layer.evictor.describe()}) needs prompts without "
                         "padding (the last prompt token must see every prompt token); run padded prompts one at a "
                         "time, or use a spec without eviction")


def kvcompress_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: SDPA, except for a decode step on a compressed layer.

    Args (as every transformers attention function):
        query: (B, H_q, Q, D); key, value: (B, H_kv, S, D) (for a tagged decode step: the
            layer's window only); attention_mask: None, bool (B, 1, Q, seq) or additive float.

    Returns:
        (attn_output of shape (B, Q, H_q, D), None).
    """
    prompt_layer = getattr(key, PROMPT_ATTRIBUTE, None)
    if prompt_layer is not None:  # a prompt held for eviction: attend to all of it, then let the layer evict
        _check_unpadded(attention_mask, prompt_layer)
        out = sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        prompt_layer.evict_prompt(query, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out
    observer = getattr(key, OBSERVED_ATTRIBUTE, None)
    if observer is not None:  # attend first, then let the layer evict with this step's query
        out = sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        observer.after_attention(query, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out
    layer = getattr(key, LAYER_ATTRIBUTE, None)
    if layer is None:
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer.mark_consumed()  # the window reached this function: the layer's guard is satisfied
    unsupported = {name: kwargs.get(name) for name in ("softcap", "s_aux", "sliding_window")
                   if kwargs.get(name) is not None}
    if dropout or unsupported:
        raise ValueError(
            f"kvcompress attention does not support {unsupported or {'dropout': dropout}} at decode time; "
            "leave the model on sdpa (restore the handle enable_fast_attention returned): decode steps then read "
            "the full reconstruction"
        )
    layer.check_reader(getattr(module, "config", None))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(layer, query, attention_mask, scale)  # (B, H_q, Q, D)
    if layer.evicts_during_generation():
        layer.after_attention(query, scale)
    return out.transpose(1, 2).contiguous(), None


def attend(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """The decode step over `layer`: on CUDA the Triton kernel where it applies
    (`kernels.decode_attention`, see `_triton_reads`); on CPU the compiled CPU kernel where it
    applies (`kvcompress.kernels.cpu`: CPU tensors, plain `QuantCodec` keys and values stored
    post-RoPE or codebook keys and values; `kernels.use_cpu_kernel`); else
    `kernels.reference.attend_compressed`. KVCOMPRESS_KERNELS chooses (see `kernels`).
    Same arguments and result as `attend_compressed`."""
    if _triton_reads(layer, query, attention_mask):
        return kernels.decode_attention(layer, query, attention_mask, scaling)
    out = cpu_kernel.attend(layer, query, attention_mask, scaling) if kernels.use_cpu_kernel(query) else None
    return out if out is not None else reference.attend_compressed(layer, query, attention_mask, scaling)


def _triton_reads(layer, query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether `kernels.decode_attention` reads this step: Triton chosen for the query's device
    (`kernels.use_triton`), uniform quantizers, post-RoPE keys and a (B, 1, Q, seq) mask or none."""
    return (kernels.use_triton(query) and layer.key_space is None
            and isinstance(layer.key_codec, QuantCodec) and isinstance(layer.value_codec, QuantCodec)
            and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)))
