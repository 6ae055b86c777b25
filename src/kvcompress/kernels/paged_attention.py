"""Attention over a paged pool of packed slots (`kvcompress.paged`): the torch reference and the seam.

`paged_attention` gives every query token the causal softmax attention over its request's tokens
as stored in the pages, itself included: the serving protocol writes a forward chunk's K/V into
its slots first, then every token, the chunk's own ones too, is read from its codes through the
block table (a few blocks at a time with an online softmax; never a dense copy of a sequence). So
a token's output does not depend on how the engine chunked or scheduled its request, on either path:
`paged_attention_torch` (readable, any device) or, with `use_kernel=True`, the compiled CPU kernel
(`cpu_paged`, every step) where it applies. The two agree to float tolerance, not bit for bit: a
caller that needs chunk independence (the vLLM backend) picks one path per layer and keeps it.
Shapes: T query tokens, Hq query heads, Hkv KV heads (query head h reads KV head h // (Hq / Hkv)), D.
"""

from __future__ import annotations

import torch

from ..paged import SlotLayout
from . import cpu_paged


# torch's CPU matmul rounds a product of 1-3 rows differently from one of 4 or more (measured: 5e-6 in q.k,
# float32); with at least 4 query rows per KV head a token's scores do not depend on its chunk's length.
MIN_ROWS = 4


