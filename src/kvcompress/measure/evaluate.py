"""Decode-faithful evaluation: quality of a compressed cache vs the uncompressed model.

The text is fed in chunks, each attending to the cache of all earlier chunks, with boundaries on
the cache's flush schedule (`chunk_boundaries`), so every query sees what it would see if the text
were decoded one token at a time; a `DynamicCache` baseline runs on the same chunks in the same
loop. Reported: perplexity of both and its change, mean KL(baseline || compressed), top-1
agreement (moving-block bootstrap intervals, `bootstrap`) and the cache's real ratio at the end.
The model runs kvcompress's attention where it supports it and is restored afterwards.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache.attention import enable_fast_attention
from ..cache.bits import report_bits_per_value
from ..cache.cache import CompressedCache
from ..compat import CACHE_KWARG
from ..spec import CacheSpec
from ..presets import load_spec
from .bootstrap import DEFAULT_BLOCK, DEFAULT_RESAMPLES, block_bootstrap_ci


@dataclass
class EvalResult:
    """Figures of one decode-faithful evaluation (see module docstring)."""

    ppl_baseline: float
    ppl: float
    ppl_change: float
    ppl_change_ci95: tuple[float, float] | None
    kl: float
    top1: float
    compression_ratio: float
    stored_bytes: int
    fp16_bytes: int
    tokens: int
    compressed_tokens: int
    chunks: int
    max_logit_diff: float
    seconds: float
    bits_per_value: float = 0.0
    spec: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    kl_ci95: tuple[float, float] | None = None
    interval: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("ppl_change_ci95", "kl_ci95"):  # None: the series was too short for an interval
            out[name] = None if getattr(self, name) is None else list(getattr(self, name))
        return out


def chunk_boundaries(n_tokens: int, spec: CacheSpec, mode: str = "chunked") -> list[tuple[int, int]]:
    """Split positions [0, n_tokens) into forward chunks.

    "chunked": one chunk up to the first flush (`sinks + window - 1` tokens, which read no
    compressed state), then chunks of `block_size` tokens aligned so that no block is
    compressed in the middle of a chunk. Each chunk is at most `block_size` <= window long
    after the first. "token": one token at a time (the reference the chunked mode must match).
    """
    if mode == "token":
        return [(i, i + 1) for i in range(n_tokens)]
    if mode != "chunked":
        raise ValueError(f"mode must be 'chunked' or 'token', got {mode!r}")
    first = max(spec.sinks + spec.window - 1, 1)
    bounds = [(0, min(first, n_tokens))]
    start = bounds[0][1]
    while start < n_tokens:
        stop = min(start + spec.block_size, n_tokens)
        bounds.append((start, stop))
        start = stop
    return bounds


class NothingCompressedError(ValueError):
    """The text is too short for a lossy spec to compress anything that a later token reads: its
    figures would equal the uncompressed baseline's and say nothing about the spec."""


def is_lossy(spec: CacheSpec) -> bool:
    """Whether some layer of `spec` stores keys or values in a compressed form."""
    tables = [spec.layers, *spec.layers_at_depth.values()]
    return spec.key.method != "none" or spec.value.method != "none" or any(
        tensor.get("method", "none") != "none"
        for table in tables for override in table.values() for tensor in override.values())


def evicts_prompt_only(spec: CacheSpec) -> bool:
    """Whether `spec` evicts the prompt's tokens and nothing else: decode-faithful evaluation has no
    prompt, so only the prompt protocol (`measure.prompt`) measures it."""
    return spec.eviction is not None and spec.eviction.applies == "prompt"


def min_eval_tokens(spec: CacheSpec) -> int:
    """Fewest tokens an evaluation of `spec` needs so that a block is compressed and then read:
    the sinks and the window fill, one block of `block_size` tokens leaves the window and is
    compressed, and one more token attends to it."""
    return spec.sinks + spec.window + spec.block_size + 1


def check_eval_tokens(spec: CacheSpec, n_tokens: int, what: str = "the text") -> None:
    """Raise NothingCompressedError if a lossy `spec` compresses nothing in `n_tokens` tokens."""
    need = min_eval_tokens(spec)
    if is_lossy(spec) and n_tokens < need:
        raise NothingCompressedError(
            f"{what} has {n_tokens} tokens, too few for spec {spec.name or spec.describe()!r} to compress anything: "
            f"it keeps sinks {spec.sinks} + window {spec.window} tokens in full precision and compresses "
            f"{spec.block_size} at a time, so it needs at least {need} tokens "
            f"({spec.sinks} + {spec.window} + {spec.block_size} + 1); use more tokens or a smaller window")


