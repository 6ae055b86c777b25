"""One spec of a sweep, measured: the shared inputs, the uncompressed baseline, and a spec's record.

`SweepJob` is the sweep as a job (`kvcompress.executor`): started on a model it prepares the
shared inputs once, then turns each `SweepUnit` into its record with `measure_record`, wherever it
runs, so a record does not depend on where it was measured. Records are described in `sweep`.
This module does not write files or skip finished specs (see `sweep`).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import artifact_for
from ..io import content_hash
from .grid import SpecEntry
from .records import BASELINE_FILE, read_record
from .settings import SweepSettings

logger = logging.getLogger(__name__)


class _Timer:
    """Wall and CPU seconds of named phases."""

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                timer.phases[name] = {"wall_s": round(time.perf_counter() - self.wall, 2),
                                      "cpu_s": round(time.process_time() - self.cpu, 2)}

        return _Phase()


@dataclass
class _Context:
    """What every spec of a sweep shares: the model, its texts, the capture and the task prompts."""

    model: Any
    tokenizer: Any
    settings: SweepSettings
    eval_ids: Any = None
    texts: dict = field(default_factory=dict)  # "eval", "recon": corpus.CorpusSlice (see sweep_texts)
    fingerprint: dict = field(default_factory=dict)  # see sweep_fingerprint
    capture: Any = None
    passkey: list = field(default_factory=list)
    agreement: list = field(default_factory=list)
    baseline_logits: dict = field(default_factory=dict)  # see evaluate.decode_faithful_eval(baseline_store=)


def _environment(model) -> dict:
    import torch
    import transformers

    from .._version import __version__
    from ..models import model_id

    return {"model": model_id(model), "kvcompress": __version__, "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0]}


def sweep_texts(tokenizer, settings: SweepSettings) -> dict:
    """The texts a sweep reads, as `corpus.CorpusSlice`s: "eval" (decode-faithful evaluation, or with
    `context_tokens` the prompt protocol's context + continuation + last target) and "recon" (captured
    for direct reconstruction), both from the start of the report part of `settings.corpus` or of
    the kind `settings.text`."""
    from ..corpus import corpus_slice

    n_eval = settings.eval_tokens
    if settings.context_tokens is not None:
        n_eval = settings.context_tokens + settings.eval_tokens + 1
    kind = None if settings.corpus else settings.text
    return {"eval": corpus_slice(tokenizer, "report", n_tokens=n_eval, path=settings.corpus, kind=kind),
            "recon": corpus_slice(tokenizer, "report", n_tokens=settings.recon_tokens, path=settings.corpus, kind=kind)}


def sweep_fingerprint(model, texts: dict) -> dict:
    """Versions, model (config, dtype, weights hash) and texts: what a record is only valid for."""
    from ..fingerprint import environment, model_fingerprint, text_fingerprint

    return {"environment": environment(), "model": model_fingerprint(model),
            "texts": {name: text_fingerprint(t.ids, t.record) for name, t in texts.items()}}


def why_measured_again(record: dict, fingerprint: dict) -> str:
    """What changed since `record` was made (a fingerprint field, or the spec or settings)."""
    from ..fingerprint import mismatch

    return mismatch(record.get("fingerprint"), fingerprint) or "the spec or the settings changed"


def baseline_key(settings: SweepSettings, fingerprint: dict | None) -> str:
    return content_hash([settings.baseline_dict(), fingerprint or None])


def prepare_inputs(ctx: _Context) -> None:
    """The inputs every spec shares, from `ctx.settings`: evaluation ids, the captured states, task prompts."""
    from ..corpus import DEFAULT_KIND, load_text, part_text
    from ..measure.reconstruction import capture_states
    from ..measure.tasks import agreement_prompts, dataset_texts, passkey_cases, prompts_from_texts

    s, tok = ctx.settings, ctx.tokenizer
    ctx.texts = ctx.texts or sweep_texts(tok, s)
    ctx.eval_ids = ctx.texts["eval"].ids
    timer = _Timer()
    with timer("capture"):
        ctx.capture = capture_states(ctx.model, ctx.texts["recon"].ids)
    logger.info(f"captured Q, K, V of {s.recon_tokens} tokens ({timer.phases['capture']['wall_s']:.1f} s)")
    filler = part_text("report", load_text(s.corpus)) if s.corpus else part_text("report", kind=s.text or DEFAULT_KIND)
    if "passkey" in s.tasks:
        ctx.passkey = passkey_cases(tok, s.passkey_lengths, s.passkey_depths, seed=s.seed, filler_text=filler,
                                    prompt_format=s.passkey_format)
    if "agreement" in s.tasks:
        if s.agreement_dataset:
            texts = dataset_texts(s.agreement_dataset, n=4 * s.agreement_prompts)
            ctx.agreement = prompts_from_texts(tok, texts, s.agreement_prompt_tokens)[:s.agreement_prompts]
        else:
            ctx.agreement = agreement_prompts(tok, s.agreement_prompts, s.agreement_prompt_tokens, text=filler)


def saved_baseline(out: Path, settings: SweepSettings, fingerprint: dict | None = None) -> dict | None:
    """`OUT/baseline.json` if it was measured with these settings and fingerprint, else None."""
    baseline = read_record(out / BASELINE_FILE)
    return baseline if baseline and baseline.get("key") == baseline_key(settings, fingerprint) else None


def measure_baseline(ctx: _Context) -> dict:
    """The uncompressed task figures (and the capture's check) that every record of the sweep refers to."""
    from ..measure.tasks import greedy_continuations, run_passkey

    s, timer = ctx.settings, _Timer()
    baseline = {"key": baseline_key(s, ctx.fingerprint), "settings": s.baseline_dict(), **_environment(ctx.model),
                "capture_check_max_error": max(ctx.capture.check_errors)}
    if ctx.passkey:
        with timer("passkey"):
            baseline["passkey"] = run_passkey(ctx.model, ctx.tokenizer, ctx.passkey)
        logger.info(f"uncompressed passkey accuracy {baseline['passkey']['by_length']}")
    if ctx.agreement:
        with timer("agreement"):
            baseline["agreement_continuations"] = greedy_continuations(ctx.model, ctx.agreement,
                                                                       s.agreement_new_tokens)
    baseline["timing"] = timer.phases
    return baseline


def measure_spec(ctx: _Context, entry: SpecEntry, baseline: dict, progress: bool = False) -> dict:
    """Reconstruction, decode-faithful evaluation and (if enabled) tasks of one spec: the record body
    (`baseline`: the uncompressed task figures, see `measure_baseline`)."""
    from ..cache.cache import CompressedCache
    from ..measure.evaluate import decode_faithful_eval, evicts_prompt_only
    from ..measure.prompt import prompt_eval
    from ..measure.reconstruction import direct_reconstruction
    from ..measure.tasks import generation_agreement, greedy_continuations, run_passkey

    s, model = ctx.settings, ctx.model
    artifact = artifact_for(model, entry.spec, s.artifact)  # load once for every cache of this spec
    timer = _Timer()
    body: dict[str, Any] = {}
    with timer("reconstruction"):
        body["reconstruction"] = direct_reconstruction(model, entry.spec, ctx.capture, artifact=artifact)
    if entry.eval and s.context_tokens is None and evicts_prompt_only(entry.spec):
        body["eval_skipped"] = (f"{entry.spec.eviction.describe()} evicts prompt tokens, and decode-faithful "
                                "evaluation has no prompt: sweep with --context N (the prompt protocol) to measure it")
        logger.info(f"{entry.label}: evaluation skipped: {body['eval_skipped']}")
    elif entry.eval:
        with timer("eval"):
            if s.context_tokens is None:
                result = decode_faithful_eval(model, ctx.eval_ids, entry.spec, progress=progress, artifact=artifact,
                                              baseline_store=ctx.baseline_logits)
            else:
                result = prompt_eval(model, ctx.eval_ids, entry.spec, s.context_tokens, progress=progress,
                                     artifact=artifact, baseline_store=ctx.baseline_logits)
            body["eval"] = result.to_dict()
    tasks: dict[str, Any] = {}
    if entry.tasks:
        def factory():
            return CompressedCache(model, entry.spec, artifact=artifact)

        if ctx.passkey:
            with timer("passkey"):
                tasks["passkey"] = run_passkey(model, ctx.tokenizer, ctx.passkey, cache_factory=factory)
            tasks["passkey"]["uncompressed"] = {k: baseline["passkey"][k] for k in ("by_length", "accuracy")}
        if ctx.agreement:
            with timer("agreement"):
                continuations = greedy_continuations(model, ctx.agreement, s.agreement_new_tokens, factory)
            tasks["agreement"] = generation_agreement(baseline["agreement_continuations"], continuations)
    body["tasks"] = tasks
    body["timing"] = timer.phases
    return body


def measure_record(ctx: _Context, entry: SpecEntry, key: str, environment: dict, baseline: dict,
                   progress: bool = False) -> dict:
    """The whole record of one spec (status "error" with the traceback if measuring it raised)."""
    start = time.perf_counter()
    record: dict[str, Any] = {"label": entry.label, "key": key, "status": "ok",
                              "spec": entry.spec.to_dict(), "describe": entry.spec.describe(),
                              "settings": ctx.settings.to_dict(), "tasks_enabled": entry.tasks, **environment,
                              "texts": {name: t.record for name, t in ctx.texts.items()},
                              "fingerprint": ctx.fingerprint}
    try:
        record.update(measure_spec(ctx, entry, baseline, progress=progress))
    except Exception as exc:  # recorded, and the sweep goes on; KeyboardInterrupt is not caught
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


@dataclass(frozen=True)
class SweepUnit:
    """One spec to measure: its entry, its record key and the baseline its record refers to."""

    entry: SpecEntry
    key: str
    baseline: dict


@dataclass(frozen=True)
class SweepJob:
    """A sweep's records as a job (see module doc): the settings, the texts read and the fingerprint
    (`sweep_fingerprint`) its records are valid for."""

    settings: SweepSettings
    texts: dict
    fingerprint: dict
    progress: bool = False

    def start(self, model, tokenizer) -> "_SweepMeasurer":
        ctx = _Context(model, tokenizer, self.settings, texts=self.texts, fingerprint=self.fingerprint)
        prepare_inputs(ctx)
        return _SweepMeasurer(ctx, _environment(model), self.progress)

    def label(self, unit: SweepUnit) -> str:
        return unit.entry.label


@dataclass
class _SweepMeasurer:
    """A started `SweepJob`: unit -> record; `baseline()` measures the uncompressed figures."""

    ctx: _Context
    environment: dict
    progress: bool

    def __call__(self, unit: SweepUnit) -> dict:
        return measure_record(self.ctx, unit.entry, unit.key, self.environment, unit.baseline, self.progress)

    def baseline(self) -> dict:
        return measure_baseline(self.ctx)


def load_from_settings(settings: SweepSettings):
    """(model, tokenizer) named by `settings.model`, `settings.dtype` and `settings.device`."""
    from ..models import DTYPES, load_model

    return load_model(settings.model, dtype=DTYPES[settings.dtype], device=settings.device)


def summary(record: dict) -> str:
    """One line of a record's main figures, for the log."""
    if record["status"] != "ok":
        return f"ERROR {record['error']}"
    rec, ev = record["reconstruction"]["mean"], record.get("eval")
    line = (f"K cos {rec['key']['cosine']:.4f}, V cos {rec['value']['cosine']:.4f}, "
            f"attn err {rec['attention']['both']['rel_error']:.3f}")
    if ev:
        line += (f" | ratio {ev['compression_ratio']:.2f}x, PPL {ev['ppl_change']:+.2%}, KL {ev['kl']:.4f}, "
                 f"top-1 {ev['top1']:.3f}")
    if "passkey" in record.get("tasks", {}):
        line += f" | passkey {record['tasks']['passkey']['accuracy']:.2f}"
    if "agreement" in record.get("tasks", {}):
        line += f" | agreement prefix {record['tasks']['agreement']['mean_prefix']:.1f}"
    return line + f" ({record['seconds']:.0f} s)"
