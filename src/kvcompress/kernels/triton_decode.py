"""Split-K ("flash-decoding", Dao et al. 2023) attention of one decode step over packed codes, in Triton.

Computes what `kernels.reference.attend_compressed` computes for a layer whose K and V codecs are
uniform quantizers (2/3/4/8 bits, any axis) with post-RoPE keys, in three launches: partial
softmaxes over tiles of codes (grid batch * kv_heads x splits, codes unpacked and dequantized in
registers), over the full-precision sinks and window, then their merge. One online softmax instead
of one softmax: results agree with torch to float32 rounding (tested), not bit for bit. No host
synchronisation. Not handled (the caller uses torch): several query tokens, pre-RoPE keys, rotated
or low-rank codecs, soft-capping, learned sink logits. Details: docs/gpu.md.
"""

from __future__ import annotations

import torch

from .backend import triton_or_none
from .fields import TOKEN_ROW_TOKENS, field_widths

triton, tl, jit = triton_or_none()  # without Triton (an optional extra) this module imports, unusable

PROGRAMS_PER_SM = 4  # splits are chosen so that about this many programs run per streaming multiprocessor
NUM_WARPS = 8  # warps per program of the two partial kernels
# Tokens per tile: the largest power of two (at most MAX_BLOCK_T) with
# padded query heads * tile * padded head_dim <= TILE_ELEMENTS, the size of the (heads, tokens,
# dims) products the online softmax forms in registers; at 8 warps this compiles without
# register spills for head_dim 64 and 128 and GQA groups up to 8 (benchmarks/kernel_registers.py).
TILE_ELEMENTS = 8192
MAX_BLOCK_T = 64


