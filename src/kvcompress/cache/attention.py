"""Decode-step attention that reads a `CompressedLayer`'s codes chunk by chunk.

`CompressedLayer.reconstruct` writes the decoded form of every compressed token into one
(B, H, seq, D) tensor per layer and step, copying the sinks and the window into it, and SDPA
then reads it again. At a decode step (one query token) this module computes the same
attention without that tensor: it decodes the compressed blocks `CHUNK_TOKENS` at a time (in
float32), takes the query's scores against each chunk, and after one softmax over all
positions takes the values the same way:

    scores = [q.sinks | q.decode(chunk 1) | ... | q.window] * scaling  (+ mask)
    out    = softmax(scores) @ [sinks | decode(chunk 1) | ... | window]

For a codec that stores its states rotated by an orthogonal R (`ComposedCodec.rotation`),
the rotation is folded out: q.k = (q R).(k R) and p.V = (p.(V R)) R^T, so the query is rotated
once and the output un-rotated once per step, and stored tokens are read as
`decode_rotated` (never un-rotated one by one). A mean m subtracted before the rotation
(`ComposedCodec.offset`) comes back as q.m added to the scores and (sum of p) m to the output.
Equal to the plain path up to float32 rounding.

Attention still reads exactly the decoded form of what is stored (tested equal to the
reconstruct-then-SDPA path), the window and sinks are read where they lie, and no more than
`CHUNK_TOKENS` tokens of one layer are ever decoded at once.

`attend_compressed` is the pure-torch reference. On CPU the decode step runs the compiled kernel
of `kvcompress.kernels.cpu` instead where it applies (`attend`), which computes the same from the
stored codes without decoding them into tensors: uniform `QuantCodec` codes with post-RoPE keys,
and the codebook codecs of the `bitsN` presets (rotated, centred or principal-basis codebooks;
keys pre- or post-RoPE). `attend_compressed` runs where it does not (low-rank fp16, Hadamard +
uniform, pre-RoPE uniform keys, a mix of the two families, GPU tensors, no compiler).

Wiring, through transformers' public `AttentionInterface` (the details are in `compat`):
`enable_fast_attention(model)` registers the attention function "kvcompress" (and sdpa's mask
function under that name; idempotent) and switches a model that uses "sdpa" to it, returning a
handle that switches it back (`.restore()`, or use it as a context manager). Importing
kvcompress registers nothing and switches no model. A model running "kvcompress" attention runs
transformers' own sdpa attention function for every call except a decode step on a
`CompressedLayer`: for that step `CompressedLayer.update` returns its full-precision window
tagged with the layer itself (attribute `LAYER_ATTRIBUTE`), and this function reads the layer
and marks it consumed (`CompressedLayer.mark_consumed`).

Eviction: a layer with an eviction spec hands back the prompt's keys (a plain tensor, attention
reads it as usual) tagged with the layer under `PROMPT_ATTRIBUTE`; this function computes the
prompt's attention with sdpa over every prompt token, then gives the layer the prompt's queries
(`CompressedLayer.evict_prompt`), which scores, drops and compresses. The prompt's own outputs
therefore read the uncompressed prompt (as in every prefill-time eviction method); every later
token reads only what the layer kept.

The guard: the handed window is a `HandedWindow`, a tensor that raises on any read but its
shape, so an attention that is not this function fails at the step instead of attending to the
window alone (which for batch 1, where the mask is None, nothing else would notice); and a
layer whose window no kvcompress attention consumed refuses its next `update`.

On CUDA with Triton installed, the decode step runs the split-K Triton kernel over the codes
instead (`kernels.decode_attention`, same result) where the layer's codecs allow it.

This module does not handle prefill (several query tokens), sliding-window layers, dropout,
logit soft-capping or learned attention-sink logits: for those the cache hands attention a
full reconstruction (or this function refuses with an error), never a partial one. It does not
switch any model by itself: only `enable_fast_attention` does, and its handle undoes it.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from .. import kernels
from ..calibration import config_fields
from ..codecs import QuantCodec, token_slice
from ..compat import register_attention_function, sdpa_attention
from ..kernels import cpu as cpu_kernel

logger = logging.getLogger(__name__)


ATTENTION_NAME = "kvcompress"
LAYER_ATTRIBUTE = "_kvcompress_layer"
PROMPT_ATTRIBUTE = "_kvcompress_prompt_layer"
OBSERVED_ATTRIBUTE = "_kvcompress_observed_layer"
CHUNK_TOKENS = 4096
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
            "window alone, without the compressed tokens. Fix: build the cache with "
            "CompressedCache(..., fast_attention=False), or restore the model's attention (the handle "
            "enable_fast_attention returned); and please report the model type to kvcompress.")


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
        raise ValueError(f"layer {layer.layer_idx}: eviction ({layer.eviction.describe()}) needs prompts without "
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
            "build the cache with CompressedCache(..., fast_attention=False) for this model, or leave the model "
            "on sdpa (restore the handle enable_fast_attention returned)"
        )
    config = getattr(module, "config", None)
    if layer.key_space is not None and config is not None and config is not layer.checked_config:
        _check_rope(layer, config)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(layer, query, attention_mask, scale)  # (B, H_q, Q, D)
    if layer.evicts_during_generation():
        layer.after_attention(query, scale)
    return out.transpose(1, 2).contiguous(), None


def _check_rope(layer, config) -> None:
    """Refuse a model whose rope differs from the one the layer's pre-RoPE keys were coded with
    (the keys would be re-rotated with the wrong angles); remember a config that matches."""
    fields = layer.model_fields
    if fields is not None:
        rope = config_fields(config)["rope"]
        if rope != fields["rope"]:
            raise ValueError(f"layer {layer.layer_idx} of this CompressedCache holds pre-RoPE keys of a model with "
                             f"rope {fields['rope']}, but a model with rope {rope} is reading it; build one "
                             "cache per model: CompressedCache(model, spec)")
    layer.checked_config = config


def attend(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """The decode step over `layer`: on CUDA the Triton kernel where it applies
    (`kernels.decode_attention`, see `_triton_reads`); on CPU the compiled CPU kernel where it
    applies (`kvcompress.kernels.cpu`: CPU tensors, plain `QuantCodec` keys and values stored
    post-RoPE or codebook keys and values, `layer.use_kernel`; not with KVCOMPRESS_KERNELS=torch);
    else `attend_compressed`.
    Same arguments and result as `attend_compressed`."""
    if _triton_reads(layer, query, attention_mask):
        return kernels.decode_attention(layer, query, attention_mask, scaling)
    use_cpu_kernel = layer.use_kernel and kernels.mode() != "torch"
    out = cpu_kernel.attend(layer, query, attention_mask, scaling) if use_cpu_kernel else None
    return out if out is not None else attend_compressed(layer, query, attention_mask, scaling)


def _triton_reads(layer, query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether `kernels.decode_attention` reads this step: Triton chosen for the query's device
    (`kernels.use_triton`), uniform quantizers, post-RoPE keys and a (B, 1, Q, seq) mask or none."""
    return (kernels.use_triton(query) and layer.key_space is None
            and isinstance(layer.key_codec, QuantCodec) and isinstance(layer.value_codec, QuantCodec)
            and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)))


