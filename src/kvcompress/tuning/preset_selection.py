"""Named presets chosen by measurement: for each KL target, the uniform spec with the highest real ratio.

`select_presets` (`kvcompress measure-presets`) evaluates candidate specs on sweep text (the
calibration part past what calibration reads), takes per target the highest-ratio candidate that
meets it, checks it on the selection part (a miss drops it for the next best; the report part is
refused), then measures the chosen presets on the report part and the passkey task. The result is
the data file `measured_presets.json` (see `presets.measured`); `verify_presets` re-measures shipped
presets. `context=N` runs the prompt protocol, and `select_prompt_presets` chooses presets by a
whole-cache compression floor (`prompt-6x`) instead of a KL target (with `kinds`: on several
kinds of text together). Texts and figures: docs/tuning.md, docs/prompt.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
import time
from collections.abc import Callable, Sequence

from ..calibration import artifact_for
from ..executor import Executor
from ..io import parse_list
from ..presets.measured import DATA_FORMAT
from ..spec import CacheSpec
from .candidates import uniform_candidates
from .evaluators import make_evaluator, make_ratio_evaluator

logger = logging.getLogger(__name__)

# name -> mean KL target on held-out text (see docs/tuning.md for why these values)
DEFAULT_TARGETS = {"lossless": 0.001, "safe": 0.005, "balanced": 0.02, "aggressive": 0.05, "extreme": 0.15}
DEFAULT_SWEEP_OFFSET = 8192
DEFAULT_SWEEP_TOKENS = 1024
DEFAULT_VERIFY_TOKENS = 2048
DEFAULT_PASSKEY_LENGTHS = (1024, 2048)
DEFAULT_PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
SWEEP_KIND = "sweep-eval"  # the state kind of a candidate's figures on the sweep text


def _parse_named_values(text: str, *, minimum: float, what: str, example: str) -> dict[str, float]:
    """"a=1,b=2" -> {"a": 1.0, "b": 2.0}, each value above `minimum`; ValueError naming `what`."""
    out = {}
    for item in parse_list(text):
        name, _, value = item.partition("=")
        name = name.strip()
        if name in out:
            raise ValueError(f"{name!r} is given twice; give each preset one value, e.g. '{example}'")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{what} look like '{example}', got {item!r}") from None
        if not name or not out[name] > minimum or not math.isfinite(out[name]):
            raise ValueError(f"each of the {what} needs a name and a finite value above {minimum:g}, got {item!r}; "
                             f"e.g. '{example}'")
    if not out:
        raise ValueError(f"no {what} given; use e.g. '{example}'")
    return out


def parse_targets(text: str) -> dict[str, float]:
    """"lossless=0.001,safe=0.005" -> {"lossless": 0.001, "safe": 0.005} (each KL above 0)."""
    return _parse_named_values(text, minimum=0, what="targets", example="safe=0.005,balanced=0.02")


def passkey_score(model, tokenizer, spec: CacheSpec | None, lengths: Sequence[int], depths: Sequence[float],
                  artifact=None) -> dict:
    """Passkey accuracy of `spec` (None: the uncompressed model) on held-out filler (`tasks.run_passkey`)."""
    from ..cache.cache import CompressedCache
    from ..measure.tasks import passkey_cases, run_passkey

    cases = passkey_cases(tokenizer, lengths, depths, seed=0)
    factory = None if spec is None else (lambda: CompressedCache(model, spec, artifact=artifact))
    result = run_passkey(model, tokenizer, cases, cache_factory=factory)
    return {"accuracy": result["accuracy"], "by_length": result["by_length"], "cases": len(cases)}


def choose(targets: dict[str, float], swept: dict[str, dict], verify: Callable[[str], dict]) -> dict[str, dict]:
    """For each target, the candidate with the highest sweep ratio meeting it on the sweep text AND
    on selection text (`verify(name)` -> figures); candidates missing on selection text are skipped.

    Args:
        targets: preset name -> KL target.
        swept: candidate name -> figures on the sweep text ("kl", "ratio", ...).

    Returns:
        preset name -> {"candidate", "target_kl", "sweep": figures, "verified": figures,
        "rejected": [candidates that met on the sweep text but missed on selection text]}.
    Raises ValueError naming the target when no candidate meets it.
    """
    chosen = {}
    for name, target in targets.items():
        ranked = sorted((c for c, f in swept.items() if f["kl"] <= target), key=lambda c: -swept[c]["ratio"])
        rejected = []
        for candidate in ranked:
            figures = verify(candidate)
            if figures["kl"] <= target:
                chosen[name] = {"candidate": candidate, "target_kl": target, "sweep": swept[candidate],
                                "verified": figures, "rejected": rejected}
                logger.info(f"{name} (KL <= {target:g}): {candidate}, ratio {figures['ratio']:.2f}x, selection KL "
                            f"{figures['kl']:.4f}, PPL {figures['ppl_change']:+.2%}")
                break
            rejected.append({"candidate": candidate, "verified_kl": figures["kl"]})
            logger.info(f"{name}: {candidate} met KL {target:g} on the sweep text but not on selection text "
                f"({figures['kl']:.4f}); trying the next")
        else:
            raise ValueError(f"no candidate meets preset {name!r} (KL <= {target:g}) on both texts; loosen the "
                             "target or add candidates")
    return chosen


@dataclass(frozen=True)
class SelectionSettings:
    """The texts a preset selection reads and the measurements made on them (see module doc).

    Attributes:
        sweep_tokens, sweep_offset: the sweep text, from token `sweep_offset` of the calibration part.
        verify_tokens, verify_part: the text that chooses ("selection" or "calibration"; "report" is refused).
        report_tokens: tokens the chosen presets are then measured on, at the start of the report
            part (default: `verify_tokens`).
        passkey_lengths, passkey_depths: the passkey cases (report-part filler; reported, not chosen on).
        context: run every evaluation under the prompt protocol with this many context tokens; the
            token counts are then continuation tokens (each text reads context + tokens + 1).
        kind, path: the kind of text (`corpus.KINDS` or "all"; default "docs") or the text file
            whose parts are read (see `corpus.corpus_slice`).
    """

    sweep_tokens: int = DEFAULT_SWEEP_TOKENS
    sweep_offset: int = DEFAULT_SWEEP_OFFSET
    verify_tokens: int = DEFAULT_VERIFY_TOKENS
    verify_part: str = "selection"
    report_tokens: int | None = None
    passkey_lengths: tuple[int, ...] = DEFAULT_PASSKEY_LENGTHS
    passkey_depths: tuple[float, ...] = DEFAULT_PASSKEY_DEPTHS
    context: int | None = None
    kind: str | None = None
    path: str | None = None


def select_presets(model, tokenizer, targets: dict[str, float] | None = None, *,
                   candidates: list[CacheSpec] | None = None, settings: SelectionSettings | None = None, state=None,
                   artifact=None, command: str | None = None, executor: Executor | None = None) -> dict:
    """Sweep, choose and verify the presets (see module doc); returns the data file's content.

    Args:
        targets: preset name -> KL target (default `DEFAULT_TARGETS`).
        candidates: named uniform specs to choose among (default `uniform_candidates()`).
        settings: the texts read and what is measured on them (see `SelectionSettings`).
        state: a `TuneState` or the path of its file (a rerun resumes from it).
        command: the command line, recorded in the result.
        executor: runs the candidate sweep (independent units; see `kvcompress.executor`, e.g.
            `distributed.RayExecutor`; default: here); the choice, verification and passkey run here.
    """
    from ..corpus import corpus_fingerprint, corpus_slice, require_selection_text
    from ..measure.prompt import protocol_record
    from ..models import model_id
    from ..fingerprint import model_fingerprint, text_fingerprint
    from .state import TuneState, measurement_fingerprint, spec_key

    t = settings or SelectionSettings()
    targets = targets or dict(DEFAULT_TARGETS)
    candidates = candidates or uniform_candidates()
    by_name = {spec.name: spec for spec in candidates}
    if len(by_name) != len(candidates):
        raise ValueError("candidate specs need distinct names")
    sweep = corpus_slice(tokenizer, "calibration", n_tokens=text_tokens(t.sweep_tokens, t.context),
                         offset=t.sweep_offset, path=t.path, kind=t.kind)
    verify = corpus_slice(tokenizer, t.verify_part, n_tokens=text_tokens(t.verify_tokens, t.context), path=t.path,
                          kind=t.kind)
    require_selection_text(verify.record, "the preset choice")
    report = corpus_slice(tokenizer, "report", n_tokens=text_tokens(t.report_tokens or t.verify_tokens, t.context),
                          path=t.path, kind=t.kind)
    artifact = artifact_for(model, candidates, artifact)
    state = state if isinstance(state, TuneState) else TuneState(state)
    sweep_fp = text_fingerprint(sweep.ids, sweep.record)
    verify_fp = text_fingerprint(verify.ids, verify.record)
    report_fp = text_fingerprint(report.ids, report.record)
    sweep_eval = make_evaluator(model, sweep.ids, SWEEP_KIND, sweep_fp, state, artifact=artifact, context=t.context,
                                executor=executor)
    verify_eval = make_evaluator(model, verify.ids, "verify-eval", verify_fp, state, artifact=artifact,
                                 context=t.context)
    report_eval = make_evaluator(model, report.ids, "report-eval", report_fp, state, artifact=artifact,
                                 context=t.context)
    started = time.perf_counter()

    def measured(spec: CacheSpec, f: dict) -> None:
        logger.info(f"[{time.perf_counter() - started:5.0f} s] sweep {spec.name}: ratio {f['ratio']:.2f}x, "
                    f"KL {f['kl']:.4f}, PPL {f['ppl_change']:+.2%}")

    swept = dict(zip(by_name, sweep_eval.map(candidates, on_new=measured)))
    chosen = choose(targets, swept, lambda name: verify_eval(by_name[name]))
    model_fp = model_fingerprint(model)
    passkey_text = {"filler": "embedded:pydoc_data.topics", "part": "report", "lengths": list(t.passkey_lengths),
                    "depths": list(t.passkey_depths), "seed": 0}
    passkey_fp = measurement_fingerprint(model_fp, passkey_text)

    def passkey(spec: CacheSpec | None, label: str) -> dict:
        spec_dict = spec_key(spec)
        result = state.lookup("passkey", spec_dict, passkey_fp)
        if result is None:
            logger.info(f"[{time.perf_counter() - started:5.0f} s] passkey: {label}")
            result = passkey_score(model, tokenizer, spec, t.passkey_lengths, t.passkey_depths, artifact=artifact)
            state.store("passkey", spec_dict, passkey_fp, result)
        return result

    baseline_passkey = passkey(None, "uncompressed")
    presets = []
    for name, pick in chosen.items():
        spec = dataclasses.replace(by_name[pick["candidate"]], name=name)
        passkey_result = passkey(spec, f"{name} ({pick['candidate']})")
        reported = report_eval(spec)
        logger.info(f"[{time.perf_counter() - started:5.0f} s] {name} on the report part: ratio "
                    f"{reported['ratio']:.2f}x, KL {reported['kl']:.4f}, PPL {reported['ppl_change']:+.2%}")
        presets.append({"name": name, "target_kl": pick["target_kl"], "candidate": pick["candidate"],
                        "describe": spec.describe(), "spec": spec.to_dict(), "verified": pick["verified"],
                        "report": reported, "sweep": pick["sweep"], "rejected": pick["rejected"],
                        "passkey": passkey_result})
    return {
        "format": DATA_FORMAT,
        "command": command,
        "model": model_id(model),
        "model_fingerprint": model_fp,
        "environment": passkey_fp["environment"],
        "corpus": corpus_fingerprint(t.kind, t.path),
        "texts": {"sweep": sweep_fp, "verify": verify_fp, "report": report_fp, "passkey": passkey_text},
        **({} if t.context is None else {"protocol": protocol_record(t.context, t.verify_tokens)}),
        "baseline_passkey": baseline_passkey,
        "presets": presets,
        "candidates": [{"name": n, "describe": by_name[n].describe(), "spec": by_name[n].to_dict(), "sweep": f}
                       for n, f in swept.items()],
        "seconds": round(time.perf_counter() - started, 1),
    }


def text_tokens(tokens: int, context: int | None) -> int:
    """Tokens a text must hold: `tokens`, or under the prompt protocol the context, `tokens`
    continuation tokens and the target of the last one."""
    return tokens if context is None else context + tokens + 1


def parse_floors(text: str) -> dict[str, float]:
    """"prompt-6x=6,prompt-8x=8" -> {"prompt-6x": 6.0, "prompt-8x": 8.0} (each floor above 1)."""
    return _parse_named_values(text, minimum=1, what="compression floors", example="prompt-6x=6,prompt-8x=8")


def choose_by_floor(floors: dict[str, float], ratios: dict[str, dict], measure: Callable[[str], dict],
                    objective: str = "kl") -> dict[str, dict]:
    """For each floor, the candidate with the lowest `objective` (`measure(name)` -> figures with
    "kl" and that key; ties broken by "kl") among those whose `ratios[name]["ratio"]` is at least
    the floor; each candidate that meets a floor is measured once (in order of ratio, highest
    first). ValueError naming the floor when no candidate meets it.

    Returns preset name -> {"candidate", "min_ratio", "cache": ratios[candidate], "verified": figures,
    "ranked": [(candidate, objective), ...] of those that met the floor, best first}.
    """
    chosen, measured = {}, {}
    for name, floor in floors.items():
        meeting = sorted((c for c, r in ratios.items() if r["ratio"] >= floor), key=lambda c: -ratios[c]["ratio"])
        if not meeting:
            best = max(ratios.values(), key=lambda r: r["ratio"], default={"ratio": 0.0})["ratio"]
            raise ValueError(f"no candidate meets preset {name!r} (whole cache >= {floor:g}x; the most compressed "
                             f"candidate stores {best:.2f}x); add candidates with fewer bits, a smaller window or "
                             "fewer tokens kept")
        figures = {c: measured[c] if c in measured else measure(c) for c in meeting}
        measured.update(figures)
        ranked = sorted(meeting, key=lambda c: (figures[c][objective], figures[c]["kl"]))
        candidate = ranked[0]
        chosen[name] = {"candidate": candidate, "min_ratio": floor, "cache": ratios[candidate],
                        "verified": figures[candidate], "ranked": [[c, figures[c][objective]] for c in ranked]}
        logger.info(f"{name} (whole cache >= {floor:g}x): {candidate}, {ratios[candidate]['ratio']:.2f}x, selection KL "
                    f"{figures[candidate]['kl']:.4f}" + ("" if objective == "kl" else
                                                         f", {objective} {figures[candidate][objective]:.4f}")
                    + f" (best of {len(ranked)})")
    return chosen


def select_prompt_presets(model, tokenizer, floors: dict[str, float], *, candidates: list[CacheSpec],
                          context: int, tokens: int, kinds: Sequence[str] | None = None, ratio_model=None,
                          verify_part: str = "selection", report_tokens: int | None = None, state=None, artifact=None,
                          ratio_artifact=None, command: str | None = None, kind: str | None = None,
                          path: str | None = None, references: dict[str, dict] | None = None,
                          report: bool = True) -> dict:
    """Presets defined by a compression floor, under the prompt protocol (see module doc); returns
    the data file's content (as `select_presets`, entries with "min_ratio" instead of "target_kl").

    With `kinds`, the choice reads the parts of several kinds of text together: a candidate's
    whole-cache ratio is its lowest over the kinds, its KL the geometric mean of its KL on each
    kind (`geometric_mean_kl`), and the figures, the texts and the corpus record carry each kind
    under "by_kind" (figures also "lowest_kind" for a ratio).

    Args:
        model: the model quality is measured on (float32 in the issue's protocol).
        floors: preset name -> least whole-cache ratio (fp16 bytes / stored bytes) at the end of
            the context.
        candidates: named specs to choose among (e.g. `uniform_candidates(..., evictions=...)`).
        context, tokens: the prompt protocol's context and continuation tokens.
        kinds: the kinds of text (`corpus.KINDS`) chosen on together; None: one text (`kind`, `path`).
        ratio_model: the model whose cache the ratio is taken from (the dtype that stores it;
            default `model`); its ratio comes from `memory_report()` after a `context`-token prefill.
        verify_part: the text that chooses ("selection" or "calibration"; ValueError for "report").
        report_tokens: continuation tokens of the report measurement (default: `tokens`).
        kind, path: the kind of text (`corpus.KINDS`; default "docs") or text file whose parts are
            read, without `kinds`.
        references: with `kinds`, kind -> {"kl": ..., "method": ...}: what the choice is held
            against on each kind's choosing part (e.g. kvpress's best press at 5x on the same
            ids); the candidate with the lowest worst ratio over the kinds (its KL / the
            reference's KL on each kind, `worst_reference_ratio`) wins a floor, instead of the
            lowest geometric mean of the KLs.
        report: measure the chosen presets on the report part(s) too (False: the caller measures
            them elsewhere, e.g. benchmarks/side_by_side.py; the entries have no "report").
    """
    from ..corpus import ALL_KINDS, corpus_fingerprint, corpus_slice, require_selection_text
    from ..models import model_id
    from ..measure.prompt import protocol_record
    from ..fingerprint import model_fingerprint, text_fingerprint
    from .state import TuneState

    ratio_model = ratio_model if ratio_model is not None else model
    by_name = {spec.name: spec for spec in candidates}
    if len(by_name) != len(candidates) or not candidates:
        raise ValueError("candidate specs need distinct names (and at least one)")
    if kinds is not None and (len(set(kinds)) != len(kinds) or not kinds or kind is not None or path is not None):
        raise ValueError(f"kinds must be distinct (and at least one, without kind or path), got {list(kinds)}")
    if references is not None and (kinds is None or set(references) != set(kinds)):
        raise ValueError(f"references need kinds and one reference per kind ({list(kinds or [])}), got "
                         f"{sorted(references)}")
    texts = list(kinds) if kinds is not None else [kind]
    artifact = artifact_for(model, candidates, artifact)
    ratio_artifact = artifact_for(ratio_model, candidates, ratio_artifact if ratio_artifact is not None else artifact)
    state = state if isinstance(state, TuneState) else TuneState(state)
    evaluators, fingerprints = {}, {"verify": {}, "report": {}}
    for text in texts:
        verify = corpus_slice(tokenizer, verify_part, n_tokens=text_tokens(tokens, context), path=path, kind=text)
        require_selection_text(verify.record, "the preset choice")
        report_text = corpus_slice(tokenizer, "report", n_tokens=text_tokens(report_tokens or tokens, context),
                                   path=path, kind=text)
        verify_fp = text_fingerprint(verify.ids, verify.record)
        report_fp = text_fingerprint(report_text.ids, report_text.record)
        fingerprints["verify"][text], fingerprints["report"][text] = verify_fp, report_fp
        # several kinds: one state kind per text kind and part (the state keeps one text per (state kind, spec))
        ratio_kinds = ({} if kinds is None else
                       {"verify": {"kind": f"prompt-ratio-{text}"}, "report": {"kind": f"prompt-ratio-report-{text}"}})
        suffix = "" if kinds is None else f"-{text}"
        evaluators[text] = {
            "ratio": make_ratio_evaluator(ratio_model, verify.ids, verify_fp, state, context, artifact=ratio_artifact,
                                          **ratio_kinds.get("verify", {})),
            "report_ratio": make_ratio_evaluator(ratio_model, report_text.ids, report_fp, state, context,
                                                 artifact=ratio_artifact, **ratio_kinds.get("report", {})),
            "verify": make_evaluator(model, verify.ids, f"verify-eval{suffix}", verify_fp, state, artifact=artifact,
                                     context=context),
            "report": make_evaluator(model, report_text.ids, f"report-eval{suffix}", report_fp, state, artifact=artifact,
                                     context=context)}

    def lowest_ratio(by_kind: dict[str, dict]) -> dict:
        """One text's sizes, or the sizes of the kind with the lowest ratio (each kind's under "by_kind")."""
        if kinds is None:
            return by_kind[kind]
        lowest = min(by_kind, key=lambda k: by_kind[k]["ratio"])
        return {**by_kind[lowest], "lowest_kind": lowest, "by_kind": {k: r["ratio"] for k, r in by_kind.items()}}

    def quality(by_kind: dict[str, dict]) -> dict:
        return by_kind[kind] if kinds is None else _across_kinds(by_kind, references)

    started = time.perf_counter()
    ratios = {}
    for spec in candidates:
        ratios[spec.name] = lowest_ratio({text: e["ratio"](spec) for text, e in evaluators.items()})
        logger.info(f"[{time.perf_counter() - started:5.0f} s] cache size {spec.name}: "
                    f"{ratios[spec.name]['ratio']:.2f}x" + ("" if kinds is None else
                                                           f" (lowest, {ratios[spec.name]['lowest_kind']})"))

    measured: dict[str, dict] = {}

    def measure(name: str) -> dict:
        by_kind = {}
        for text, e in evaluators.items():
            by_kind[text] = e["verify"](by_name[name])
            if kinds is not None:
                logger.info(f"[{time.perf_counter() - started:5.0f} s] selection {name} on {text}: "
                            f"KL {by_kind[text]['kl']:.4f}")
        figures = measured[name] = quality(by_kind)
        logger.info(f"[{time.perf_counter() - started:5.0f} s] selection {name}: {ratios[name]['ratio']:.2f}x, "
                    f"KL {figures['kl']:.4f}, PPL {figures['ppl_change']:+.2%}"
                    + ("" if kinds is None else f" (KL: geometric mean over {', '.join(kinds)})"))
        return figures

    chosen = choose_by_floor(floors, ratios, measure, "kl" if references is None else "worst_reference_ratio")
    presets = []
    for name, pick in chosen.items():
        spec = dataclasses.replace(by_name[pick["candidate"]], name=name)
        if not report:
            presets.append({"name": name, "min_ratio": pick["min_ratio"], "candidate": pick["candidate"],
                            "describe": spec.describe(), "spec": spec.to_dict(),
                            "cache": {"dtype": str(next(ratio_model.parameters()).dtype).removeprefix("torch."),
                                      "context_tokens": context, **pick["cache"]},
                            "verified": pick["verified"], "ranked": pick["ranked"]})
            continue
        by_kind = {text: e["report"](spec) for text, e in evaluators.items()}
        reported = by_kind[kind] if kinds is None else _across_kinds(by_kind)
        cache_report = lowest_ratio({text: e["report_ratio"](spec) for text, e in evaluators.items()})
        kls = (f"{reported['kl']:.4f}" if kinds is None else
               ", ".join(f"{k} {f['kl']:.4f}" for k, f in reported["by_kind"].items()))
        logger.info(f"[{time.perf_counter() - started:5.0f} s] {name} on the report part(s): "
                    f"{cache_report['ratio']:.2f}x, KL {kls}, PPL {reported['ppl_change']:+.2%}")
        presets.append({"name": name, "min_ratio": pick["min_ratio"], "candidate": pick["candidate"],
                        "describe": spec.describe(), "spec": spec.to_dict(),
                        "cache": {"dtype": str(next(ratio_model.parameters()).dtype).removeprefix("torch."),
                                  "context_tokens": context, **pick["cache"]},
                        "cache_report": cache_report, "verified": pick["verified"], "report": reported,
                        "ranked": pick["ranked"]})
    if kinds is None:
        corpus = corpus_fingerprint(kind, path)
        text_records = {"verify": fingerprints["verify"][kind], "report": fingerprints["report"][kind]}
    else:
        corpus = corpus_fingerprint(ALL_KINDS)
        corpus["kinds"] = {k: v for k, v in corpus["kinds"].items() if k in kinds}
        text_records = {part: {"part": part_name, "kinds": list(kinds), "by_kind": fingerprints[part]}
                        for part, part_name in (("verify", verify_part), ("report", "report"))}
    return {
        "format": DATA_FORMAT,
        "command": command,
        "model": model_id(model),
        "model_fingerprint": model_fingerprint(model),
        "ratio_model_fingerprint": model_fingerprint(ratio_model),
        "corpus": corpus,
        "protocol": protocol_record(context, tokens),
        "texts": text_records,
        **({} if references is None else {"objective": "worst_reference_ratio", "references": references}),
        "presets": presets,
        "candidates": [{"name": n, "describe": by_name[n].describe(), "spec": by_name[n].to_dict(), "cache": r,
                        **({"verified": measured[n]} if n in measured else {})}
                       for n, r in ratios.items()],
        "seconds": round(time.perf_counter() - started, 1),
    }


def geometric_mean_kl(by_kind: dict[str, dict]) -> float:
    """The geometric mean of the "kl" of each kind's figures: every kind weighs the same, whatever
    the scale of its KL (eviction costs several times more on some texts than on others)."""
    kls = [max(float(f["kl"]), 1e-12) for f in by_kind.values()]
    return math.exp(sum(math.log(k) for k in kls) / len(kls))


def worst_reference_ratio(by_kind: dict[str, dict], references: dict[str, dict]) -> tuple[float, str]:
    """(the largest KL / reference KL over the kinds, the kind it is on): how far the worst kind is
    from what the choice is held against (e.g. 0.5 = half kvpress's best KL on that kind)."""
    ratios = {k: float(f["kl"]) / float(references[k]["kl"]) for k, f in by_kind.items()}
    worst = max(ratios, key=ratios.get)
    return ratios[worst], worst


def _across_kinds(by_kind: dict[str, dict], references: dict[str, dict] | None = None) -> dict:
    """Figures of several kinds as one: KL the geometric mean, PPL change and top-1 the plain mean,
    each kind's figures under "by_kind"; with `references`, also "worst_reference_ratio" and
    "worst_kind" (`worst_reference_ratio`)."""
    mean = lambda key: sum(float(f[key]) for f in by_kind.values()) / len(by_kind)  # noqa: E731
    out = {"kl": geometric_mean_kl(by_kind), "ppl_change": mean("ppl_change"), "top1": mean("top1"),
           "aggregate": "KL: geometric mean over kinds; PPL change, top-1: mean", "by_kind": by_kind}
    if references is not None:
        out["worst_reference_ratio"], out["worst_kind"] = worst_reference_ratio(by_kind, references)
    return out


def verify_presets(data: dict, measure: Callable[[CacheSpec], dict]
                   ) -> list[dict]:
    """Re-measure every preset of `data` (`measure(spec)` -> figures with "kl", "ratio", "ppl_change")
    and compare with its target: a KL target (`target_kl`), or for a prompt preset its compression
    floor (`min_ratio`: "ratio" must be the whole cache's, in the dtype the floor is defined for).
    Returns one row per preset with "met"."""
    rows = []
    for entry in data["presets"]:
        spec = CacheSpec.from_dict(entry["spec"])
        figures = measure(spec)
        if "min_ratio" in entry:
            met, target = figures["ratio"] >= entry["min_ratio"], {"min_ratio": entry["min_ratio"]}
            label = f"whole cache >= {entry['min_ratio']:g}x"
        else:
            met, target = figures["kl"] <= entry["target_kl"], {"target_kl": entry["target_kl"]}
            label = f"target KL <= {entry['target_kl']:g}"
        rows.append({"name": entry["name"], **target, "met": met, **figures})
        logger.info(f"{entry['name']:11s} {label}: KL {figures['kl']:.4f}, ratio "
            f"{figures['ratio']:.2f}x, PPL {figures['ppl_change']:+.2%}  {'ok' if met else 'MISSED'}")
    return rows
