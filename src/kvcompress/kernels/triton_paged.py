"""Triton kernels for a paged pool of packed slots (`paged.SlotLayout`): the store and the attention (CUDA).

`write` encodes K/V rows (N, Hkv, D) into their slots, one program per (token, KV head): the bytes of
`SlotLayout.write` (uniform and "none" parts byte-identical; codebook parts the same codes, the fp16 scale
equal or one step away: a float32 sum in another order). A part's rotation is the torch matmul before it.
`attend` returns what `paged_attention.paged_attention_torch` returns, (out (T, Hq, D), lse (T, Hq))
float32, to float tolerance, for every step: one program per (query token, KV head, split of
SPLIT_TOKENS tokens from token 0) decodes codes through the block table with an online softmax for the
token's GQA group; a second kernel merges the splits in order; rotations run row by row. A token's
arithmetic depends only on its query and its request's earlier tokens: the same bits in any chunk or batch.
Prefill is correct, not fast (each query token reads its whole prefix). Not handled (`supports_layout`):
head_dim not a power of two in 8 .. MAX_DIM. Details: docs/gpu.md.
"""

from __future__ import annotations

import functools

import torch

from ..codecs.base import check_finite
from ..codecs.packing import fields
from ..paged import PartLayout, SlotLayout
from .backend import triton_or_none
from .paged_attention import check_lengths
from .triton_pack import _codes

triton, tl, jit = triton_or_none()  # without Triton (an optional extra) this module imports, unusable

METHODS = {"quant": 0, "hadamard+quant": 0, "rotated+codebook": 1, "none": 2}
NONE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_DIM = 256
SPLIT_TOKENS = 512  # tokens per split of a request's keys, cut from token 0 (a multiple of MAX_BLOCK_TOKENS)
MAX_BLOCK_TOKENS = 16  # keys per tile of the attention kernel, at most (see block_tokens)
# the (query heads, keys, head_dim) products of a tile stay within this many elements: compiled for sm_90 at
# ATTEND_WARPS warps, no spills for head_dim 64 / 128 and GQA groups up to 8 (scripts/triton_compile_check.py)
TILE_ELEMENTS = 8192
ATTEND_WARPS = 8
NUM_WARPS = 4  # the other kernels
ROTATE_COLUMNS = 16  # output columns per step of the rotation kernel
_FP16_MAX = 65504.0


# ---- bytes <-> values ----------------------------------------------------------------------------

