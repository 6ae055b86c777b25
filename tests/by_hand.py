"""What a quantized cache must hold and decode to, computed by hand (not with the code under test).

`manual_dequantize`: code * scale + zero, group by group, from the stored tensors.
`expected_layer_parts`: bytes of each part of a layer, from the spec.
`manual_slot_part`: one K or V vector from the bytes of a paged slot, read field by field as
`kvcompress.paged.SlotLayout` documents them (struct for fp16, `unpack_reference` for codes).

For a layer that has seen `tokens` tokens: the first `sinks` and the tokens that have not yet
filled a whole block past the window stay in the model dtype; the rest, whole blocks of
`block_size` that left the window, are quantized: `bits` per value, packed with no padding
(the head_dim x block sizes used in tests are multiples of 8 values), plus an fp16 scale and an
fp16 zero point per group of `group_size` values. Only "quant" and "none" tensor specs.
"""

from __future__ import annotations

import struct

import torch

from kvcompress.codecs.packing import unpack, unpack_reference

FP16 = 2


def expected_layer_parts(spec: dict, tokens: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                         batch: int = 1) -> dict[str, int]:
    """{"sinks", "window", "key_codes", "key_scale", "key_zero", "value_...": bytes} of one layer."""
    sinks = min(spec["sinks"], tokens)
    rest = tokens - sinks
    compressed = max(rest - spec["window"], 0) // spec["block_size"] * spec["block_size"]
    window = rest - compressed
    per_token = batch * kv_heads * head_dim  # values per token of one tensor
    parts = {"sinks": 2 * sinks * per_token * dtype_bytes, "window": 2 * window * per_token * dtype_bytes}
    for tensor in ("key", "value"):
        t = spec[tensor]
        values = compressed * per_token
        assert (values * t["bits"]) % 8 == 0 and values % t["group_size"] == 0, "pick sizes that pack exactly"
        parts[f"{tensor}_codes"] = values * t["bits"] // 8
        parts[f"{tensor}_scale"] = values // t["group_size"] * FP16
        parts[f"{tensor}_zero"] = values // t["group_size"] * FP16
    return parts


def expected_compressed_tokens(spec: dict, tokens: int) -> int:
    rest = tokens - min(spec["sinks"], tokens)
    return max(rest - spec["window"], 0) // spec["block_size"] * spec["block_size"]


def manual_dequantize(stored: dict, bits: int, axis: str, group: int) -> torch.Tensor:
    """Independent reconstruction of (B, H, T, D) from stored codes: code * scale + zero, loop by group."""
    scale, zero = stored["scale"].float(), stored["zero"].float()
    codes = unpack(stored["codes"], bits).float()  # (B, H, rows, tokens per row * D): tokens in order
    B, H = codes.shape[:2]
    n_codes = codes[0, 0].numel()
    T = scale.shape[2] if axis == "token" else n_codes // scale.shape[3]
    D = n_codes // T
    codes = codes.reshape(B, H, T, D)
    out = torch.empty_like(codes)
    if axis == "token":
        for g in range(D // group):
            cols = slice(g * group, (g + 1) * group)
            out[..., cols] = codes[..., cols] * scale[..., g:g + 1] + zero[..., g:g + 1]
    else:
        for g in range(T // group):
            rows = slice(g * group, (g + 1) * group)
            out[:, :, rows] = codes[:, :, rows] * scale[:, :, g:g + 1] + zero[:, :, g:g + 1]
    return out


def manual_slot_part(part: bytes, method: str, head_dim: int, bits: int = 0, group: int = 0,
                     rotation: torch.Tensor | None = None, centroids: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (D,) float64 vector that the bytes of one slot part hold (layout of `paged.SlotLayout`).

    method "quant"/"hadamard+quant": codes (D*bits/8 bytes) | D/group fp16 scales | D/group fp16 zeros,
    x[d] = code[d] * scale[d // group] + zero[d // group]; "rotated+codebook": codes | one fp16 scale,
    x[d] = scale * centroids[code[d]]; "none": D values of `dtype`. Then x @ rotation.T if given.
    """
    if method == "none":
        return torch.frombuffer(bytearray(part[:head_dim * torch.empty(0, dtype=dtype).element_size()]),
                                dtype=dtype).double()
    n_codes = head_dim * bits // 8
    codes = unpack_reference(torch.tensor(list(part[:n_codes]), dtype=torch.uint8), bits).double()
    n_scales = 1 if method == "rotated+codebook" else head_dim // group
    halves = struct.unpack(f"<{n_scales}e", part[n_codes:n_codes + 2 * n_scales])
    out = torch.empty(head_dim, dtype=torch.float64)
    if method == "rotated+codebook":
        for d in range(head_dim):
            out[d] = halves[0] * centroids.double()[int(codes[d])]
    else:
        zeros = struct.unpack(f"<{n_scales}e", part[n_codes + 2 * n_scales:n_codes + 4 * n_scales])
        for d in range(head_dim):
            out[d] = codes[d] * halves[d // group] + zeros[d // group]
    return out if rotation is None else out @ rotation.double().T
