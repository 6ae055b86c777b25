"""Evaluations as a tune keeps them: the figures of one, and an evaluator that measures each spec
once and saves it in a `TuneState`.

Decode-faithful (`measure.evaluate`) or, with `context=N`, the prompt protocol (`measure.prompt`),
whose "ratio" is the whole cache's at the end of the context. `make_ratio_evaluator` measures that
ratio alone after a prefill (e.g. on a bfloat16 copy of the model). Shared by `tune`,
`preset_selection` and their Ray workers, so a figure is saved with the same content wherever it
is measured.
"""

from __future__ import annotations

import torch

from ..spec import CacheSpec
from .sensitivity import Evaluator
from ..fingerprint import model_fingerprint
from .state import TuneState, measurement_fingerprint

__all__ = ["eval_figures", "make_evaluator", "make_ratio_evaluator", "prompt_figures"]


def eval_figures(result) -> dict:
    """The figures of an `EvalResult` that a tune keeps."""
    return {"kl": result.kl, "ppl_change": result.ppl_change, "top1": result.top1,
            "ratio": result.compression_ratio, "stored_bytes": result.stored_bytes, "fp16_bytes": result.fp16_bytes,
            "tokens": result.tokens, "ppl_change_ci95": _listed(result.ppl_change_ci95),
            "kl_ci95": _listed(result.kl_ci95), "interval": result.interval, "seconds": result.seconds}


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval as saved in JSON (None: the series was too short for one)."""
    return None if interval is None else list(interval)


def prompt_figures(result) -> dict:
    """The figures of a `PromptEvalResult` that a tune keeps ("ratio": the whole-cache ratio)."""
    return {**eval_figures(result), "whole_cache_ratio": result.whole_cache_ratio,
            "context_compression": result.context_compression, "kept_fraction": result.kept_fraction,
            "codec_ratio": result.codec_ratio, "context_tokens": result.context_tokens,
            "evicted_tokens": result.evicted_tokens}


def _fingerprint(model, text_fp: dict, context: int | None) -> dict:
    """What a measurement is keyed by: model and text, and under the prompt protocol the protocol."""
    if context is None:
        return measurement_fingerprint(model_fingerprint(model), text_fp)
    from ..measure.prompt import CHUNK, PROTOCOL

    return measurement_fingerprint(model_fingerprint(model),
                                   {**text_fp, "protocol": PROTOCOL, "context": context, "chunk": CHUNK})


def make_evaluator(model, input_ids: torch.Tensor, kind: str, text_fp: dict, state: TuneState, *, artifact=None,
                   progress: bool = False, context: int | None = None) -> Evaluator:
    """spec -> eval figures on `input_ids`, measured once and saved in `state`.

    Without `context`: decode-faithful evaluation of the text (`eval_figures`). With `context`:
    the prompt protocol (`measure.prompt.prompt_eval`), the first `context` tokens prefilled
    at once and the rest of `input_ids` teacher-forced (`prompt_figures`). The uncompressed
    logits are computed once and shared by every call (`baseline_store`).
    """
    from ..measure.evaluate import decode_faithful_eval
    from ..measure.prompt import prompt_eval

    fingerprint = _fingerprint(model, text_fp, context)
    store: dict = {}

    def evaluate(spec: CacheSpec) -> dict:
        spec_dict = {k: v for k, v in spec.to_dict().items() if k != "name"}
        result = state.lookup(kind, spec_dict, fingerprint)
        if result is None:
            if context is None:
                result = eval_figures(decode_faithful_eval(model, input_ids, spec, progress=progress,
                                                           artifact=artifact, baseline_store=store))
            else:
                result = prompt_figures(prompt_eval(model, input_ids, spec, context, progress=progress,
                                                    artifact=artifact, baseline_store=store))
            state.store(kind, spec_dict, fingerprint, result)
        return result

    return evaluate


def make_ratio_evaluator(model, input_ids: torch.Tensor, text_fp: dict, state: TuneState, context: int, *,
                         artifact=None, kind: str = "prompt-ratio") -> Evaluator:
    """spec -> the sizes of its cache right after a `context`-token prefill of `input_ids` on `model`
    ("ratio": the whole-cache ratio from `memory_report()`, "stored_bytes", "fp16_bytes",
    "kept_fraction", ...; see `measure.prompt.context_sizes`), measured once and saved in `state`.

    Nothing is scored: this is what a cache of `model`'s dtype stores, e.g. in bfloat16 while the
    quality is measured in float32.
    """
    from ..cache.attention import enable_fast_attention
    from ..cache.cache import CompressedCache
    from ..measure.evaluate import is_lossy
    from ..measure.prompt import context_sizes, layer_tokens, prefill

    fingerprint = _fingerprint(model, text_fp, context)

    @torch.no_grad()
    def evaluate(spec: CacheSpec) -> dict:
        spec_dict = {k: v for k, v in spec.to_dict().items() if k != "name"}
        result = state.lookup(kind, spec_dict, fingerprint)
        if result is None:
            with enable_fast_attention(model, strict=False):
                cache = CompressedCache(model, spec, artifact=artifact)
                prefill(model, cache, input_ids.to(next(model.parameters()).device), context)
            report = cache.memory_report()
            sizes = context_sizes(report, layer_tokens(cache, report), lossy=is_lossy(spec))
            result = {**sizes, "ratio": sizes["whole_cache_ratio"], "context_tokens": context}
            state.store(kind, spec_dict, fingerprint, result)
        return result

    return evaluate
