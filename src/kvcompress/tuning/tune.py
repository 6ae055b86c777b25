"""Tuning: per-layer K and V settings with the highest real compression ratio under a quality target.

    result = tune(model, tune_text, verify_text, TuneSettings(target=0.01), state="spec.json.tune-state.json")

Steps (the method and its measured behaviour: docs/tuning.md): a sensitivity proxy per layer and
candidate (`sensitivity`), K/V weights from two decode-faithful evaluations, the Lagrangian path of
allocations (`allocation`), a bisection on that path by decode-faithful quality on the tuning text
(here), verification on selection text with retries at a tighter internal target, then a short
bisection of the path on the selection text itself between the point that met and one that missed
(here); a spec that misses its target is never returned (`TuneError`). Every measurement is saved in a
`TuneState` as it is made, so a tune resumes; the independent ones (probes, K/V weights) run on
the caller's executor (`kvcompress.executor`). `context=N` measures under the prompt protocol
(`measure.prompt`); `tune_grid` tunes several windows / eviction settings and keeps the best.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field


from ..calibration import artifact_for
from ..io import parse_list
from ..spec import CacheSpec, TensorSpec
from .allocation import PathPoint, lagrangian_path, spec_from_choice
from .candidates import candidate_settings
from .evaluators import make_evaluator
from ..corpus import CorpusSlice, require_selection_text
from ..executor import Executor
from ..fingerprint import text_fingerprint
from .sensitivity import TENSORS, Evaluator, Sensitivity, calibrate_tensor_weights, measure_sensitivity
from .state import TuneState

logger = logging.getLogger(__name__)

METRICS = ("kl", "ppl_change")
DEFAULT_TUNE_OFFSET = 8192  # tokens into the calibration part: past what calibration artifacts use (4096)
DEFAULT_TUNE_TOKENS = 1024
DEFAULT_VERIFY_TOKENS = 2048
DEFAULT_MAX_TRIES = 3
# held-out measurements spent refining the point the tries found (`tune_allocation`); 0 keeps the first point
# that meets, so the figures published with earlier tunes reproduce; `--refine 3` spends three more.
DEFAULT_REFINE = 0


class TuneError(RuntimeError):
    """The target cannot be met with the candidate settings; the message says what was measured."""


# --------------------------------------------------------------------------- candidates


def parse_candidates(text: str) -> dict[str, list[TensorSpec]]:
    """Candidates from a comma-separated list of families, e.g. "quant,hadamard"."""
    return candidate_settings(parse_list(text))


# --------------------------------------------------------------------------- search and verification




def search_path(path: list[PathPoint], meets: Callable[[int], bool], tolerance: float = 0.005) -> int:
    """Index of the most compressed point (lowest index) that meets the target, by bisection.

    `meets(i)` must be measured; it is assumed to hold for every index above the first that
    meets (quality improves along the path). The search stops once the point that meets stores
    at most `tolerance` (relative) more bytes than one that misses: the rest cannot gain more.
    Raises TuneError if even the last point misses.
    """
    hi = len(path) - 1
    if not meets(hi):
        raise TuneError("even the most faithful candidate allocation misses the target on the tuning text (the "
                        "search assumes quality improves along the path, so it looks no further)")
    lo = -1  # invariant: meets(hi), not meets(lo) (lo = -1: nothing known)
    while hi - lo > 1 and (lo < 0 or path[hi].nbytes > path[lo].nbytes * (1 + tolerance)):
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


@dataclass
class TuneResult:
    """What `tune` found (see module doc).

    Attributes:
        spec: the tuned spec; it met the target on the verification text.
        target, metric: the quality target (metric <= target).
        verified: eval figures of `spec` on the verification text.
        tuned: eval figures of `spec` on the tuning text.
        attempts: per try, the internal target, the chosen path index and both measurements.
        index: the path index of `spec` (after the refinement, see `tune_allocation`).
        verified_points: every path index measured on the verification text, with its figures.
        path_size: number of distinct allocations on the Lagrangian path.
        searched: every (path index, tuning-text figures) the searches measured.
        sens: the sensitivities the allocation used.
        tensor_weights: the K and V proxy weights (see `calibrate_tensor_weights`), if calibrated.
    """

    spec: CacheSpec
    target: float
    metric: str
    verified: dict
    tuned: dict
    attempts: list[dict] = field(default_factory=list)
    path_size: int = 0
    searched: list[dict] = field(default_factory=list)
    sens: Sensitivity | None = None
    tensor_weights: dict | None = None
    index: int | None = None
    verified_points: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "target": self.target, "metric": self.metric, "verified": self.verified,
                "tuned": self.tuned, "attempts": self.attempts, "path_size": self.path_size, "index": self.index,
                "searched": self.searched, "verified_points": self.verified_points,
                "sensitivity": self.sens.to_dict() if self.sens else None, "tensor_weights": self.tensor_weights}


def tune_allocation(sens: Sensitivity, base: CacheSpec, target: float, *, metric: str = "kl",
                    evaluate: Evaluator, verify: Evaluator, max_tries: int = DEFAULT_MAX_TRIES,
                    tighten: float = 0.8, refine: int = 0, refine_tolerance: float = 0.01) -> TuneResult:
    """Steps 2-5 of the module doc on given sensitivities; `evaluate` measures on the tuning text,
    `verify` on held-out text (both: spec -> figures dict with `metric` and "ratio").

    `refine`: at most this many more verifications after the first point that meets, spent on a
    bisection of the path on the verification text itself, between that point and the nearest
    more compressed one measured there to miss (one is found first by a looser search on the tuning
    text if none is known); it stops once the two differ by at most `refine_tolerance` of their bytes.
    The spec returned is the most compressed point measured to meet the target on the verification
    text. 0: none (the point the tries found)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not target > 0:
        raise ValueError(f"the target must be positive, got {target!r}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries}")
    if refine < 0:
        raise ValueError(f"refine must be 0 or more, got {refine}")
    path = lagrangian_path(sens)
    logger.info(f"Lagrangian path: {len(path)} distinct allocations, {path[0].nbytes:.0f} to {path[-1].nbytes:.0f} "
        f"bytes per token over all layers")
    measured: dict[int, dict] = {}
    checked: dict[int, dict] = {}

    def spec_at(i: int) -> CacheSpec:
        return spec_from_choice(path[i].key, path[i].value, sens.settings, base)

    def figures(i: int) -> dict:
        if i not in measured:
            spec = spec_at(i)
            measured[i] = evaluate(spec)
            logger.info(f"  path {i}/{len(path) - 1} (λ {path[i].lam:.3g}): ratio {measured[i]['ratio']:.2f}x, "
                f"{metric} {measured[i][metric]:.4f}, {len(spec.layers)} override range(s)")
        return measured[i]

    def held_out(i: int, why: str) -> dict:
        if i not in checked:
            checked[i] = verify(spec_at(i))
            ok = checked[i][metric] <= target
            logger.info(f"verified path {i} ({why}) on held-out text: {metric} {checked[i][metric]:.4f} (target "
                f"{target:g}), ratio {checked[i]['ratio']:.2f}x: {'met' if ok else 'MISSED'}")
        return checked[i]

    internal = target
    attempts = []
    index = None
    for attempt in range(1, max_tries + 1):
        logger.info(f"try {attempt}/{max_tries}: internal target {metric} <= {internal:.4g} on the tuning text")
        try:
            found = search_path(path, lambda i: figures(i)[metric] <= internal)
        except TuneError as err:
            raise TuneError(f"{err} ({metric} {figures(len(path) - 1)[metric]:.4g} > {internal:.4g}); "
                            "the target cannot be met this way: loosen it or add more faithful "
                            "candidates") from None
        result = held_out(found, f"try {attempt}")
        ok = result[metric] <= target
        attempts.append({"internal_target": internal, "index": found, "lam": path[found].lam,
                         "tuned": figures(found), "verified": result, "met": ok, "spec": spec_at(found).to_dict()})
        if ok:
            index = found
            break
        # Lower the internal target below what this point reached on the tuning text, in
        # proportion to how far the held-out figure overshot.
        reached = max(figures(found)[metric], 1e-12)
        internal = min(internal, reached) * min(tighten, target / result[metric])
    if index is None:
        raise TuneError(f"after {max_tries} tries no tuned spec met {metric} <= {target:g} on the held-out text "
                        f"(last: {attempts[-1]['verified'][metric]:.4g}); loosen the target, allow more tries "
                        "(--max-tries) or tune on more text (--tokens)")
    refined = _refine(path, index, target, metric, figures, held_out, checked, refine, refine_tolerance)
    searched = [{"index": i, "lam": path[i].lam, **measured[i]} for i in sorted(measured)]
    held = [{"index": i, "lam": path[i].lam, "met": checked[i][metric] <= target, **checked[i]}
            for i in sorted(checked)]
    return TuneResult(spec_at(refined), target, metric, checked[refined], figures(refined), attempts, len(path),
                      searched, sens, index=refined, verified_points=held)


