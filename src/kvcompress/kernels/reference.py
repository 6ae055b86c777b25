"""The pure-torch decode step over a `CompressedLayer`'s codes: the reference the kernels match.

`attend_compressed` computes one query token's attention over [sinks | compressed blocks |
window], decoding the blocks `CHUNK_TOKENS` at a time in float32 (never the whole layer at
once). A codec that stores states rotated by an orthogonal R is read rotated: q.k = (qR).(kR)
and p.V = (p.(VR))R^T, with a subtracted mean m returning as q.m and (sum p) m. The CPU and
Triton kernels compute the same from the codes; `cache.attention.attend` picks one. A layer is
read through its attributes only.
"""

from __future__ import annotations

import torch

from ..codecs.base import token_slice

CHUNK_TOKENS = 4096


def _chunks(layer, kind: str):
    """Yield (start, stop, encoding of tokens [start, stop)) over the layer's compressed tokens."""
    stored = layer.stored_keys if kind == "key" else layer.stored_values
    total = layer.n_compressed
    step = max(layer.block_size, CHUNK_TOKENS // layer.block_size * layer.block_size)
    for start in range(0, total, step):
        stop = min(start + step, total)
        yield start, stop, token_slice(stored, total, start, stop)


def codec_rotation(codec, dim: int, device: torch.device) -> torch.Tensor | None:
    """The float32 orthogonal R (dim, dim) a codec stores its states in (x -> x @ R), or None."""
    rotation = getattr(codec, "rotation", None)
    return rotation(dim, device, torch.float32) if rotation is not None else None


def codec_offset(codec, device: torch.device) -> torch.Tensor | None:
    """The float32 (H, D) mean a rotated codec subtracts before rotating, or None."""
    offset = getattr(codec, "offset", None)
    return offset(device) if offset is not None else None


def _chunk_scores(layer, part: dict, start: int, q: torch.Tensor, rotated: bool) -> torch.Tensor:
    """q . k for the keys of one chunk: (B, H, rep, T) from q (B, H, rep, D), in float32.

    With `rotated`, q is already q @ R and the keys are read in the codec's rotated space.
    """
    if rotated:
        return q @ layer.key_codec.decode_rotated(part, torch.float32).transpose(-1, -2)
    keys = layer.key_codec.decode(part, torch.float32)  # (B, H, T, D)
    if layer.key_space is not None:  # keys were coded pre-RoPE: rotate them to their positions
        keys = layer.key_space.rotate(keys, start=layer.key_positions(start, start + keys.shape[2]))
    return q @ keys.transpose(-1, -2)


def _chunk_mix(layer, part: dict, probs: torch.Tensor, rotated: bool) -> torch.Tensor:
    """probs @ v for the values of one chunk: (B, H, rep, D) from probs (B, H, rep, T), in float32.

    With `rotated`, the result stays in the codec's rotated space (probs @ (V @ R)).
    """
    if rotated:
        return probs @ layer.value_codec.decode_rotated(part, torch.float32)
    return probs @ layer.value_codec.decode(part, torch.float32)


def attend_compressed(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
                      ) -> torch.Tensor:
    """Attention of one decode step over [sinks | compressed blocks | window] of `layer`.

    Args:
        layer: a `CompressedLayer` holding at least one compressed block.
        query: (B, H_q, 1, D), H_q a multiple of the layer's H_kv heads (grouped-query attention).
        attention_mask: None, bool (True = attend) or additive float, (B, 1, 1, seq) where seq
            is every token the layer holds.
        scaling: factor applied to q.k.

    Returns:
        (B, H_q, 1, D_v) attention output in the query's dtype; computed in float32.
    """
    B, Hq, Q, D = query.shape
    if Q != 1:
        raise ValueError(f"attend_compressed handles one query token (a decode step), got {Q}")
    sink_k, window_k = layer.sink_keys, layer.window_keys
    H = window_k.shape[1]
    n_sinks, n_compressed, n_window = sink_k.shape[2], layer.n_compressed, window_k.shape[2]
    seq = n_sinks + n_compressed + n_window
    compute = torch.float32
    q = (query.to(compute) * scaling).reshape(B, H, Hq // H, D)  # query heads grouped by their K/V head

    scores = torch.empty(B, H, Hq // H, seq, dtype=compute, device=query.device)
    scores[..., :n_sinks] = q @ sink_k.to(compute).transpose(-1, -2)
    # A rotated key codec (pre-RoPE keys excepted: RoPE does not commute with R): rotate q once.
    key_rotation = codec_rotation(layer.key_codec, D, query.device) if layer.key_space is None else None
    q_keys = q @ key_rotation if key_rotation is not None else q
    key_offset = codec_offset(layer.key_codec, query.device) if key_rotation is not None else None
    for start, stop, part in _chunks(layer, "key"):
        scores[..., n_sinks + start:n_sinks + stop] = _chunk_scores(layer, part, start, q_keys,
                                                                     key_rotation is not None)
    if key_offset is not None:  # keys stored as k - m: add q.m to every compressed token's score
        scores[..., n_sinks:n_sinks + n_compressed] += (q * key_offset[None, :, None, :]).sum(-1, keepdim=True)
    scores[..., n_sinks + n_compressed:] = q @ window_k.to(compute).transpose(-1, -2)
    if attention_mask is not None:
        if attention_mask.shape[-1] != seq:
            raise ValueError(f"attention mask covers {attention_mask.shape[-1]} positions, the cache holds {seq}")
        mask = attention_mask[..., -1:, :]  # (B or 1, 1, 1, seq)
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores += mask.to(compute)
    probs = torch.softmax(scores, dim=-1)

    out = probs[..., :n_sinks] @ layer.sink_values.to(compute)
    out += probs[..., n_sinks + n_compressed:] @ layer.window_values.to(compute)
    # A rotated value codec: sum p.(V R) over the chunks, then un-rotate that sum once.
    value_rotation = codec_rotation(layer.value_codec, out.shape[-1], query.device)
    mixed = torch.zeros_like(out) if value_rotation is not None else out
    for start, stop, part in _chunks(layer, "value"):
        mixed += _chunk_mix(layer, part, probs[..., n_sinks + start:n_sinks + stop], value_rotation is not None)
    if value_rotation is not None:
        out += mixed @ value_rotation.T
        value_offset = codec_offset(layer.value_codec, query.device)
        if value_offset is not None:  # values stored as v - m: add (sum of their probabilities) * m
            weight = probs[..., n_sinks:n_sinks + n_compressed].sum(-1, keepdim=True)  # (B, H, rep, 1)
            out += weight * value_offset[None, :, None, :]
    return out.reshape(B, Hq, 1, out.shape[-1]).to(query.dtype)