def bootstrap_intervals(nll_base: torch.Tensor, nll_comp: torch.Tensor, kl: torch.Tensor, *,
                        block: int = DEFAULT_BLOCK, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                        ) -> tuple[tuple[float, float], tuple[float, float], dict]:
    """95% intervals of the PPL change exp(mean nll_comp - mean nll_base) - 1 and of the mean KL,
    from a moving-block bootstrap over positions (blocks of `block` consecutive tokens).

    Returns (ppl_change interval, KL interval, method dict: ci_method, block_tokens, resamples, ...).
    """
    diff = (nll_comp - nll_base).double()
    intervals, method = block_bootstrap_ci(
        {"diff": diff, "kl": kl.double()},
        {"ppl_change": lambda r: torch.exp(r["diff"].mean(dim=1)) - 1.0, "kl": lambda r: r["kl"].mean(dim=1)},
        block=block, resamples=resamples, seed=seed)
    return intervals["ppl_change"], intervals["kl"], method


class TokenScores:
    """Per-position figures of the compressed vs the uncompressed next-token distributions, added
    chunk by chunk, and their summary (PPL of both, PPL change, mean KL(baseline || compressed),
    top-1 agreement, bootstrap intervals). Shared by every evaluation protocol."""

    def __init__(self):
        self.nll_base: list[torch.Tensor] = []
        self.nll_comp: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.max_diff = 0.0

    def add(self, logits_b: torch.Tensor, logits_c: torch.Tensor, targets: torch.Tensor) -> None:
        """Score one chunk: logits (T, vocab) float of the baseline and the compressed cache at T
        positions, targets (U,) with U <= T the next tokens of the first U of them (positions
        without a target count only in `max_diff`, the largest |logit difference| seen)."""
        self.max_diff = max(self.max_diff, (logits_b - logits_c).abs().max().item())
        usable = targets.shape[0]
        logp_b = F.log_softmax(logits_b[:usable], dim=-1)
        logp_c = F.log_softmax(logits_c[:usable], dim=-1)
        self.nll_base.append(-logp_b.gather(1, targets[:, None])[:, 0])
        self.nll_comp.append(-logp_c.gather(1, targets[:, None])[:, 0])
        self.kl.append((logp_b.exp() * (logp_b - logp_c)).sum(-1))
        self.agree.append(logp_b.argmax(-1) == logp_c.argmax(-1))

    def figures(self) -> dict:
        """{ppl_baseline, ppl, ppl_change, ppl_change_ci95, kl, kl_ci95, top1, interval} over the
        scored positions (see `bootstrap_intervals`)."""
        nll_b, nll_c = torch.cat(self.nll_base).cpu(), torch.cat(self.nll_comp).cpu()
        kl_all = torch.cat(self.kl).cpu()
        ppl_ci, kl_ci, interval = bootstrap_intervals(nll_b, nll_c, kl_all)
        ppl_b = math.exp(nll_b.double().mean().item())
        ppl_c = math.exp(nll_c.double().mean().item())
        return {"ppl_baseline": ppl_b, "ppl": ppl_c, "ppl_change": ppl_c / ppl_b - 1.0, "ppl_change_ci95": ppl_ci,
                "kl": kl_all.double().mean().item(), "kl_ci95": kl_ci,
                "top1": torch.cat(self.agree).double().mean().item(), "interval": interval}


def check_read_path(spec: CacheSpec, changed_tokens: int, max_diff: float, text: str,
                    changed: str = "compressed", lossy: bool | None = None) -> None:
    """The guards of every evaluation, once its forwards ran (`text` names what was read).

    `changed_tokens`: tokens the cache compressed (or dropped: say so in `changed`), the most of
    any layer. `lossy`: whether those tokens lost anything (default: `is_lossy(spec)`).

    Raises:
        NothingCompressedError: a lossy spec changed no token and no logit (its figures would be
            the baseline's).
        RuntimeError: tokens were changed, yet the logits equal the baseline's exactly, i.e.
            attention did not read the compressed cache.
    """
    lossy = is_lossy(spec) if lossy is None else lossy
    if lossy and changed_tokens == 0 and max_diff == 0.0:
        raise NothingCompressedError(
            f"spec {spec.name or spec.describe()!r} {changed} no token of {text}, so its figures would "
            "equal the uncompressed baseline's; evaluate on a longer text")
    if lossy and changed_tokens > 0 and max_diff == 0.0:
        raise RuntimeError(
            f"{changed_tokens} tokens were {changed} with a lossy spec ({spec.describe()}), yet the "
            "logits equal the uncompressed baseline's exactly: attention is not reading the compressed "
            "cache. This is the read-path bug kvcompress exists to prevent; please report it."
        )


