"""Pools of packed slots filled with random states, for the paged attention kernels' tests (the CPU kernel
and the Triton kernels read the same pools). Does not check anything itself."""

from __future__ import annotations

import torch

from kvcompress.paged import SlotLayout


def fill_pool(layout: SlotLayout, lengths: list[int], chunks: list[int], hq: int, hkv: int, block: int,
              dtype: torch.dtype, gen: torch.Generator, spare_blocks: int, spare_column: bool):
    """(query, pages, block_table, seq_lens, query_start_loc): request r's lengths[r] tokens (random states,
    keys with an outlier channel) written by `layout.write` to a pool of (blocks, hkv, block, slot_bytes)
    whose blocks are handed out in a scrambled order, `spare_blocks` of them owned by no request (and one
    unused block-table column if `spare_column`), and queries (sum(chunks), hq, D) for each request's last
    chunks[r] tokens (seq_lens = lengths: a chunk's own tokens are stored first, as vLLM does)."""
    D = layout.key.head_dim
    per_request = [-(-n // block) for n in lengths]
    order = torch.randperm(sum(per_request) + spare_blocks, generator=gen)
    pages = torch.randint(0, 256, (len(order), hkv, block, layout.slot_bytes), dtype=torch.uint8, generator=gen)
    table = torch.zeros(len(lengths), max(per_request) + int(spare_column), dtype=torch.int32)
    used = 0
    for r, n in enumerate(lengths):
        table[r, :per_request[r]] = order[used:used + per_request[r]]
        used += per_request[r]
        t = torch.arange(n)
        keys = torch.randn(n, hkv, D, generator=gen) * 2
        keys[..., 3] *= 6  # an outlier channel, as keys have
        values = torch.randn(n, hkv, D, generator=gen)
        layout.write(pages, keys.to(dtype), values.to(dtype), table[r, t // block].long() * block + t % block)
    query = (torch.randn(sum(chunks), hq, D, generator=gen) * 2).to(dtype)
    starts = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    return query, pages, table, torch.tensor(lengths, dtype=torch.int32), starts
