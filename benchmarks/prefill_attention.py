"""Time one layer's prefill attention of one long prompt in the vLLM plugin, outside vLLM, against the same
bf16 queries, keys and values in torch's SDPA and (in the vLLM environment) vLLM's own CPU attention.

    .venv-vllm/bin/python benchmarks/prefill_attention.py --spec paged-int4 --tokens 1920 --threads 1

The prompt's K/V are written into a paged pool (blocks of --block tokens) and its --tokens queries attend,
as one chunk, to every stored token up to their own (the plugin reads them all from codes, its own chunk
included); auto and SDPA attend to the bf16 K/V. The embedded model's shapes (3 KV heads, 9 query heads,
head_dim 64), random states. Prints milliseconds per call (the best of --iters calls after one warm-up:
a shared machine disturbs the mean more than the minimum), GFLOP/s of the causal attention
(4 * D flops per query head and attended token), and the encoding of the chunk's K/V into slots.
Exploration only: it measures no quality and chooses nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

HQ, HKV, D = 9, 3, 64


def best_ms(step, iters: int) -> float:
    step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def vllm_attention(query, key, value, block: int):
    """A function running vLLM's CPU attention (its `vec` or `amx` path, as CPU_ATTN picks) on the bf16
    states stored in its own paged pool, or None outside the vLLM environment."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return None
    t = query.shape[0]
    n_blocks = -(-t // block)
    isa = _get_attn_isa(torch.bfloat16, block, D)
    kv = torch.zeros(n_blocks, HKV, 2 * block, D, dtype=torch.bfloat16)
    key_cache, value_cache = kv.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(t, dtype=torch.int64), isa)
    seq_lens = torch.tensor([t], dtype=torch.int32)
    starts = torch.tensor([0, t], dtype=torch.int32)
    table = torch.arange(n_blocks, dtype=torch.int32)[None]
    output = torch.empty_like(query)

    def run():
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=seq_lens, dtype=torch.bfloat16,
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
    parser.add_argument("--block", type=int, default=128, help="tokens per block (default 128, vLLM's CPU default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls (default 3)")
    args = parser.parse_args()
    for name in ("tokens", "block", "threads", "iters"):
        if getattr(args, name) < 1:
            parser.exit(2, f"--{name} must be at least 1, got {getattr(args, name)}\n")

    from kvcompress.kernels.paged_attention import paged_attention, write_slots
    from kvcompress.paged import PagedLayout
    from kvcompress.presets import load_spec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = PagedLayout.for_spec(load_spec(args.spec), 30, D, torch.bfloat16).layers[0]
    t, block = args.tokens, args.block
    n_blocks = -(-t // block)
    pages = torch.zeros(n_blocks, HKV, block, layout.slot_bytes, dtype=torch.uint8)
    table = torch.arange(n_blocks, dtype=torch.int32)[None]
    key, value = (torch.randn(t, HKV, D, dtype=torch.bfloat16) for _ in range(2))
    query = torch.randn(t, HQ, D, dtype=torch.bfloat16)
    slots = torch.arange(t)
    seq_lens, starts = torch.tensor([t], dtype=torch.int32), torch.tensor([0, t], dtype=torch.int32)
    flops = 4 * D * HQ * t * (t + 1) / 2

    rows = []
    write_ms = best_ms(lambda: write_slots(pages, key, value, slots, layout, use_kernel=True), args.iters)
    rows.append(("plugin: encode the chunk's K/V into slots", write_ms, None))
    rows.append(("plugin: attention from codes (compiled kernel)",
                 best_ms(lambda: paged_attention(query, pages, table, seq_lens, starts, layout, D ** -0.5,
                                                 use_kernel=True), args.iters), flops))
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # (1, H, T, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows.append(("torch SDPA, bf16", best_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), args.iters), flops))
    qf, kf, vf = q.float(), k.float(), v.float()
    rows.append(("torch SDPA, float32",
                 best_ms(lambda: sdpa(qf, kf, vf, is_causal=True, enable_gqa=True), args.iters), flops))
    found = vllm_attention(query, key, value, block)
    if found is not None:
        run, isa = found
        rows.append((f"vLLM CPU_ATTN ({isa}), bf16 pool", best_ms(run, args.iters), flops))
    print(f"{args.spec}, one prompt of {t} tokens as one chunk, {HQ} query / {HKV} KV heads, head_dim {D}, "
          f"{args.threads} thread(s), best of {args.iters}:")
    for name, ms, f in rows:
        print(f"  {name:50s} {ms:9.2f} ms" + (f"  {f / ms / 1e6:6.1f} GFLOP/s" if f else ""))


if __name__ == "__main__":
    main()
