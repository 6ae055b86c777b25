"""Named presets chosen by measurement: from near-lossless to extreme, each defined by a KL target.

`select_presets` (run by `kvcompress measure-presets`) evaluates candidate uniform specs on a
sweep text (the calibration part of the embedded corpus at an offset past what calibration
artifacts use), and for each named target takes the candidate with the highest real
compression ratio whose decode-faithful mean KL meets the target. The choice is then checked
on the selection part (which neither the sweep nor calibration read); a candidate that misses
there is dropped and the next best is checked, so a preset is only written if it met its own
target on selection text. Selecting on the report part is refused. Each chosen preset is then
measured once more on the report part (text no step of the choice read): those "report"
figures are what tables show. The passkey score (`tasks.run_passkey`) of the chosen spec and
of the uncompressed model is measured on report-part filler (reported, not used to choose).

The result is the data file `measured_presets.json`: each preset's spec, target, the figures
measured on the three texts, and the command, model, fingerprints and texts used.
`kvcompress measure-presets` writes it to `runs/measured_presets.json`; shipping it means
copying that file over `src/kvcompress/presets/measured_presets.json` and committing it.
`kvcompress.presets` registers a preset per entry (see `presets.measured`). `verify_presets` re-measures the shipped presets on
held-out text and reports which no longer meet their target (`kvcompress measure-presets
--verify` exits non-zero then).

This module does not define the metrics (see `measure.evaluate`, `measure.tasks`), does not read or
register the shipped presets (see `presets.measured`) and does not tune per-layer specs (see `tune`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from ..calibration import artifact_for
from ..io import parse_list
from ..presets.measured import DATA_FORMAT
from ..spec import CacheSpec
from ..distributed import RayOptions
from .candidates import uniform_candidates
from .distributed_presets import SWEEP_KIND, sweep_candidates_on_ray

logger = logging.getLogger(__name__)

# name -> mean KL target on held-out text (see docs/tuning.md for why these values)
DEFAULT_TARGETS = {"lossless": 0.001, "safe": 0.005, "balanced": 0.02, "aggressive": 0.05, "extreme": 0.15}
DEFAULT_SWEEP_OFFSET = 20000
DEFAULT_SWEEP_TOKENS = 1024
DEFAULT_VERIFY_TOKENS = 2048
DEFAULT_PASSKEY_LENGTHS = (1024, 2048)
DEFAULT_PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


def parse_targets(text: str) -> dict[str, float]:
    """"lossless=0.001,safe=0.005" -> {"lossless": 0.001, "safe": 0.005}."""
    out = {}
    for item in parse_list(text):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"targets look like 'name=0.01,other=0.05', got {item!r}") from None
        if not name.strip() or not out[name.strip()] > 0:
            raise ValueError(f"each target needs a name and a positive KL, got {item!r}")
    if not out:
        raise ValueError("no targets given; use e.g. 'safe=0.005,balanced=0.02'")
    return out


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


def select_presets(model, tokenizer, targets: dict[str, float] | None = None, *,
                   candidates: list[CacheSpec] | None = None, sweep_tokens: int = DEFAULT_SWEEP_TOKENS,
                   sweep_offset: int = DEFAULT_SWEEP_OFFSET, verify_tokens: int = DEFAULT_VERIFY_TOKENS,
                   verify_part: str = "selection", report_tokens: int | None = None, state=None,
                   passkey_lengths: Sequence[int] = DEFAULT_PASSKEY_LENGTHS,
                   passkey_depths: Sequence[float] = DEFAULT_PASSKEY_DEPTHS, artifact=None,
                   command: str | None = None, ray: RayOptions | None = None, loader: Callable | None = None,
                   load_args=None) -> dict:
    """Sweep, choose and verify the presets (see module doc); returns the data file's content.

    `verify_part` must be a part a selection may read (ValueError for "report"); the chosen presets
    are then measured on the first `report_tokens` (default: `verify_tokens`) of the report part.
    With `ray`, the candidate sweep runs first on a Ray cluster (see `distributed_presets`;
    `loader(load_args)` loads the model on each worker, by default `load_named_model` of
    (model name, dtype name, device)); the rest runs here.
    """
    from ..corpus import corpus_fingerprint, corpus_slice, require_selection_text
    from ..models import model_id
    from .state import TuneState, measurement_fingerprint, model_fingerprint, text_fingerprint
    from .tune import make_evaluator

    targets = targets or dict(DEFAULT_TARGETS)
    candidates = candidates or uniform_candidates()
    by_name = {spec.name: spec for spec in candidates}
    if len(by_name) != len(candidates):
        raise ValueError("candidate specs need distinct names")
    sweep = corpus_slice(tokenizer, "calibration", n_tokens=sweep_tokens, offset=sweep_offset)
    verify = corpus_slice(tokenizer, verify_part, n_tokens=verify_tokens)
    require_selection_text(verify.record, "the preset choice")
    report = corpus_slice(tokenizer, "report", n_tokens=report_tokens or verify_tokens)
    artifact = artifact_for(model, candidates, artifact)
    state = state if isinstance(state, TuneState) else TuneState(state)
    sweep_fp = text_fingerprint(sweep.ids, sweep.record)
    verify_fp = text_fingerprint(verify.ids, verify.record)
    report_fp = text_fingerprint(report.ids, report.record)
    sweep_eval = make_evaluator(model, sweep.ids, SWEEP_KIND, sweep_fp, state, artifact=artifact)
    verify_eval = make_evaluator(model, verify.ids, "verify-eval", verify_fp, state, artifact=artifact)
    report_eval = make_evaluator(model, report.ids, "report-eval", report_fp, state, artifact=artifact)
    started = time.perf_counter()
    if ray is not None:
        n = sweep_candidates_on_ray(
            candidates, state, measurement_fingerprint(model_fingerprint(model), sweep_fp), ray, loader, load_args,
            sweep_tokens, sweep_offset,
            None if artifact is None else str(artifact.path),
            on_result=lambda spec, f: logger.info(f"[{time.perf_counter() - started:5.0f} s] sweep (Ray) {spec.name}: "
                                                  f"ratio {f['ratio']:.2f}x, KL {f['kl']:.4f}"))
        logger.info(f"{n} candidates measured on Ray")
    swept = {}
    for i, spec in enumerate(candidates, 1):
        swept[spec.name] = sweep_eval(spec)
        f = swept[spec.name]
        logger.info(f"[{time.perf_counter() - started:5.0f} s] sweep {i}/{len(candidates)} {spec.name}: ratio "
            f"{f['ratio']:.2f}x, KL {f['kl']:.4f}, PPL {f['ppl_change']:+.2%}")
    chosen = choose(targets, swept, lambda name: verify_eval(by_name[name]))
    model_fp = model_fingerprint(model)
    passkey_text = {"filler": "embedded:pydoc_data.topics", "part": "report", "lengths": list(passkey_lengths),
                    "depths": list(passkey_depths), "seed": 0}
    passkey_fp = measurement_fingerprint(model_fp, passkey_text)

    def passkey(spec: CacheSpec | None, label: str) -> dict:
        spec_dict = None if spec is None else {k: v for k, v in spec.to_dict().items() if k != "name"}
        result = state.lookup("passkey", spec_dict, passkey_fp)
        if result is None:
            logger.info(f"[{time.perf_counter() - started:5.0f} s] passkey: {label}")
            result = passkey_score(model, tokenizer, spec, passkey_lengths, passkey_depths, artifact=artifact)
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
        "corpus": corpus_fingerprint(),
        "texts": {"sweep": sweep_fp, "verify": verify_fp, "report": report_fp, "passkey": passkey_text},
        "baseline_passkey": baseline_passkey,
        "presets": presets,
        "candidates": [{"name": n, "describe": by_name[n].describe(), "spec": by_name[n].to_dict(), "sweep": f}
                       for n, f in swept.items()],
        "seconds": round(time.perf_counter() - started, 1),
    }


def verify_presets(data: dict, measure: Callable[[CacheSpec], dict]
                   ) -> list[dict]:
    """Re-measure every preset of `data` (`measure(spec)` -> figures with "kl", "ratio", "ppl_change")
    and compare with its target. Returns one row per preset with "met"."""
    rows = []
    for entry in data["presets"]:
        spec = CacheSpec.from_dict(entry["spec"])
        figures = measure(spec)
        met = figures["kl"] <= entry["target_kl"]
        rows.append({"name": entry["name"], "target_kl": entry["target_kl"], "met": met, **figures})
        logger.info(f"{entry['name']:11s} target KL <= {entry['target_kl']:g}: KL {figures['kl']:.4f}, ratio "
            f"{figures['ratio']:.2f}x, PPL {figures['ppl_change']:+.2%}  {'ok' if met else 'MISSED'}")
    return rows