def _refine(path: list[PathPoint], met: int, target: float, metric: str, figures: Callable[[int], dict],
            held_out: Callable[[int, str], dict], checked: dict[int, dict], budget: int, tolerance: float) -> int:
    """The most compressed path index measured to meet `target` on held-out text, after at most
    `budget` more held-out measurements (see `tune_allocation`'s `refine`)."""
    def misses(i: int) -> bool:
        return checked[i][metric] > target

    used = 0
    while used < budget:
        below = [i for i in checked if i < met and misses(i)]
        if below:
            lo = max(below)
        else:
            # No more compressed point measured to miss: search the tuning text with the target
            # scaled by how far the held-out figure of `met` stayed under it.
            loose = figures(met)[metric] * target / max(checked[met][metric], 1e-12)
            try:
                candidate = search_path(path[:met + 1], lambda i: figures(i)[metric] <= loose)
            except TuneError:
                return met
            if candidate >= met:
                return met
            held_out(candidate, "looser search on the tuning text")
            used += 1
            if not misses(candidate):
                met = candidate
            continue
        if met - lo <= 1 or path[met].nbytes <= path[lo].nbytes * (1 + tolerance):
            return met
        mid = (lo + met) // 2
        held_out(mid, f"bisection between {lo} and {met}")
        used += 1
        if not misses(mid):
            met = mid
    return met


