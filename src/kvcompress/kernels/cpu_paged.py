"""The CPU paged kernel (`cpu_paged.cpp`): `paged_attention` over a paged pool of packed slots, compiled.

`attend(query, pages, block_table, seq_lens, query_start_loc, layout, scale)` returns what
`paged_attention.paged_attention_torch` returns, (out (T, Hq, D), lse (T, Hq)) float32, to float
tolerance, for every step (decode, prefill chunks, prefix-cache hits); or None where it does not apply
(tensors not on the CPU, head_dim above 1024, the extension not built or KVCOMPRESS_KERNELS=torch:
then `kernels.cpu.load` has warned once). Each query row's arithmetic, its rotations included, depends
only on the row and its request's tokens up to its position: a token gets the same bits in any chunk
or batch (SPLIT_TOKENS and the tile are fixed). It rounds differently from the torch path, so one
engine must use one of the two throughout. It knows the slot layout only through `paged.SlotLayout`.
"""

from __future__ import annotations

import functools

import torch

from ..paged import PartLayout, SlotLayout
from . import cpu

SPLIT_TOKENS = 512  # tokens per task, cut at multiples of it from token 0: splits a long context between threads
METHODS = {"quant": 0, "hadamard+quant": 0, "rotated+codebook": 1, "none": 2}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_DIM = 1024


def part_description(part: PartLayout, offset: int) -> tuple[list[int], torch.Tensor]:
    """(method, offset, bits, group, scale_at, zero_at, dtype) of a part for the kernel, and its codebook."""
    fields = part.fields()
    description = [METHODS[part.method], offset, part.bits, part.group_size, fields.get("scale", (0, 0))[0],
                   fields.get("zero", (0, 0))[0], DTYPES.get(part.dtype, -1)]
    book = part.centroids() if part.method == "rotated+codebook" else torch.empty(0)
    return description, book.float().contiguous()


def supports_layout(layout: SlotLayout) -> bool:
    """Whether the kernel reads this layer's slots (head_dim <= 1024, a "none" part in a float dtype)."""
    parts_ok = all(p.method != "none" or p.dtype in DTYPES for p in (layout.key, layout.value))
    return layout.key.head_dim <= MAX_DIM and parts_ok


def supports(query: torch.Tensor, pages: torch.Tensor, layout: SlotLayout) -> bool:
    """Whether the kernel reads this call (CPU tensors, uint8 pages, `supports_layout`)."""
    return (query.device.type == "cpu" and pages.device.type == "cpu" and query.shape[-1] <= MAX_DIM
            and pages.dtype == torch.uint8 and supports_layout(layout))


@functools.lru_cache(maxsize=256)
def layout_arguments(layout: SlotLayout) -> tuple:
    """The kernel's arguments for a layer's slots (computed once per layout): the K and V part
    descriptions and codebooks, R_K (D, D) and R_V^T (D, D) float32 (empty tensors for no rotation)."""
    key, key_book = part_description(layout.key, 0)
    value, value_book = part_description(layout.value, layout.value_offset)
    key_rotation, value_rotation = layout.key.rotation(), layout.value.rotation()
    empty = torch.empty(0)
    key_rotation = empty if key_rotation is None else key_rotation.float().contiguous()
    value_rotation_t = empty if value_rotation is None else value_rotation.float().T.contiguous()
    return key, key_book, value, value_book, key_rotation, value_rotation_t


def available(query: torch.Tensor, pages: torch.Tensor, layout: SlotLayout) -> bool:
    """Whether `attend` runs the kernel for this layer's calls (`supports` and the extension loads)."""
    return supports(query, pages, layout) and cpu.load() is not None


def attend(query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor, layout: SlotLayout, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`paged_attention` through the compiled kernel (arguments and results as there), or None."""
    if not supports(query, pages, layout):
        return None
    module = cpu.load()
    if module is None:
        return None
    as_int = [t.to(torch.int32).contiguous() for t in (block_table, seq_lens, query_start_loc)]
    return tuple(module.paged_attend(query.float().contiguous(), pages, *as_int, *layout_arguments(layout),
                                     float(scale), SPLIT_TOKENS))
