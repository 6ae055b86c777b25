"""Prompt-compression evaluation: a long context compressed at once, then a teacher-forced continuation.

The N context tokens go into the compressed cache in one forward (which compresses and, for a spec
that evicts, drops tokens as for any prompt); the next M tokens are teacher-forced in chunks of 32
at their true positions, and their next-token distributions are scored against a `DynamicCache`
run on the same chunks (KL, perplexity change, top-1; block-bootstrap intervals). Sizes are taken
right after the prefill: `whole_cache_ratio` (fp16 bytes of every context token / every byte
stored) and `context_compression` (kvpress's count: tokens seen / kept x codec ratio, window and
sinks apart). The model runs kvcompress's attention during the evaluation and is restored
afterwards. The protocol and its figures: docs/prompt.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache.attention import enable_fast_attention
from ..cache.bits import report_bits_per_value
from ..cache.cache import CompressedCache
from ..compat import CACHE_KWARG
from ..presets import load_spec
from ..spec import CacheSpec
from .evaluate import NothingCompressedError, TokenScores, check_read_path, is_lossy

CHUNK = 32
PROTOCOL = "prompt"


@dataclass
class PromptEvalResult:
    """Figures of one prompt-compression evaluation (see module docstring).

    `layers`: per layer at the end of the context, {"layer", "seen", "held", "compressed"} tokens and
    "sliding" (a sliding layer drops what leaves its window, as an uncompressed one does).
    `compression_ratio`, `stored_bytes`, `fp16_bytes`: the whole cache at the end of the context
    (`compression_ratio` is `whole_cache_ratio`, under the name sweep reports read).
    `memory_end`: the memory report's totals after the last continuation token.
    """

    protocol: dict
    context_tokens: int
    tokens: int
    chunk: int
    ppl_baseline: float
    ppl: float
    ppl_change: float
    ppl_change_ci95: tuple[float, float] | None
    kl: float
    kl_ci95: tuple[float, float] | None
    top1: float
    interval: dict
    whole_cache_ratio: float
    context_compression: float
    kept_fraction: float
    codec_ratio: float
    bits_per_value: float
    compression_ratio: float
    stored_bytes: int
    fp16_bytes: int
    compressed_tokens: int
    evicted_tokens: int
    chunks: int
    max_logit_diff: float
    seconds: float
    layers: list = field(default_factory=list)
    memory_end: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("ppl_change_ci95", "kl_ci95"):  # None: the series was too short for an interval
            out[name] = None if getattr(self, name) is None else list(getattr(self, name))
        return out


def min_context_tokens(spec: CacheSpec) -> int:
    """Fewest context tokens after which a lossy `spec` holds a compressed block that the
    continuation reads: the sinks and the window fill, and one block of `block_size` leaves it."""
    return spec.sinks + spec.window + spec.block_size


def check_context_tokens(spec: CacheSpec, context: int, tokens: int) -> None:
    """NothingCompressedError if a lossy `spec` compresses nothing in a `context`-token prefill;
    ValueError if `tokens` (the continuation) is below 1."""
    if tokens < 1:
        raise ValueError(f"the continuation needs at least 1 token, got {tokens}")
    need = min_context_tokens(spec)
    if is_lossy(spec) and context < need:
        raise NothingCompressedError(
            f"a {context}-token context is too short for spec {spec.name or spec.describe()!r} to compress anything: "
            f"it keeps sinks {spec.sinks} + window {spec.window} tokens in full precision and compresses "
            f"{spec.block_size} at a time, so the context needs at least {need} tokens")


def layer_tokens(cache, report) -> list[dict]:
    """Per layer of `cache`: tokens seen (the layer's sequence length), held and compressed (from
    `report`, its memory report), and whether the layer slides (it drops what leaves its window,
    as an uncompressed sliding layer does: not counted as eviction)."""
    return [{"layer": m.layer, "seen": int(layer.get_seq_length()), "held": m.tokens,
             "compressed": m.compressed_tokens, "sliding": bool(getattr(layer, "is_sliding", False))}
            for layer, m in zip(cache.layers, report.layers, strict=True)]


def context_sizes(report, layers: list[dict], lossy: bool = True) -> dict:
    """The size figures of the module docstring from a memory report and `layer_tokens` (the kept
    fraction over full-attention layers only; `lossy`: whether the spec's codecs compress, else the
    codec ratio is 1, kept tokens counted as fp16 whatever the model's dtype)."""
    full = [x for x in layers if not x["sliding"]]
    seen = sum(x["seen"] for x in full)
    held = sum(x["held"] for x in full)
    bits = report_bits_per_value(report)
    codec_ratio = 16.0 / bits if bits and lossy else 1.0
    kept = held / seen if seen else 1.0
    return {"whole_cache_ratio": report.ratio, "kept_fraction": kept, "codec_ratio": codec_ratio,
            "context_compression": codec_ratio / kept if kept else 0.0, "bits_per_value": bits,
            "stored_bytes": report.stored_bytes, "fp16_bytes": report.fp16_bytes}


def continuation_bounds(context: int, tokens: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """[start, stop) of each continuation forward: `tokens` positions after `context`, `chunk` at a time."""
    return [(start, min(start + chunk, context + tokens)) for start in range(context, context + tokens, chunk)]


def prefill(model, cache, input_ids: torch.Tensor, context: int) -> None:
    """The first `context` tokens of (1, n) `input_ids` into `cache` in one forward (logits unused)."""
    model(input_ids=input_ids[:, :context], **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)


def forward_chunk(model, cache, input_ids: torch.Tensor, start: int, stop: int, name: str = "") -> torch.Tensor:
    """(stop - start, vocab) float logits of tokens [start, stop) attending to `cache`.

    Raises RuntimeError unless the cache puts the first of them at `start`, its true position in the
    text (transformers numbers a forward's tokens from the cache's sequence length)."""
    if cache.get_seq_length() != start:
        raise RuntimeError(f"after {start} tokens the {name} cache reports sequence length {cache.get_seq_length()}: "
                           "the next tokens would get wrong positions")
    return model(input_ids=input_ids[:, start:stop], **{CACHE_KWARG: cache}, use_cache=True).logits[0].float()


@torch.no_grad()
def prompt_eval(model, input_ids: torch.Tensor, spec: str | dict | CacheSpec, context: int, *,
                chunk: int = CHUNK, progress: bool = True, cache_factory=None, artifact=None,
                baseline_store: dict | None = None) -> PromptEvalResult:
    """Evaluate `spec` on a compressed prompt of `context` tokens, continued teacher-forced.

    Args:
        model: a causal LM.
        input_ids: (1, context + M + 1) token ids: the context, the M continuation tokens, and the
            target of the last one.
        spec: what the compressed cache does (preset name, file, dict or CacheSpec).
        context: N, the tokens prefilled at once.
        chunk: continuation tokens per forward.
        progress: show a progress bar.
        cache_factory: optional callable (model, spec) -> Cache, defaults to CompressedCache.
        artifact: calibration artifact for low-rank specs (as in `decode_faithful_eval`).
        baseline_store: optional dict shared by several calls: the uncompressed logits are kept in
            it, keyed by the model, the ids, `context` and `chunk`, and reused by a later call.

    Raises:
        ValueError: bad shapes or counts.
        NothingCompressedError: a lossy spec whose context is too short to compress anything
            (checked before any forward), or that compressed and dropped nothing by its end.
        RuntimeError: tokens were compressed or dropped but the logits equal the baseline's exactly
            (attention did not read the compressed cache), or a cache reports a sequence length
            other than the tokens seen (the continuation would get wrong positions).
    """
    spec = load_spec(spec)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, n), got {tuple(input_ids.shape)}")
    if context < 1 or chunk < 1:
        raise ValueError(f"context and chunk must be positive, got {context} and {chunk}")
    n_tokens = input_ids.shape[1] - context - 1
    check_context_tokens(spec, context, n_tokens)
    input_ids = input_ids.to(next(model.parameters()).device)
    bounds = continuation_bounds(context, n_tokens, chunk)
    store_key = (id(model), tuple(input_ids[0].tolist()), context, chunk)
    stored_logits = baseline_store.get(store_key) if baseline_store is not None else None
    new_logits = []
    start_time = time.perf_counter()
    with enable_fast_attention(model, strict=False):
        cache = cache_factory(model, spec) if cache_factory else CompressedCache(model, spec, artifact=artifact)
        baseline = DynamicCache(config=model.config)
        prefill(model, cache, input_ids, context)
        if stored_logits is None:
            prefill(model, baseline, input_ids, context)
        after_prefill = cache.memory_report()
        layers = layer_tokens(cache, after_prefill)
        scores = TokenScores()
        for i, (start, stop) in enumerate(tqdm(bounds, desc=f"prompt {spec.name or 'spec'}", disable=not progress,
                                               leave=False)):
            if stored_logits is not None:
                logits_b = stored_logits[i]
            else:
                logits_b = forward_chunk(model, baseline, input_ids, start, stop, "uncompressed")
                new_logits.append(logits_b)
            logits_c = forward_chunk(model, cache, input_ids, start, stop, "compressed")
            scores.add(logits_b, logits_c, input_ids[0, start + 1:stop + 1])
    seconds = time.perf_counter() - start_time
    if baseline_store is not None and stored_logits is None:
        baseline_store[store_key] = new_logits
    compressed = max((x["compressed"] for x in layers), default=0)
    evicted = max((x["seen"] - x["held"] for x in layers if not x["sliding"]), default=0)
    changed = max((x["compressed"] * is_lossy(spec) + (0 if x["sliding"] else x["seen"] - x["held"])
                   for x in layers), default=0)
    check_read_path(spec, changed, scores.max_diff, f"the {context}-token context", changed="compressed or dropped",
                    lossy=is_lossy(spec) or spec.eviction is not None)
    sizes = context_sizes(after_prefill, layers, lossy=is_lossy(spec))
    end = cache.memory_report()
    return PromptEvalResult(
        protocol=protocol_record(context, n_tokens, chunk),
        context_tokens=context, tokens=n_tokens, chunk=chunk, **scores.figures(),
        **sizes, compression_ratio=sizes["whole_cache_ratio"],
        compressed_tokens=compressed, evicted_tokens=evicted, chunks=len(bounds), max_logit_diff=scores.max_diff,
        seconds=seconds, layers=layers,
        memory_end={k: v for k, v in end.to_dict().items() if k != "layers"}, spec=spec.to_dict())


def protocol_record(context: int, tokens: int, chunk: int = CHUNK) -> dict:
    """What a result says about how it was measured (positions relative to the first token read)."""
    return {"name": PROTOCOL, "context_tokens": context, "continuation_tokens": tokens, "chunk_tokens": chunk,
            "prefill": "one forward", "positions": "true positions (the cache counts every token seen)",
            "scored": "next-token distributions at the continuation tokens",
            "ranges": {"context": [0, context], "continuation": [context, context + tokens],
                       "targets": [context + 1, context + tokens + 1]},
            "ratios_at": "end of the context (right after the prefill)"}
