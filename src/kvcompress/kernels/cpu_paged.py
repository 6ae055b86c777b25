"""The CPU paged kernels: `paged_attention` over a paged pool of packed slots (`cpu_paged.cpp`) and
`SlotLayout.write` (`cpu_paged_write.cpp`), compiled.

`attend(query, pages, block_table, seq_lens, query_start_loc, layout, scale)` returns what
`paged_attention.paged_attention_torch` returns, (out (T, Hq, D), lse (T, Hq)) float32, to float
tolerance, for every step (decode, prefill chunks, prefix-cache hits); or None where it does not apply
(tensors not on the CPU, head_dim above 1024, the extension not built or KVCOMPRESS_KERNELS=torch:
then `kernels.cpu.load` has warned once). Each query row's arithmetic, its rotations included, depends
only on the row and its request's tokens up to its position: a token gets the same bits in any chunk
or batch (SPLIT_TOKENS and the tile are fixed). It rounds differently from the torch path, so one
engine must use one of the two throughout. It knows the slot layout only through `paged.SlotLayout`.

`write(pages, key, value, slot_mapping, layout)` stores a step's tokens: the same bytes as
`SlotLayout.write` (rotations stay a torch matmul here, everything else is one compiled call); it
returns False where it does not apply (then the caller runs `SlotLayout.write`). It does not handle
states the torch writer refuses (non-finite, beyond fp16): it hands those to `SlotLayout.write`,
which raises.
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


def _write_description(part: PartLayout, offset: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(method, offset, bits, group, scale_at, zero_at, nbytes) of a part for the encoder, its codebook
    and the midpoints between neighbouring centroids (torch.bucketize's boundaries in `CodebookCodec`)."""
    fields = part.fields()
    description = [METHODS[part.method], offset, part.bits, part.group_size, fields.get("scale", (0, 0))[0],
                   fields.get("zero", (0, 0))[0], part.nbytes]
    if part.method != "rotated+codebook":
        return description, torch.empty(0), torch.empty(0)
    book = part.centroids().float().contiguous()
    return description, book, ((book[1:] + book[:-1]) / 2).contiguous()


@functools.lru_cache(maxsize=256)
def write_arguments(layout: SlotLayout) -> tuple:
    """The encoder's arguments for a layer's slots: per part its description, codebook and midpoints."""
    return (*_write_description(layout.key, 0), *_write_description(layout.value, layout.value_offset))


def pages_input(x: torch.Tensor, part: PartLayout) -> torch.Tensor:
    """What the encoder reads for states `x` (n, H, D): the stored dtype ("none"), x @ R (rotated), or x."""
    if part.method == "none":
        return x.to(part.dtype)
    rotation = part.rotation(x.device)
    return x if rotation is None else x.float() @ rotation  # the torch writer's matmul, so the same bits


def write(pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
          layout: SlotLayout) -> bool:
    """`layout.write(pages, key, value, slot_mapping)` compiled (the same bytes); False where it does not apply.

    pages: (num_blocks, H, block_size, slot_bytes) uint8; key, value: (N, H, D) float32, bfloat16 or
    float16; slot_mapping: (N,) int, negative for padding.
    """
    writer = slot_writer(layout)
    return writer is not None and writer(pages, key, value, slot_mapping)


@functools.lru_cache(maxsize=256)
def slot_writer(layout: SlotLayout):
    """`write` bound to one layout, its arguments prepared once (a layer's hot path), or None where the
    encoder is not built or does not reproduce the torch writer's bytes here."""
    if layout.key.head_dim > MAX_DIM:
        return None
    lanes = _lanes(layout)
    if lanes is None:
        return None
    module = cpu.load()
    arguments = (*write_arguments(layout), *lanes)
    rotated = layout.key.rotation() is not None or layout.value.rotation() is not None
    key_part, value_part = layout.key, layout.value

    def run(pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
        if (pages.device.type != "cpu" or key.device.type != "cpu" or pages.dtype != torch.uint8
                or key.dtype not in DTYPES or value.dtype not in DTYPES
                or key.stride(-1) != 1 or value.stride(-1) != 1):
            return False
        if rotated:
            keep = slot_mapping >= 0  # the torch writer multiplies the kept rows only (matmul rounds by row count)
            if not bool(keep.all()):
                key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
        status = module.paged_write(pages, pages_input(key, key_part), pages_input(value, value_part), slot_mapping,
                                    *arguments)
        if status:  # states the torch writer refuses: it raises its error
            layout.write(pages, key, value, slot_mapping)
        return True

    return run


LANES = ((16, 8), (8, 8), (16, 16), (8, 16), (4, 4))  # (sums, amin/amax) vector widths torch may use


@functools.lru_cache(maxsize=256)
def _lanes(layout: SlotLayout) -> tuple[int, int] | None:
    """The vector widths of torch's float sums and amin / amax with which the encoder writes the torch
    writer's bytes for this layout on this machine, or None (then the torch writer runs). Found once per
    layout on a few random tokens and on zeros of random signs (whose sign a min or max keeps by order)."""
    module = cpu.load()
    if module is None:
        return None
    gen = torch.Generator().manual_seed(0)
    n, heads, d = 16, 2, layout.key.head_dim
    signs = torch.randint(0, 2, (n, heads, d), generator=gen) * 2.0 - 1
    key, value = torch.randn(n, heads, d, generator=gen), torch.randn(n, heads, d, generator=gen)
    key[:4], value[:4] = 0.0 * signs[:4], 0.0 * signs[:4]  # all zeros, of random signs
    key[4:8] = torch.where(signs[4:8] > 0, key[4:8].abs(), 0.0 * signs[4:8])  # the minimum a signed zero
    value[4:8] = torch.where(signs[4:8] > 0, -value[4:8].abs(), 0.0 * signs[4:8])  # the maximum a signed zero
    slots = torch.arange(n)
    want = torch.zeros(1, heads, n, layout.slot_bytes, dtype=torch.uint8)
    layout.write(want, key, value, slots)
    inputs = (pages_input(key, layout.key), pages_input(value, layout.value))
    for lanes in LANES:
        got = torch.zeros_like(want)
        if module.paged_write(got, *inputs, slots, *write_arguments(layout), *lanes) == 0 and torch.equal(got, want):
            return lanes
    return None


def available(query: torch.Tensor, pages: torch.Tensor, layout: SlotLayout) -> bool:
    """Whether `attend` runs the kernel for this layer's calls (`supports` and the extension loads)."""
    return supports(query, pages, layout) and cpu.load() is not None


def layer_attention(layout: SlotLayout):
    """`attend` bound to one layer's slots, its arguments prepared once: a function (query, pages,
    block_table, seq_lens, query_start_loc, scale) -> (out, lse) that expects block_table, seq_lens and
    query_start_loc already int32 and contiguous (the caller checked the lengths once per step), or
    returns None where the kernel does not apply; None itself where the extension is not built."""
    if not supports_layout(layout) or cpu.load() is None:
        return None
    module, arguments = cpu.load(), layout_arguments(layout)

    def run(query, pages, block_table, seq_lens, query_start_loc, scale):
        if query.device.type != "cpu" or pages.device.type != "cpu" or pages.dtype != torch.uint8:
            return None
        return tuple(module.paged_attend(query.float().contiguous(), pages, block_table, seq_lens, query_start_loc,
                                         *arguments, float(scale), SPLIT_TOKENS))

    return run


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
