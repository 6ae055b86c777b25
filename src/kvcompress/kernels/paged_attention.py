"""Attention over a paged pool of packed slots (`kvcompress.paged`), in torch: the seam for paged kernels.

`paged_attention` gives every query token of request r the softmax attention over the first
`context_lens[r]` tokens stored in r's pages, read from their codes a few blocks at a time (online
softmax; never a dense copy of a whole sequence), with its log-sum-exp. `chunk_attention` is the
causal attention of a forward chunk over its own full-precision K/V, and `merge_attention` joins the
two: the serving protocol (a chunk attends to itself in full precision, to earlier tokens through
their codes). With `use_kernel=True` the compiled CPU kernel (`cpu_paged`) replaces
`paged_attention_torch` where it applies, with the same arguments and results.
Shapes: T query tokens, Hq query heads, Hkv KV heads (query head h reads KV head h // (Hq / Hkv)), D.
"""

from __future__ import annotations

import torch

from ..paged import SlotLayout
from . import cpu_paged


def paged_attention(query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, layout: SlotLayout, scale: float, use_kernel: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its request's stored tokens, and its log-sum-exp.

    Args:
        query: (T, Hq, D) queries; request r's are rows query_start_loc[r]:query_start_loc[r+1].
        pages: (num_blocks, Hkv, block_size, slot_bytes) uint8, one layer's pool.
        block_table: (R, max_blocks) int; token t of request r is row t % block_size of block
            block_table[r, t // block_size].
        context_lens: (R,) int; tokens of request r stored before its chunk (all precede its queries).
        query_start_loc: (R + 1,) int.
        layout: the layer's `SlotLayout`.
        scale: the softmax scale (1 / sqrt(D) for most models).
        use_kernel: run the compiled CPU kernel (`cpu_paged.attend`) where it applies (CPU tensors,
            the extension built); the torch path otherwise.

    Returns:
        out (T, Hq, D) float32 (0 for a request with no stored tokens) and lse (T, Hq) float32, the
        natural log of the softmax denominator (-inf for a request with no stored tokens).
    """
    if use_kernel:
        result = cpu_paged.attend(query, pages, block_table, context_lens, query_start_loc, layout, scale)
        if result is not None:
            return result
    return paged_attention_torch(query, pages, block_table, context_lens, query_start_loc, layout, scale)


def _by_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(t, Hq, D) -> (Hkv, Hq / Hkv * t, D): the queries that read each KV head."""
    t, hq, d = x.shape
    return x.reshape(t, kv_heads, hq // kv_heads, d).permute(1, 2, 0, 3).reshape(kv_heads, -1, d)


def _by_query_head(x: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of `_by_kv_head`: (Hkv, Hq / Hkv * t, ...) -> (t, Hq, ...)."""
    kv_heads, m = x.shape[:2]
    rest = x.shape[2:]
    return x.reshape(kv_heads, m // t, t, *rest).movedim(2, 0).reshape(t, kv_heads * (m // t), *rest)


def paged_attention_torch(query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                          context_lens: torch.Tensor, query_start_loc: torch.Tensor, layout: SlotLayout, scale: float,
                          blocks_per_step: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_attention` in torch, request by request, `blocks_per_step` blocks decoded at a time.

    Works in the stored (rotated) space: keys are never un-rotated (q.k = (q @ R_K).stored_k) and the
    output is un-rotated once (p @ V = (p @ stored_v) @ R_V^T).
    """
    T, hq, d = query.shape
    kv_heads, block_size = pages.shape[1], pages.shape[2]
    out = torch.zeros(T, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.full((T, hq), float("-inf"), dtype=torch.float32, device=query.device)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    key_rotation, value_rotation = layout.key.rotation(query.device), layout.value.rotation(query.device)
    for r, stored in enumerate(lens):
        first, last = starts[r], starts[r + 1]
        if stored <= 0 or last <= first:
            continue
        q = _by_kv_head(query[first:last].float(), kv_heads)  # (Hkv, M, D)
        if key_rotation is not None:
            q = q @ key_rotation
        running_max = torch.full(q.shape[:2], float("-inf"), device=q.device)  # (Hkv, M)
        total = torch.zeros(q.shape[:2], device=q.device)
        acc = torch.zeros_like(q)  # (Hkv, M, D), in the stored space of V
        n_blocks = -(-stored // block_size)
        for b0 in range(0, n_blocks, blocks_per_step):
            b1 = min(b0 + blocks_per_step, n_blocks)
            n = min(stored, b1 * block_size) - b0 * block_size
            slots = pages[block_table[r, b0:b1].long()].transpose(0, 1).flatten(1, 2)[:, :n]  # (Hkv, n, slot)
            k_part, v_part = layout.split(slots)
            keys, values = layout.key.decode_stored(k_part), layout.value.decode_stored(v_part)  # (Hkv, n, D)
            scores = (q @ keys.transpose(1, 2)) * scale  # (Hkv, M, n)
            new_max = torch.maximum(running_max, scores.amax(dim=-1))
            weights = torch.exp(scores - new_max[..., None])
            correction = torch.exp(running_max - new_max)
            total = total * correction + weights.sum(dim=-1)
            acc = acc * correction[..., None] + weights @ values
            running_max = new_max
        result = acc / total[..., None]
        if value_rotation is not None:
            result = result @ value_rotation.T
        t = last - first
        out[first:last] = _by_query_head(result, t)
        lse[first:last] = _by_query_head(running_max + torch.log(total), t)
    return out, lse


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each request's chunk over its own full-precision keys and values.

    Args:
        query: (T, Hq, D); key, value: (T, Hkv, D), request r's rows query_start_loc[r]:query_start_loc[r+1].

    Returns:
        out (T, Hq, D) float32 and lse (T, Hq) float32 (every query sees at least itself).
    """
    T, hq, d = query.shape
    kv_heads = key.shape[1]
    out = torch.zeros(T, hq, d, dtype=torch.float32, device=query.device)
    lse = torch.zeros(T, hq, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for first, last in zip(starts[:-1], starts[1:]):
        t = last - first
        if t <= 0:
            continue
        q = _by_kv_head(query[first:last].float(), kv_heads).reshape(kv_heads, -1, t, d)  # (Hkv, rep, t, D)
        k = key[first:last].float().transpose(0, 1)[:, None]  # (Hkv, 1, t, D)
        v = value[first:last].float().transpose(0, 1)[:, None]
        scores = (q @ k.transpose(-1, -2)) * scale  # (Hkv, rep, t, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)  # (Hkv, rep, t)
        result = torch.exp(scores - chunk_lse[..., None]) @ v  # (Hkv, rep, t, D)
        out[first:last] = _by_query_head(result.reshape(kv_heads, -1, d), t)
        lse[first:last] = _by_query_head(chunk_lse.reshape(kv_heads, -1), t)
    return out, lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                    ) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's (out, lse).

    out_*: (T, Hq, D) float32, lse_*: (T, Hq) float32 (-inf for an empty set; not both empty).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