@jit
def _decode_tile(codes_ptr, row_stride, scale_ptr, zero_ptr, stat_stride, t, d, valid,
                 D: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, ROW: tl.constexpr,
                 GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """Decoded float32 states (len(t), len(d)) of compressed tokens t and channels d of one head."""
    i = (t % ROW)[:, None] * D + d[None, :]  # code index inside its packed row
    base = codes_ptr + (t // ROW).to(tl.int64)[:, None] * row_stride
    M1: tl.constexpr = ROW * D * W1 // 8
    code = (tl.load(base + i % M1, mask=valid, other=0).to(tl.int32) >> ((i // M1) * W1)) & ((1 << W1) - 1)
    if W2 > 0:
        M2: tl.constexpr = ROW * D * W2 // 8
        high = (tl.load(base + M1 + i % M2, mask=valid, other=0).to(tl.int32) >> ((i // M2) * W2)) & ((1 << W2) - 1)
        code = code | (high << W1)
    if PER_CHANNEL:
        at = (t // GROUP).to(tl.int64)[:, None] * stat_stride + d[None, :]
    else:
        at = t.to(tl.int64)[:, None] * stat_stride + (d // GROUP)[None, :]
    scale = tl.load(scale_ptr + at, mask=valid, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + at, mask=valid, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@jit
def _online_step(q, k, v, bias, m_i, l_i, acc):
    """Fold one tile into the running softmax state.

    q (REP, D) scaled queries; k (T, D), v (T, DV) float32; bias (T,) additive (-inf = not attended).
    m_i, l_i (REP,) running max and sum; acc (REP, DV) running weighted sum of values.
    """
    s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) + bias[None, :]  # (REP, T)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile adds nothing
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@jit
def _bias(mask_ptr, mask_stride_b, b, pos, valid, HAS_MASK: tl.constexpr):
    """Additive bias (len(pos),): the mask row at positions `pos`, -inf where not `valid`."""
    if HAS_MASK:
        bias = tl.load(mask_ptr + b * mask_stride_b + pos, mask=valid, other=float("-inf"))
    else:
        bias = tl.zeros(pos.shape, tl.float32)
    return tl.where(valid, bias, float("-inf"))


@jit
def _load_queries(q_ptr, bh, REP: tl.constexpr, D: tl.constexpr, REP_P: tl.constexpr, D_P: tl.constexpr):
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D_P)
    return tl.load(q_ptr + (bh * REP + r)[:, None] * D + d[None, :], mask=(r[:, None] < REP) & (d[None, :] < D),
                   other=0.0)


@jit
def _store_partial(m_ptr, l_ptr, acc_ptr, bh, slot, n_slots, m_i, l_i, acc,
                   REP_P: tl.constexpr, DV_P: tl.constexpr):
    r = tl.arange(0, REP_P)
    dv = tl.arange(0, DV_P)
    at = (bh * n_slots + slot) * REP_P + r
    tl.store(m_ptr + at, m_i)
    tl.store(l_ptr + at, l_i)
    tl.store(acc_ptr + at[:, None] * DV_P + dv[None, :], acc)


@jit
def _codes_partial_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
        kc_sb, kc_sh, kc_st, ks_sb, ks_sh, ks_st, vc_sb, vc_sh, vc_st, vs_sb, vs_sh, vs_st, mask_sb,
        H, n_compressed, n_sinks, tiles_per_split, n_slots,
        REP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        REP_P: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr, BLOCK: tl.constexpr,
        K_W1: tl.constexpr, K_W2: tl.constexpr, K_ROW: tl.constexpr, K_GROUP: tl.constexpr, K_CHANNEL: tl.constexpr,
        V_W1: tl.constexpr, V_W2: tl.constexpr, V_ROW: tl.constexpr, V_GROUP: tl.constexpr, V_CHANNEL: tl.constexpr,
        HAS_MASK: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    q = _load_queries(q_ptr, bh, REP, D, REP_P, D_P)
    d = tl.arange(0, D_P)
    dv = tl.arange(0, DV_P)
    kc = kc_ptr + b.to(tl.int64) * kc_sb + h.to(tl.int64) * kc_sh
    ks = ks_ptr + b.to(tl.int64) * ks_sb + h.to(tl.int64) * ks_sh
    kz = kz_ptr + b.to(tl.int64) * ks_sb + h.to(tl.int64) * ks_sh
    vc = vc_ptr + b.to(tl.int64) * vc_sb + h.to(tl.int64) * vc_sh
    vs = vs_ptr + b.to(tl.int64) * vs_sb + h.to(tl.int64) * vs_sh
    vz = vz_ptr + b.to(tl.int64) * vs_sb + h.to(tl.int64) * vs_sh
    m_i = tl.full((REP_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, DV_P), tl.float32)
    for tile in range(tiles_per_split):
        t = (split * tiles_per_split + tile) * BLOCK + tl.arange(0, BLOCK)
        in_cache = t < n_compressed
        k = _decode_tile(kc, kc_st, ks, kz, ks_st, t, d, in_cache[:, None] & (d[None, :] < D),
                         D, K_W1, K_W2, K_ROW, K_GROUP, K_CHANNEL)
        v = _decode_tile(vc, vc_st, vs, vz, vs_st, t, dv, in_cache[:, None] & (dv[None, :] < DV),
                         DV, V_W1, V_W2, V_ROW, V_GROUP, V_CHANNEL)
        bias = _bias(mask_ptr, mask_sb, b, n_sinks + t, in_cache, HAS_MASK)
        m_i, l_i, acc = _online_step(q, k, v, bias, m_i, l_i, acc)
    _store_partial(m_ptr, l_ptr, acc_ptr, bh, split + 1, n_slots, m_i, l_i, acc, REP_P, DV_P)


@jit
def _full_partial_kernel(
        q_ptr, sk_ptr, sv_ptr, wk_ptr, wv_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
        sk_sb, sk_sh, sk_st, sv_sb, sv_sh, sv_st, wk_sb, wk_sh, wk_st, wv_sb, wv_sh, wv_st, mask_sb,
        H, n_sinks, n_window, window_start, n_slots,
        REP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        REP_P: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    q = _load_queries(q_ptr, bh, REP, D, REP_P, D_P)
    d = tl.arange(0, D_P)
    dv = tl.arange(0, DV_P)
    m_i = tl.full((REP_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, DV_P), tl.float32)
    sk = sk_ptr + b.to(tl.int64) * sk_sb + h.to(tl.int64) * sk_sh
    sv = sv_ptr + b.to(tl.int64) * sv_sb + h.to(tl.int64) * sv_sh
    for start in range(0, n_sinks, BLOCK):  # sinks: positions [0, n_sinks)
        t = start + tl.arange(0, BLOCK)
        ok = t < n_sinks
        k = tl.load(sk + t[:, None] * sk_st + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(sv + t[:, None] * sv_st + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        bias = _bias(mask_ptr, mask_sb, b, t, ok, HAS_MASK)
        m_i, l_i, acc = _online_step(q, k.to(tl.float32), v.to(tl.float32), bias, m_i, l_i, acc)
    wk = wk_ptr + b.to(tl.int64) * wk_sb + h.to(tl.int64) * wk_sh
    wv = wv_ptr + b.to(tl.int64) * wv_sb + h.to(tl.int64) * wv_sh
    for start in range(0, n_window, BLOCK):  # window: positions [window_start, window_start + n_window)
        t = start + tl.arange(0, BLOCK)
        ok = t < n_window
        k = tl.load(wk + t[:, None] * wk_st + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(wv + t[:, None] * wv_st + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        bias = _bias(mask_ptr, mask_sb, b, window_start + t, ok, HAS_MASK)
        m_i, l_i, acc = _online_step(q, k.to(tl.float32), v.to(tl.float32), bias, m_i, l_i, acc)
    _store_partial(m_ptr, l_ptr, acc_ptr, bh, 0, n_slots, m_i, l_i, acc, REP_P, DV_P)


@jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_slots,
                    REP: tl.constexpr, DV: tl.constexpr, REP_P: tl.constexpr, DV_P: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.arange(0, REP_P)
    dv = tl.arange(0, DV_P)
    m_all = tl.full((REP_P,), float("-inf"), tl.float32)
    for slot in range(n_slots):
        m_all = tl.maximum(m_all, tl.load(m_ptr + (bh * n_slots + slot) * REP_P + r))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, DV_P), tl.float32)
    for slot in range(n_slots):
        at = (bh * n_slots + slot) * REP_P + r
        weight = tl.exp(tl.load(m_ptr + at) - m_safe)
        total += weight * tl.load(l_ptr + at)
        acc += weight[:, None] * tl.load(acc_ptr + at[:, None] * DV_P + dv[None, :])
    out = acc / total[:, None]
    tl.store(out_ptr + (bh * REP + r)[:, None] * DV + dv[None, :], out, mask=(r[:, None] < REP) & (dv[None, :] < DV))


def _codec_constants(codec, prefix: str) -> dict:
    """Constexprs of one uniform quantizer (duck-typed: bits, axis, group_size)."""
    w1, w2 = field_widths(codec.bits)
    channel = codec.axis == "channel"
    return {f"{prefix}_W1": w1, f"{prefix}_W2": w2, f"{prefix}_GROUP": codec.group_size,
            f"{prefix}_ROW": codec.group_size if channel else TOKEN_ROW_TOKENS, f"{prefix}_CHANNEL": channel}


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` with a contiguous last dim; an empty `t` (no sinks, an empty window) is replaced by a
    one-element tensor, since Triton refuses the null data pointer of an empty CUDA tensor (the
    kernels never read it: their loops over those tokens do not run)."""
    if t.numel() == 0:
        return torch.zeros((1,) * t.dim(), dtype=t.dtype, device=t.device)
    return t if t.stride(-1) == 1 else t.contiguous()


def _stored(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Codes, scale and zero with a contiguous last dim, scale and zero sharing their strides."""
    out = {name: _last_dim_contiguous(t) for name, t in stored.items()}
    if out["scale"].stride() != out["zero"].stride():
        out["scale"], out["zero"] = out["scale"].contiguous(), out["zero"].contiguous()
    return out


def _mask_bias(attention_mask: torch.Tensor | None, seq: int) -> tuple[torch.Tensor | None, int]:
    """The mask's last query row as an additive float32 (B or 1, seq) tensor and its batch stride."""
    if attention_mask is None:
        return None, 0
    if attention_mask.shape[-1] != seq:
        raise ValueError(f"attention mask covers {attention_mask.shape[-1]} positions, the cache holds {seq}")
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise ValueError(f"decode_attention takes a (B, 1, Q, seq) mask, got shape {tuple(attention_mask.shape)}")
    row = attention_mask[:, 0, -1, :]  # (B or 1, seq)
    if row.dtype == torch.bool:
        bias = torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill_(~row, float("-inf"))
    else:
        bias = row.to(torch.float32).contiguous()
    return bias, (bias.stride(0) if bias.shape[0] > 1 else 0)


def block_tokens_for(rep: int, head_dim: int, value_dim: int) -> int:
    """Tokens per tile for a GQA group of `rep` query heads (see TILE_ELEMENTS)."""
    widest = triton.next_power_of_2(rep) * max(triton.next_power_of_2(head_dim), triton.next_power_of_2(value_dim))
    block = 1
    while block < MAX_BLOCK_T and 2 * block * widest <= TILE_ELEMENTS:
        block *= 2
    return block


def _splits(tiles: int, bh: int, device: torch.device, split_tiles: int | None) -> tuple[int, int]:
    """(number of splits, tiles per split) for `tiles` tiles of each of `bh` (batch, head) pairs."""
    if tiles == 0:
        return 0, 0
    if split_tiles is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        wanted = max(1, triton.cdiv(PROGRAMS_PER_SM * sms, bh))
        split_tiles = triton.cdiv(tiles, min(tiles, wanted))
    return triton.cdiv(tiles, split_tiles), split_tiles


def decode_attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                     split_tiles: int | None = None, block_tokens: int | None = None) -> torch.Tensor:
    """Attention of one decode step over [sinks | compressed codes | window] of `layer`.

    Args:
        layer: a `CompressedLayer` whose key and value codecs are `QuantCodec`s and whose keys
            are stored post-RoPE (`key_space` None); read through its attributes only.
        query: (B, H_q, 1, D), H_q a multiple of the layer's H_kv heads.
        attention_mask: None, bool (True = attend) or additive float, (B or 1, 1, Q, seq).
        scaling: factor applied to q.k.
        split_tiles: tiles of `block_tokens` compressed tokens per program (default: enough
            splits for about PROGRAMS_PER_SM programs per multiprocessor); for tests.
        block_tokens: tokens per tile (a power of two; default `block_tokens_for` the shapes).

    Returns:
        (B, H_q, 1, D_v) in the query's dtype; computed in float32.
    """
    B, Hq, Q, D = query.shape
    if Q != 1:
        raise ValueError(f"decode_attention handles one query token (a decode step), got {Q}")
    sink_k, sink_v = _last_dim_contiguous(layer.sink_keys), _last_dim_contiguous(layer.sink_values)
    window_k, window_v = _last_dim_contiguous(layer.window_keys), _last_dim_contiguous(layer.window_values)
    H, DV = layer.window_keys.shape[1], layer.window_values.shape[3]
    rep = Hq // H
    n_sinks, n_compressed, n_window = layer.sink_keys.shape[2], layer.n_compressed, layer.window_keys.shape[2]
    seq = n_sinks + n_compressed + n_window
    bias, mask_sb = _mask_bias(attention_mask, seq)
    device = query.device
    q = (query.to(torch.float32) * scaling).reshape(B * H * rep, D).contiguous()  # heads grouped by K/V head
    block_tokens = block_tokens or block_tokens_for(rep, D, DV)
    sizes = {"REP": rep, "D": D, "DV": DV, "REP_P": triton.next_power_of_2(rep),
             "D_P": triton.next_power_of_2(D), "DV_P": triton.next_power_of_2(DV), "BLOCK": block_tokens}
    n_splits, tiles_per_split = _splits(triton.cdiv(n_compressed, block_tokens), B * H, device, split_tiles)
    n_slots = n_splits + 1  # slot 0: sinks and window
    m = torch.empty(B * H, n_slots, sizes["REP_P"], dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    acc = torch.empty(B * H, n_slots, sizes["REP_P"], sizes["DV_P"], dtype=torch.float32, device=device)
    mask_arg = bias if bias is not None else q  # never read without HAS_MASK
    has_mask = bias is not None
    _full_partial_kernel[(B * H,)](
        q, sink_k, sink_v, window_k, window_v, mask_arg, m, l, acc,
        *sink_k.stride()[:3], *sink_v.stride()[:3], *window_k.stride()[:3], *window_v.stride()[:3], mask_sb,
        H, n_sinks, n_window, n_sinks + n_compressed, n_slots, HAS_MASK=has_mask, num_warps=NUM_WARPS, **sizes)
    if n_splits:
        keys, values = _stored(layer.stored_keys), _stored(layer.stored_values)
        _codes_partial_kernel[(B * H, n_splits)](
            q, keys["codes"], keys["scale"], keys["zero"], values["codes"], values["scale"], values["zero"],
            mask_arg, m, l, acc,
            *keys["codes"].stride()[:3], *keys["scale"].stride()[:3],
            *values["codes"].stride()[:3], *values["scale"].stride()[:3], mask_sb,
            H, n_compressed, n_sinks, tiles_per_split, n_slots, HAS_MASK=has_mask, num_warps=NUM_WARPS,
            **_codec_constants(layer.key_codec, "K"), **_codec_constants(layer.value_codec, "V"), **sizes)
    out = torch.empty(B * H * rep, DV, dtype=torch.float32, device=device)
    _combine_kernel[(B * H,)](m, l, acc, out, n_slots, REP=rep, DV=DV, REP_P=sizes["REP_P"], DV_P=sizes["DV_P"])
    return out.reshape(B, Hq, 1, DV).to(query.dtype)