@dataclass(frozen=True)
class TuneSettings:
    """What a tune aims at and how it searches (see module doc).

    Attributes:
        target: the quality target: `metric` <= target on the verification text.
        metric: "kl" or "ppl_change".
        candidates: settings per tensor, {"key": [TensorSpec, ...], "value": [...]}
            (default: `candidate_settings()`).
        max_tries: verifications before `TuneError` (each miss tightens the internal target).
        weight_tensors: scale the K and V proxy costs by their measured KL (`calibrate_tensor_weights`).
        context: measure under the prompt protocol with this many context tokens; the base spec
            may then evict.
        refine: held-out measurements spent after the first point that meets, bisecting the path
            on the verification text (see `tune_allocation`); 0: none.
    """

    target: float
    metric: str = "kl"
    candidates: dict[str, list[TensorSpec]] | None = None
    max_tries: int = DEFAULT_MAX_TRIES
    weight_tensors: bool = True
    context: int | None = None
    refine: int = DEFAULT_REFINE

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if not self.target > 0:
            raise ValueError(f"the target must be positive, got {self.target!r}")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {self.max_tries}")
        if self.refine < 0:
            raise ValueError(f"refine must be 0 or more, got {self.refine}")


def tune(model, tune_text: CorpusSlice, verify_text: CorpusSlice, settings: TuneSettings, *,
         base: CacheSpec | None = None, state: TuneState | str | os.PathLike | None = None, artifact=None,
         verify: Evaluator | None = None, executor: Executor | None = None) -> TuneResult:
    """Tune a per-layer spec so that `settings.metric` <= `settings.target` on `verify_text` (see module doc).

    Args:
        tune_text: the tuning text (sensitivities and the search): ids (1, T) and its corpus record
            (`corpus.corpus_slice`; the record may be None for ids from elsewhere).
        verify_text: the held-out text of the verification, (1, T'). Records are part of the
            state keys; a `verify_text` from the report part is refused (ValueError): the text
            that chooses a spec must not be the text it is reported on.
        base: window, sinks and block_size of the result (default: `CacheSpec()`).
        state: a `TuneState`, or the path of its JSON file (resumes from it), or None (nothing saved).
        artifact: calibration artifact for low-rank candidates.
        verify: replaces the held-out evaluation (spec -> figures), e.g. in tests.
        executor: runs the sensitivity probes and the two weight evaluations (independent units;
            see `kvcompress.executor`, e.g. `distributed.RayExecutor`); default: here. The search
            and the verification run here, in order.
    """
    context = settings.context
    if verify_text.record is not None:
        require_selection_text(verify_text.record, "tune's verification")
    base = base or CacheSpec()
    if base.eviction is not None and context is None:
        raise ValueError("a base spec that evicts tokens is measured under the prompt protocol: pass context")
    probe_base = dataclasses.replace(base, eviction=None)  # the proxy and K/V weights rank codecs only
    candidates = settings.candidates or candidate_settings()
    artifact = artifact_for(model, [s for t in TENSORS for s in candidates[t]], artifact)
    state = state if isinstance(state, TuneState) else TuneState(state)
    tune_fp = text_fingerprint(tune_text.ids, tune_text.record)
    verify_fp = text_fingerprint(verify_text.ids, verify_text.record)
    sens = measure_sensitivity(model, tune_text.ids, candidates, probe_base, state=state, text_fp=tune_fp,
                               artifact=artifact, executor=executor)
    evaluate = make_evaluator(model, tune_text.ids, "tune-eval", tune_fp, state, artifact=artifact, context=context,
                              executor=executor)
    verify = verify or make_evaluator(model, verify_text.ids, "verify-eval", verify_fp, state, artifact=artifact,
                                      context=context)
    weights = None
    if settings.weight_tensors:
        sens, weights = calibrate_tensor_weights(sens, probe_base, evaluate.map)
    result = tune_allocation(sens, base, settings.target, metric=settings.metric, evaluate=evaluate, verify=verify,
                             max_tries=settings.max_tries, refine=settings.refine)
    result.tensor_weights = weights
    return result


