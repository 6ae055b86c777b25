"""The candidate sweep of `measure-presets` on Ray: one candidate spec per unit of work.

Each `CandidateWorker` loads the model itself, reads the same sweep text and evaluates one candidate
at a time (decode-faithful, its uncompressed logits shared across candidates). The driver saves each
result in the tune state under the same key and content as the serial sweep, which then finds every
candidate measured, so an interrupted sweep resumes with or without Ray. The choice, verification
and passkey scores run in the driver afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from ..distributed import RayOptions, WorkersLostError, actor_threads, run_on_actors
from ..models import load_named_model
from ..spec import CacheSpec
from .state import TuneState

SWEEP_KIND = "sweep-eval"  # the state kind of a candidate's sweep figures (as `select_presets` names them)


class CandidateWorker:
    """One Ray actor: the model, loaded once, and the sweep text."""

    def __init__(self, loader: Callable | None, load_args, sweep_tokens: int, sweep_offset: int, artifact: str | None,
                 threads: int, kind: str | None = None, path: str | None = None):
        import torch

        torch.set_num_threads(threads)
        self.error = None
        try:
            from ..corpus import corpus_tokens

            self.model, tokenizer = (loader or load_named_model)(load_args)
            self.ids = corpus_tokens(tokenizer, part="calibration", n_tokens=sweep_tokens, offset=sweep_offset,
                                     path=path, kind=kind)
            self.artifact, self.store = artifact, {}
        except Exception as exc:  # reported to the driver by ready()
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> str | None:
        return self.error

    def evaluate(self, spec: CacheSpec) -> dict:
        from ..calibration import artifact_for
        from ..measure.evaluate import decode_faithful_eval
        from .evaluators import eval_figures

        artifact = artifact_for(self.model, spec, self.artifact)
        return eval_figures(decode_faithful_eval(self.model, self.ids, spec, progress=False, artifact=artifact,
                                                 baseline_store=self.store))


def sweep_candidates_on_ray(candidates: list[CacheSpec], state: TuneState, fingerprint: dict,
                            options: RayOptions, loader: Callable | None, load_args, sweep_tokens: int, sweep_offset: int,
                            artifact: str | None, on_result: Callable[[CacheSpec, dict], None] | None = None,
                            kind: str | None = None, path: str | None = None) -> int:
    """Measure the candidates missing from `state` on Ray actors, saving each as it arrives; returns how many.

    `fingerprint` is the one the serial sweep keys its measurements by (`state.measurement_fingerprint`
    of the model and the sweep text), so either kind of run reuses the other's results.

    `loader(load_args) -> (model, tokenizer)` runs on every worker (None: `load_named_model`); each
    reads the sweep text from the kind of text `kind` or the file `path` (see `corpus.corpus_slice`).
    Raises WorkersLostError (after the others are saved) if some candidates were given up
    because their workers kept dying.
    """
    def key(spec: CacheSpec) -> tuple[str, dict]:
        spec_dict = {k: v for k, v in spec.to_dict().items() if k != "name"}
        return TuneState.key(SWEEP_KIND, fingerprint, spec_dict), spec_dict

    missing = [spec for spec in candidates if key(spec)[0] not in state.entries]
    if not missing:
        return 0

    def save(index: int, result: dict) -> None:
        spec = missing[index]
        _, spec_dict = key(spec)
        state.store(SWEEP_KIND, spec_dict, fingerprint, result)
        if on_result is not None:
            on_result(spec, result)

    args = (loader, load_args, sweep_tokens, sweep_offset, artifact, actor_threads(options), kind, path)
    lost = run_on_actors(CandidateWorker, args, "evaluate", missing, save, options,
                         name=f"kvcompress-presets-{uuid.uuid4().hex[:8]}")
    if lost:
        names = [missing[i].name for i in lost]
        raise WorkersLostError(f"{len(names)} candidate(s) not measured because their Ray worker died: "
                               f"{', '.join(names)}; run the same command again to measure them")
    return len(missing)