def _chunks(layer, kind: str):
    """Yield (start, stop, encoding of tokens [start, stop)) over the layer's compressed tokens."""
    stored = layer.stored_keys if kind == "key" else layer.stored_values
    total = layer.n_compressed
    step = max(layer.block_size, CHUNK_TOKENS // layer.block_size * layer.block_size)
    for start in range(0, total, step):
        stop = min(start + step, total)
        yield start, stop, token_slice(stored, total, start, stop)


def codec_rotation(codec, dim: int, device: torch.device) -> torch.Tensor | None:
    """The float32 orthogonal R (dim, dim) a codec stores its states in (x -> x @ R), or None."""
    rotation = getattr(codec, "rotation", None)
    return rotation(dim, device, torch.float32) if rotation is not None else None


def codec_offset(codec, device: torch.device) -> torch.Tensor | None:
    """The float32 (H, D) mean a rotated codec subtracts before rotating, or None."""
    offset = getattr(codec, "offset", None)
    return offset(device) if offset is not None else None


def _chunk_scores(layer, part: dict, start: int, q: torch.Tensor, rotated: bool) -> torch.Tensor:
    """q . k for the keys of one chunk: (B, H, rep, T) from q (B, H, rep, D), in float32.

    With `rotated`, q is already q @ R and the keys are read in the codec's rotated space.
    """
    if rotated:
        return q @ layer.key_codec.decode_rotated(part, torch.float32).transpose(-1, -2)
    keys = layer.key_codec.decode(part, torch.float32)  # (B, H, T, D)
    if layer.key_space is not None:  # keys were coded pre-RoPE: rotate them to their positions
        keys = layer.key_space.rotate(keys, start=layer.key_positions(start, start + keys.shape[2]))
    return q @ keys.transpose(-1, -2)


def _chunk_mix(layer, part: dict, probs: torch.Tensor, rotated: bool) -> torch.Tensor:
    """probs @ v for the values of one chunk: (B, H, rep, D) from probs (B, H, rep, T), in float32.

    With `rotated`, the result stays in the codec's rotated space (probs @ (V @ R)).
    """
    if rotated:
        return probs @ layer.value_codec.decode_rotated(part, torch.float32)
    return probs @ layer.value_codec.decode(part, torch.float32)


def attend_compressed(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
                      ) -> torch.Tensor:
    """Attention of one decode step over [sinks | compressed blocks | window] of `layer`.

    Args:
        layer: a `CompressedLayer` holding at least one compressed block.
        query: (B, H_q, 1, D), H_q a multiple of the layer's H_kv heads (grouped-query attention).
        attention_mask: None, bool (True = attend) or additive float, (B, 1, 1, seq) where seq
            is every token the layer holds.
        scaling: factor applied to q.k.

    Returns:
        (B, H_q, 1, D_v) attention output in the query's dtype; computed in float32.
    """
    B, Hq, Q, D = query.shape
    if Q != 1:
        raise ValueError(f"attend_compressed handles one query token (a decode step), got {Q}")
    sink_k, window_k = layer.sink_keys, layer.window_keys
    H = window_k.shape[1]
    n_sinks, n_compressed, n_window = sink_k.shape[2], layer.n_compressed, window_k.shape[2]
    seq = n_sinks + n_compressed + n_window
    compute = torch.float32
    q = (query.to(compute) * scaling).reshape(B, H, Hq // H, D)  # query heads grouped by their K/V head

    scores = torch.empty(B, H, Hq // H, seq, dtype=compute, device=query.device)
    scores[..., :n_sinks] = q @ sink_k.to(compute).transpose(-1, -2)
    # A rotated key codec (pre-RoPE keys excepted: RoPE does not commute with R): rotate q once.
    key_rotation = codec_rotation(layer.key_codec, D, query.device) if layer.key_space is None else None
    q_keys = q @ key_rotation if key_rotation is not None else q
    key_offset = codec_offset(layer.key_codec, query.device) if key_rotation is not None else None
    for start, stop, part in _chunks(layer, "key"):
        scores[..., n_sinks + start:n_sinks + stop] = _chunk_scores(layer, part, start, q_keys,
                                                                     key_rotation is not None)
    if key_offset is not None:  # keys stored as k - m: add q.m to every compressed token's score
        scores[..., n_sinks:n_sinks + n_compressed] += (q * key_offset[None, :, None, :]).sum(-1, keepdim=True)
    scores[..., n_sinks + n_compressed:] = q @ window_k.to(compute).transpose(-1, -2)
    if attention_mask is not None:
        if attention_mask.shape[-1] != seq:
            raise ValueError(f"attention mask covers {attention_mask.shape[-1]} positions, the cache holds {seq}")
        mask = attention_mask[..., -1:, :]  # (B or 1, 1, 1, seq)
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores += mask.to(compute)
    probs = torch.softmax(scores, dim=-1)

    out = probs[..., :n_sinks] @ layer.sink_values.to(compute)
    out += probs[..., n_sinks + n_compressed:] @ layer.window_values.to(compute)
    # A rotated value codec: sum p.(V R) over the chunks, then un-rotate that sum once.
    value_rotation = codec_rotation(layer.value_codec, out.shape[-1], query.device)
    mixed = torch.zeros_like(out) if value_rotation is not None else out
    for start, stop, part in _chunks(layer, "value"):
        mixed += _chunk_mix(layer, part, probs[..., n_sinks + start:n_sinks + stop], value_rotation is not None)
    if value_rotation is not None:
        out += mixed @ value_rotation.T
        value_offset = codec_offset(layer.value_codec, query.device)
        if value_offset is not None:  # values stored as v - m: add (sum of their probabilities) * m
            weight = probs[..., n_sinks:n_sinks + n_compressed].sum(-1, keepdim=True)  # (B, H, rep, 1)
            out += weight * value_offset[None, :, None, :]
    return out.reshape(B, Hq, 1, out.shape[-1]).to(query.dtype)
