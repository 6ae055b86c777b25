"""The CPU decode kernel's codebook path (`cpu_codebook.cpp`): which layers it reads, and the call.

Codebook codecs decode to x = offset + s * sum_j book[code_j] rows[j] (rows (H, n, D), offset (H, D)
or none); `describe(codec)` finds `rows` and `offset` for a rotated, low-rank or centred codebook
codec (float64, cached per codec), and the kernel scores keys and mixes values in code space
without decoding tokens into a tensor (pre-RoPE keys re-rotated with the model's cos/sin tables,
at each kept token's own position after eviction). `attend` returns None (the torch path runs)
for a codec it does not describe, head_dim not a multiple of 16, or a key space without tables.
How the rows are folded: docs/decode.md. Building the extension is `kernels.cpu`'s job.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..codecs.allocated import AllocatedCodebookCodec
from ..codecs.centering import Centered
from ..codecs.codebook import CodebookCodec
from ..codecs.composed import ComposedCodec
from ..codecs.hadamard import HadamardRotation
from ..codecs.lloyd_max import gaussian_codebook
from ..codecs.lowrank import LowRankProjection
from ..codecs.rotation import RandomizedHadamard
from ..codecs.scalecode import stored_scale

DIM_MULTIPLE = 16  # head_dim must be a multiple of the widest vector (16 floats) the kernel uses
_EMPTY = torch.empty(0)


@dataclass(frozen=True, eq=False)
class CodedForm:
    """What the kernel needs to read one codebook-coded tensor besides the stored codes.

    Attributes:
        names: stored tensors holding the code groups, in the order of `rows`.
        bits: width of each group's codes.
        books: float32 (2**bits,) codebook of each group.
        rows: float32 (H, n, D): decoded state = offset + scale * sum_j c_j rows[j].
        offset: float32 (H, D), or an empty tensor when nothing is added.
    """

    names: tuple[str, ...]
    bits: tuple[int, ...]
    books: tuple[torch.Tensor, ...]
    rows: torch.Tensor
    offset: torch.Tensor


_forms: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base_rows(transform, dim: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(base (H or 1, r, dim) float64 with x = y @ base, offset (H, dim) or None); None if the
    transform is not one whose inverse is known to be linear."""
    offset = None
    if isinstance(transform, Centered):
        offset, transform = transform.mean, transform.inner
    if type(transform) in (RandomizedHadamard, HadamardRotation):
        return transform.matrix(dim, "cpu", torch.float64).T[None], offset  # x = y @ R^T
    if type(transform) is LowRankProjection and transform.basis.shape[1] == dim:
        return transform.basis.to("cpu", torch.float64).transpose(1, 2), offset  # x = y @ U^T
    return None


def _describe(codec, dim: int) -> CodedForm | None:
    if type(codec) is not ComposedCodec or type(codec.inner) not in (CodebookCodec, AllocatedCodebookCodec):
        return None
    found = _base_rows(codec.transform, dim)
    if found is None:
        return None
    base, offset = found  # (H or 1, r, D)
    inner = codec.inner
    if type(inner) is CodebookCodec:
        names, bits, books, rows = ("codes",), (inner.bits,), (inner.centroids("cpu"),), base
    else:
        std = inner.std.to("cpu", torch.float64)  # (H, r)
        if base.shape[1] != std.shape[1]:
            return None
        base = base.expand(std.shape[0], -1, -1)
        parts, names, bits, books = [], [], [], []
        for width, js, mixer in inner.code_groups():
            scaled = std[:, js, None] * base[:, js, :]  # (H, n_w, D)
            parts.append(scaled if mixer is None else mixer.double().T @ scaled)
            names.append(f"codes{width}")
            bits.append(width)
            books.append(gaussian_codebook(width))
        rows = torch.cat(parts, dim=1)  # (H, n, D)
    return CodedForm(names=tuple(names), bits=tuple(bits), books=tuple(b.float().contiguous() for b in books),
                     rows=rows.float().contiguous(),
                     offset=offset.float().contiguous() if offset is not None else _EMPTY)


def describe(codec, dim: int) -> CodedForm | None:
    """The `CodedForm` of `codec` for states of head_dim `dim` (cached per codec), or None when
    the kernel cannot read it."""
    try:
        per_dim = _forms.setdefault(codec, {})
    except TypeError:  # not weakly referenceable or not hashable: not a codec this path reads
        return None
    if dim not in per_dim:
        per_dim[dim] = _describe(codec, dim)
    return per_dim[dim]


