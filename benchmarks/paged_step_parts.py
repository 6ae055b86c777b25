"""Time the two parts of one layer's decode step in the vLLM plugin, outside vLLM: encoding the new
tokens into their slots (`paged_attention.write_slots`) and the attention through the pages
(`paged_attention`), both compiled, or both in torch with --torch-path.

    python benchmarks/paged_step_parts.py --spec paged-int4 --requests 16 --context 400 --threads 2

Random K/V and queries with the embedded model's shapes (3 KV heads, 9 query heads, head_dim 64,
bf16, blocks of 16 tokens); prints milliseconds per call, the mean over --iters calls after one
warm-up. Exploration only: it measures no quality and chooses nothing.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="paged-int4", help="a paged preset or spec file (default paged-int4)")
    parser.add_argument("--requests", type=int, default=16, help="requests decoding together (default 16)")
    parser.add_argument("--context", type=int, default=400, help="stored tokens per request (default 400)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls (default 50)")
    parser.add_argument("--torch-path", action="store_true", help="time the torch paths instead of the kernels")
    args = parser.parse_args()
    for name in ("requests", "context", "threads", "iters"):
        if getattr(args, name) < 1:
            parser.exit(2, f"--{name} must be at least 1, got {getattr(args, name)}\n")

    from kvcompress.kernels.paged_attention import paged_attention, write_slots
    from kvcompress.paged import PagedLayout
    from kvcompress.presets import load_spec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = PagedLayout.for_spec(load_spec(args.spec), 30, 64, torch.bfloat16).layers[0]
    requests, context, block = args.requests, args.context, 16
    per_request = context // block + 2
    pages = torch.zeros(requests * per_request, 3, block, layout.slot_bytes, dtype=torch.uint8)
    block_table = torch.arange(requests * per_request, dtype=torch.int32).reshape(requests, per_request)
    for r in range(requests):  # every request's first `context` tokens stored
        slots = (block_table[r].long()[:, None] * block + torch.arange(block)).flatten()[:context]
        layout.write(pages, torch.randn(context, 3, 64, dtype=torch.bfloat16),
                     torch.randn(context, 3, 64, dtype=torch.bfloat16), slots)
    query = torch.randn(requests, 9, 64, dtype=torch.bfloat16)
    new = torch.randn(requests, 3, 64, dtype=torch.bfloat16)
    new_slots = block_table[:, context // block].long() * block + context % block
    seq_lens = torch.full((requests,), context + 1)
    starts = torch.arange(requests + 1, dtype=torch.int32)

    def per_call_ms(step) -> float:
        step()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        return 1000 * (time.perf_counter() - start) / args.iters

    write = per_call_ms(lambda: write_slots(pages, new, new, new_slots, layout, use_kernel=not args.torch_path))
    attend = per_call_ms(lambda: paged_attention(query, pages, block_table, seq_lens, starts, layout, 0.125,
                                                 use_kernel=not args.torch_path))
    print(f"{args.spec}, {requests} requests x {context + 1} stored tokens, {args.threads} threads: "
          f"encode {write:.3f} ms, attention {attend:.3f} ms per layer "
          f"({'torch paths' if args.torch_path else 'compiled kernels'})")


if __name__ == "__main__":
    main()
