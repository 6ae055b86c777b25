"""One benchmark run: speed and memory of KV caches on one model, measured in interleaved rounds.

For every context C, each cache is filled by one timed prefill of C - repeats * steps tokens; then
in each of `repeats` rounds every cache decodes `steps` greedy tokens, the order rotated each round,
and each round's speed is divided by `DynamicCache`'s in the same round (median and range over
rounds). The parts: `kinds` (names, construction), `nbytes`, `timing`, `peak` (fresh process),
`capacity`, `targets`, `render`. Progress goes to the `kvcompress.bench` logger; no global torch
setting is changed. How it measures and the figures: docs/performance.md.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..cache.attention import enable_fast_attention
from .capacity import capacity
from .kinds import DEFAULT_CACHES, QUANTIZED_CACHE_SETTINGS, baseline_unavailable, parse_cache_name
from .nbytes import cache_stored_bytes, fp16_cache_bytes, predicted_stored_bytes
from .peak import measure_peak, peak_memory_unavailable
from .prompts import build_prompt
from .targets import evaluate_targets
from .timing import Measurement, decode, measure, prefill

logger = logging.getLogger(__name__)

DEFAULT_CONTEXTS = (512, 2048, 4096, 8192)


@dataclass
class BenchConfig:
    """Settings of one benchmark run (all recorded in its results).

    Attributes:
        model: as for `load_model` (None: the embedded SmolLM2-135M-Instruct).
        dtype, device: model dtype name ("float32", ...) and torch device.
        contexts: tokens the cache holds at the end of each measurement.
        steps: decode steps per measurement (the prompt is context - steps tokens).
        repeats: rounds of interleaved measurements.
        caches: cache names (see `parse_cache_name`); "dynamic" is always added.
        peak: measure peak memory (one fresh process per cache and context).
        peak_contexts: the contexts whose peak memory is measured (None: all).
        budget_mb: cache memory budget for the capacity section (0: skip it).
        capacity_context: context of the largest-batch question.
        capacity_steps: decode steps of the capacity throughput measurement.
        max_batch: cap on the batch the capacity section measures.
        corpus: text file for prompts (None: the embedded corpus).
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    steps: int = 32
    repeats: int = 3
    caches: tuple[str, ...] = DEFAULT_CACHES
    peak: bool = True
    peak_contexts: tuple[int, ...] | None = None
    budget_mb: float = 128.0
    capacity_context: int = 2048
    capacity_steps: int = 16
    max_batch: int = 32
    corpus: str | None = None

    def validate(self) -> None:
        if not self.contexts or any(c <= self.steps * self.repeats for c in self.contexts):
            raise ValueError(f"every context must exceed --steps x --repeats ({self.steps * self.repeats}) since the "
                             f"prompt is context - steps x repeats tokens; got contexts {list(self.contexts)}")
        if self.steps < 1 or self.repeats < 1:
            raise ValueError(f"--steps and --repeats must be >= 1, got {self.steps} and {self.repeats}")
        if self.peak_contexts and set(self.peak_contexts) - set(self.contexts):
            raise ValueError(f"--peak-contexts {list(self.peak_contexts)} must be among --contexts {list(self.contexts)}")
        if self.budget_mb < 0 or self.max_batch < 1 or self.capacity_context <= self.capacity_steps:
            raise ValueError("--budget-mb must be >= 0, --max-batch >= 1 and --capacity-context > --capacity-steps")
        if len(set(self.caches)) != len(self.caches):
            raise ValueError(f"cache names repeat: {list(self.caches)}")


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run the whole benchmark; returns the results dict (see `render.write_outputs`)."""
    import transformers

    from ..models import load_model, model_id

    cfg.validate()
    started = time.perf_counter()
    names = ("dynamic",) + tuple(c for c in cfg.caches if c != "dynamic")
    kinds, skipped = [], {}
    for name in names:
        kind = parse_cache_name(name)
        why = baseline_unavailable(kind.backend) if kind.family == "quantized" else None
        if why:
            skipped[name] = why
            logger.info(f"skipping {name}: {why}")
        else:
            kinds.append(kind)
    model, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    # Every cache decodes on kvcompress's attention where the model supports it (for caches other
    # than kvcompress's it is transformers' sdpa; "+reconstruct" caches run on sdpa, see
    # `kinds.running`). The model is this run's own, loaded above, so it is not restored.
    enable_fast_attention(model, strict=False)
    config = model.config
    prompts, notes = {}, set()
    for context in cfg.contexts:
        prompts[context], note = build_prompt(tokenizer, context - cfg.repeats * cfg.steps, 1, cfg.corpus)
        notes.add(note)

    logger.info("warming up every cache (first-use costs such as kernel builds are not measured)")
    for kind in kinds:
        measure(model, kind, prompts[min(cfg.contexts)][:, :64], 2)

    runs: list[Measurement] = []
    prefills: dict[tuple[str, int], float] = {}
    for context in cfg.contexts:
        live = {}
        for kind in kinds:  # one prefill per cache, then interleaved decode rounds on the filled caches
            cache, token, prefills[(kind.name, context)] = prefill(model, kind, prompts[context])
            live[kind.name] = [cache, token]
            logger.info(f"{context:6d} tokens  {kind.name:10s} prefill {prefills[(kind.name, context)]:7.2f} s")
        for rnd in range(cfg.repeats):
            shift = rnd % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:  # every cache once per round, order rotated
                cache, token = live[kind.name]
                live[kind.name][1], seconds = decode(model, kind, cache, token, cfg.steps)
                m = Measurement(kind.name, context, 1, cfg.steps, prefills[(kind.name, context)], seconds,
                                cache_stored_bytes(cache), rnd)
                runs.append(m)
                logger.info(f"{context:6d} tokens  {kind.name:10s} round {rnd + 1}/{cfg.repeats}  "
                            f"decode {m.tokens_per_s:7.2f} tok/s  stored {m.stored_bytes / 2**20:8.2f} MiB")
        del live
        gc.collect()

    peaks: dict[tuple[str, int], dict] = {}
    peak_skip = None if cfg.peak else "not requested (--no-peak)"
    peak_skip = peak_skip or peak_memory_unavailable(cfg.device)
    if peak_skip is None:
        for context in cfg.peak_contexts or cfg.contexts:
            for kind in kinds:
                peaks[(kind.name, context)] = measure_peak(cfg.model, cfg.dtype, cfg.device, kind.name, context,
                                                           cfg.steps, corpus=cfg.corpus,
                                                           threads=torch.get_num_threads())
                logger.info(f"peak    {context:6d} tokens  {kind.name:10s} "
                            f"{peaks[(kind.name, context)]['peak_bytes'] / 2**20:8.1f} MiB")

    summary = []
    for context in cfg.contexts:
        dyn = {m.round: m for m in runs if m.cache == "dynamic" and m.context == context}
        for kind in kinds:
            mine = [m for m in runs if m.cache == kind.name and m.context == context]
            row = {
                "cache": kind.name, "context": context,
                "tokens_per_s": _summary([m.tokens_per_s for m in mine]),
                "speed_vs_dynamic": _summary([m.tokens_per_s / dyn[m.round].tokens_per_s for m in mine]),
                "prefill_s": prefills[(kind.name, context)],
                "prefill_vs_dynamic": prefills[("dynamic", context)] / prefills[(kind.name, context)],
                "stored_bytes": mine[-1].stored_bytes,
                "fp16_bytes": fp16_cache_bytes(config, context),
                "predicted_bytes": (predicted_stored_bytes(kind.spec_name, config, context, model.dtype,
                                                           prompt_tokens=prompts[context].shape[1])
                                    if kind.family == "kvcompress" else None),
                "peak_bytes": peaks.get((kind.name, context), {}).get("peak_bytes"),
            }
            summary.append(row)

    cap = None
    if cfg.budget_mb > 0:
        cap = capacity(model, tokenizer, kinds, summary, budget_bytes=int(cfg.budget_mb * 2**20),
                       context=cfg.capacity_context, steps=cfg.capacity_steps, max_batch=cfg.max_batch,
                       corpus=cfg.corpus)
    result = {
        "model": model_id(model), "dtype": cfg.dtype, "device": str(model.device),
        "attn_implementation": model.config._attn_implementation,  # "kvcompress": decode steps read the codes
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if model.device.type == "cuda" else None},
        "settings": {**asdict(cfg), "contexts": list(cfg.contexts), "caches": list(cfg.caches),
                     "quantized_cache": QUANTIZED_CACHE_SETTINGS},
        "prompt": sorted(notes),
        "caches": {kind.name: kind.describe() for kind in kinds},
        "skipped": skipped,
        "peak_memory": {"method": ("cuda max_memory_allocated above the allocation at reset"
                                   if model.device.type == "cuda" else
                                   "VmHWM - VmRSS at reset (/proc/self/clear_refs) in a fresh process"),
                        "skipped": peak_skip},
        "runs": [m.to_dict() for m in runs],
        "summary": summary,
        "capacity": cap,
    }
    result["targets"] = evaluate_targets(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