def tune_grid(model, tune_text: CorpusSlice, verify_text: CorpusSlice, settings: TuneSettings,
              bases: list[CacheSpec], **kwargs) -> tuple[TuneResult, list[dict]]:
    """`tune` once per base spec (e.g. windows x eviction settings) and the result with the highest
    verified ratio; every result met the target on the verification text.

    Returns (best result, one row per base: {"base", "ratio", "met", metric figures or "error"}).
    Raises TuneError when no base meets the target. `kwargs` go to `tune` (a shared `state` is
    reused by every base, so the sensitivity probes are measured once).
    """
    if not bases:
        raise ValueError("tune_grid needs at least one base spec")
    if "state" in kwargs and not isinstance(kwargs["state"], TuneState):
        kwargs["state"] = TuneState(kwargs["state"])
    best, rows = None, []
    for base in bases:
        label = base.describe()
        logger.info(f"tuning with base {label}")
        try:
            result = tune(model, tune_text, verify_text, settings, base=base, **kwargs)
        except TuneError as err:
            rows.append({"base": base.to_dict(), "describe": label, "met": False, "error": str(err)})
            logger.info(f"base {label}: {err}")
            continue
        rows.append({"base": base.to_dict(), "describe": label, "met": True, "ratio": result.verified["ratio"],
                     "verified": result.verified})
        if best is None or result.verified["ratio"] > best.verified["ratio"]:
            best = result
    if best is None:
        raise TuneError(f"no base spec of the {len(bases)} tried meets the target (first: {rows[0]['error']})")
    return best, rows


def best_uniform(settings: dict[str, list[TensorSpec]], base: CacheSpec, target: float, evaluate: Evaluator, *,
                 metric: str = "kl", sens: Sensitivity | None = None) -> tuple[CacheSpec | None, list[dict]]:
    """The uniform (same K and V setting on every layer) spec with the highest real ratio that meets
    the target under `evaluate`; and every figure measured on the way.

    With `sens`, candidates are measured in order of their real stored bytes, most compressed
    first, stopping at the first that meets: so the one returned has the highest ratio of all that
    meet. Without `sens` the stored sizes are not known beforehand, so every pair is measured and
    the one with the highest measured ratio among those that meet is returned. Pairs with both
    tensors "none" are left out.
    """
    pairs = [(k, v) for k in range(len(settings["key"])) for v in range(len(settings["value"]))
             if not (settings["key"][k].method == "none" and settings["value"][v].method == "none")]
    if sens is not None:
        def stored(pair):
            return sens.nbytes["key"][:, pair[0]].sum().item() + sens.nbytes["value"][:, pair[1]].sum().item()

        pairs.sort(key=stored)
    tried, best = [], None
    for k, v in pairs:
        spec = dataclasses.replace(base, key=settings["key"][k], value=settings["value"][v], layers={},
                                   layers_at_depth={},
                                   name=f"K {settings['key'][k].describe()} / V {settings['value'][v].describe()}")
        figures = evaluate(spec)
        tried.append({"spec": spec.to_dict(), "describe": spec.describe(), **figures})
        met = figures[metric] <= target
        logger.info(f"uniform {spec.name}: ratio {figures['ratio']:.2f}x, {metric} {figures[metric]:.4f}"
            f"{' (meets)' if met else ''}")
        if met and (best is None or figures["ratio"] > best[1]["ratio"]):
            best = (spec, figures)
            if sens is not None:  # measured in order of bytes: the first that meets is the best
                break
    return (best[0] if best else None), tried
