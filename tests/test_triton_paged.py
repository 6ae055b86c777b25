"""The Triton paged kernels (kernels.triton_paged) against the torch writer and the torch paged path.

The store writes the bytes `SlotLayout.write` writes into a pool of random bytes through a scrambled slot
mapping with padding (-1) entries: byte for byte for uniform ("quant", "hadamard+quant") and "none"
parts, tail padding included; for codebook parts the same codes and every scale equal or one fp16 step
away. The attention equals `paged_attention_torch` to float tolerance for every kind of part, GQA
ratio, dtype and head dim, over requests that decode, prefill from token 0, prefill a chunk after a
stored prefix, cross split boundaries or have no queries; it gives a token the same bits in any chunk or
batch; it reads the stored codes. Without a GPU the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py), on small shapes and splits of SPLIT tokens so that they stay fast.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton", reason="Triton is an optional extra: pip install 'kvcompress[gpu]'")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before Triton's import
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton cannot run here", allow_module_level=True)

from test_paged import PARTS, paged_spec  # noqa: E402
from paged_pools import fill_pool  # noqa: E402

from kvcompress.kernels import triton_paged  # noqa: E402
from kvcompress.kernels.paged_attention import paged_attention_torch  # noqa: E402
from kvcompress.paged import PagedLayout, SlotLayout  # noqa: E402
from kvcompress.spec import TensorSpec  # noqa: E402

BLOCK = 16
SPLIT = 32  # tokens per split in these tests (the kernel's default is SPLIT_TOKENS)
SPLIT_SMALL = triton_paged.MAX_BLOCK_TOKENS  # the smallest split, for the many calls of the chunking test
CB1 = TensorSpec(method="rotated+codebook", bits=1, seed=11)


def layout_for(key: str | TensorSpec, value: str | TensorSpec, D: int = 64, dtype=torch.bfloat16) -> SlotLayout:
    specs = [PARTS[x][0] if isinstance(x, str) else x for x in (key, value)]
    return PagedLayout.for_spec(paged_spec(*specs), 2, D, dtype).layers[1]


def states_with_ties(n: int, heads: int, D: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Random states (n, heads, D) with an outlier channel, a constant group of 32 (scale 0) and a group
    whose values lie halfway between two 4-bit codes (min 0, max 15: scale 1, round-half-even decides)."""
    x = torch.randn(n, heads, D, generator=torch.Generator().manual_seed(seed)) * 2
    x[..., 3] *= 6
    x[2, :, :32] = 0.625
    ties = torch.arange(32) % 31 / 2
    ties[0], ties[1] = 0.0, 15.0
    x[4, 0, :32] = ties
    return x.to(dtype)


def store_both(layout: SlotLayout, n: int = 21, heads: int = 2, seed: int = 0, dtype=torch.bfloat16):
    """(pages written by the kernel, pages written by `layout.write`) from the same random bytes, states
    and scrambled slot mapping with two padding entries."""
    D = layout.key.head_dim
    gen = torch.Generator().manual_seed(seed)
    key = states_with_ties(n, heads, D, seed, dtype)
    value = states_with_ties(n, heads, D, seed + 1, dtype)
    slots = torch.randperm(3 * BLOCK, generator=gen)[:n]
    slots[[1, 7]] = -1
    pages = torch.randint(0, 256, (3, heads, BLOCK, layout.slot_bytes), dtype=torch.uint8, generator=gen)
    on_device = [t.to(DEVICE) for t in (pages, key, value, slots)]
    mine, reference = on_device[0].clone(), on_device[0].clone()
    triton_paged.write(mine, *on_device[1:], layout)
    layout.write(reference, *on_device[1:])
    return mine.cpu(), reference.cpu()


@pytest.mark.parametrize("key,value,dtype", [("int4", "int4", torch.bfloat16), ("int8", "int2", torch.bfloat16),
                                             ("int3", "hadamard-int4", torch.float16),
                                             ("none", "int4", torch.float32), ("hadamard-int4", "none", torch.float16)])