def paged_attention(query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, layout: SlotLayout, scale: float, use_kernel: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each query over its request's stored tokens up to and including its own.

    Args:
        query: (T, Hq, D) queries; request r's are rows query_start_loc[r]:query_start_loc[r+1], the
            last q_r = query_start_loc[r+1] - query_start_loc[r] of its seq_lens[r] tokens: query i
            sits at position seq_lens[r] - q_r + i and attends to stored tokens 0 .. that position.
        pages: (num_blocks, Hkv, block_size, slot_bytes) uint8, one layer's pool, the queries' own
            tokens already written.
        block_table: (R, max_blocks) int; token t of request r is row t % block_size of block
            block_table[r, t // block_size].
        seq_lens: (R,) int, tokens of request r stored so far (>= q_r).
        query_start_loc: (R + 1,) int.
        layout: the layer's `SlotLayout`.
        scale: the softmax scale (1 / sqrt(D) for most models).
        use_kernel: run the compiled CPU kernel (`cpu_paged.attend`) where it applies; calls it
            declines (`cpu_paged.available` is False for them), the torch path.

    Returns:
        out (T, Hq, D) float32 and lse (T, Hq) float32, the natural log of each softmax denominator.
    """
    check_lengths(seq_lens, query_start_loc)
    if use_kernel:
        result = cpu_paged.attend(query, pages, block_table, seq_lens, query_start_loc, layout, scale)
        if result is not None:
            return result
    return paged_attention_torch(query, pages, block_table, seq_lens, query_start_loc, layout, scale)


def write_slots(pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                layout: SlotLayout, use_kernel: bool = False) -> None:
    """`layout.write(pages, key, value, slot_mapping)`: through the compiled CPU encoder (`cpu_paged.write`,
    the same bytes) with `use_kernel` where it applies, else in torch. Shapes as `SlotLayout.write`."""
    if not (use_kernel and cpu_paged.write(pages, key, value, slot_mapping, layout)):
        layout.write(pages, key, value, slot_mapping)


def check_lengths(seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> None:
    """ValueError unless every request has at least as many stored tokens as queries."""
    queries = (query_start_loc[1:] - query_start_loc[:-1]).cpu()
    short = (queries > 0) & (seq_lens.cpu() < queries)
    if bool(short.any()):
        r = int(short.nonzero()[0, 0])
        raise ValueError(f"request {r} has {int(queries[r])} queries but only {int(seq_lens[r])} stored tokens; its "
                         "own tokens must be written to the pages before attention")


def _by_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(t, Hq, D) -> (Hkv, Hq / Hkv * t, D): the queries that read each KV head (row m is token m % t)."""
    t, hq, d = x.shape
    return x.reshape(t, kv_heads, hq // kv_heads, d).permute(1, 2, 0, 3).reshape(kv_heads, -1, d)


def _by_query_head(x: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of `_by_kv_head`: (Hkv, Hq / Hkv * t, ...) -> (t, Hq, ...)."""
    kv_heads, m = x.shape[:2]
    rest = x.shape[2:]
    return x.reshape(kv_heads, m // t, t, *rest).movedim(2, 0).reshape(t, kv_heads * (m // t), *rest)


def paged_attention_torch(query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, query_start_loc: torch.Tensor, layout: SlotLayout, scale: float,
                          blocks_per_step: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_attention` in torch, request by request, `blocks_per_step` blocks decoded at a time.

    Works in the stored (rotated) space: keys are never un-rotated (q.k = (q @ R_K).stored_k) and the
    output is un-rotated once (p @ V = (p @ stored_v) @ R_V^T). Blocks are visited from the first in
    groups of `blocks_per_step` blocks, each zero-padded to its full width, whatever chunk a query came
    in; a group's tokens after a query (and the padding) are masked out, and fewer than MIN_ROWS query
    rows are padded: every sum has the same shape and terms, so a token's output is the same, bit for
    bit, in whatever chunk it comes (tested).
    """
    check_lengths(seq_lens, query_start_loc)
    T, hq, d = query.shape
    kv_heads, block_size = pages.shape[1], pages.shape[2]
    out = torch.zeros(T, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.full((T, hq), float("-inf"), dtype=torch.float32, device=query.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    key_rotation, value_rotation = layout.key.rotation(query.device), layout.value.rotation(query.device)
    for r, stored in enumerate(lens):
        first, last = starts[r], starts[r + 1]
        t = last - first
        if t <= 0:
            continue
        q = _by_kv_head(query[first:last].float(), kv_heads)  # (Hkv, M, D), M = Hq / Hkv * t
        rows = q.shape[1]
        if rows < MIN_ROWS:  # zero rows, dropped below: a decode step takes a chunk's matmul path
            q = torch.cat([q, q.new_zeros(kv_heads, MIN_ROWS - rows, d)], dim=1)
        if key_rotation is not None:
            q = q @ key_rotation
        first_pos = stored - t
        q_pos = first_pos + torch.arange(q.shape[1], device=q.device) % t  # (M,) position of each query row
        running_max = torch.full(q.shape[:2], float("-inf"), device=q.device)  # (Hkv, M)
        total = torch.zeros(q.shape[:2], device=q.device)
        acc = torch.zeros_like(q)  # (Hkv, M, D), in the stored space of V
        n_blocks = -(-stored // block_size)
        width = blocks_per_step * block_size  # every group this wide (zero-padded): the same sums in any chunk
        for b0 in range(0, n_blocks, blocks_per_step):
            b1 = min(b0 + blocks_per_step, n_blocks)
            n = min(stored, b1 * block_size) - b0 * block_size
            slots = pages[block_table[r, b0:b1].long()].transpose(0, 1).flatten(1, 2)[:, :n]  # (Hkv, n, slot)
            k_part, v_part = layout.split(slots)
            keys, values = layout.key.decode_stored(k_part), layout.value.decode_stored(v_part)  # (Hkv, n, D)
            if n < width:
                keys, values = (torch.cat([x, x.new_zeros(kv_heads, width - n, d)], dim=1) for x in (keys, values))
            scores = (q @ keys.transpose(1, 2)) * scale  # (Hkv, M, width)
            if b0 * block_size + width - 1 > first_pos:  # the group reaches into the chunk or the padding
                k_pos = b0 * block_size + torch.arange(width, device=q.device)
                scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
            # every query sees token 0 in the first group, so running_max is finite from then on
            new_max = torch.maximum(running_max, scores.amax(dim=-1))
            weights = torch.exp(scores - new_max[..., None])
            correction = torch.exp(running_max - new_max)
            total = total * correction + weights.sum(dim=-1)
            acc = acc * correction[..., None] + weights @ values
            running_max = new_max
        result = acc[:, :rows] / total[:, :rows, None]
        if value_rotation is not None:
            result = result @ value_rotation.T
        out[first:last] = _by_query_head(result, t)
        lse[first:last] = _by_query_head(running_max[:, :rows] + torch.log(total[:, :rows]), t)
    return out, lse
