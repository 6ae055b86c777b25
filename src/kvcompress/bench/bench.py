"""Speed and memory of KV caches on one model: kvcompress presets vs `DynamicCache` and
transformers' `QuantizedCache` (quanto / HQQ backends), measured in one run.

For every context length C, every cache is filled by one prefill of C - repeats * steps
prompt tokens (timed), and then the caches take turns: in each of `repeats` rounds every
cache decodes `steps` greedy tokens (timed), the order rotated each round, so the cache holds
C tokens after the last round. Every round's decode speed is divided by the `DynamicCache`
speed of the same round, so a machine that gets slower or faster during the run shifts both
sides of each ratio alike. Reported: median and min..max over rounds. (Filling each cache
once per context rather than once per round keeps the long prefills from dominating the
run; it means the context grows by `steps` tokens from one round to the next.)

Stored bytes are `numel * element_size` of what each cache holds at the end:
- kvcompress: `CompressedCache.memory_report()` (codes, scales, zero points, window, sinks);
- `DynamicCache`: its key and value tensors;
- `QuantizedCache`: its quantized tensors (codes, scales, shifts/zeros: every tensor inside
  the backend's quantized object) plus its full-precision residual tensors.

Peak memory: each (cache, context) runs once more in a fresh Python process, which loads the
model, warms up with a short generation, then resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`, Linux) and runs the same prefill + decode. Peak = VmHWM after the
run minus VmRSS at the reset: every byte the generation added at its highest point (cache,
activations, temporaries), as the operating system saw it. The child runs with glibc's
`MALLOC_MMAP_THRESHOLD_=65536`, so freed blocks of 64 KiB or more go back to the kernel at
once: without it, memory glibc kept after frees made the peak of one configuration vary by
about 2x from one process to the next. On CUDA it is
`torch.cuda.max_memory_allocated` above the allocation at the reset instead.

Capacity: for a cache memory budget, the longest batch-1 context and the largest batch at
`capacity_context` tokens that fit, from the measured stored bytes (a straight line through
the two longest measured contexts: bytes = fixed + per_token * tokens, per batch row), and
the aggregate decode tokens/s measured at that batch.

Prompts come from the held-out part of the embedded corpus (or a text file); a prompt longer
than the text repeats it, and the result says so.

This module does not evaluate quality (see `evaluate`) and does not change how any cache
works; it sets no global torch settings (thread counts are whatever the process has).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..compat import CACHE_KWARG, quantized_layer_storage

DEFAULT_CACHES = ("dynamic", "int4", "int2", "quanto-4", "quanto-2", "hqq-4", "hqq-2")
DEFAULT_CONTEXTS = (512, 2048, 4096, 8192)
# transformers' QuantizedCache defaults, used for both backends (recorded in the results).
QUANTIZED_CACHE_SETTINGS = {"q_group_size": 64, "residual_length": 128, "axis_key": 0, "axis_value": 0}
_BASELINE_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}
_BASELINE_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}
_PEAK_CHILD_FLAG = "--peak-child"


# --------------------------------------------------------------------------- cache kinds


@dataclass(frozen=True)
class CacheKind:
    """One cache to benchmark, parsed from its name.

    Names: "dynamic" (transformers' `DynamicCache`), "quanto-<bits>" / "hqq-<bits>"
    (transformers' `QuantizedCache` with that backend), anything else a kvcompress preset
    name or spec file. Suffixes on a kvcompress name: "+monitor" ("int4+monitor") runs it with
    its runtime quality monitor on, to show the monitor's overhead; "+reconstruct" runs it with
    `fast_attention=False` (attention reads the full reconstruction every step), to show what
    attention over the codes saves.
    """

    name: str
    family: str  # "dynamic" | "quantized" | "kvcompress"
    backend: str | None = None
    nbits: int | None = None
    monitor: bool = False
    reconstruct: bool = False

    def describe(self) -> str:
        if self.family == "dynamic":
            return "transformers DynamicCache (uncompressed, model dtype)"
        if self.family == "quantized":
            s = QUANTIZED_CACHE_SETTINGS
            return (f"transformers QuantizedCache, {self.backend} backend, {self.nbits}-bit, groups of "
                    f"{s['q_group_size']}, {s['residual_length']}-token residual")
        from ..presets import load_spec

        monitor = " + runtime quality monitor" if self.monitor else ""
        reconstruct = "; attention reads the full reconstruction (fast_attention=False)" if self.reconstruct else ""
        return f"kvcompress {load_spec(self.spec_name).describe()}{monitor}{reconstruct}"

    @property
    def spec_name(self) -> str:
        """The preset or spec file of a kvcompress cache (the name without its suffixes)."""
        return _split_suffixes(self.name)[0]


_SUFFIXES = ("+monitor", "+reconstruct")


def _split_suffixes(name: str) -> tuple[str, set[str]]:
    """"int4+monitor+reconstruct" -> ("int4", {"+monitor", "+reconstruct"})."""
    found = set()
    stripped = True
    while stripped:
        stripped = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, stripped = name.removesuffix(suffix), True
                found.add(suffix)
    return name, found


def parse_cache_name(name: str) -> CacheKind:
    """The `CacheKind` for a name; ValueError naming the valid forms if it is malformed."""
    if name == "dynamic":
        return CacheKind(name, "dynamic")
    match = re.fullmatch(r"(quanto|hqq)-(\d+)", name)
    if match:
        backend, nbits = match.group(1), int(match.group(2))
        if nbits not in _BASELINE_BITS[backend]:
            raise ValueError(f"{backend} supports bits {_BASELINE_BITS[backend]}, got {name!r}")
        return CacheKind(name, "quantized", backend, nbits)
    if name.startswith(("quanto", "hqq")):
        raise ValueError(f"cache {name!r}: write transformers' quantized caches as quanto-<bits> or hqq-<bits>, "
                         "e.g. quanto-4")
    from ..presets import load_spec

    spec_name, suffixes = _split_suffixes(name)
    load_spec(spec_name)  # raises ValueError listing the presets
    return CacheKind(name, "kvcompress", monitor="+monitor" in suffixes, reconstruct="+reconstruct" in suffixes)


def baseline_unavailable(backend: str) -> str | None:
    """Why transformers' `QuantizedCache` with `backend` cannot run here, or None if it can."""
    import importlib.util

    module, package = _BASELINE_PACKAGES[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return (f"the {package!r} package is not installed (install the optional extra: "
                f"pip install 'kvcompress[baselines]', or pip install {package})")
    return None


def make_cache(kind: CacheKind, model):
    """A fresh, empty cache of `kind` for `model`."""
    from transformers import DynamicCache, QuantizedCache

    if kind.family == "dynamic":
        return DynamicCache()
    if kind.family == "quantized":
        config = model.config.get_text_config(decoder=True)
        return QuantizedCache(backend=kind.backend, config=config, nbits=kind.nbits, **QUANTIZED_CACHE_SETTINGS)
    from ..cache.cache import CompressedCache

    return CompressedCache(model, kind.spec_name, monitor=kind.monitor, fast_attention=not kind.reconstruct)


# --------------------------------------------------------------------------- stored bytes


def tensor_bytes(obj) -> int:
    """Bytes held by every tensor in `obj`: a tensor, a tensor subclass made of inner tensors
    (quanto's quantized tensors: their inner data, scales and shifts), or a tuple/list/dict of
    such (HQQ's `(codes, meta)`). Non-tensor values count 0."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item) for item in obj.values())
    return 0


def cache_stored_bytes(cache) -> int:
    """Bytes a cache holds, from its stored tensors (see module docstring)."""
    from transformers import QuantizedCache

    from ..cache.cache import CompressedCache

    if isinstance(cache, CompressedCache):
        return cache.memory_report().stored_bytes
    if isinstance(cache, QuantizedCache):
        return sum(tensor_bytes(quantized_layer_storage(layer)) for layer in cache.layers)
    return sum(tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
               for layer in cache.layers)


def fp16_cache_bytes(config, tokens: int, batch: int = 1) -> int:
    """Bytes of K and V for `tokens` tokens in fp16, all layers: the reference size."""
    config = config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * kv_heads * tokens * head_dim * 2


def predicted_stored_bytes(spec_name: str, config, tokens: int, dtype: torch.dtype, batch: int = 1) -> int | None:
    """What a kvcompress spec should store for `tokens` tokens, from bit widths and overheads.

    Sinks and window in `dtype`; compressed tokens (whole blocks that left the window) as
    `bits/8` bytes per value plus an fp16 scale and zero point per group. None for specs with
    methods other than "quant"/"none" (no closed form here).
    """
    from ..presets import load_spec

    spec = load_spec(spec_name)
    config = config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    elem = torch.empty(0, dtype=dtype).element_size()
    sinks = min(spec.sinks, tokens)
    rest = tokens - sinks
    compressed = max((rest - spec.window) // spec.block_size * spec.block_size, 0)
    full = sinks + rest - compressed
    total = 0
    for layer in range(config.num_hidden_layers):
        per_layer = 2 * full * head_dim * elem
        for tensor_spec in spec.for_layer(layer):
            if tensor_spec.method == "none":
                per_layer += compressed * head_dim * elem
            elif tensor_spec.method == "quant":
                groups = compressed * head_dim // tensor_spec.group_size
                per_layer += compressed * head_dim * tensor_spec.bits // 8 + groups * 2 * 2
            else:
                return None
        total += per_layer
    return total * batch * kv_heads


# --------------------------------------------------------------------------- prompts


def build_prompt(tokenizer, n_tokens: int, batch: int = 1, corpus: str | None = None) -> tuple[torch.Tensor, str]:
    """(batch, n_tokens) ids from consecutive stretches of the held-out corpus text, and a note.

    Each row continues where the previous one stopped; the text is repeated end to end when
    it has fewer than batch * n_tokens tokens (the note says so).
    """
    from ..corpus import corpus_tokens

    ids = corpus_tokens(tokenizer, part="report", path=corpus)[0]
    where = f"{corpus or 'embedded corpus'}, report part"
    need = n_tokens * batch
    note = f"{where}"
    if ids.numel() < need:
        ids = ids.repeat(math.ceil(need / ids.numel()))
        note += f" (repeated: the text has fewer than {need} tokens)"
    return ids[:need].reshape(batch, n_tokens), note


# --------------------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    """One prefill + decode of one cache at one context (see module docstring)."""

    cache: str
    context: int
    batch: int
    steps: int
    prefill_s: float
    decode_s: float
    stored_bytes: int
    round: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.steps / self.decode_s

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model, kind: CacheKind, prompt: torch.Tensor) -> tuple[object, torch.Tensor, float]:
    """A fresh cache of `kind` filled with `prompt` (B, T): (cache, next tokens (B, 1), seconds)."""
    device = model.device
    prompt = prompt.to(device)
    cache = make_cache(kind, model)
    _sync(device)
    start = time.perf_counter()
    out = model(prompt, **{CACHE_KWARG: cache}, logits_to_keep=1, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    return cache, token, time.perf_counter() - start


@torch.inference_mode()
def decode(model, cache, token: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """`steps` greedy decode steps from `token` (B, 1): (next tokens (B, 1), seconds)."""
    device = model.device
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, **{CACHE_KWARG: cache}, logits_to_keep=1, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return token, time.perf_counter() - start


def measure(model, kind: CacheKind, prompt: torch.Tensor, steps: int) -> Measurement:
    """Prefill `prompt` (B, T) into a fresh cache, then `steps` greedy decode steps."""
    cache, token, prefill_s = prefill(model, kind, prompt)
    _, decode_s = decode(model, cache, token, steps)
    return Measurement(kind.name, prompt.shape[1] + steps, prompt.shape[0], steps, prefill_s, decode_s,
                       cache_stored_bytes(cache))


# --------------------------------------------------------------------------- peak memory


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def peak_memory_unavailable(device: str) -> str | None:
    """Why peak memory cannot be measured here, or None if it can."""
    if torch.device(device).type == "cuda":
        return None
    if not (os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")):
        return "peak process memory needs Linux /proc (VmHWM and clear_refs)"
    return None


def _peak_child(argv: list[str]) -> int:
    """Entry point of the fresh process that measures one peak (see module docstring)."""
    args = json.loads(argv[0])
    from ..models import load_model

    if args.get("threads"):  # this child is its own process: match the parent's thread count
        torch.set_num_threads(args["threads"])
    dtype = getattr(torch, args["dtype"])
    model, tokenizer = load_model(args["model"], dtype=dtype, device=args["device"])
    kind = parse_cache_name(args["cache"])
    prompt, _ = build_prompt(tokenizer, args["context"] - args["steps"], args["batch"], args["corpus"])
    warm = prompt[:, : min(prompt.shape[1], 2 * args["warmup_tokens"])]
    measure(model, kind, warm, 2)  # one-time allocations (thread pools, kernels) are not the cache's
    gc.collect()
    device = torch.device(args["device"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status_kb("VmRSS") * 1024
    m = measure(model, kind, prompt, args["steps"])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _proc_status_kb("VmHWM") * 1024 - base
    print(json.dumps({"peak_bytes": peak, "stored_bytes": m.stored_bytes, "base_bytes": base}))
    return 0


def measure_peak(model_name: str | None, dtype: str, device: str, cache: str, context: int, steps: int,
                 batch: int = 1, corpus: str | None = None, warmup_tokens: int = 64,
                 timeout: float = 3600, threads: int | None = None) -> dict:
    """Peak memory of one generation in a fresh process: {"peak_bytes", "stored_bytes", "base_bytes"}."""
    args = {"model": model_name, "dtype": dtype, "device": device, "cache": cache, "context": context,
            "steps": steps, "batch": batch, "corpus": corpus, "warmup_tokens": warmup_tokens, "threads": threads}
    # glibc keeps freed heap memory mapped (and resident) depending on the order of earlier
    # allocations, which made peaks of one configuration vary by 2x between processes. With a
    # fixed mmap threshold every allocation of 64 KiB or more is returned to the kernel when it
    # is freed, so VmHWM is the most memory the generation held live at once.
    env = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), **os.environ}
    proc = subprocess.run([sys.executable, "-m", "kvcompress.bench.bench", _PEAK_CHILD_FLAG, json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory process for {cache} at {context} tokens failed "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark


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


def _fit_bytes(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(fixed, per_token) of a line through the two longest (tokens, bytes) points."""
    (t1, b1), (t2, b2) = sorted(points)[-2:]
    per_token = (b2 - b1) / (t2 - t1)
    return b2 - per_token * t2, per_token


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole benchmark; returns the results dict (see `write_outputs`)."""
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
            log(f"skipping {name}: {why}")
        else:
            kinds.append(kind)
    model, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    config = model.config
    prompts, notes = {}, set()
    for context in cfg.contexts:
        prompts[context], note = build_prompt(tokenizer, context - cfg.repeats * cfg.steps, 1, cfg.corpus)
        notes.add(note)

    log("warming up every cache (first-use costs such as kernel builds are not measured)")
    for kind in kinds:
        measure(model, kind, prompts[min(cfg.contexts)][:, :64], 2)

    runs: list[Measurement] = []
    prefills: dict[tuple[str, int], float] = {}
    for context in cfg.contexts:
        live = {}
        for kind in kinds:  # one prefill per cache, then interleaved decode rounds on the filled caches
            cache, token, prefills[(kind.name, context)] = prefill(model, kind, prompts[context])
            live[kind.name] = [cache, token]
            log(f"{context:6d} tokens  {kind.name:10s} prefill {prefills[(kind.name, context)]:7.2f} s")
        for rnd in range(cfg.repeats):
            shift = rnd % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:  # every cache once per round, order rotated
                cache, token = live[kind.name]
                live[kind.name][1], seconds = decode(model, cache, token, cfg.steps)
                m = Measurement(kind.name, context, 1, cfg.steps, prefills[(kind.name, context)], seconds,
                                cache_stored_bytes(cache), rnd)
                runs.append(m)
                log(f"{context:6d} tokens  {kind.name:10s} round {rnd + 1}/{cfg.repeats}  "
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
                log(f"peak    {context:6d} tokens  {kind.name:10s} "
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
                "predicted_bytes": (predicted_stored_bytes(kind.spec_name, config, context, model.dtype)
                                    if kind.family == "kvcompress" else None),
                "peak_bytes": peaks.get((kind.name, context), {}).get("peak_bytes"),
            }
            summary.append(row)

    capacity = _capacity(cfg, model, tokenizer, kinds, summary, log) if cfg.budget_mb > 0 else None
    result = {
        "model": model_id(model), "dtype": cfg.dtype, "device": str(model.device),
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
        "capacity": capacity,
    }
    result["targets"] = evaluate_targets(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _capacity(cfg: BenchConfig, model, tokenizer, kinds, summary, log) -> dict:
    """Longest batch-1 context and largest batch at `capacity_context` within the budget."""
    budget = int(cfg.budget_mb * 2**20)
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    rows = {}
    for kind in kinds:
        points = [(r["context"], r["stored_bytes"]) for r in summary if r["cache"] == kind.name]
        if len(points) < 2:
            rows[kind.name] = {"skipped": "needs at least two measured contexts to fit bytes per token"}
            continue
        fixed, per_token = _fit_bytes(points)
        longest = max(int((budget - fixed) // per_token), 0) if per_token > 0 else None
        at_context = fixed + per_token * cfg.capacity_context
        batch = int(budget // at_context) if at_context > 0 else 0
        row = {"bytes_per_token": per_token, "fixed_bytes": fixed, "longest_context": longest,
               "longest_context_within_model_limit": min(longest, limit) if limit and longest is not None else longest,
               "bytes_at_capacity_context": at_context, "largest_batch": batch,
               "measured_batch": min(batch, cfg.max_batch)}
        if row["measured_batch"] >= 1:
            b = row["measured_batch"]
            prompt, _ = build_prompt(tokenizer, cfg.capacity_context - cfg.capacity_steps, b, cfg.corpus)
            m = measure(model, kind, prompt, cfg.capacity_steps)
            row.update(aggregate_tokens_per_s=m.tokens_per_s, stored_bytes_at_batch=m.stored_bytes,
                       fits=m.stored_bytes <= budget, prefill_s=m.prefill_s)
            log(f"capacity {kind.name:10s} batch {b:3d} at {cfg.capacity_context} tokens: "
                f"{m.tokens_per_s:7.2f} tok/s aggregate, {m.stored_bytes / 2**20:.1f} MiB stored")
        rows[kind.name] = row
    return {"budget_bytes": budget, "capacity_context": cfg.capacity_context, "model_context_limit": limit,
            "caches": rows}


# --------------------------------------------------------------------------- targets


def _row(result: dict, cache: str, context: int) -> dict | None:
    return next((r for r in result["summary"] if r["cache"] == cache and r["context"] == context), None)


def evaluate_targets(result: dict, preset: str = "int4", at: int = 4096) -> list[dict]:
    """The issue's targets, checked on this run's figures (a target with missing figures is
    listed with `met: None` and says what is missing)."""
    targets = []
    mine = _row(result, preset, at)

    def add(name: str, value, met, detail: str) -> None:
        targets.append({"target": name, "value": value, "met": met, "detail": detail})

    name = f"{preset} decode >= 0.85x DynamicCache at {at} tokens"
    if mine:
        v = mine["speed_vs_dynamic"]["median"]
        add(name, v, v >= 0.85, f"median {v:.2f}x (min {mine['speed_vs_dynamic']['min']:.2f}, "
                                f"max {mine['speed_vs_dynamic']['max']:.2f})")
    else:
        add(name, None, None, f"{preset} at {at} tokens not measured")

    name = f"{preset} decode >= 1.5x the faster of quanto-4 / hqq-4 at {at} tokens, at <= their stored bytes"
    rivals = [r for r in (_row(result, "quanto-4", at), _row(result, "hqq-4", at)) if r]
    if mine and rivals:
        best = max(rivals, key=lambda r: r["tokens_per_s"]["median"])
        v = mine["tokens_per_s"]["median"] / best["tokens_per_s"]["median"]
        fewer = mine["stored_bytes"] <= best["stored_bytes"]
        add(name, v, v >= 1.5 and fewer, f"{v:.2f}x {best['cache']}; stored {mine['stored_bytes']:,} vs "
                                         f"{best['stored_bytes']:,} bytes")
    else:
        add(name, None, None, "needs the quanto/hqq baselines and the preset at that context")

    name = f"crossover: shortest context where {preset} decodes faster than DynamicCache"
    faster = [r["context"] for r in result["summary"]
              if r["cache"] == preset and r["speed_vs_dynamic"]["median"] > 1.0]
    measured = sorted(r["context"] for r in result["summary"] if r["cache"] == preset)
    add(name, min(faster) if faster else None, bool(faster),
        f"faster from {min(faster)} tokens" if faster else f"not faster at any measured context {measured}")

    worst = None
    for r in result["summary"]:
        if r["predicted_bytes"]:
            dev = abs(r["stored_bytes"] - r["predicted_bytes"]) / r["predicted_bytes"]
            worst = dev if worst is None else max(worst, dev)
    add("stored bytes within 3% of the prediction (all kvcompress rows)", worst,
        None if worst is None else worst <= 0.03,
        "no predictable rows" if worst is None else f"largest deviation {worst:.3%}")

    longest = max(result["settings"]["contexts"])
    dyn, comp = _row(result, "dynamic", longest), _row(result, preset, longest)
    name = f"peak memory at {longest} tokens: DynamicCache - {preset} >= 70% of (fp16 cache - {preset} stored)"
    if dyn and comp and dyn["peak_bytes"] is not None and comp["peak_bytes"] is not None:
        saved = dyn["peak_bytes"] - comp["peak_bytes"]
        fp16_gap = comp["fp16_bytes"] - comp["stored_bytes"]
        stored_gap = dyn["stored_bytes"] - comp["stored_bytes"]
        add(name, saved / fp16_gap, saved >= 0.7 * fp16_gap,
            f"peak saved {saved / 2**20:.1f} MiB; fp16 gap {fp16_gap / 2**20:.1f} MiB "
            f"({saved / fp16_gap:.0%}); gap to DynamicCache as stored in {result['dtype']}: "
            f"{stored_gap / 2**20:.1f} MiB ({saved / stored_gap:.0%} of it)")
    else:
        add(name, None, None, "peak memory not measured")
    return targets


# --------------------------------------------------------------------------- outputs


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render_markdown(result: dict) -> str:
    """The results as markdown: settings, the main table, capacity and targets."""
    s = result["settings"]
    lines = [
        f"Model: {result['model']} ({result['dtype']}, {result['device']}); torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}; {result['machine']['cpu_count']} CPUs, "
        f"{result['machine']['torch_threads']} torch threads.",
        f"Per context, each cache is filled by one prefill of context - {s['repeats']} x {s['steps']} tokens, then "
        f"the caches take turns decoding {s['steps']} greedy tokens for {s['repeats']} rounds (order rotated); "
        "decode tok/s is the median [min-max] over rounds and 'vs dynamic' the median [min-max] of the ratio to "
        "DynamicCache in the same round. Prompt text: " + "; ".join(result["prompt"]) + ".",
        "",
        "| context | cache | decode tok/s | vs dynamic | prefill s | stored MiB | fp16 MiB | peak MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        t, v, p = r["tokens_per_s"], r["speed_vs_dynamic"], r["prefill_s"]  # p: one prefill
        lines.append(f"| {r['context']} | {r['cache']} | {t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}] | "
                     f"{v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}] | {p:.2f} | "
                     f"{_mib(r['stored_bytes'])} | {_mib(r['fp16_bytes'])} | {_mib(r['peak_bytes'])} |")
    lines.append("")
    lines.append("Peak MiB: " + (result["peak_memory"]["skipped"] or result["peak_memory"]["method"]) + ".")
    for name, why in result["skipped"].items():
        lines.append(f"Skipped {name}: {why}.")
    lines.append("Caches: " + "; ".join(f"`{k}` = {v}" for k, v in result["caches"].items()) + ".")
    cap = result.get("capacity")
    if cap:
        lines += ["", f"Capacity for a {_mib(cap['budget_bytes'])} MiB cache budget (model context limit "
                      f"{cap['model_context_limit']}):", "",
                  f"| cache | bytes/token | longest context (batch 1) | largest batch at {cap['capacity_context']} | "
                  "aggregate decode tok/s at that batch |", "|---|---:|---:|---:|---:|"]
        for name, row in cap["caches"].items():
            if "skipped" in row:
                lines.append(f"| {name} | - | - | - | {row['skipped']} |")
                continue
            measured = row.get("aggregate_tokens_per_s")
            batch = f"{row['largest_batch']}" + (f" (measured {row['measured_batch']})"
                                                 if row["measured_batch"] != row["largest_batch"] else "")
            lines.append(f"| {name} | {row['bytes_per_token']:.0f} | {row['longest_context']} | {batch} | "
                         f"{'-' if measured is None else f'{measured:.1f}'} |")
    lines += ["", "Targets:", ""]
    for t in result["targets"]:
        mark = {True: "met", False: "NOT met", None: "not checked"}[t["met"]]
        lines.append(f"- {t['target']}: **{mark}** ({t['detail']})")
    lines.append("")
    lines.append(f"Benchmark time: {result['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """PNG: decode tokens/s vs context (median, min-max bars) and memory vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in result["caches"]:
        rows = sorted((r for r in result["summary"] if r["cache"] == name), key=lambda r: r["context"])
        x = [r["context"] for r in rows]
        med = [r["tokens_per_s"]["median"] for r in rows]
        err = [[m - r["tokens_per_s"]["min"] for m, r in zip(med, rows)],
               [r["tokens_per_s"]["max"] - m for m, r in zip(med, rows)]]
        line = ax_speed.errorbar(x, med, yerr=err, marker="o", capsize=3, label=name)
        color = line[0].get_color()
        ax_mem.plot(x, [r["stored_bytes"] / 2**20 for r in rows], marker="o", color=color, label=f"{name} stored")
        peak_rows = [r for r in rows if r["peak_bytes"] is not None]
        if peak_rows:
            ax_mem.plot([r["context"] for r in peak_rows], [r["peak_bytes"] / 2**20 for r in peak_rows], marker="x", linestyle="--", color=color,
                        label=f"{name} peak")
    ax_speed.set(xlabel="context (tokens)", ylabel="decode tokens/s (batch 1)", title="Decode speed")
    ax_mem.set(xlabel="context (tokens)", ylabel="MiB", title="Cache stored (solid) and peak process memory (dashed)")
    for ax in (ax_speed, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']}, {result['dtype']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(result))
    plot(result, paths["plot"])
    return paths


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _PEAK_CHILD_FLAG:
        sys.exit(_peak_child(sys.argv[2:]))
    sys.exit("kvcompress.bench.bench is run through `kvcompress bench`; this entry point only serves its "
             "peak-memory child processes")