def test_store_writes_the_bytes_of_the_torch_writer(key, value, dtype):
    layout = layout_for(key, value, dtype=dtype)
    mine, reference = store_both(layout, dtype=dtype)
    assert torch.equal(mine, reference), f"{int((mine != reference).sum())} bytes differ"


def test_store_zeroes_the_tail_of_a_wide_slot_and_head_dim_128():
    """A per-layer spec gives narrow layers a wider slot: the bytes after the parts are zeros."""
    narrow = layout_for("int4", "int2", D=128)
    wide = SlotLayout(narrow.key, narrow.value, slot_bytes=narrow.slot_bytes + 12)
    mine, reference = store_both(wide, n=9, seed=3)
    assert torch.equal(mine, reference)


@pytest.mark.parametrize("key,value,D", [("rot-cb4", "rot-cb3", 64), ("rot-cb2", "int4", 64), (CB1, "rot-cb4", 128)])
def test_codebook_store_writes_the_same_codes_and_scales_within_one_fp16_step(key, value, D):
    layout = layout_for(key, value, D=D)
    mine, reference = store_both(layout, n=13, seed=4)
    scale_bytes = torch.zeros(layout.slot_bytes, dtype=torch.bool)  # where fp16 codebook scales lie
    for part, offset in ((layout.key, 0), (layout.value, layout.value_offset)):
        if part.method == "rotated+codebook":
            start = offset + part.fields()["scale"][0]
            scale_bytes[start:start + 2] = True
    assert torch.equal(mine[..., ~scale_bytes], reference[..., ~scale_bytes])  # codes, other parts, padding
    steps = (mine[..., scale_bytes].contiguous().view(torch.int16).int()
             - reference[..., scale_bytes].contiguous().view(torch.int16).int())
    assert steps.abs().max() <= 1


@pytest.mark.parametrize("key,value,bad,message", [("int4", "int4", float("nan"), "NaN"),
                                                   ("int4", "int4", 7e4, "fp16 range"),
                                                   ("hadamard-int4", "int4", 1e6, "fp16 range"),
                                                   ("int4", "rot-cb3", float("inf"), "NaN")])
def test_store_refuses_what_the_torch_writer_refuses(key, value, bad, message):
    if DEVICE == "cuda":
        pytest.skip("on CUDA these are device-side assertions, which would end the test process")
    layout = layout_for(key, value)
    pages = torch.zeros(2, 2, BLOCK, layout.slot_bytes, dtype=torch.uint8)
    states = torch.randn(4, 2, 64)
    bad_states = states.clone()
    bad_states[1, 0, 5] = bad
    args = (states, bad_states) if value != "int4" else (bad_states, states)
    for store in (lambda: layout.write(pages, *args, torch.arange(4)),
                  lambda: triton_paged.write(pages, *args, torch.arange(4), layout)):
        with pytest.raises(ValueError, match=message):
            store()