def _heads_match(form: CodedForm, heads: int, dim: int) -> bool:
    rows_heads = form.rows.shape[0]
    offset_ok = form.offset.numel() == 0 or tuple(form.offset.shape) == (heads, dim)
    return rows_heads in (1, heads) and form.rows.shape[-1] == dim and offset_ok


def supports(layer) -> bool:
    """Whether this path can run the layer's decode step (independent of the build)."""
    window_k, window_v = layer.window_keys, layer.window_values
    if window_k is None or window_k.device.type != "cpu":
        return False
    heads, dim, dim_v = window_k.shape[1], window_k.shape[-1], window_v.shape[-1]
    if dim % DIM_MULTIPLE or dim_v % DIM_MULTIPLE:
        return False
    # pre-RoPE keys are rotated at their positions with the model's tables
    if layer.key_space is not None and not callable(getattr(layer.key_space, "tables", None)):
        return False
    keys, values = describe(layer.key_codec, dim), describe(layer.value_codec, dim_v)
    return (keys is not None and values is not None and _heads_match(keys, heads, dim)
            and _heads_match(values, heads, dim_v))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _per_head(rows: torch.Tensor, heads: int) -> torch.Tensor:
    return rows.expand(heads, -1, -1) if rows.shape[0] != heads else rows  # (H, n, D), no copy


def rope_rows(layer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, sin, positions) the kernel rotates the layer's pre-RoPE compressed keys with.

    Consecutive positions (compressed token i at n_sinks + i): cos, sin (n, D) or (n, D/2) rows of
    the tokens' positions in order, positions empty. After eviction (`layer.token_positions`):
    cos, sin the tables' rows 0 .. seen_tokens - 1 (every held token's position is below the
    tokens seen), positions int32 (B, H, n) of the compressed tokens, each KV head its own.
    The (., D/2) form is the first half of rows whose halves are equal (`half_tables`).
    """
    space, n_compressed = layer.key_space, layer.n_compressed
    start = layer.key_positions(0, n_compressed)
    if isinstance(start, int):
        first, count, positions = start, n_compressed, _EMPTY
    else:
        first, count, positions = 0, layer.get_seq_length(), _rows(start.to(torch.int32))
    halves = space.half_tables(first, count, device) if hasattr(space, "half_tables") else None
    cos, sin = halves if halves is not None else space.tables(first, count, device)
    return _rows(cos), _rows(sin), positions


def attend(module, layer, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
           block_tokens: int) -> torch.Tensor:
    """The decode step over a layer that `supports` accepts, from its codes.

    Args:
        module: the loaded extension (`kernels.cpu.load()`).
        query: (B, H_q, 1, D); mask: None or (B or 1, seq) bool / float32 rows of the step's mask.

    Returns:
        (B, H_q, 1, D_v) in the query's dtype.
    """
    heads, dim, dim_v = layer.window_keys.shape[1], layer.window_keys.shape[-1], layer.window_values.shape[-1]
    keys, values = describe(layer.key_codec, dim), describe(layer.value_codec, dim_v)
    ks, vs = layer.stored_keys, layer.stored_values
    n_compressed = layer.n_compressed
    cos = sin = positions = _EMPTY
    if layer.key_space is not None:  # pre-RoPE keys: rotated at their positions (the kernel checks them)
        cos, sin, positions = rope_rows(layer, query.device)
    B, Hq, _, D = query.shape
    out = module.attend_codebook(
        _rows(query.reshape(B, Hq, D)),
        _rows(layer.sink_keys), _rows(layer.sink_values), _rows(layer.window_keys), _rows(layer.window_values),
        [_rows(ks[name]) for name in keys.names], list(keys.bits), list(keys.books), stored_scale(ks["scale"]),
        _per_head(keys.rows, heads), keys.offset, cos, sin, positions,
        [_rows(vs[name]) for name in values.names], list(values.bits), list(values.books), stored_scale(vs["scale"]),
        _per_head(values.rows, heads), values.offset,
        n_compressed, mask, float(scaling), block_tokens)
    return out.unsqueeze(2)  # (B, H_q, 1, D_v)
