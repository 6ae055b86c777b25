"""Time one layer's prefill attention of one long prompt in the vLLM plugin, outside vLLM, against the same
bf16 queries, keys and values in torch's SDPA and (in the vLLM environment) vLLM's own CPU attention.

    .venv-vllm/bin/python benchmarks/prefill_attention.py --spec paged-int4 --tokens 1920 --threads 1

--requests prompts' K/V are written into a paged pool (blocks of --block tokens) and their --tokens queries
each attend, in one call (a prefill step of --requests whole prompts), to every stored token up to their own (the plugin reads them all from codes, its own chunk
included); auto and SDPA attend to the bf16 K/V. The embedded model's shapes (3 KV heads, 9 query heads,
head_dim 64), random states. Prints milliseconds per call, wall and CPU time (each the least of --iters calls after one warm-up:
a shared machine disturbs the mean more than the minimum; with --threads 1 on a loaded machine the CPU
time is the steadier figure, with more threads it includes their spin-waits), GFLOP/s by wall time of the causal attention
(4 * D flops per query head and attended token), and the encoding of the chunk's K/V into slots.
Exploration only: it measures no quality and chooses nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

HQ, HKV, D = 9, 3, 64


def best_ms(step, iters: int) -> tuple[float, float]:
    """(wall, CPU time of the process) in ms, each the least of `iters` calls after a warm-up."""
    step()
    walls, cpus = [], []
    for _ in range(iters):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return 1000 * min(walls), 1000 * min(cpus)


def vllm_attention(query, key, value, block: int, requests: int):
    """A function running vLLM's CPU attention (its `vec` or `amx` path, as CPU_ATTN picks) on the bf16
    states stored in its own paged pool, or None outside the vLLM environment."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return None
    t = query.shape[0] // requests
    n_blocks = -(-t // block)
    isa = _get_attn_isa(torch.bfloat16, block, D)
    kv = torch.zeros(requests * n_blocks, HKV, 2 * block, D, dtype=torch.bfloat16)
    key_cache, value_cache = kv.chunk(2, dim=2)
    table = torch.arange(requests * n_blocks, dtype=torch.int32).reshape(requests, n_blocks)
    slots = (table.long()[:, :, None] * block + torch.arange(block)).flatten(1)[:, :t].flatten()
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    seq_lens = torch.full((requests,), t, dtype=torch.int32)
    starts = torch.arange(requests + 1, dtype=torch.int32) * t
    output = torch.empty_like(query)

    def run():
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=requests, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=seq_lens, dtype=torch.bfloat16,
            query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True)
        ops.cpu_attention_with_kv_cache(query=query, key_cache=key_cache, value_cache=value_cache, output=output,
                                        query_start_loc=starts, seq_lens=seq_lens, scale=D ** -0.5, causal=True,
                                        alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
                                        scheduler_metadata=metadata, s_aux=None)
    return run, isa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="paged-int4", help="a paged preset or spec file (default paged-int4)")
    parser.add_argument("--tokens", type=int, default=1920, help="prompt tokens, one chunk (default 1920)")
    parser.add_argument("--requests", type=int, default=1, help="prompts in the call (default 1)")
    parser.add_argument("--block", type=int, default=128, help="tokens per block (default 128, vLLM's CPU default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls (default 3)")
    args = parser.parse_args()
    for name in ("tokens", "requests", "block", "threads", "iters"):
        if getattr(args, name) < 1:
            parser.exit(2, f"--{name} must be at least 1, got {getattr(args, name)}\n")

    from kvcompress.kernels.paged_attention import paged_attention, write_slots
    from kvcompress.paged import PagedLayout
    from kvcompress.presets import load_spec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = PagedLayout.for_spec(load_spec(args.spec), 30, D, torch.bfloat16).layers[0]
    t, block, requests = args.tokens, args.block, args.requests
    n_blocks = -(-t // block)
    pages = torch.zeros(requests * n_blocks, HKV, block, layout.slot_bytes, dtype=torch.uint8)
    table = torch.arange(requests * n_blocks, dtype=torch.int32).reshape(requests, n_blocks)
    key, value = (torch.randn(requests * t, HKV, D, dtype=torch.bfloat16) for _ in range(2))
    query = torch.randn(requests * t, HQ, D, dtype=torch.bfloat16)
    slots = (table.long()[:, :, None] * block + torch.arange(block)).flatten(1)[:, :t].flatten()
    seq_lens = torch.full((requests,), t, dtype=torch.int32)
    starts = torch.arange(requests + 1, dtype=torch.int32) * t
    flops = 4 * D * HQ * requests * t * (t + 1) / 2

    rows = []
    write_ms = best_ms(lambda: write_slots(pages, key, value, slots, layout, use_kernel=True), args.iters)
    rows.append(("plugin: encode the chunk's K/V into slots", write_ms, None))
    rows.append(("plugin: attention from codes (compiled kernel)",
                 best_ms(lambda: paged_attention(query, pages, table, seq_lens, starts, layout, D ** -0.5,
                                                 use_kernel=True), args.iters), flops))
    q, k, v = (x.unflatten(0, (requests, t)).transpose(1, 2) for x in (query, key, value))  # (R, H, T, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows.append(("torch SDPA, bf16", best_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), args.iters), flops))
    qf, kf, vf = q.float(), k.float(), v.float()
    rows.append(("torch SDPA, float32",
                 best_ms(lambda: sdpa(qf, kf, vf, is_causal=True, enable_gqa=True), args.iters), flops))
    found = vllm_attention(query, key, value, block, requests)
    if found is not None:
        run, isa = found
        rows.append((f"vLLM CPU_ATTN ({isa}), bf16 pool", best_ms(run, args.iters), flops))
    print(f"{args.spec}, {requests} prompt(s) of {t} tokens in one call, {HQ} query / {HKV} KV heads, head_dim {D}, "
          f"{args.threads} thread(s), best of {args.iters}:")
    for name, (ms, cpu_ms), f in rows:
        print(f"  {name:48s} {ms:9.2f} ms wall {cpu_ms:9.2f} ms CPU" + (f"  {f / ms / 1e6:6.1f} GFLOP/s" if f else ""))


if __name__ == "__main__":
    main()
