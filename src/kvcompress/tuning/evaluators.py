"""Evaluations as a tune keeps them: the figures of one spec, the job that measures them
(`EvalJob`, run here or by any executor) and an evaluator that saves each in a `TuneState`.

Two protocols: decode-faithful evaluation of a text (`measure.evaluate`), or, with `context=N`,
prompt compression (`measure.prompt`: N context tokens prefilled at once, the rest teacher-forced);
then "ratio" is the whole-cache ratio at the end of the context. `make_ratio_evaluator` measures
that ratio alone after a prefill (no scores), e.g. on a bfloat16 copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..executor import Executor, Job, Local
from ..spec import CacheSpec
from ..fingerprint import model_fingerprint
from .state import TuneState, measurement_fingerprint

__all__ = ["EvalJob", "RatioJob", "SavedEvaluator", "eval_figures", "make_evaluator", "make_ratio_evaluator",
           "prompt_figures"]


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


@dataclass(frozen=True)
class EvalJob:
    """Figures of specs on one text (a `Job`, see `kvcompress.executor`): decode-faithful
    evaluation (`eval_figures`), or with `context` the prompt protocol (`prompt_figures`: the first
    `context` tokens prefilled at once, the rest teacher-forced). The uncompressed logits are
    computed once per start and shared by every spec.

    Attributes:
        input_ids: (1, T) the text.
        artifact: calibration artifact for the specs that need one (None: resolved on use).
    """

    input_ids: torch.Tensor
    artifact: object = None
    context: int | None = None
    progress: bool = False

    def start(self, model, tokenizer=None):
        from ..measure.evaluate import decode_faithful_eval
        from ..measure.prompt import prompt_eval

        store: dict = {}

        def measure(spec: CacheSpec) -> dict:
            if self.context is None:
                return eval_figures(decode_faithful_eval(model, self.input_ids, spec, progress=self.progress,
                                                         artifact=self.artifact, baseline_store=store))
            return prompt_figures(prompt_eval(model, self.input_ids, spec, self.context, progress=self.progress,
                                              artifact=self.artifact, baseline_store=store))

        return measure

    def label(self, spec: CacheSpec) -> str:
        return spec.name or spec.describe()


class SavedEvaluator:
    """spec -> figures of `job`, each measured once and saved in `state` under (kind, fingerprint).

    A call measures here, on `model`; `map` measures the missing ones of many specs with
    `executor` (default: here too), e.g. on Ray. Both share one start of the job here.
    """

    def __init__(self, model, job: Job, kind: str, fingerprint: dict, state: TuneState,
                 executor: Executor | None = None):
        self.job, self.kind, self.fingerprint, self.state = job, kind, fingerprint, state
        self.local = Local(model)
        self.executor = executor or self.local

    def __call__(self, spec: CacheSpec) -> dict:
        return self.state.measured(self.kind, self.fingerprint, [spec], partial(self.local.map, self.job))[0]

    def map(self, specs: list[CacheSpec], on_new: Callable[[CacheSpec, dict], None] | None = None) -> list[dict]:
        """The figures of every spec, in order (`on_new(spec, figures)` for each newly measured one)."""
        return self.state.measured(self.kind, self.fingerprint, specs, partial(self.executor.map, self.job), on_new)


def make_evaluator(model, input_ids: torch.Tensor, kind: str, text_fp: dict, state: TuneState, *, artifact=None,
                   progress: bool = False, context: int | None = None,
                   executor: Executor | None = None) -> SavedEvaluator:
    """spec -> eval figures on `input_ids` (see `EvalJob`), measured once and saved in `state`;
    `.map(specs)` runs the missing ones on `executor` (see `SavedEvaluator`)."""
    job = EvalJob(input_ids, artifact, context, progress)
    return SavedEvaluator(model, job, kind, _fingerprint(model, text_fp, context), state, executor)


@dataclass(frozen=True)
class RatioJob:
    """Specs -> the sizes of their cache right after a `context`-token prefill of `input_ids` (1, T)
    ("ratio": the whole-cache ratio from `memory_report()`, "stored_bytes", "fp16_bytes",
    "kept_fraction", ...; see `measure.prompt.context_sizes`). Nothing is scored."""

    input_ids: torch.Tensor
    context: int
    artifact: object = None

    def start(self, model, tokenizer=None):
        from ..cache.attention import enable_fast_attention
        from ..cache.cache import CompressedCache
        from ..measure.evaluate import is_lossy
        from ..measure.prompt import context_sizes, layer_tokens, prefill

        @torch.no_grad()
        def measure(spec: CacheSpec) -> dict:
            with enable_fast_attention(model, strict=False):
                cache = CompressedCache(model, spec, artifact=self.artifact)
                prefill(model, cache, self.input_ids.to(next(model.parameters()).device), self.context)
            report = cache.memory_report()
            sizes = context_sizes(report, layer_tokens(cache, report), lossy=is_lossy(spec))
            return {**sizes, "ratio": sizes["whole_cache_ratio"], "context_tokens": self.context}

        return measure

    def label(self, spec: CacheSpec) -> str:
        return spec.name or spec.describe()


def make_ratio_evaluator(model, input_ids: torch.Tensor, text_fp: dict, state: TuneState, context: int, *,
                         artifact=None, kind: str = "prompt-ratio") -> SavedEvaluator:
    """spec -> the sizes of its cache after a `context`-token prefill on `model` (see `RatioJob`),
    measured once and saved in `state`: what a cache of `model`'s dtype stores, e.g. in bfloat16
    while the quality is measured in float32."""
    return SavedEvaluator(model, RatioJob(input_ids, context, artifact), kind, _fingerprint(model, text_fp, context),
                          state)
