"""Decode-faithful evaluations as a tune keeps them: the figures of one, and an evaluator that
measures each spec once and saves it in a `TuneState`.

Shared by `tune`, `preset_selection` and the Ray workers of `distributed_tune` and
`distributed_presets`, so a figure measured anywhere is saved with the same content. This
module does not choose anything.
"""

from __future__ import annotations

import torch

from ..spec import CacheSpec
from .sensitivity import Evaluator
from .state import TuneState, measurement_fingerprint, model_fingerprint

__all__ = ["eval_figures", "make_evaluator"]


def eval_figures(result) -> dict:
    """The figures of an `EvalResult` that a tune keeps."""
    return {"kl": result.kl, "ppl_change": result.ppl_change, "top1": result.top1,
            "ratio": result.compression_ratio, "stored_bytes": result.stored_bytes, "fp16_bytes": result.fp16_bytes,
            "tokens": result.tokens, "ppl_change_ci95": list(result.ppl_change_ci95),
            "kl_ci95": list(result.kl_ci95), "interval": result.interval, "seconds": result.seconds}


def make_evaluator(model, input_ids: torch.Tensor, kind: str, text_fp: dict, state: TuneState, *, artifact=None,
                   progress: bool = False) -> Evaluator:
    """spec -> eval figures on `input_ids`, measured once by decode-faithful evaluation and saved in `state`.

    The uncompressed logits are computed once and shared by every call (`baseline_store`).
    """
    from ..measure.evaluate import decode_faithful_eval

    fingerprint = measurement_fingerprint(model_fingerprint(model), text_fp)
    store: dict = {}

    def evaluate(spec: CacheSpec) -> dict:
        spec_dict = {k: v for k, v in spec.to_dict().items() if k != "name"}
        result = state.lookup(kind, spec_dict, fingerprint)
        if result is None:
            result = eval_figures(decode_faithful_eval(model, input_ids, spec, progress=progress, artifact=artifact,
                                                       baseline_store=store))
            state.store(kind, spec_dict, fingerprint, result)
        return result

    return evaluate
