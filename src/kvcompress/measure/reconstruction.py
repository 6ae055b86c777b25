"""Direct reconstruction: how far the decoded K, V (and the attention output) are from the real ones.

`capture_states(model, ids)` records, per layer, the post-RoPE keys and the values (B, H_kv, T, D),
the queries (B, H_q, T, D) after the model's own rotary embedding, and the model's attention output;
it raises, naming the layer, when softmax(QK^T + mask)V recomputed from them differs from the
model's output. `reconstruct(model, spec, capture)` feeds each layer's K and V through a real
`CompressedCache` with `window=0` (the spec's sinks kept, every other token decoded from codes; a
spec's eviction left out, which the record says), and
`reconstruction_metrics` gives per layer MSE, relative error, cosine (mean, 5th percentile) and the
attention-output error with the real queries from (K^, V), (K, V^), (K^, V^). What it measures and
why: docs/analysis.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ..compat import CACHE_KWARG
from ..spec import CacheSpec
from ..presets import load_spec

CAPTURE_TOLERANCE = 1e-3
# The model computes its own attention in its dtype: half-precision rounding alone gives relative
# errors of a few 1e-3 (bf16 keeps 8 mantissa bits), far below what an unmodelled feature causes.
_CAPTURE_TOLERANCE_BY_DTYPE = {torch.float16: 1e-2, torch.bfloat16: 3e-2}
ATTENTION_VARIANTS = ("key_only", "value_only", "both")


@dataclass
class Capture:
    """Real states of one forward pass, per layer (lists indexed by layer), float32 on CPU.

    Attributes:
        keys: post-RoPE keys, each (B, kv_heads, T, D).
        values: values, each (B, kv_heads, T, D).
        queries: post-RoPE queries, each (B, q_heads, T, D).
        scalings: the softmax scale of each layer's attention.
        sliding_windows: each layer's sliding window (None for full attention).
        check_errors: per layer, relative error between the attention output recomputed from
            the captured tensors and the model's own (must be below CAPTURE_TOLERANCE).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    scalings: list[float]
    sliding_windows: list[int | None] = field(default_factory=list)
    check_errors: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.keys)


class _RecordingCache(DynamicCache):
    """A DynamicCache that also keeps a float32 CPU copy of every layer's new keys and values."""

    def __init__(self, config):
        super().__init__(config=config)
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded[layer_idx] = (key_states.detach().float().cpu(), value_states.detach().float().cpu())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the decoder, ordered by `layer_idx`.

    Raises ValueError if the model has none with `q_proj`, `o_proj` and `layer_idx`.
    """
    found = {}
    for module in model.modules():
        if all(hasattr(module, name) for name in ("q_proj", "o_proj", "layer_idx")):
            found[module.layer_idx] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with q_proj/o_proj/layer_idx; "
                         "direct reconstruction supports transformers decoder models of the Llama family")
    return [found[i] for i in sorted(found)]


def attention_output(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                     sliding_window: int | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ · scaling + causal mask) V, query heads sharing KV heads as in the model.

    Args:
        queries: (B, Hq, T, D); query head h reads KV head h // (Hq / Hkv).
        keys, values: (B, Hkv, T, D).
        sliding_window: if given, query i sees keys i - sliding_window + 1 .. i only.

    Returns:
        (B, Hq, T, D) float32.
    """
    B, Hq, T, D = queries.shape
    Hkv = keys.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads cannot share {Hkv} KV heads evenly")
    group = Hq // Hkv
    k = keys.float().repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    v = values.float().repeat_interleave(group, dim=1)
    pos = torch.arange(T, device=queries.device)
    allowed = pos[None, :] <= pos[:, None]  # (T, T): key j visible to query i
    if sliding_window is not None:
        allowed &= pos[None, :] > pos[:, None] - sliding_window
    return F.scaled_dot_product_attention(queries.float(), k, v, attn_mask=allowed, scale=scaling)


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).double().norm() / ref.double().norm().clamp_min(1e-30)).item()


