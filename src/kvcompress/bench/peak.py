"""Peak memory of one generation, measured in a fresh Python process.

Each (cache, context) runs in a child (`python -m kvcompress.bench.peak --peak-child JSON`) that
loads the model, warms up, resets the kernel's peak-RSS mark (`/proc/self/clear_refs`, Linux) and
runs the prefill and decode: peak = VmHWM afterwards minus VmRSS at the reset. The child runs with
glibc's `MALLOC_MMAP_THRESHOLD_=65536` (without it, memory kept by glibc made one configuration's
peak vary by about 2x between processes). On CUDA: `torch.cuda.max_memory_allocated` above the
allocation at the reset.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

from ..cache.attention import enable_fast_attention
from .kinds import parse_cache_name
from .prompts import build_prompt
from .timing import measure

PEAK_CHILD_MODULE = "kvcompress.bench.peak"
_PEAK_CHILD_FLAG = "--peak-child"


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
    enable_fast_attention(model, strict=False)  # as in run.run_benchmark; this process's own model
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
    proc = subprocess.run([sys.executable, "-m", PEAK_CHILD_MODULE, _PEAK_CHILD_FLAG, json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory process for {cache} at {context} tokens failed "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _PEAK_CHILD_FLAG:
        sys.exit(_peak_child(sys.argv[2:]))
    sys.exit(f"{PEAK_CHILD_MODULE} is run through `kvcompress bench`; this entry point only serves its "
             "peak-memory child processes")