@jit
def _u16_at(ptr, mask):
    """The little-endian 16-bit words (uint32) at byte pointers `ptr` (any shape)."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint32)
    return lo | (hi << 8)


@jit
def _fp16_at(ptr, mask):
    """float32 of the fp16 values stored at byte pointers `ptr`."""
    return _u16_at(ptr, mask).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@jit
def _value_at(ptr, mask, KIND: tl.constexpr):
    """float32 of the "none" values stored at byte pointers `ptr`: KIND 0 fp32, 1 fp16, 2 bf16."""
    if KIND == 0:
        bits = _u16_at(ptr, mask) | (_u16_at(ptr + 2, mask) << 16)
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 1:
        return _fp16_at(ptr, mask)
    else:
        return (_u16_at(ptr, mask) << 16).to(tl.float32, bitcast=True)


@jit
def _kept(keep, index):
    """A mask shaped like the int tensor `index`: True where the slot index `keep` is >= 0 (Triton's
    interpreter mis-types a scalar mask combined with a tensor one, so the scalar is broadcast first)."""
    return (index * 0 + keep) >= 0


@jit
def _store_fp16(ptr, values, keep):
    """Store fp16 `values` (any shape) little-endian at byte pointers `ptr` if `keep` >= 0."""
    bits = values.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    ok = _kept(keep, bits)
    tl.store(ptr, (bits & 255).to(tl.uint8), mask=ok)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=ok)


@jit
def _store_field(out_ptr, values, keep, N: tl.constexpr, W: tl.constexpr):
    """Pack `values` (N,) int32 of width W byte-planar: byte j = sum_h values[j + h*m] << h*W, m = N*W/8."""
    M: tl.constexpr = N * W // 8
    planes = tl.reshape(values, (8 // W, M))  # value j + h*m at [h, j]
    shifts = tl.arange(0, 8 // W) * W
    byte = tl.sum(planes << shifts[:, None], axis=0)  # fields of one byte do not overlap: sum == or
    j = tl.arange(0, M)
    tl.store(out_ptr + j, byte.to(tl.uint8), mask=_kept(keep, j))


@jit
def _store_codes(out_ptr, codes, keep, D: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
    """Pack the D int32 codes of one vector (`codecs.packing.pack`, fields of widths W1 then W2)."""
    _store_field(out_ptr, codes & ((1 << W1) - 1), keep, D, W1)
    if W2 > 0:
        _store_field(out_ptr + D * W1 // 8, (codes >> W1) & ((1 << W2) - 1), keep, D, W2)


@jit
def _zero_bytes(ptr, start, end, keep, PAD_P: tl.constexpr):
    """Zero the bytes [start, end) after `ptr` (end - start <= PAD_P) if `keep` >= 0."""
    i = start + tl.arange(0, PAD_P)
    tl.store(ptr + i, tl.zeros((PAD_P,), tl.uint8), mask=_kept(keep, i) & (i < end))


# ---- the store kernel ------------------------------------------------------------------------------

@jit
def _store_part(x_ptr, book_ptr, bound_ptr, slot, keep, scale_out_ptr,
                METHOD: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                GROUP: tl.constexpr, NBYTES: tl.constexpr, NBYTES_P: tl.constexpr, N_BOUNDS_P: tl.constexpr):
    """Encode the vector at `x_ptr` into the part bytes at byte pointer `slot` (see PartLayout) if `keep` >= 0."""
    d = tl.arange(0, D)
    CODES: tl.constexpr = D * BITS // 8
    if METHOD == 2:  # "none": the bytes of the values, as given
        i = tl.arange(0, NBYTES_P)
        tl.store(slot + i, tl.load(x_ptr + i, mask=i < NBYTES, other=0), mask=_kept(keep, i) & (i < NBYTES))
    elif METHOD == 1:  # "rotated+codebook": codes of x / rms, one least-squares fp16 scale
        x = tl.load(x_ptr + d)
        rms = tl.sqrt_rn(tl.math.div_rn(tl.sum(x * x, axis=0), D * 1.0))
        u = tl.math.div_rn(x, tl.where(rms > 0, rms, 1.0))
        b = tl.arange(0, N_BOUNDS_P)
        bounds = tl.load(bound_ptr + b, mask=b < (1 << BITS) - 1, other=float("inf"))
        idx = tl.sum((u[:, None] > bounds[None, :]).to(tl.int32), axis=1)  # nearest centroid; ties: the lower
        values = tl.load(book_ptr + idx)
        energy = tl.sum(values * values, axis=0)
        scale = tl.math.div_rn(tl.sum(x * values, axis=0), tl.where(energy > 0, energy, 1.0))
        tl.store(scale_out_ptr, scale)
        _store_codes(slot, idx, keep, D, W1, W2)
        _store_fp16(slot + CODES, scale, keep)
        _zero_bytes(slot, CODES + 2, NBYTES, keep, 2)
    else:  # "quant" / "hadamard+quant": asymmetric uniform codes per group of GROUP channels
        LEVELS: tl.constexpr = (1 << BITS) - 1
        NG: tl.constexpr = D // GROUP
        x = tl.reshape(tl.load(x_ptr + d).to(tl.float32), (NG, GROUP))
        zero = tl.min(x, axis=1).to(tl.float16)  # (NG,)
        zero_f = zero.to(tl.float32)
        scale = tl.math.div_rn(tl.max(x, axis=1) - zero_f, LEVELS * 1.0).to(tl.float16)
        codes = _codes(x, zero_f[:, None], scale.to(tl.float32)[:, None], LEVELS)  # QuantCodec's float32 steps
        _store_codes(slot, tl.reshape(codes, (D,)), keep, D, W1, W2)
        g = tl.arange(0, NG)
        _store_fp16(slot + CODES + 2 * g, scale, keep)
        _store_fp16(slot + CODES + 2 * NG + 2 * g, zero, keep)
        _zero_bytes(slot, CODES + 4 * NG, NBYTES, keep, 2)


@jit
def _store_kernel(k_ptr, v_ptr, pages_ptr, slot_mapping_ptr, k_book, k_bounds, v_book, v_bounds, scales_ptr,
                  H, block_size, slot_bytes,
                  D: tl.constexpr, K_METHOD: tl.constexpr, K_BITS: tl.constexpr, K_W1: tl.constexpr,
                  K_W2: tl.constexpr, K_GROUP: tl.constexpr, K_BYTES: tl.constexpr, K_BYTES_P: tl.constexpr,
                  K_ROW: tl.constexpr,
                  V_METHOD: tl.constexpr, V_BITS: tl.constexpr, V_W1: tl.constexpr, V_W2: tl.constexpr,
                  V_GROUP: tl.constexpr, V_BYTES: tl.constexpr, V_BYTES_P: tl.constexpr, V_ROW: tl.constexpr,
                  N_BOUNDS_P: tl.constexpr, TAIL_P: tl.constexpr):
    n = tl.program_id(0)  # one (token, KV head)
    h = tl.program_id(1)
    slot_index = tl.load(slot_mapping_ptr + n).to(tl.int64)
    safe_index = tl.maximum(slot_index, 0)  # a negative slot is padding: nothing is stored
    block = safe_index // block_size
    slot = pages_ptr + ((block * H + h) * block_size + safe_index % block_size) * slot_bytes
    row = n.to(tl.int64) * H + h
    _store_part(k_ptr + row * K_ROW, k_book, k_bounds, slot, slot_index, scales_ptr + row * 2,
                K_METHOD, D, K_BITS, K_W1, K_W2, K_GROUP, K_BYTES, K_BYTES_P, N_BOUNDS_P)
    _store_part(v_ptr + row * V_ROW, v_book, v_bounds, slot + K_BYTES, slot_index, scales_ptr + row * 2 + 1,
                V_METHOD, D, V_BITS, V_W1, V_W2, V_GROUP, V_BYTES, V_BYTES_P, N_BOUNDS_P)
    _zero_bytes(slot, K_BYTES + V_BYTES, slot_bytes, slot_index, TAIL_P)


# ---- the attention kernels -------------------------------------------------------------------------

@jit
def _load_part(pages_ptr, slot, valid, d, book_ptr, METHOD: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
               W1: tl.constexpr, W2: tl.constexpr, GROUP: tl.constexpr, KIND: tl.constexpr):
    """Stored (still rotated) float32 values (len(slot), len(d)) of the part at byte offsets `slot`."""
    base = pages_ptr + slot[:, None]
    mask = valid[:, None] & (d[None, :] < D)
    if METHOD == 2:
        SIZE: tl.constexpr = 4 if KIND == 0 else 2
        return _value_at(base + d[None, :] * SIZE, mask, KIND)
    M1: tl.constexpr = D * W1 // 8
    code = (tl.load(base + d[None, :] % M1, mask=mask, other=0).to(tl.int32) >> ((d[None, :] // M1) * W1))
    code = code & ((1 << W1) - 1)
    if W2 > 0:
        M2: tl.constexpr = D * W2 // 8
        high = tl.load(base + M1 + d[None, :] % M2, mask=mask, other=0).to(tl.int32) >> ((d[None, :] // M2) * W2)
        code = code | ((high & ((1 << W2) - 1)) << W1)
    CODES: tl.constexpr = D * BITS // 8
    if METHOD == 1:
        scale = _fp16_at(pages_ptr + slot + CODES, valid)  # (len(slot),)
        return tl.load(book_ptr + code, mask=mask, other=0.0) * scale[:, None]
    NG: tl.constexpr = D // GROUP
    at = base + CODES + 2 * (d[None, :] // GROUP)
    return code.to(tl.float32) * _fp16_at(at, mask) + _fp16_at(at + 2 * NG, mask)


@jit
def _attend_kernel(q_ptr, pages_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, token_request_ptr,
                   k_book, v_book, m_ptr, l_ptr, acc_ptr, scale, Hkv, block_size, slot_bytes, table_stride,
                   n_splits,
                   REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                   SPLIT: tl.constexpr,
                   K_METHOD: tl.constexpr, K_BITS: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr,
                   K_GROUP: tl.constexpr, K_KIND: tl.constexpr,
                   V_METHOD: tl.constexpr, V_BITS: tl.constexpr, V_W1: tl.constexpr, V_W2: tl.constexpr,
                   V_GROUP: tl.constexpr, V_KIND: tl.constexpr, V_OFFSET: tl.constexpr):
    i = tl.program_id(0)  # one query token, one KV head (its REP query heads), one split of its keys
    h = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.load(token_request_ptr + i)
    q_first = tl.load(qsl_ptr + r)
    q_count = tl.load(qsl_ptr + r + 1) - q_first
    pos = tl.load(seq_lens_ptr + r) - q_count + (i - q_first)  # the token's position; it reads keys 0 .. pos
    row = tl.arange(0, REP_P)
    d = tl.arange(0, D)
    heads = i.to(tl.int64) * Hkv * REP + h * REP + row  # (REP_P,) flat (token, query head) indices
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=(row[:, None] < REP), other=0.0)
    m_i = tl.full((REP_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, D), tl.float32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, pos + 1)
    table = block_table_ptr + r.to(tl.int64) * table_stride
    for t0 in range(start, end, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        valid = t <= pos
        blk = tl.load(table + t // block_size, mask=valid, other=0).to(tl.int64)
        slot = ((blk * Hkv + h) * block_size + t % block_size) * slot_bytes  # (BLOCK,) byte offsets
        k = _load_part(pages_ptr, slot, valid, d, k_book, K_METHOD, D, K_BITS, K_W1, K_W2, K_GROUP, K_KIND)
        v = _load_part(pages_ptr, slot + V_OFFSET, valid, d, v_book, V_METHOD, D, V_BITS, V_W1, V_W2, V_GROUP,
                       V_KIND)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (REP_P, BLOCK)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: adds nothing
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    at = heads * n_splits + split
    keep = row < REP
    tl.store(m_ptr + at, m_i, mask=keep)
    tl.store(l_ptr + at, l_i, mask=keep)
    tl.store(acc_ptr + at[:, None] * D + d[None, :], acc, mask=keep[:, None])


@jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, lse_ptr, n_splits, REP: tl.constexpr, REP_P: tl.constexpr,
                    D: tl.constexpr):
    x = tl.program_id(0)  # one (query token, KV head): its REP query heads; splits merged in order
    row = tl.arange(0, REP_P)
    keep = row < REP
    heads = x.to(tl.int64) * REP + row  # flat (token, query head) indices
    d = tl.arange(0, D)
    m_all = tl.load(m_ptr + heads * n_splits, mask=keep, other=0.0)  # split 0 holds token 0: finite
    for s in range(1, n_splits):
        m_all = tl.maximum(m_all, tl.load(m_ptr + heads * n_splits + s, mask=keep, other=0.0))
    total = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, D), tl.float32)
    for s in range(n_splits):  # a split after the token's position adds exact zeros
        at = heads * n_splits + s
        weight = tl.exp(tl.load(m_ptr + at, mask=keep, other=0.0) - m_all)
        total = total + weight * tl.load(l_ptr + at, mask=keep, other=1.0)
        acc = acc + weight[:, None] * tl.load(acc_ptr + at[:, None] * D + d[None, :], mask=keep[:, None], other=0.0)
    tl.store(out_ptr + heads[:, None] * D + d[None, :], acc / total[:, None], mask=keep[:, None])
    tl.store(lse_ptr + heads, m_all + tl.log(total), mask=keep)


@jit
def _rotate_kernel(x_ptr, r_ptr, out_ptr, ROWS: tl.constexpr, ROWS_P: tl.constexpr, D: tl.constexpr,
                   COLUMNS: tl.constexpr):
    """out[i] = x[i] @ R (D, D) for the ROWS rows of program i (one token's heads); each row's sums are
    its own, so a row's bits do not depend on the others."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS_P)
    keep = tl.arange(0, ROWS_P) < ROWS
    k = tl.arange(0, D)
    x = tl.load(x_ptr + row[:, None] * D + k[None, :], mask=keep[:, None], other=0.0)  # (ROWS_P, D)
    for c0 in range(0, D, COLUMNS):
        c = c0 + tl.arange(0, COLUMNS)
        rot = tl.load(r_ptr + k[:, None] * D + c[None, :])  # (D, COLUMNS)
        tl.store(out_ptr + row[:, None] * D + c[None, :], tl.sum(x[:, :, None] * rot[None, :, :], axis=1),
                 mask=keep[:, None])


# ---- host side ------------------------------------------------------------------------------------

def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def supports_layout(layout: SlotLayout) -> bool:
    """Whether these kernels serve a layer's slots: power-of-two head_dim in 8 .. MAX_DIM (so its
    quantization groups are powers of two too), "none" parts in float32, float16 or bfloat16."""
    for part in (layout.key, layout.value):
        if part.method == "none" and part.dtype not in NONE_DTYPES:
            return False
    return _power_of_two(layout.key.head_dim) and 8 <= layout.key.head_dim <= MAX_DIM


def block_tokens(rep: int, head_dim: int) -> int:
    """Keys per tile for GQA groups of `rep` query heads: the largest power of two <= MAX_BLOCK_TOKENS with
    padded rep * tile * head_dim <= TILE_ELEMENTS (at least 1). Fixed by the model's shapes, so every call
    of a layer cuts its keys into the same tiles."""
    block = MAX_BLOCK_TOKENS
    while block > 1 and triton.next_power_of_2(rep) * block * head_dim > TILE_ELEMENTS:
        block //= 2
    return block


def _widths(part: PartLayout) -> tuple[int, int]:
    """Widths of the (first, second) bit fields of the part's codes (`codecs.packing.fields`)."""
    if part.method == "none":
        return 0, 0
    widths = [width for width, _ in fields(part.bits)]
    if len(widths) > 2:
        raise ValueError(f"{part.bits}-bit codes have {len(widths)} bit fields; these kernels read at most 2")
    return widths[0], (widths[1] if len(widths) > 1 else 0)


def _part_constants(part: PartLayout, prefix: str) -> dict:
    w1, w2 = _widths(part)
    return {f"{prefix}_METHOD": METHODS[part.method], f"{prefix}_BITS": part.bits, f"{prefix}_W1": w1,
            f"{prefix}_W2": w2, f"{prefix}_GROUP": max(part.group_size, 1)}


@functools.lru_cache(maxsize=256)
def _tables(part: PartLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                             torch.Tensor | None]:
    """(codebook (2**bits,), its decision boundaries, R (D, D) or None, R^T or None), float32 on `device`,
    once per part."""
    if part.method == "rotated+codebook":
        book = part.centroids(device).float().contiguous()
        bounds = ((book[1:] + book[:-1]) / 2).contiguous()  # as CodebookCodec.quantize computes them
    else:
        book = bounds = torch.zeros(1, dtype=torch.float32, device=device)
    rotation = part.rotation(device)
    if rotation is None:
        return book, bounds, None, None
    return book, bounds, rotation.float().contiguous(), rotation.float().T.contiguous()


def _check_range(values: torch.Tensor, what: str) -> None:
    """ValueError (CPU) or a device-side assertion (CUDA) if |values| exceeds the fp16 range."""
    largest = values.abs().amax()
    message = f"{what} exceed the fp16 range in which scales are stored"
    if values.device.type == "cuda":
        torch._assert_async(largest <= _FP16_MAX, message)
    elif float(largest) > _FP16_MAX:
        raise ValueError(f"{message} (up to {float(largest):.3g}); this codec cannot represent them")


def _check_pages(pages: torch.Tensor) -> None:
    """ValueError unless `pages` is a contiguous uint8 (num_blocks, H, block_size, slot_bytes) tensor."""
    if pages.dtype != torch.uint8 or pages.dim() != 4 or not pages.is_contiguous():
        raise ValueError(f"the kernels read pages as a contiguous uint8 (num_blocks, kv_heads, block_size, slot_bytes) "
                         f"tensor, got {pages.dtype} {tuple(pages.shape)} with strides {pages.stride()}")


def _part_input(part: PartLayout, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """What the store kernel reads for one part of states x (N, H, D): the bytes of the values in the
    model dtype ("none"), else float32 states, rotated (x @ R, the torch matmul `PartLayout.encode` does).
    Rows not `kept` (N, 1, 1) bool (padding, never stored) are zeroed first, so that only stored rows are checked."""
    if part.method == "none":
        return x.to(part.dtype).contiguous().view(torch.uint8)
    x = torch.where(kept, x, 0.0)
    check_finite(x)
    y = x.float()
    rotation = _tables(part, x.device)[2]
    if rotation is not None:
        y = y @ rotation
    if part.method != "rotated+codebook":
        _check_range(y, "KV states")
    return y.contiguous()


def write(pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
          layout: SlotLayout) -> None:
    """`layout.write(pages, key, value, slot_mapping)` in one Triton launch (see the module docstring).

    pages: (num_blocks, H, block_size, slot_bytes) uint8; key, value: (N, H, D); slot_mapping: (N,) int,
    negative = padding (not stored). Raises ValueError for non-finite states or codebook scales beyond
    fp16 on CPU tensors; on CUDA those are device-side assertions (no host synchronisation).
    """
    N, H, D = key.shape
    _check_pages(pages)
    if N == 0:
        return
    block_size, slot_bytes = pages.shape[2], pages.shape[3]
    kept = (slot_mapping >= 0)[:, None, None]
    k_in, v_in = _part_input(layout.key, key, kept), _part_input(layout.value, value, kept)
    k_book, k_bounds = _tables(layout.key, key.device)[:2]
    v_book, v_bounds = _tables(layout.value, key.device)[:2]
    codebook = "rotated+codebook" in (layout.key.method, layout.value.method)
    # the codebook scales the kernel computes (K, V), for the fp16 range check; written only for codebook parts
    scales = torch.zeros((N, H, 2) if codebook else (1,), dtype=torch.float32, device=key.device)
    tail = slot_bytes - layout.key.nbytes - layout.value.nbytes
    _store_kernel[(N, H)](
        k_in, v_in, pages, slot_mapping.contiguous(), k_book, k_bounds, v_book, v_bounds, scales,
        H, block_size, slot_bytes, D=D,
        **_part_constants(layout.key, "K"), K_BYTES=layout.key.nbytes,
        K_BYTES_P=triton.next_power_of_2(layout.key.nbytes), K_ROW=k_in.shape[-1],
        **_part_constants(layout.value, "V"), V_BYTES=layout.value.nbytes,
        V_BYTES_P=triton.next_power_of_2(layout.value.nbytes), V_ROW=v_in.shape[-1],
        N_BOUNDS_P=16, TAIL_P=triton.next_power_of_2(max(tail, 1)), num_warps=NUM_WARPS)
    if codebook:  # padding rows were zeroed: their scales are 0
        _check_range(scales, "KV states (codebook scales)")


def _rotate_rows(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) float32 @ rotation (D, D), row by row (`_rotate_kernel`, one program per token)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    T, H, D = x.shape
    if x.numel():
        _rotate_kernel[(T,)](x, rotation.contiguous(), out, ROWS=H, ROWS_P=triton.next_power_of_2(H), D=D,
                             COLUMNS=min(ROTATE_COLUMNS, D))
    return out


def attend(query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor, layout: SlotLayout, scale: float, max_seq_len: int | None = None,
           split_tokens: int = SPLIT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_attention.paged_attention` in Triton (arguments and results as there).

    Args:
        max_seq_len: max(seq_lens), if the caller knows it (read from `seq_lens` otherwise: a host
            synchronisation when `seq_lens` lives on the GPU; vLLM's metadata holds it on the CPU).
        split_tokens: tokens per split (a multiple of MAX_BLOCK_TOKENS); the default for every call of a
            process, or a token's bits depend on the call (tests use small ones).
    """
    if split_tokens % MAX_BLOCK_TOKENS:
        raise ValueError(f"split_tokens must be a multiple of {MAX_BLOCK_TOKENS}, got {split_tokens}")
    T, hq, D = query.shape
    _check_pages(pages)
    check_lengths(seq_lens, query_start_loc)
    device = query.device
    hkv, block_size, slot_bytes = pages.shape[1], pages.shape[2], pages.shape[3]
    out = torch.empty(T, hq, D, dtype=torch.float32, device=device)
    lse = torch.empty(T, hq, dtype=torch.float32, device=device)
    if T == 0:
        return out, lse
    rep = hq // hkv
    longest = int(seq_lens.max()) if max_seq_len is None else max_seq_len  # no synchronisation for CPU seq_lens
    seq_lens = seq_lens.to(device=device, dtype=torch.int32)
    qsl = query_start_loc.to(device=device, dtype=torch.int32)
    token_request = torch.searchsorted(qsl[1:], torch.arange(T, device=device, dtype=torch.int32), right=True)
    n_splits = max(1, -(-longest // split_tokens))
    k_book, _, k_rotation, _ = _tables(layout.key, device)
    v_book, _, _, v_rotation_t = _tables(layout.value, device)
    q = query.float().contiguous()
    if k_rotation is not None:
        q = _rotate_rows(q, k_rotation)  # q . k = (q @ R_K) . stored_k
    m = torch.empty(T, hq, n_splits, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    acc = torch.empty(T, hq, n_splits, D, dtype=torch.float32, device=device)
    table = block_table.to(device=device, dtype=torch.int32).contiguous()
    kinds = {"K_KIND": NONE_DTYPES.get(layout.key.dtype, 0), "V_KIND": NONE_DTYPES.get(layout.value.dtype, 0)}
    _attend_kernel[(T, hkv, n_splits)](
        q, pages, table, seq_lens, qsl, token_request.to(torch.int32), k_book, v_book,
        m, l, acc, float(scale), hkv, block_size, slot_bytes, table.stride(0),
        n_splits, REP=rep, REP_P=triton.next_power_of_2(rep), D=D, BLOCK=block_tokens(rep, D), SPLIT=split_tokens,
        **_part_constants(layout.key, "K"), **_part_constants(layout.value, "V"), **kinds,
        V_OFFSET=layout.value_offset, num_warps=ATTEND_WARPS)
    _combine_kernel[(T * hkv,)](m, l, acc, out, lse, n_splits, REP=rep, REP_P=triton.next_power_of_2(rep), D=D)
    if v_rotation_t is not None:
        out = _rotate_rows(out, v_rotation_t)  # p @ V = (p @ stored_v) @ R_V^T
    return out, lse