def _token_cosines(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each (..., D) vector of `x` with the same vector of `ref`, flattened."""
    return F.cosine_similarity(x.double(), ref.double(), dim=-1, eps=1e-12).flatten()


def _query_heads(raw: torch.Tensor, T: int, D: int) -> torch.Tensor:
    """Hooked queries -> (B, Hq, T, D): q_proj gives (B, T, Hq*D); a q_norm gives (B, T, Hq, D) or,
    where the model transposes before normalising (Gemma 3), (B, Hq, T, D)."""
    if raw.dim() == 3:
        return raw.reshape(raw.shape[0], T, -1, D).transpose(1, 2)
    if raw.shape[1] == T and raw.shape[2] != T:
        return raw.transpose(1, 2)
    return raw  # (B, Hq, T, D); a wrong guess when Hq == T is caught by the capture check


@torch.no_grad()
def capture_states(model, input_ids: torch.Tensor) -> Capture:
    """Run `model` once over `input_ids` (1, T) from position 0 and capture Q, K, V per layer (see module doc)."""
    from ..rope import key_space_for

    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 2, got {tuple(input_ids.shape)}")
    modules = attention_modules(model)
    inverters, reason = key_space_for(model)
    if inverters is None:
        raise ValueError(f"direct reconstruction needs the model's post-RoPE queries, but its rotary embedding "
                         f"cannot be applied here: {reason}")
    raw_queries: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for attn in modules:
        idx = attn.layer_idx
        q_source = attn.q_norm if isinstance(getattr(attn, "q_norm", None), nn.Module) else attn.q_proj

        def keep_query(_module, _args, out, idx=idx):
            raw_queries[idx] = out.detach().float().cpu()

        def keep_output(_module, args, idx=idx):
            outputs[idx] = args[0].detach().float().cpu()

        handles.append(q_source.register_forward_hook(keep_query))
        handles.append(attn.o_proj.register_forward_pre_hook(keep_output))
    cache = _RecordingCache(model.config)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    device = next(model.parameters()).device
    try:
        model(input_ids=input_ids.to(device), **{CACHE_KWARG: cache}, use_cache=True, **extra)
    finally:
        for handle in handles:
            handle.remove()
    keys, values, queries, scalings, windows, errors = [], [], [], [], [], []
    T = input_ids.shape[1]
    for attn in modules:
        idx = attn.layer_idx
        if idx not in cache.recorded:
            raise ValueError(f"layer {idx} did not write to the cache (KV sharing?); direct reconstruction "
                             "needs every layer to keep its own keys and values")
        k, v = cache.recorded[idx]
        B, Hkv, _, D = k.shape
        q = _query_heads(raw_queries[idx], T, D)  # (B, Hq, T, D)
        q = inverters[idx].rotate(q, start=0)
        scaling = float(getattr(attn, "scaling", D ** -0.5))
        window = getattr(attn, "sliding_window", None)
        exact = attention_output(q, k, v, scaling, window)  # (B, Hq, T, D)
        theirs = outputs[idx].reshape(B, T, -1, D).transpose(1, 2)
        error = _relative_error(exact, theirs)
        tolerance = _CAPTURE_TOLERANCE_BY_DTYPE.get(model.dtype, CAPTURE_TOLERANCE)
        if not error < tolerance:
            raise RuntimeError(
                f"layer {idx}: attention recomputed from the captured Q, K, V differs from the model's own "
                f"output (relative error {error:.3g} >= {tolerance}); this model's attention has "
                "features direct reconstruction does not model (e.g. logit soft-capping or attention sinks), "
                "so its attention-output figures would be wrong")
        keys.append(k)
        values.append(v)
        queries.append(q)
        scalings.append(scaling)
        windows.append(window)
        errors.append(error)
    return Capture(keys, values, queries, scalings, windows, errors)


def codec_only_spec(spec: str | dict | CacheSpec) -> CacheSpec:
    """The spec with no full-precision window and no eviction: every token after the sinks goes
    through the codecs (eviction drops tokens, which has no reconstruction to compare)."""
    return dataclasses.replace(load_spec(spec), window=0, eviction=None)


@torch.no_grad()
def reconstruct(model, spec: str | dict | CacheSpec, capture: Capture, artifact=None
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """Decoded (K̂, V̂) per layer, each (B, kv_heads, T', D) float32: what a `CompressedCache` returns.

    T' = sinks + the largest whole number of the spec's blocks that fits in the capture, so
    every token after the sinks is compressed. Returns the pairs and the codec-only cache's
    memory report (a dict; its `ratio` is fp16 bytes / stored bytes of those T' tokens).
    """
    from ..cache.cache import CompressedCache

    only = codec_only_spec(spec)
    n = only.sinks + ((capture.tokens - only.sinks) // only.block_size) * only.block_size
    if n <= only.sinks:
        raise ValueError(f"{capture.tokens} captured tokens do not fill {only.sinks} sinks and one block of "
                         f"{only.block_size} tokens; capture more tokens")
    # Whole blocks go straight through `update`, no attention and no decode step: the
    # reconstruction is returned whatever attention the model runs.
    cache = CompressedCache(model, only, artifact=artifact)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    pairs = []
    for idx in range(capture.num_layers):
        k = capture.keys[idx][:, :, :n].to(device=device, dtype=dtype)
        v = capture.values[idx][:, :, :n].to(device=device, dtype=dtype)
        cache.update(k, v, idx)
        layer = cache.layers[idx]
        # What later tokens read: the decoded codes (update hands the forward pass that stored the
        # tokens their own full-precision K/V, the one prompt protocol).
        k_hat, v_hat = layer.reconstruct()
        if k_hat.shape != k.shape or layer.n_compressed != n - only.sinks:
            raise ValueError(f"layer {idx}: the cache returned {tuple(k_hat.shape)} with {layer.n_compressed} "
                             f"compressed tokens for {tuple(k.shape)} input; direct reconstruction needs "
                             "full-attention layers that keep every token")
        pairs.append((k_hat.float().cpu(), v_hat.float().cpu()))
    return pairs, {**cache.memory_report().to_dict(), "sinks": only.sinks}


def _tensor_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = _token_cosines(x, ref)
    return {
        "mse": (x.double() - ref.double()).pow(2).mean().item(),
        "rel_error": _relative_error(x, ref),
        "cosine": cos.mean().item(),
        "cosine_p05": torch.quantile(cos, 0.05).item() if cos.numel() <= 16_000_000 else float("nan"),
    }


def reconstruction_metrics(capture: Capture, pairs: list[tuple[torch.Tensor, torch.Tensor]], sinks: int = 0
                           ) -> dict:
    """Per-layer and layer-mean figures for K, V and the attention output (see module doc).

    Args:
        capture: the real states.
        pairs: per layer (K̂, V̂) of shape (B, kv_heads, T', D), T' <= captured tokens.
        sinks: leading tokens kept in full precision; left out of the K and V figures.

    Returns:
        {"tokens": T', "compressed_tokens": T' - sinks, "layers": [{"layer", "key": {...}, "value": {...},
          "attention": {"key_only"|"value_only"|"both": {"rel_error", "cosine"}}}, ...],
         "mean": the same without "layer", averaged over layers}
    """
    layers = []
    n = pairs[0][0].shape[2]
    for idx, (k_hat, v_hat) in enumerate(pairs):
        k, v, q = capture.keys[idx][:, :, :n], capture.values[idx][:, :, :n], capture.queries[idx][:, :, :n]
        scaling, window = capture.scalings[idx], capture.sliding_windows[idx]
        exact = attention_output(q, k, v, scaling, window)
        attention = {}
        for name, (kk, vv) in zip(ATTENTION_VARIANTS, ((k_hat, v), (k, v_hat), (k_hat, v_hat))):
            out = attention_output(q, kk, vv, scaling, window)
            attention[name] = {"rel_error": _relative_error(out, exact),
                               "cosine": _token_cosines(out, exact).mean().item()}
        layers.append({"layer": idx, "key": _tensor_metrics(k_hat[:, :, sinks:], k[:, :, sinks:]),
                       "value": _tensor_metrics(v_hat[:, :, sinks:], v[:, :, sinks:]), "attention": attention})
    return {"tokens": n, "compressed_tokens": n - sinks, "layers": layers, "mean": _mean_over_layers(layers)}


def _mean_over_layers(layers: list[dict]) -> dict:
    def mean(getter) -> float:
        vals = [getter(layer) for layer in layers]
        vals = [x for x in vals if not math.isnan(x)]
        return sum(vals) / len(vals) if vals else float("nan")

    out: dict = {}
    for part in ("key", "value"):
        out[part] = {m: mean(lambda layer, p=part, m=m: layer[p][m]) for m in layers[0][part]}
    out["attention"] = {v: {m: mean(lambda layer, v=v, m=m: layer["attention"][v][m])
                            for m in ("rel_error", "cosine")} for v in ATTENTION_VARIANTS}
    return out


def direct_reconstruction(model, spec: str | dict | CacheSpec, capture: Capture, artifact=None) -> dict:
    """`reconstruction_metrics` of `spec` on `capture`, plus the codec-only compression ratio.

    Returns the metrics dict with "codec_ratio" (fp16 bytes / stored bytes when every token but
    the sinks is compressed) and "codec_stored_bytes" added; for a spec with eviction, also "note"
    (the figures are of its codecs on every token: eviction is measured by the evaluation).
    """
    spec = load_spec(spec)
    pairs, memory = reconstruct(model, spec, capture, artifact=artifact)
    result = reconstruction_metrics(capture, pairs, sinks=memory["sinks"])
    result["codec_ratio"] = memory["ratio"]
    result["codec_stored_bytes"] = memory["stored_bytes"]
    if spec.eviction is not None:
        result["note"] = (f"codecs only: the spec's eviction ({spec.eviction.describe()}) is not applied here, every "
                          "captured token is compressed and compared; what eviction costs is in the evaluation")
    return result