def test_a_padding_row_is_neither_stored_nor_checked():
    """A NaN in a row whose slot is -1 (padding) stops neither writer; the other rows are stored alike."""
    layout = layout_for("hadamard-int4", "rot-cb2")
    states = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(6))
    states[2, 1, 7] = float("nan")
    slots = torch.tensor([5, 9, -1, 0])
    mine = torch.zeros(1, 2, BLOCK, layout.slot_bytes, dtype=torch.uint8, device=DEVICE)
    reference = mine.clone()
    triton_paged.write(mine, states.to(DEVICE), states.to(DEVICE), slots.to(DEVICE), layout)
    layout.write(reference, states.to(DEVICE), states.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(mine[:, :, [5, 9, 0], :layout.value_offset], reference[:, :, [5, 9, 0], :layout.value_offset])
    assert mine[:, :, [5, 9, 0]].any() and not mine[:, :, [1, 2, 3]].any()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's fp16 of a too-large scale
def test_codebook_scales_beyond_fp16_are_refused():
    layout = layout_for("int4", "rot-cb3")
    pages = torch.zeros(2, 2, BLOCK, layout.slot_bytes, dtype=torch.uint8)
    if DEVICE == "cuda":
        pytest.skip("on CUDA this is a device-side assertion, which would end the test process")
    values = torch.randn(4, 2, 64) * 3e4  # scales near the rms, 3e4; four times that for token 2
    values[2] *= 4
    with pytest.raises(ValueError, match="fp16 range"):
        layout.write(pages, torch.randn(4, 2, 64), values, torch.arange(4))
    with pytest.raises(ValueError, match="fp16 range"):
        triton_paged.write(pages, torch.randn(4, 2, 64), values, torch.arange(4), layout)


def test_supports_power_of_two_head_dims_only():
    assert triton_paged.supports_layout(layout_for("int4", "rot-cb3"))
    assert not triton_paged.supports_layout(layout_for("none", "none", D=40))
    assert not triton_paged.supports_layout(layout_for("int4", "int4", D=96))


# ---- attention ------------------------------------------------------------------------------------

def filled_pool(layout: SlotLayout, lengths: list[int], chunks: list[int], hq: int, hkv: int = 2, seed: int = 0):
    """(query, pages, block_table, seq_lens, query_start_loc): request r's lengths[r] tokens (random states)
    written by `layout.write` to a pool whose blocks are handed out in a scrambled order, and queries for
    its last chunks[r] tokens (seq_lens = lengths: a chunk's own tokens are stored first, as vLLM does)."""
    gen = torch.Generator().manual_seed(seed)
    return fill_pool(layout, lengths, chunks, hq, hkv, BLOCK, torch.bfloat16, gen, spare_blocks=2, spare_column=True)


def kernel(query, pages, table, lens, starts, layout, scale, split=SPLIT):
    """`triton_paged.attend` on DEVICE with splits of `split` tokens, results on the CPU."""
    out, lse = triton_paged.attend(query.to(DEVICE), pages.to(DEVICE), table.to(DEVICE), lens, starts, layout, scale,
                                   split_tokens=split)
    return out.cpu(), lse.cpu()


def assert_close(got, want, what):
    (out, lse), (out_t, lse_t) = got, want
    torch.testing.assert_close(out, out_t, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(lse, lse_t, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what}: {m}")


# a decode step, a request without queries, a 3-token chunk after a stored prefix, a decode past two split
# boundaries, a prefill from token 0 that ends on a block boundary
LENGTHS, CHUNKS = [21, 5, 50, 2 * SPLIT + 13, 16], [1, 0, 3, 1, 16]


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("int8", "int2"), ("int3", "hadamard-int4"),
                                       ("hadamard-int4", "rot-cb3"), ("rot-cb4", "rot-cb2"), ("none", "int4"),
                                       (CB1, "none")])
def test_attention_equals_the_torch_paged_path_for_every_part(key, value):
    layout = layout_for(key, value)
    pool = filled_pool(layout, LENGTHS, CHUNKS, hq=6)
    assert_close(kernel(*pool, layout, 64 ** -0.5), paged_attention_torch(*pool, layout, 64 ** -0.5), f"{key}/{value}")


@pytest.mark.parametrize("hq,hkv,dtype,D", [(2, 2, torch.float32, 64), (8, 2, torch.float16, 32),
                                            (3, 1, torch.bfloat16, 128)])
