"""Sweep: measure many specs (reconstruction, decode-faithful quality, tasks), one JSON record each.

    entries = parse_specs("int8,int4,my_spec.yaml")          # or a grid file, see `load_grid`
    run_sweep(entries, "runs/sweep", SweepSettings(tasks=("passkey",)))

For every spec the sweep writes `OUT/records/<label>.json` as soon as that spec is done
(written to a temporary file, then renamed, so a record is either whole or absent):

    {"label", "key", "status": "ok" | "error", "spec", "describe", "settings", "model",
     "reconstruction": {...}  (see `reconstruction.direct_reconstruction`),
     "eval": {...}            (see `evaluate.EvalResult`),
     "tasks": {"passkey": {..., "uncompressed": {...}}, "agreement": {...}},
     "error", "traceback"     (only when status is "error"),
     "timing": {phase: {"wall_s", "cpu_s"}}}

`key` is a hash of the resolved spec, the settings that shape the record and the run's
`fingerprint` (kvcompress / transformers / torch versions, the model's config and weights hash,
and the texts read: corpus part, token range and a hash of the ids; see `kvcompress.fingerprint`),
which the record also holds. Rerunning the same sweep skips every spec whose record exists with
the same key and status "ok" and leaves that file untouched (so an interrupted sweep resumes
and loses nothing already measured); a record whose key differs is measured again and the log
says why (which fingerprint field changed, or that the spec or settings did); records with an
error are measured again. Computing the fingerprint loads the model even when every record is
done (a few seconds for the embedded model). A spec that raises gets an error record and the
sweep goes on (KeyboardInterrupt stops it). The uncompressed figures are measured in the same
run: the PPL baseline inside every evaluation, the tasks once per sweep (`OUT/baseline.json`,
reused on resume when its key matches). `OUT/config.json` holds the resolved settings and
specs.

A grid file (YAML or JSON) lists specs and/or grids:

    specs:                       # presets, spec files (relative to the grid file), inline specs,
      - int4                     # or {spec: ..., label: ..., tasks: false, eval: false}
      - {label: v2, spec: {key: {method: none}, value: {bits: 2, axis: token, group_size: 32}}}
    grids:                       # each: the cartesian product of `vary` applied to `base`
      - name: "lowrank{key.rank}"            # label template; {dotted.field} is replaced
        base: {key: {method: lowrank, key_space: pre_rope}, value: {method: lowrank}}
        vary: {"key.rank,value.rank": [48, 32, 16]}   # "a,b": both fields take each value
        tasks: false                          # optional, for every spec of the grid (as is eval)

`tasks: false` leaves the tasks out for that spec; `eval: false` leaves out decode-faithful
evaluation and the tasks, keeping only direct reconstruction (cheap: a curve can have many
points, the expensive measurements a few).

This module does not draw plots or tables (see `report`) and does not define the metrics
(see `kvcompress.measure`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import artifact_for
from ..io import content_hash, write_json_atomic
from ..measure.tasks import PASSKEY_DEPTHS, PASSKEY_LENGTHS, PROMPT_FORMATS
from .grid import SpecEntry, check_unique
from .records import BASELINE_FILE, CONFIG_FILE, read_record, record_path

logger = logging.getLogger(__name__)

TASKS = ("passkey", "agreement")
RECORD_FORMAT = 2  # 2: keys include the fingerprint (versions, weights hash, texts)
_TASK_SETTINGS = ("tasks", "passkey_lengths", "passkey_depths", "passkey_format", "seed", "agreement_prompts",
                  "agreement_prompt_tokens", "agreement_new_tokens", "agreement_dataset")


@dataclass(frozen=True)
class SweepSettings:
    """Everything besides the spec that shapes a record (defaults, then files, then CLI flags).

    Attributes:
        model: model name/path for `load_model` (None: the embedded SmolLM2-135M-Instruct).
        dtype, device: how the model is loaded.
        corpus: a UTF-8 text file whose report part (split like the embedded corpus, see `corpus`)
            is evaluated on (None: the report part of the embedded corpus).
        eval_tokens: tokens of decode-faithful evaluation.
        recon_tokens: tokens captured for direct reconstruction.
        tasks: names from TASKS to run (on the entries whose `tasks` flag is set).
        passkey_lengths, passkey_depths, passkey_format, seed: see `tasks.passkey_cases`.
        agreement_prompts, agreement_prompt_tokens, agreement_new_tokens: generation agreement.
        agreement_dataset: a `datasets` name whose "text" column gives the agreement prompts
            (needs the library and hub access; None: the evaluation text).
        artifact: calibration artifact folder for low-rank specs (None: the embedded model's).
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    corpus: str | None = None
    eval_tokens: int = 1024
    recon_tokens: int = 512
    tasks: tuple[str, ...] = ()
    passkey_lengths: tuple[int, ...] = PASSKEY_LENGTHS
    passkey_depths: tuple[float, ...] = PASSKEY_DEPTHS
    passkey_format: str = "plain"
    seed: int = 0
    agreement_prompts: int = 4
    agreement_prompt_tokens: int = 256
    agreement_new_tokens: int = 32
    agreement_dataset: str | None = None
    artifact: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "passkey_lengths", tuple(int(x) for x in self.passkey_lengths))
        object.__setattr__(self, "passkey_depths", tuple(float(x) for x in self.passkey_depths))
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; allowed: {list(TASKS)}")
        if self.passkey_format not in PROMPT_FORMATS:
            raise ValueError(f"passkey_format must be one of {PROMPT_FORMATS}, got {self.passkey_format!r}")
        for name in ("eval_tokens", "recon_tokens", "agreement_prompts", "agreement_prompt_tokens",
                     "agreement_new_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("tasks", "passkey_lengths", "passkey_depths"):
            out[name] = list(out[name])
        return out

    def baseline_dict(self) -> dict:
        """The settings the uncompressed task figures depend on."""
        keep = ("model", "dtype", "device", "corpus", "tasks", "passkey_lengths", "passkey_depths",
                "passkey_format", "seed", "agreement_prompts", "agreement_prompt_tokens", "agreement_new_tokens",
                "agreement_dataset")
        return {k: v for k, v in self.to_dict().items() if k in keep}


# --------------------------------------------------------------------------- records


def record_key(entry: SpecEntry, settings: SweepSettings, fingerprint: dict | None = None) -> str:
    """Hash of what shapes the record: the resolved spec, the settings, whether tasks run on it, and
    the run's fingerprint (see `sweep_fingerprint`)."""
    shaping = settings.to_dict()
    if not (entry.tasks and settings.tasks):  # task settings do not shape a record without tasks
        shaping = {k: v for k, v in shaping.items() if k not in _TASK_SETTINGS}
    if not entry.eval:
        shaping.pop("eval_tokens")
    payload = {"format": RECORD_FORMAT, "spec": entry.spec.to_dict(), "settings": shaping,
               "tasks": list(settings.tasks) if entry.tasks else [], "eval": entry.eval, "fingerprint": fingerprint}
    return content_hash(payload)


def sweep_texts(tokenizer, settings: SweepSettings) -> dict:
    """The texts a sweep reads, as `corpus.CorpusSlice`s: "eval" (decode-faithful evaluation) and
    "recon" (captured for direct reconstruction), both from the start of the report part."""
    from ..corpus import corpus_slice

    return {"eval": corpus_slice(tokenizer, "report", n_tokens=settings.eval_tokens, path=settings.corpus),
            "recon": corpus_slice(tokenizer, "report", n_tokens=settings.recon_tokens, path=settings.corpus)}


def sweep_fingerprint(model, texts: dict) -> dict:
    """Versions, model (config, dtype, weights hash) and texts: what a record is only valid for."""
    from ..fingerprint import environment, model_fingerprint, text_fingerprint

    return {"environment": environment(), "model": model_fingerprint(model),
            "texts": {name: text_fingerprint(t.ids, t.record) for name, t in texts.items()}}


def _why_measured_again(record: dict, fingerprint: dict) -> str:
    from ..fingerprint import mismatch

    why = mismatch(record.get("fingerprint"), fingerprint)
    return why or "the spec or the settings changed"


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


# --------------------------------------------------------------------------- running


@dataclass
class _Context:
    """What every spec of a sweep shares: the model, its text, the capture and the baseline."""

    model: Any
    tokenizer: Any
    settings: SweepSettings
    eval_ids: Any = None
    texts: dict = field(default_factory=dict)  # "eval", "recon": corpus.CorpusSlice
    fingerprint: dict = field(default_factory=dict)  # see sweep_fingerprint
    capture: Any = None
    baseline: dict = field(default_factory=dict)
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


def _prepare(ctx: _Context, out: Path, progress: bool) -> None:
    from ..corpus import load_text, part_text
    from ..measure.reconstruction import capture_states
    from ..measure.tasks import (
        agreement_prompts,
        dataset_texts,
        greedy_continuations,
        passkey_cases,
        prompts_from_texts,
        run_passkey,
    )

    s, tok = ctx.settings, ctx.tokenizer
    ctx.eval_ids = ctx.texts["eval"].ids
    timer = _Timer()
    with timer("capture"):
        ctx.capture = capture_states(ctx.model, ctx.texts["recon"].ids)
    logger.info(f"captured Q, K, V of {s.recon_tokens} tokens ({timer.phases['capture']['wall_s']:.1f} s)")
    filler = part_text("report", load_text(s.corpus)) if s.corpus else None
    if "passkey" in s.tasks:
        ctx.passkey = passkey_cases(tok, s.passkey_lengths, s.passkey_depths, seed=s.seed, filler_text=filler,
                                    prompt_format=s.passkey_format)
    if "agreement" in s.tasks:
        if s.agreement_dataset:
            texts = dataset_texts(s.agreement_dataset, n=4 * s.agreement_prompts)
            ctx.agreement = prompts_from_texts(tok, texts, s.agreement_prompt_tokens)[:s.agreement_prompts]
        else:
            ctx.agreement = agreement_prompts(tok, s.agreement_prompts, s.agreement_prompt_tokens, text=filler)
    key = content_hash([s.baseline_dict(), ctx.fingerprint])
    path = out / BASELINE_FILE
    baseline = read_record(path)
    if baseline and baseline.get("key") == key:
        ctx.baseline = baseline
        return
    baseline = {"key": key, "settings": s.baseline_dict(), **_environment(ctx.model),
                "capture_check_max_error": max(ctx.capture.check_errors)}
    if ctx.passkey:
        with timer("passkey"):
            baseline["passkey"] = run_passkey(ctx.model, tok, ctx.passkey)
        logger.info(f"uncompressed passkey accuracy {baseline['passkey']['by_length']}")
    if ctx.agreement:
        with timer("agreement"):
            baseline["agreement_continuations"] = greedy_continuations(ctx.model, ctx.agreement,
                                                                       s.agreement_new_tokens)
    baseline["timing"] = timer.phases
    write_json_atomic(path, baseline)
    ctx.baseline = baseline


def measure_spec(ctx: _Context, entry: SpecEntry, progress: bool = False) -> dict:
    """Reconstruction, decode-faithful evaluation and (if enabled) tasks of one spec: the record body."""
    from ..cache.cache import CompressedCache
    from ..measure.evaluate import decode_faithful_eval
    from ..measure.reconstruction import direct_reconstruction
    from ..measure.tasks import generation_agreement, greedy_continuations, run_passkey

    s, model = ctx.settings, ctx.model
    artifact = artifact_for(model, entry.spec, s.artifact)  # load once for every cache of this spec
    timer = _Timer()
    body: dict[str, Any] = {}
    with timer("reconstruction"):
        body["reconstruction"] = direct_reconstruction(model, entry.spec, ctx.capture, artifact=artifact)
    if entry.eval:
        with timer("eval"):
            body["eval"] = decode_faithful_eval(model, ctx.eval_ids, entry.spec, progress=progress,
                                                artifact=artifact, baseline_store=ctx.baseline_logits).to_dict()
    tasks: dict[str, Any] = {}
    if entry.tasks:
        def factory():
            return CompressedCache(model, entry.spec, artifact=artifact)

        if ctx.passkey:
            with timer("passkey"):
                tasks["passkey"] = run_passkey(model, ctx.tokenizer, ctx.passkey, cache_factory=factory)
            tasks["passkey"]["uncompressed"] = {k: ctx.baseline["passkey"][k] for k in ("by_length", "accuracy")}
        if ctx.agreement:
            with timer("agreement"):
                continuations = greedy_continuations(model, ctx.agreement, s.agreement_new_tokens, factory)
            tasks["agreement"] = generation_agreement(ctx.baseline["agreement_continuations"], continuations)
    body["tasks"] = tasks
    body["timing"] = timer.phases
    return body


def run_sweep(entries: list[SpecEntry], out_dir: str | os.PathLike, settings: SweepSettings | None = None, *,
              model=None, tokenizer=None, progress: bool = True,
              on_record: Callable[[dict], None] | None = None, command: str | None = None) -> list[dict]:
    """Measure every entry (skipping those already measured with the same key); return all records.

    Args:
        entries: the specs (see `parse_specs`, `load_grid`).
        out_dir: the sweep folder (created).
        settings: see `SweepSettings`.
        model, tokenizer: an already loaded model (else loaded from `settings`).
        on_record: called with each new record right after it is written.
        command: the command line that started the sweep, saved in config.json for the report.
    """
    settings = settings or SweepSettings()
    entries = check_unique(list(entries))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from ..models import DTYPES, load_model

        model, tokenizer = load_model(settings.model, dtype=DTYPES[settings.dtype], device=settings.device)
    texts = sweep_texts(tokenizer, settings)
    fingerprint = sweep_fingerprint(model, texts)
    keys = {entry.label: record_key(entry, settings, fingerprint) for entry in entries}
    write_json_atomic(out / CONFIG_FILE, {"command": command, "settings": settings.to_dict(),
                                          "fingerprint": fingerprint,
                                          "specs": [{**e.to_dict(), "key": keys[e.label]} for e in entries]})
    done = {}
    for entry in entries:
        record = read_record(record_path(out, entry.label))
        if not record or record.get("status") != "ok":
            continue
        if record.get("key") == keys[entry.label]:
            done[entry.label] = record
        else:
            logger.warning(f"{entry.label}: measuring again, its record is stale: "
                           f"{_why_measured_again(record, fingerprint)}")
    pending = [e for e in entries if e.label not in done]
    if done:
        logger.info(f"resuming: {len(done)} of {len(entries)} specs already measured")
    baseline = read_record(out / BASELINE_FILE)
    baseline_ok = bool(baseline) and baseline.get("key") == content_hash([settings.baseline_dict(), fingerprint])
    if not pending and not baseline_ok:
        logger.info(f"{out / BASELINE_FILE} is missing, damaged or stale: measuring the uncompressed baseline again")
    if pending or not baseline_ok:
        ctx = _Context(model, tokenizer, settings, texts=texts, fingerprint=fingerprint)
        _prepare(ctx, out, progress)
        environment = _environment(model)
    records = []
    for i, entry in enumerate(entries, 1):
        if entry.label in done:
            records.append(done[entry.label])
            continue
        start = time.perf_counter()
        record: dict[str, Any] = {"label": entry.label, "key": keys[entry.label], "status": "ok",
                                  "spec": entry.spec.to_dict(), "describe": entry.spec.describe(),
                                  "settings": settings.to_dict(), "tasks_enabled": entry.tasks, **environment,
                                  "texts": {name: t.record for name, t in texts.items()},
                                  "fingerprint": fingerprint}
        try:
            record.update(measure_spec(ctx, entry, progress=progress))
        except Exception as exc:  # recorded, and the sweep goes on; KeyboardInterrupt is not caught
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - start, 2)
        write_json_atomic(record_path(out, entry.label), record)
        records.append(record)
        logger.info(f"[{i}/{len(entries)}] {entry.label}: {_summary(record)}")
        if on_record is not None:
            on_record(record)
    return records


def _summary(record: dict) -> str:
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
