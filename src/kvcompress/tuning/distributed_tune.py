"""The independent measurements of `tune` on Ray: the sensitivity probes and the two K/V weight evaluations.

Each `TuneWorker` loads the model itself (by default from `--model/--dtype/--device`), receives the
tuning text's ids and measures one unit at a time (a probe from Q, K, V it captures once, or a
decode-faithful evaluation). The driver saves each result in the tune state under the same key and
content as the serial code, so the serial steps that follow find them and an interrupted tune
resumes with or without Ray. A result from a model whose fingerprint differs from the driver's is
refused (`WorkerModelMismatch`). The search and verification stay in the driver.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import torch

from ..distributed import RayOptions, WorkersLostError, actor_threads, run_on_actors
from ..models import load_named_model
from ..spec import CacheSpec
from .sensitivity import COST_POWER
from .state import TuneState

PROBE_KIND = "probe"  # state kinds, as `measure_sensitivity` and `tune` name them
EVAL_KIND = "tune-eval"


class WorkerModelMismatch(RuntimeError):
    """A Ray worker loaded a model whose fingerprint differs from the driver's (the message says how)."""


class TuneWorker:
    """One Ray actor: the model, loaded once, the tuning text, and (after the first probe) its captured Q, K, V."""

    def __init__(self, loader: Callable | None, load_args, input_ids: torch.Tensor, artifact: str | None,
                 cost_power: float, threads: int):
        torch.set_num_threads(threads)
        self.error = None
        try:
            from ..fingerprint import model_fingerprint

            self.model, _ = (loader or load_named_model)(load_args)
            self.model_fp = model_fingerprint(self.model)
            self.ids, self.artifact_path, self.cost_power = input_ids, artifact, cost_power
            self.capture, self.store = None, {}
        except Exception as exc:  # reported to the driver by ready()
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> str | None:
        return self.error

    def _artifact(self, spec: CacheSpec):
        from ..calibration import artifact_for

        return artifact_for(self.model, spec, self.artifact_path)

    def probe(self, spec: CacheSpec) -> tuple[dict, dict]:
        """(model fingerprint, `measure_probe` result) of one probe spec."""
        from ..measure.reconstruction import capture_states
        from .sensitivity import measure_probe

        if self.capture is None:
            self.capture = capture_states(self.model, self.ids)
        return self.model_fp, measure_probe(self.model, spec, self.capture, artifact=self._artifact(spec),
                                            cost_power=self.cost_power)

    def evaluate(self, spec: CacheSpec) -> tuple[dict, dict]:
        """(model fingerprint, `eval_figures` of a decode-faithful evaluation on the tuning text)."""
        from ..measure.evaluate import decode_faithful_eval
        from .evaluators import eval_figures

        return self.model_fp, eval_figures(decode_faithful_eval(self.model, self.ids, spec, progress=False,
                                                                artifact=self._artifact(spec),
                                                                baseline_store=self.store))


def _run(method: str, kind: str, specs: Sequence[CacheSpec], state: TuneState, fingerprint: dict,
         options: RayOptions, worker_args: tuple, on_result: Callable[[CacheSpec, dict], None] | None) -> int:
    """Measure the `specs` missing from `state` with `TuneWorker.<method>`, saving each under `kind`."""
    def spec_dict(spec: CacheSpec) -> dict:
        return {k: v for k, v in spec.to_dict().items() if k != "name"}

    missing = [spec for spec in specs if TuneState.key(kind, fingerprint, spec_dict(spec)) not in state.entries]
    if not missing:
        return 0

    def save(index: int, answer: tuple[dict, dict]) -> None:
        model_fp, result = answer
        if model_fp != fingerprint["model"]:
            from ..fingerprint import mismatch

            raise WorkerModelMismatch(f"a Ray worker loaded another model than this process ("
                                      f"{mismatch(fingerprint['model'], model_fp)}); check --model/--dtype")
        spec = missing[index]
        state.store(kind, spec_dict(spec), fingerprint, result)
        if on_result is not None:
            on_result(spec, result)

    lost = run_on_actors(TuneWorker, worker_args, method, missing, save, options,
                         name=f"kvcompress-tune-{uuid.uuid4().hex[:8]}")
    if lost:
        names = [missing[i].describe() for i in lost]
        raise WorkersLostError(f"{len(names)} tune measurement(s) not made because their Ray worker died: "
                               f"{'; '.join(names)}; run the same command again to make them")
    return len(missing)


def probes_on_ray(probes: Sequence[CacheSpec], state: TuneState, fingerprint: dict, options: RayOptions,
                  loader: Callable | None, load_args, input_ids: torch.Tensor, artifact: str | None,
                  cost_power: float = COST_POWER, on_result: Callable[[CacheSpec, dict], None] | None = None) -> int:
    """Measure the sensitivity probes missing from `state` on Ray actors, saving each as it arrives; returns how many.

    Args:
        probes: `sensitivity.probe_specs(settings, base)`.
        fingerprint: `sensitivity.probe_fingerprint` of the driver's model, the tuning text and
            `cost_power`: the key `measure_sensitivity` looks the probes up by.
        loader: `loader(load_args) -> (model, tokenizer)`, run on every worker (None: `models.load_named_model`).
        input_ids: (1, T) the tuning text.
        artifact: folder of the calibration artifact (None: none, or the embedded model's built on use).

    Raises WorkersLostError (after the others are saved) if some probes were given up because
    their workers kept dying, and WorkerModelMismatch if a worker loaded another model.
    """
    args = (loader, load_args, input_ids, artifact, cost_power, actor_threads(options))
    return _run("probe", PROBE_KIND, probes, state, fingerprint, options, args, on_result)


def weight_evals_on_ray(specs: Sequence[CacheSpec], state: TuneState, fingerprint: dict, options: RayOptions,
                        loader: Callable | None, load_args, input_ids: torch.Tensor, artifact: str | None,
                        on_result: Callable[[CacheSpec, dict], None] | None = None) -> int:
    """The decode-faithful evaluations on the tuning text (`sensitivity.weight_specs`) missing from
    `state`, on Ray actors, saved under "tune-eval" with `fingerprint` (`measurement_fingerprint` of
    the model and the tuning text, as `make_evaluator` keys them); returns how many. Raises as
    `probes_on_ray`."""
    args = (loader, load_args, input_ids, artifact, COST_POWER, actor_threads(options))
    return _run("evaluate", EVAL_KIND, specs, state, fingerprint, options, args, on_result)
