"""Packed pages: the byte slot of one (token, KV head) in a paged KV pool, its write and its read.

A paged pool (vLLM's) holds per layer `pages` of shape (num_blocks, kv_heads, block_size,
slot_bytes) uint8; token t of a request sits in block `block_table[t // block_size]`, row
`t % block_size`. `SlotLayout` specifies the bytes of a slot (K then V, each self-contained);
`PagedLayout` gives every layer of a model its slot layout under one `CacheSpec`.

Limits: only codecs whose bytes are complete per token (`unservable` names what is not: per-channel
or pre-RoPE keys, low rank, calibrated codecs, sinks, window, eviction). This module imports neither
vLLM nor transformers; attention over pages is `kernels.paged_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .codecs.base import check_finite
from .codecs.codebook import CodebookCodec
from .codecs.hadamard import HadamardRotation
from .codecs.packing import pack, unpack
from .codecs.quant import QuantCodec
from .codecs.rotation import RandomizedHadamard, layer_seed
from .spec import CODEBOOK_BITS, CacheSpec, TensorSpec

PART_METHODS = ("quant", "hadamard+quant", "rotated+codebook", "none")
SLOT_ALIGN = 4  # slot sizes are a multiple of this many bytes (32-bit loads; fp32 model dtypes)
_FP16_MAX = 65504.0


class UnservableSpecError(ValueError):
    """A spec whose bytes are not complete per token; the message lists what stands in the way."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class PartLayout:
    """How one of K or V of one token and KV head is coded inside a slot (see `SlotLayout`).

    Attributes:
        method: one of PART_METHODS.
        head_dim: D, values per vector.
        bits: code width (0 for "none").
        group_size: channels per scale and zero point ("quant", "hadamard+quant"); 0 otherwise.
        seed: "rotated+codebook" only: the layer's sign seed, `codecs.rotation.layer_seed(spec seed, layer)`.
        dtype: "none" only: the element type of the stored values (the model's dtype).
    """

    method: str
    head_dim: int
    bits: int = 0
    group_size: int = 0
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.method not in PART_METHODS:
            raise ValueError(f"a paged part's method must be one of {PART_METHODS}, got {self.method!r}")
        if self.head_dim < 8 or self.head_dim % 8:
            raise ValueError(f"packed codes need head_dim to be a multiple of 8, got {self.head_dim}")
        if self.method in ("quant", "hadamard+quant") and (self.group_size < 1 or self.head_dim % self.group_size):
            raise ValueError(f"group_size {self.group_size} must divide head_dim {self.head_dim}")

    @classmethod
    def from_spec(cls, spec: TensorSpec, head_dim: int, layer_idx: int, dtype: torch.dtype) -> PartLayout:
        """The part that stores `spec` (which `unservable_tensor` accepts) for layer `layer_idx`."""
        if spec.method == "none":
            return cls("none", head_dim, dtype=dtype)
        if spec.method == "rotated+codebook":
            return cls(spec.method, head_dim, bits=spec.bits, seed=layer_seed(spec.seed, layer_idx))
        return cls(spec.method, head_dim, bits=spec.bits, group_size=spec.group_size)

    # ---- sizes and field offsets (bytes, from the start of the part) ---------------------------

    @property
    def codes_bytes(self) -> int:
        """D * bits / 8 bytes of packed codes (0 for "none")."""
        return 0 if self.method == "none" else self.head_dim * self.bits // 8

    @property
    def n_scales(self) -> int:
        """fp16 scales stored: D / group_size (uniform), 1 (codebook), 0 ("none")."""
        return {"none": 0, "rotated+codebook": 1}.get(self.method, self.head_dim // max(self.group_size, 1))

    @property
    def n_zeros(self) -> int:
        """fp16 zero points stored: D / group_size (uniform), else 0."""
        return self.n_scales if self.method in ("quant", "hadamard+quant") else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the part, padded to an even number."""
        if self.method == "none":
            return self.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        return _round_up(self.codes_bytes + 2 * (self.n_scales + self.n_zeros), 2)

    def fields(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset in the part, bytes): "codes", "scale", "zero" (those present) or "values"."""
        if self.method == "none":
            return {"values": (0, self.nbytes)}
        out = {"codes": (0, self.codes_bytes), "scale": (self.codes_bytes, 2 * self.n_scales)}
        if self.n_zeros:
            out["zero"] = (self.codes_bytes + 2 * self.n_scales, 2 * self.n_zeros)
        return out

    def rotation(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """R (D, D) float32 with stored = x @ R and x = stored @ R^T, or None (no rotation)."""
        if self.method == "hadamard+quant":
            return HadamardRotation().matrix(self.head_dim, device)
        if self.method == "rotated+codebook":
            return RandomizedHadamard(seed=self.seed).matrix(self.head_dim, device)
        return None

    def centroids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(2**bits,) float32 codebook of "rotated+codebook" (the Gaussian Lloyd-Max centroids)."""
        return CodebookCodec(bits=self.bits).centroids(device)

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The part's bytes (N, H, nbytes) uint8 for states `x` (N, H, D)."""
        N, H, D = x.shape
        if D != self.head_dim:
            raise ValueError(f"states have head_dim {D}, the layout expects {self.head_dim}")
        if self.method == "none":
            return x.to(self.dtype).contiguous().view(torch.uint8)
        check_finite(x)
        y = x.float()
        rotation = self.rotation(x.device)
        if rotation is not None:
            y = y @ rotation
        y = y[:, :, None, :]  # (N, H, 1, D): one token per "row" of the codecs
        if self.method == "rotated+codebook":
            idx, scale = CodebookCodec(bits=self.bits).quantize(y)
            if scale.abs().max().item() > _FP16_MAX:
                raise ValueError("KV states exceed the fp16 range in which codebook scales are stored")
            codes, parts = idx.to(torch.uint8), [scale.half()]
        else:
            codes, scale, zero = QuantCodec(bits=self.bits, axis="token", group_size=self.group_size).quantize(y)
            parts = [scale, zero]
        out = torch.zeros(N, H, self.nbytes, dtype=torch.uint8, device=x.device)
        out[..., :self.codes_bytes] = pack(codes.reshape(N, H, D), self.bits)
        start = self.codes_bytes
        for part in parts:  # fp16 (N, H, 1, n) -> 2n bytes each
            raw = part.reshape(N, H, -1).contiguous().view(torch.uint8)
            out[..., start:start + raw.shape[-1]] = raw
            start += raw.shape[-1]
        return out

    def _fp16(self, part: torch.Tensor, name: str) -> torch.Tensor:
        start, size = self.fields()[name]
        return part[..., start:start + size].contiguous().view(torch.float16).float()

    def decode_stored(self, part: torch.Tensor) -> torch.Tensor:
        """Values (..., D) float32 of the part's bytes (..., nbytes), still rotated (stored = x @ R)."""
        if self.method == "none":
            return part[..., :self.nbytes].contiguous().view(self.dtype).float()
        codes = unpack(part[..., :self.codes_bytes], self.bits)  # (..., D) uint8
        scale = self._fp16(part, "scale")  # (..., n_scales)
        if self.method == "rotated+codebook":
            return self.centroids(part.device)[codes.long()] * scale
        g = self.group_size
        grouped = codes.float().unflatten(-1, (self.head_dim // g, g))  # (..., D/g, g)
        return (grouped * scale[..., None] + self._fp16(part, "zero")[..., None]).flatten(-2)

    def decode(self, part: torch.Tensor) -> torch.Tensor:
        """States (..., D) float32 of the part's bytes (..., nbytes): `decode_stored` un-rotated."""
        values = self.decode_stored(part)
        rotation = self.rotation(part.device)
        return values if rotation is None else values @ rotation.T


@dataclass(frozen=True)
class SlotLayout:
    """The bytes of one (token, KV head) slot of one layer: K part, V part, zero padding.

    Byte layout (offsets from the start of the slot; fp16 little-endian, as every platform vLLM
    runs on stores it):

        [0, key.nbytes)                         K part
        [key.nbytes, key.nbytes + value.nbytes) V part
        [.., slot_bytes)                        zeros (slot_bytes is a multiple of 4)

    A part of head_dim D, by method (see `PartLayout.fields`; each part padded to even bytes):
      "quant" / "hadamard+quant", bits b, groups of g channels:
          codes  D*b/8 bytes | scale  D/g fp16 | zero  D/g fp16
          stored[d] = codes[d] * scale[d // g] + zero[d // g]
      "rotated+codebook", bits b:  codes  D*b/8 bytes | scale  1 fp16
          stored[d] = scale * centroid[codes[d]]   (`codecs.lloyd_max.gaussian_codebook(b)`)
      "none":  D values in the model's dtype (stored = x)
    `codes` are the D codes of one vector packed as one row by `codecs.packing.pack` (byte-planar:
    4 bits: byte j holds code j in bits 0-3 and code j + D/2 in bits 4-7; 2 bits: code j + h*D/4
    at bits 2h; 3 bits: a 2-bit plane of D/4 bytes, then a 1-bit plane of D/8 bytes for bit 2;
    8 bits: one byte per code). The vector itself is x = stored @ R^T, where R is the identity
    ("quant", "none"), the orthonormal Sylvester Hadamard matrix H(D)/sqrt(D) ("hadamard+quant"), or
    diag(signs) @ H(D)/sqrt(D) with signs drawn from the part's seed ("rotated+codebook",
    `codecs.rotation.randomized_hadamard_matrix`). Attention may stay in the rotated space:
    q.k = (q @ R_K).stored_k and p @ V = (p @ stored_v) @ R_V^T.

    Attributes:
        key, value: the two parts.
        slot_bytes: bytes per slot (>= key.nbytes + value.nbytes, a multiple of SLOT_ALIGN).
    """

    key: PartLayout
    value: PartLayout
    slot_bytes: int

    def __post_init__(self):
        if self.slot_bytes < self.key.nbytes + self.value.nbytes or self.slot_bytes % SLOT_ALIGN:
            raise ValueError(f"slot_bytes {self.slot_bytes} must hold {self.key.nbytes} + {self.value.nbytes} "
                             f"bytes and be a multiple of {SLOT_ALIGN}")

    @property
    def value_offset(self) -> int:
        """Byte offset of the V part in the slot."""
        return self.key.nbytes

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Slots (N, H, slot_bytes) uint8 of keys and values (N, H, D)."""
        N, H, _ = key.shape
        out = torch.zeros(N, H, self.slot_bytes, dtype=torch.uint8, device=key.device)
        out[..., :self.value_offset] = self.key.encode(key)
        out[..., self.value_offset:self.value_offset + self.value.nbytes] = self.value.encode(value)
        return out

    def write(self, pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store token i's keys and values (N, H, D) at slot `slot_mapping[i]` of `pages`.

        pages: (num_blocks, H, block_size, slot_bytes) uint8; slot s is row s % block_size of block
        s // block_size. A negative slot (padding) is skipped. Each token is encoded once, here.
        """
        block_size = pages.shape[2]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        if slots.numel() == 0:
            return
        pages[slots // block_size, :, slots % block_size] = self.encode(key[keep], value[keep])  # (n, H, slot)

    def split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V parts (..., key.nbytes), (..., value.nbytes) of slots (..., slot_bytes) (views)."""
        return slots[..., :self.value_offset], slots[..., self.value_offset:self.value_offset + self.value.nbytes]

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (..., D) float32 of slots (..., slot_bytes), un-rotated."""
        k, v = self.split(slots)
        return self.key.decode(k), self.value.decode(v)

    def read(self, pages: torch.Tensor, block_ids: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (H, n_tokens, D) float32 of the first `n_tokens` tokens held by blocks
        `block_ids` (in order) of `pages` (num_blocks, H, block_size, slot_bytes)."""
        slots = pages[block_ids.long()]  # (nb, H, bs, slot)
        slots = slots.transpose(0, 1).flatten(1, 2)[:, :n_tokens]  # (H, nb*bs, slot) -> (H, T, slot)
        return self.decode(slots)


def unservable_tensor(spec: TensorSpec, which: str) -> list[str]:
    """Why K or V under `spec` cannot be stored per token in a page (empty if it can)."""
    if spec.method == "none":
        return []
    if spec.method not in PART_METHODS:
        return [f"{which} method {spec.method!r} (paged pages serve {', '.join(PART_METHODS)})"]
    reasons = []
    if spec.is_quantized and spec.axis != "token":
        reasons.append(f"{which} quantized per channel (groups of tokens share a scale)")
    if spec.key_space != "post_rope":
        reasons.append(f"{which} stored pre-RoPE (vLLM hands keys after RoPE)")
    if spec.center:
        reasons.append(f"{which} centred on a calibrated mean")
    if spec.method == "rotated+codebook" and spec.bits not in CODEBOOK_BITS:
        reasons.append(f"{which} codebook of {spec.bits} bits (pages store whole widths: 1, 2, 3 or 4)")
    return reasons


def unservable(spec: CacheSpec) -> list[str]:
    """Everything in `spec` that a paged pool of self-contained token slots cannot store (empty if none)."""
    reasons = []
    if spec.window:
        reasons.append(f"a full-precision window of {spec.window} tokens")
    if spec.sinks:
        reasons.append(f"{spec.sinks} full-precision sink tokens")
    if spec.eviction is not None:
        reasons.append("token eviction")
    seen = set(reasons)
    for key, value, layer in _layer_pairs(spec):
        where = "" if layer is None else f" (layer {layer})"
        for reason in unservable_tensor(key, "keys" + where) + unservable_tensor(value, "values" + where):
            if reason not in seen:
                seen.add(reason)
                reasons.append(reason)
    return reasons


def _layer_pairs(spec: CacheSpec):
    """(key spec, value spec, layer) of the default (layer None) and of every overridden layer, at
    every depth the spec has a layer table for (`layers_at_depth`)."""
    yield spec.key, spec.value, None
    any_depth = replace(spec, layers_at_depth={})
    for bound in [any_depth, *(spec.at_depth(int(depth)) for depth in spec.layers_at_depth)]:
        for layer in bound.override_layers():
            yield (*bound.for_layer(layer), layer)


def slot_bytes(spec: CacheSpec, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of every slot under `spec`: the widest of its default and per-layer (key, value) pairs.

    Needs no layer count (vLLM asks before it says how many layers there are); a default that
    every layer overrides still counts.
    """
    widest = 0
    for key, value, layer in _layer_pairs(spec):
        parts = [PartLayout.from_spec(t, head_dim, layer or 0, dtype) for t in (key, value)]
        widest = max(widest, _round_up(parts[0].nbytes + parts[1].nbytes, SLOT_ALIGN))
    return widest


@dataclass(frozen=True)
class PagedLayout:
    """The slot layout of every layer of a model under one spec; all slots have `slot_bytes` bytes.

    A paged pool gives every layer the same slot size, so a per-layer spec costs every layer the
    widest layer's slot (`narrowest_bytes` says what the narrowest layer needs).
    """

    layers: tuple[SlotLayout, ...]

    @property
    def slot_bytes(self) -> int:
        return self.layers[0].slot_bytes

    @property
    def narrowest_bytes(self) -> int:
        return min(_round_up(s.key.nbytes + s.value.nbytes, SLOT_ALIGN) for s in self.layers)

    @classmethod
    def for_spec(cls, spec: CacheSpec, num_layers: int, head_dim: int, dtype: torch.dtype) -> PagedLayout:
        """Layouts of `num_layers` layers of head_dim `head_dim` whose "none" parts keep `dtype`.

        Raises UnservableSpecError listing what of `spec` cannot be stored per token, and ValueError
        where the spec does not fit the model (e.g. a group size that does not divide head_dim).
        """
        reasons = unservable(spec)
        if reasons:
            raise UnservableSpecError("; ".join(reasons))
        spec.validate_for(num_layers, head_dim)
        bound = spec.at_depth(num_layers)
        parts = []
        for layer in range(num_layers):
            key, value = bound.for_layer(layer)
            parts.append((PartLayout.from_spec(key, head_dim, layer, dtype),
                          PartLayout.from_spec(value, head_dim, layer, dtype)))
        size = slot_bytes(spec, head_dim, dtype)
        return cls(tuple(SlotLayout(k, v, size) for k, v in parts))
