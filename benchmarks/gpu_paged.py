"""The vLLM plugin's Triton paged kernels on one GPU: correctness against the torch path, then decode speed.

1. Correctness, for every servable preset (paged-int8 ... paged-bits2) at small shapes: the Triton store
   (`triton_paged.write`) against `SlotLayout.write` (bytes equal; codebook scales at most one fp16 step
   apart, codes equal), and the Triton attention (`triton_paged.attend`) against `paged_attention_torch`
   (max |difference| of out and lse) on one step that mixes decode queries, a chunk after a stored prefix
   and a prefill from token 0, over a scrambled block table, with splits of 16 tokens. A check that fails
   makes the script exit 1 before timing anything.
2. Decode speed of one attention layer with the shapes of Llama-3.2-1B (32 query heads, 8 KV heads,
   head_dim 64): `batch` requests of `context` stored tokens each, one query token per request:
   `triton` (`triton_paged.attend` over paged-int4 pages: codes read through the block table) against
   `sdpa` (torch's scaled_dot_product_attention over a dense bf16 (batch, 8, context, 64) cache, GQA);
   `--rounds` rounds, the two taking turns, each timing `--iters` calls between CUDA synchronisations;
   reported: the median per-call time of each and the median over rounds of their ratio, and the store
   time of one decode step's tokens. Memory: bytes of the paged pool vs the dense bf16 cache.

    python benchmarks/gpu_paged.py --out runs/gpu-check            # on a CUDA GPU (about a minute)
    python benchmarks/gpu_paged.py --dry-run --out runs/gpu-dry    # CPU, Triton's interpreter, tiny shapes

`--dry-run` runs the same code on the CPU through Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes:
it proves the script runs; its timings mean nothing. Writes `gpu_paged.json` and `gpu_paged.md` into
`--out`. This script does not run a model, vLLM or prefill timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # Triton reads it when first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from kvcompress.integrations.vllm.config import servable_presets  # noqa: E402
from kvcompress.kernels import triton_paged  # noqa: E402
from kvcompress.kernels.paged_attention import paged_attention_torch  # noqa: E402
from kvcompress.paged import PagedLayout  # noqa: E402
from kvcompress.presets import PRESETS  # noqa: E402

BLOCK = 16  # tokens per page (vLLM's default block size on CUDA)
LLAMA_1B = dict(hq=32, hkv=8, head_dim=64)
TINY = dict(hq=4, hkv=2, head_dim=32)
CHECK_LENGTHS, CHECK_CHUNKS = [37, 5, 70, 16, 1], [1, 0, 7, 16, 1]  # decode, none, chunk, prefill, one token


def layout_of(preset: str, head_dim: int) -> PagedLayout:
    """Layer 1's slot layout of a servable preset (bf16 model)."""
    return PagedLayout.for_spec(PRESETS.get(preset), 2, head_dim, torch.bfloat16).layers[1]