@torch.no_grad()
def decode_faithful_eval(model, input_ids: torch.Tensor, spec: str | dict | CacheSpec, *,
                         mode: str = "chunked", progress: bool = True,
                         cache_factory=None, artifact=None, baseline_store: dict | None = None) -> EvalResult:
    """Evaluate `spec` on `input_ids` of shape (1, n) against the uncompressed cache.

    Args:
        model: a causal LM.
        input_ids: (1, n) token ids, n >= 2.
        spec: what the compressed cache does (preset name, file, dict or CacheSpec).
        mode: "chunked" (default) or "token" (one token per forward; slow, for validation).
        progress: show a progress bar.
        cache_factory: optional callable (model, spec) -> Cache, defaults to CompressedCache.
        artifact: calibration artifact (folder or `CalibrationArtifact`) for low-rank specs, given
            to the default CompressedCache; the embedded model's is built on first use.
        baseline_store: optional dict shared by several calls (e.g. a sweep): the uncompressed
            logits of a run are kept in it, keyed by the model, the token ids and the chunk
            boundaries, and a later call with the same key reuses them instead of running the
            uncompressed model again (same numbers; holds n x vocab float32 per key).

    Raises:
        NothingCompressedError (a ValueError): if the spec is lossy but the text is too short for
            anything compressed to be read (see `min_eval_tokens`), checked before any forward,
            or if no layer compressed a token by the end (e.g. only sliding layers).
        RuntimeError: if tokens were compressed lossily but the logits equal the baseline's
            exactly, i.e. attention did not read the compressed cache.
    """
    spec = load_spec(spec)
    if evicts_prompt_only(spec):
        raise ValueError(f"spec {spec.name or spec.describe()!r} evicts prompt tokens, but decode-faithful evaluation "
                         "feeds the text in short chunks, so no prompt would be evicted and its figures would be the "
                         "codecs' alone; measure it with a prompt: `kvcompress eval --context N --tokens M` "
                         "(measure.prompt.prompt_eval)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape (1, n) with n >= 2, got {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    n = input_ids.shape[1]
    check_eval_tokens(spec, n)
    # Attention over the codes where the model supports it (the path `enable_fast_attention`
    # users decode with; other calls are transformers' sdpa), and the model as it was afterwards.
    with enable_fast_attention(model, strict=False):
        cache = cache_factory(model, spec) if cache_factory else CompressedCache(model, spec, artifact=artifact)
        baseline = DynamicCache(config=model.config)
        scores = TokenScores()
        start_time = time.perf_counter()
        bounds = chunk_boundaries(n, spec, mode)
        store_key = (id(model), tuple(input_ids[0].tolist()), tuple(bounds))
        stored_logits = baseline_store.get(store_key) if baseline_store is not None else None
        new_logits = []
        for i, (start, stop) in enumerate(tqdm(bounds, desc=f"eval {spec.name or 'spec'}", disable=not progress,
                                               leave=False)):
            chunk = input_ids[:, start:stop]
            if stored_logits is not None:
                logits_b = stored_logits[i]
            else:
                logits_b = model(input_ids=chunk, **{CACHE_KWARG: baseline}, use_cache=True).logits[0].float()
                new_logits.append(logits_b)
            logits_c = model(input_ids=chunk, **{CACHE_KWARG: cache}, use_cache=True).logits[0].float()
            scores.add(logits_b, logits_c, input_ids[0, start + 1:stop + 1])  # the last position has no target
    seconds = time.perf_counter() - start_time
    if baseline_store is not None and stored_logits is None:
        baseline_store[store_key] = new_logits
    report = cache.memory_report()
    compressed_tokens = max((m.compressed_tokens for m in report.layers), default=0)
    check_read_path(spec, compressed_tokens, scores.max_diff, f"the {n}-token text")
    figures = scores.figures()
    return EvalResult(
        **figures,
        compression_ratio=report.ratio,
        stored_bytes=report.stored_bytes,
        fp16_bytes=report.fp16_bytes,
        tokens=n,
        compressed_tokens=compressed_tokens,
        chunks=len(bounds),
        max_logit_diff=scores.max_diff,
        seconds=seconds,
        bits_per_value=report_bits_per_value(report),
        spec=spec.to_dict(),
        memory={k: v for k, v in report.to_dict().items() if k != "layers"},
    )
