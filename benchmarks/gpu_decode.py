"""Decode speed and memory on one GPU: DynamicCache (bf16, SDPA) vs kvcompress int4 and int2.

The model is a randomly initialised Llama with the shapes of Llama-3.2-1B (16 layers, 32 query
heads, 8 KV heads, head_dim 64, vocabulary 128256), built from a `LlamaConfig`: nothing is
downloaded, and decode speed does not depend on the weights. For every (context, batch):

1. every cache is filled with `context` tokens of random key and value states per layer,
   through `cache.update` as attention would (kvcompress compresses them on the way in); no
   prefill is run, which keeps the 64k-token batches cheap and the comparison about decoding;
2. the caches take turns (`--rounds` rounds, the order rotated each round): each decodes
   `--steps` tokens through the whole model, timed with CUDA synchronisation around the
   round; tokens/s = batch * steps / seconds. Each round's speed is divided by DynamicCache's
   in the same round; reported: median (min..max) over rounds;
3. memory: `cache_bytes` = bytes of the tensors the cache holds after the last round
   (codes, scales, zero points, window, sinks; DynamicCache: its keys and values), and
   `decode_peak_extra_bytes` = `torch.cuda.max_memory_allocated` during that cache's decode
   steps above the allocation when they started (activations and temporaries of a step).

The model runs kvcompress's attention function (`enable_fast_attention`), which is transformers'
sdpa for every call except a decode step on a compressed layer, where it reads the codes (the
Triton kernel on CUDA): DynamicCache runs sdpa, the kvcompress caches attention over the codes.

Caches: `dynamic`, a preset name (`int4`, `int2`, ... kvcompress's `CompressedCache`, Triton
kernels on CUDA when Triton is importable) or `PRESET:torch` (the same cache with
KVCOMPRESS_KERNELS=torch: the torch path, to compare the two). A (context, batch) whose caches
would not fit in free GPU memory (estimated from DynamicCache's size) is skipped and recorded
with the reason; so is one that runs out of memory.

    python benchmarks/gpu_decode.py --out runs/gpu              # on a CUDA GPU (a few minutes)
    python benchmarks/gpu_decode.py --smoke --out runs/gpu-smoke  # tiny sizes, CPU is fine

Writes `gpu_decode.json` and `gpu_decode.md` into `--out`. This script does not measure
quality (the model is random) and does not measure prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvcompress import CompressedCache, enable_fast_attention, kernels

log = logging.getLogger("gpu_decode")

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
MEMORY_HEADROOM = 0.8  # use at most this fraction of free GPU memory for the caches of one (context, batch)


def csv_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


@contextlib.contextmanager
def kernel_mode(name: str | None):
    """Set KVCOMPRESS_KERNELS for the block (None: leave it as it is)."""
    if name is None:
        yield
        return
    before = os.environ.get(kernels.ENV)
    os.environ[kernels.ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(kernels.ENV, None)
        else:
            os.environ[kernels.ENV] = before


def split_cache_name(name: str) -> tuple[str, str | None]:
    """'int4:torch' -> ('int4', 'torch'); 'int4' -> ('int4', None)."""
    preset, _, mode = name.partition(":")
    if mode and mode not in kernels.MODES:
        raise SystemExit(f"--caches: {name!r}: the part after ':' must be one of {', '.join(kernels.MODES)}")
    return preset, mode or None


def make_cache(name: str, model):
    preset, _ = split_cache_name(name)
    if preset == "dynamic":
        return DynamicCache(config=model.config)
    return CompressedCache(model, preset)


def cache_bytes(cache) -> int:
    if isinstance(cache, CompressedCache):
        return cache.memory_report().stored_bytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def dynamic_bytes(config, context: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes of DynamicCache's keys and values for `context` tokens."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * context * batch * torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def fill(cache, config, context: int, batch: int, device, dtype, seed: int) -> None:
    """Put `context` tokens of random (B, H, context, D) keys and values into every layer."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for idx in range(config.num_hidden_layers):
        keys = torch.randn(shape, generator=g, device=device, dtype=dtype)
        values = torch.randn(shape, generator=g, device=device, dtype=dtype)
        cache.update(keys, values, idx)
        del keys, values


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_round(model, cache, batch: int, steps: int, device) -> tuple[float, int]:
    """Decode `steps` fixed tokens; (seconds, peak bytes allocated above the start on CUDA, else 0)."""
    tokens = torch.full((batch, 1), 7, dtype=torch.long, device=device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(steps):
        model(tokens, cache=cache, use_cache=True)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return seconds, peak


def run_point(model, names: list[str], context: int, batch: int, args, device, dtype) -> dict:
    """All caches at one (context, batch): fill, warm up, interleaved rounds."""
    config = model.config
    point = {"context": context, "batch": batch, "caches": {}}
    need = dynamic_bytes(config, context, batch, dtype) * len(names)  # compressed caches are smaller
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > MEMORY_HEADROOM * free:
            point["skipped"] = (f"the caches would need about {need / 2**30:.1f} GiB (DynamicCache's size "
                                f"times {len(names)}), more than {MEMORY_HEADROOM:.0%} of the "
                                f"{free / 2**30:.1f} GiB free")
            log.info("context %d batch %d: skipped (%s)", context, batch, point["skipped"])
            return point
    caches = {}
    try:
        for name in names:
            with kernel_mode(split_cache_name(name)[1]):
                caches[name] = make_cache(name, model)
                fill(caches[name], config, context, batch, device, dtype, seed=context + batch)
                decode_round(model, caches[name], batch, args.warmup, device)  # compiles kernels, warms caches
        speeds = {name: [] for name in names}
        peaks = {name: 0 for name in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                with kernel_mode(split_cache_name(name)[1]):
                    seconds, peak = decode_round(model, caches[name], batch, args.steps, device)
                speeds[name].append(batch * args.steps / seconds)
                peaks[name] = max(peaks[name], peak)
        reference = speeds.get("dynamic")
        for name in names:
            entry = {"tokens_per_s": summary(speeds[name]), "cache_bytes": cache_bytes(caches[name]),
                     "decode_peak_extra_bytes": peaks[name] if device.type == "cuda" else None,
                     "held_tokens": caches[name].get_seq_length()}
            if reference is not None:
                entry["speed_vs_dynamic"] = summary([s / d for s, d in zip(speeds[name], reference)])
            point["caches"][name] = entry
            log.info("context %d batch %d %-12s %8.1f tokens/s  cache %8.1f MiB", context, batch, name,
                     entry["tokens_per_s"]["median"], entry["cache_bytes"] / 2**20)
    except torch.cuda.OutOfMemoryError as error:
        point["skipped"] = f"out of GPU memory: {str(error).splitlines()[0]}"
        log.info("context %d batch %d: skipped (%s)", context, batch, point["skipped"])
    finally:
        caches.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return point


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def render_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Decode on {env['device_name']}", "",
             f"Model: {result['model']}, {result['dtype']}, attention "
             f"{result['attention']}; caches filled with random states, {result['rounds']} interleaved rounds of "
             f"{result['steps']} decode steps. Triton kernels: {env['triton_kernels']}. "
             f"torch {env['torch']}, transformers {env['transformers']}, Triton {env['triton']}.", "",
             "| context | batch | cache | tokens/s (median, min..max) | vs DynamicCache | cache MiB | "
             "cache vs DynamicCache | decode peak extra MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for point in result["points"]:
        if "skipped" in point:
            lines.append(f"| {point['context']} | {point['batch']} | all | skipped: {point['skipped']} | | | | |")
            continue
        dynamic = point["caches"].get("dynamic")
        for name, entry in point["caches"].items():
            speed = entry["tokens_per_s"]
            ratio = entry.get("speed_vs_dynamic")
            ratio_text = f"{ratio['median']:.2f}x ({ratio['min']:.2f}..{ratio['max']:.2f})" if ratio else "-"
            size_ratio = f"{entry['cache_bytes'] / dynamic['cache_bytes']:.3f}" if dynamic else "-"
            extra = entry["decode_peak_extra_bytes"]
            lines.append(f"| {point['context']} | {point['batch']} | {name} | {speed['median']:.1f} "
                         f"({speed['min']:.1f}..{speed['max']:.1f}) | {ratio_text} | "
                         f"{entry['cache_bytes'] / 2**20:.1f} | {size_ratio} | "
                         f"{'-' if extra is None else f'{extra / 2**20:.1f}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_decode.json and gpu_decode.md")
    parser.add_argument("--contexts", default="8192,32768,65536", help="comma-separated tokens held by the cache")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--caches", default="dynamic,int4,int2,int4:torch",
                        help="comma-separated: dynamic, a preset name, or PRESET:torch (the torch path)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps per cache first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, contexts 256,512, batches 1,2, 2 steps, 2 rounds, float32: checks "
                             "that the script runs (on CPU too); its figures mean nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu with --smoke")
    if args.smoke:
        shape, dtype = TINY, torch.float32
        args.contexts, args.batches, args.steps, args.rounds, args.warmup = "256,512", "1,2", 2, 2, 1
    else:
        shape, dtype = LLAMA_32_1B, torch.bfloat16
    names = [name.strip() for name in args.caches.split(",") if name.strip()]
    for name in names:
        split_cache_name(name)

    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    enable_fast_attention(model)
    points = [run_point(model, names, context, batch, args, device, dtype)
              for context in csv_ints(args.contexts) for batch in csv_ints(args.batches)]
    probe = torch.empty(1, device=device)
    result = {
        "model": "tiny Llama (smoke)" if args.smoke else "Llama-3.2-1B shapes, random weights",
        "config": shape, "dtype": str(dtype).removeprefix("torch."), "attention": "sdpa",
        "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "caches": names, "smoke": args.smoke,
        "environment": {
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or "cpu"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": _triton_version(), "triton_kernels": kernels.use_triton(probe),
            "kernels_env": os.environ.get(kernels.ENV, "auto"),
        },
        "points": points,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_decode.md").write_text(render_markdown(result))
    log.info("wrote %s and %s", out / "gpu_decode.json", out / "gpu_decode.md")


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