def pool(layout, lengths: list[int], hkv: int, device: str, seed: int = 0, store: str = "torch"):
    """(pages, block_table, seq_lens) with request r's lengths[r] random tokens stored (by `layout.write`
    or, store="triton", `triton_paged.write`) in scrambled blocks."""
    gen = torch.Generator(device=device).manual_seed(seed)  # states drawn where they are used (32k-token requests)
    head_dim = layout.key.head_dim
    per_request = [-(-n // BLOCK) for n in lengths]
    order = torch.randperm(sum(per_request), generator=torch.Generator().manual_seed(seed)).to(device)
    pages = torch.zeros(len(order), hkv, BLOCK, layout.slot_bytes, dtype=torch.uint8, device=device)
    table = torch.zeros(len(lengths), max(per_request), dtype=torch.int32, device=device)
    used = 0
    for r, n in enumerate(lengths):
        table[r, :per_request[r]] = order[used:used + per_request[r]]
        used += per_request[r]
        t = torch.arange(n, device=device)
        keys = (torch.randn(n, hkv, head_dim, generator=gen, device=device) * 2).bfloat16()
        values = torch.randn(n, hkv, head_dim, generator=gen, device=device).bfloat16()
        slots = table[r, t // BLOCK].long() * BLOCK + t % BLOCK
        if store == "triton":
            triton_paged.write(pages, keys, values, slots, layout)
        else:
            layout.write(pages, keys, values, slots)
    return pages, table, torch.tensor(lengths, dtype=torch.int32)


def check(preset: str, shapes: dict, device: str) -> dict:
    """Store and attention of one preset against the torch path (see the module docstring)."""
    layout = layout_of(preset, shapes["head_dim"])
    hq, hkv, D = shapes["hq"], shapes["hkv"], shapes["head_dim"]
    gen = torch.Generator().manual_seed(1)
    n = 40
    keys, values = (torch.randn(n, hkv, D, generator=gen) * 3).to(device), torch.randn(n, hkv, D, generator=gen).to(device)
    slots = torch.randperm(4 * BLOCK, generator=gen)[:n].to(device)
    slots[3] = -1
    start = torch.randint(0, 256, (4, hkv, BLOCK, layout.slot_bytes), dtype=torch.uint8, generator=gen).to(device)
    mine, reference = start.clone(), start.clone()
    triton_paged.write(mine, keys, values, slots, layout)
    layout.write(reference, keys, values, slots)
    scale_bytes = torch.zeros(layout.slot_bytes, dtype=torch.bool, device=device)
    for part, offset in ((layout.key, 0), (layout.value, layout.value_offset)):
        if part.method == "rotated+codebook":
            at = offset + part.fields()["scale"][0]
            scale_bytes[at:at + 2] = True
    other_bytes_equal = bool(torch.equal(mine[..., ~scale_bytes], reference[..., ~scale_bytes]))
    scale_steps = 0
    if bool(scale_bytes.any()):
        steps = (mine[..., scale_bytes].contiguous().view(torch.int16).int()
                 - reference[..., scale_bytes].contiguous().view(torch.int16).int())
        scale_steps = int(steps.abs().max())
    pages, table, lens = pool(layout, CHECK_LENGTHS, hkv, device, seed=2)
    query = (torch.randn(sum(CHECK_CHUNKS), hq, D, generator=gen) * 2).to(device)
    qsl = torch.tensor([0, *torch.tensor(CHECK_CHUNKS).cumsum(0).tolist()], dtype=torch.int32)
    out, lse = triton_paged.attend(query, pages, table, lens, qsl, layout, D ** -0.5, split_tokens=16)
    out_t, lse_t = paged_attention_torch(query, pages, table, lens, qsl, layout, D ** -0.5)
    result = {"preset": preset, "store_bytes_equal": other_bytes_equal, "store_scale_steps": scale_steps,
              "attend_max_abs_out": float((out - out_t).abs().max()), "attend_max_abs_lse": float((lse - lse_t).abs().max())}
    result["ok"] = (other_bytes_equal and scale_steps <= 1 and result["attend_max_abs_out"] <= 1e-4
                    and result["attend_max_abs_lse"] <= 1e-4)
    return result


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters: int, device: str) -> float:
    """Seconds per call of `fn` over `iters` calls, synchronised around them."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def speed(context: int, batch: int, shapes: dict, preset: str, rounds: int, iters: int, device: str) -> dict:
    """One decode step of one layer: paged codes through Triton vs SDPA over a dense bf16 cache."""
    hq, hkv, D = shapes["hq"], shapes["hkv"], shapes["head_dim"]
    layout = layout_of(preset, D)
    pages, table, lens = pool(layout, [context] * batch, hkv, device, seed=3, store="triton")
    gen = torch.Generator(device=device).manual_seed(4)
    query = torch.randn(batch, hq, D, generator=gen, device=device).bfloat16()
    qsl = torch.arange(batch + 1, dtype=torch.int32)  # on the CPU, as vLLM's metadata holds it
    dense_k = torch.randn(batch, hkv, context, D, generator=gen, device=device).bfloat16()
    dense_v = torch.randn(batch, hkv, context, D, generator=gen, device=device).bfloat16()
    step_k = torch.randn(batch, hkv, D, generator=gen, device=device).bfloat16()
    step_slots = table[:, (context - 1) // BLOCK].long() * BLOCK + (context - 1) % BLOCK  # rewrite the last token

    def triton_attend():
        triton_paged.attend(query, pages, table, lens, qsl, layout, D ** -0.5, max_seq_len=context)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(query[:, :, None], dense_k, dense_v, enable_gqa=True)

    def store():
        triton_paged.write(pages, step_k, step_k, step_slots, layout)

    for fn in (triton_attend, sdpa, store):  # compile and warm up
        fn()
    times = {"triton": [], "sdpa": [], "store": []}
    for r in range(rounds):
        order = [("triton", triton_attend), ("sdpa", sdpa)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(fn, iters, device))
        times["store"].append(timed(store, iters, device))
    ratios = [s / t for t, s in zip(times["triton"], times["sdpa"])]
    return {"context": context, "batch": batch, "preset": preset,
            "triton_ms": 1e3 * statistics.median(times["triton"]), "sdpa_ms": 1e3 * statistics.median(times["sdpa"]),
            "speed_vs_sdpa_median": statistics.median(ratios), "speed_vs_sdpa_min": min(ratios),
            "speed_vs_sdpa_max": max(ratios), "store_ms": 1e3 * statistics.median(times["store"]),
            "paged_bytes": batch * context * hkv * layout.slot_bytes,
            "dense_bf16_bytes": 2 * batch * context * hkv * D * 2}


def csv_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def markdown(record: dict) -> str:
    lines = [f"# Paged kernels: {record['device']}", "", "| preset | store bytes equal | codebook scale steps | "
             "attention max abs (out, lse) | ok |", "|---|---|---|---|---|"]
    for c in record["checks"]:
        lines.append(f"| {c['preset']} | {c['store_bytes_equal']} | {c['store_scale_steps']} | "
                     f"{c['attend_max_abs_out']:.2e}, {c['attend_max_abs_lse']:.2e} | {c['ok']} |")
    lines += ["", f"One decode step of one layer ({record['shapes']}), {record['rounds']} rounds x {record['iters']} "
              "calls; speed = SDPA time / Triton time, median (min..max) over rounds.", "",
              "| context | batch | preset | Triton ms | SDPA bf16 ms | speed vs SDPA | store ms | pool MB | dense bf16 MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in record["speed"]:
        lines.append(f"| {s['context']} | {s['batch']} | {s['preset']} | {s['triton_ms']:.3f} | {s['sdpa_ms']:.3f} | "
                     f"{s['speed_vs_sdpa_median']:.2f} ({s['speed_vs_sdpa_min']:.2f}..{s['speed_vs_sdpa_max']:.2f}) | "
                     f"{s['store_ms']:.3f} | {s['paged_bytes'] / 2**20:.1f} | {s['dense_bf16_bytes'] / 2**20:.1f} |")
    if record["dry_run"]:
        lines += ["", "Dry run (CPU, Triton's interpreter, tiny shapes): the timings mean nothing."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_paged.json and gpu_paged.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton's interpreter, tiny shapes: checks that the script runs (timings mean nothing)")
    parser.add_argument("--contexts", type=csv_ints, default=None,
                        help="stored tokens per request, comma-separated (default 8192,32768; dry run 40)")
    parser.add_argument("--batches", type=csv_ints, default=None, help="requests per step (default 1,16; dry run 2)")
    parser.add_argument("--preset", default="paged-int4", help="the preset timed (default paged-int4)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5; dry run 1)")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing (default 20; dry run 1)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_paged: no CUDA device; run on a GPU or pass --dry-run", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    shapes = TINY if dry else LLAMA_1B
    if args.preset not in servable_presets():
        print(f"gpu_paged: --preset {args.preset!r} is not servable; use one of {', '.join(servable_presets())}",
              file=sys.stderr)
        return 2
    checks = [check(preset, TINY if dry else dict(hq=8, hkv=2, head_dim=shapes["head_dim"]), device)
              for preset in servable_presets()]
    record = {"device": "CPU (Triton interpreter, dry run)" if dry else torch.cuda.get_device_name(0),
              "torch": torch.__version__, "python": platform.python_version(), "dry_run": dry, "shapes": shapes,
              "checks": checks, "speed": []}
    for c in checks:
        print(f"gpu_paged: check {c}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if all(c["ok"] for c in checks):
        record["rounds"] = args.rounds or (1 if dry else 5)
        record["iters"] = args.iters or (1 if dry else 20)
        for context in args.contexts or ([40] if dry else [8192, 32768]):
            for batch in args.batches or ([2] if dry else [1, 16]):
                result = speed(context, batch, shapes, args.preset, record["rounds"], record["iters"], device)
                print(f"gpu_paged: speed {result}", flush=True)
                record["speed"].append(result)
    else:
        record["rounds"] = record["iters"] = 0
    (args.out / "gpu_paged.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "gpu_paged.md").write_text(markdown(record))
    failed = [c["preset"] for c in checks if not c["ok"]]
    if failed:
        print(f"gpu_paged: the Triton paged kernels disagree with the torch path for {', '.join(failed)}; "
              "nothing was timed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