def test_attention_equals_the_torch_paged_path_for_gqa_dtypes_and_head_dims(hq, hkv, dtype, D):
    layout = layout_for("none" if D == 32 else "rot-cb3", "hadamard-int4", D=D, dtype=dtype)
    pool = filled_pool(layout, [40, 9], [2, 9], hq=hq, hkv=hkv, seed=hq)
    assert_close(kernel(*pool, layout, 0.1), paged_attention_torch(*pool, layout, 0.1), f"{hq}/{hkv} {dtype} {D}")


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("hadamard-int4", "rot-cb3")])
def test_a_token_gets_the_same_bits_in_any_chunk_or_batch(key, value):
    """A request of split + 9 tokens (splits of 16 here) computed in one chunk, in chunks of 1 and 7 tokens,
    and beside other requests (a long decode before it, a chunk of a third after it): every token's output
    and lse are the same bits, rotations included (they are per row)."""
    n = SPLIT_SMALL + 9
    layout = layout_for(key, value)
    query, pages, table, lens, starts = filled_pool(layout, [n, 2 * SPLIT_SMALL + 3, 30], [n, 1, 30], hq=4, seed=5)
    other_rows = [starts[1].item(), *range(starts[2].item(), starts[3].item())]

    def steps(cut: int, with_others: bool) -> tuple[torch.Tensor, torch.Tensor]:
        outs, lses = [], []
        for a in range(0, n, cut):
            b = min(a + cut, n)
            rows, tables, seq, counts = [torch.arange(a, b)], [table[0]], [b], [b - a]
            if with_others:
                rows = [torch.tensor(other_rows[:1]), *rows, torch.tensor(other_rows[1:1 + a % 5 + 1])]
                tables, seq = [table[1], table[0], table[2]], [lens[1].item(), b, 20 + a % 5 + 1]
                counts = [1, b - a, a % 5 + 1]
            qsl = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
            out, lse = kernel(query[torch.cat(rows)], pages, torch.stack(tables), torch.tensor(seq, dtype=torch.int32),
                              qsl, layout, 0.125, split=SPLIT_SMALL)
            mine = slice(qsl[1].item(), qsl[2].item()) if with_others else slice(0, b - a)
            outs.append(out[mine])
            lses.append(lse[mine])
        return torch.cat(outs), torch.cat(lses)

    whole = steps(n, False)
    assert_close(whole, paged_attention_torch(query[:n], pages, table[:1], lens[:1], starts[:2], layout, 0.125),
                 "whole")
    for cut, with_others in ((1, False), (7, True)):
        got = steps(cut, with_others)
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1]), (cut, with_others,
                                                                                  (got[0] - whole[0]).abs().max())


def test_attention_reads_the_stored_codes():
    layout = layout_for("int4", "rot-cb3")
    query, pages, table, lens, starts = filled_pool(layout, [20, 30], [1, 4], hq=4)
    before = kernel(query, pages, table, lens, starts, layout, 0.125)
    t = 27  # a token of request 1 (queries at positions 26 .. 29): its slot's value codes get other bytes
    slot = pages[table[1, t // BLOCK], :, t % BLOCK]
    slot[:, layout.value_offset:layout.value_offset + 4] ^= 0x5A
    after = kernel(query, pages, table, lens, starts, layout, 0.125)
    assert torch.equal(after[0][:2], before[0][:2])  # request 0, and request 1's query before the token
    assert all((after[0][row] - before[0][row]).abs().max() > 1e-4 for row in (2, 3, 4))
    assert_close(after, paged_attention_torch(query, pages, table, lens, starts, layout, 0.125), "tampered")


def test_pages_written_by_the_kernel_attend_like_the_torch_path():
    """The two kernels together: tokens stored by `write`, read by `attend`, against the torch path over
    the same pages."""
    layout = layout_for("hadamard-int4", "int3")
    gen = torch.Generator().manual_seed(8)
    n = 24
    pages = torch.zeros(3, 2, BLOCK, layout.slot_bytes, dtype=torch.uint8, device=DEVICE)
    slots = torch.tensor([*range(BLOCK, 2 * BLOCK), *range(8)])  # block 1, then the head of block 0
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    keys, values = torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen)
    triton_paged.write(pages, keys.to(DEVICE), values.to(DEVICE), slots.to(DEVICE), layout)
    query = torch.randn(3, 4, 64, generator=gen)
    pool = (query, pages.cpu(), table, torch.tensor([n], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32))
    assert_close(kernel(*pool, layout, 0.125), paged_attention_torch(*pool, layout, 0.125), "written and read")
