"""The compiled CPU paged kernel (kernels.cpu_paged, cpu_paged.cpp) serves every step: each query's causal
attention over its request's tokens up to its own position equals the torch paged path's (to float
tolerance) for every kind of slot part, GQA ratio, dtype and head dim, over random pages reached through a
scrambled block table, with requests that decode, prefill from token 0, prefill a chunk after a stored
prefix, cross the kernel's split boundaries or have no queries; and it gives a token the same bits in any
chunk or batch (one chunk, chunks of 1, 3 and 17 tokens, batched with other requests), rotations
included. `paged_attention(..., use_kernel=True)` runs it for every step; it reads the codes.

The extension is built once per machine into the user's cache (a few minutes cold)."""

from __future__ import annotations

import pytest
import torch
from test_paged import PARTS, paged_spec
from paged_pools import fill_pool

from kvcompress.kernels import cpu_paged
from kvcompress.kernels.paged_attention import paged_attention, paged_attention_torch
from kvcompress.paged import PagedLayout

BLOCK = 16
SPLIT = cpu_paged.SPLIT_TOKENS


from test_cpu_kernel import kernel  # noqa: E402,F401  (the module's autouse fixture: skip under torch, build once)


def filled_pool(key: str, value: str, lengths: list[int], chunks: list[int], hq: int, hkv: int = 3, D: int = 64,
                dtype=torch.bfloat16, seed: int = 0):
    """(query, pages, block_table, seq_lens, query_start_loc, layout): request r's lengths[r] tokens
    (random states) written to a pool whose blocks are handed out in a scrambled order, and queries for its
    last chunks[r] tokens (seq_lens = lengths: the chunk's own tokens are stored first, as vLLM does)."""
    gen = torch.Generator().manual_seed(seed)
    layout = PagedLayout.for_spec(paged_spec(PARTS[key][0], PARTS[value][0]), 2, D, dtype).layers[1]
    pool = fill_pool(layout, lengths, chunks, hq, hkv, BLOCK, dtype, gen, spare_blocks=3, spare_column=False)
    return (*pool, layout)


def assert_close(got, want, what):
    (out, lse), (out_t, lse_t) = got, want
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_t)), what
    torch.testing.assert_close(out, out_t, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(lse, lse_t, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what}: {m}")


# a decode step, a request without queries, a 6-token chunk after a stored prefix, a decode past two splits,
# a prefill from token 0, a chunk that crosses the first split boundary
LENGTHS, CHUNKS = [38, 5, 106, 2 * SPLIT + 76, 45, SPLIT + 30], [1, 0, 6, 1, 45, 60]


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("int8", "int2"), ("int3", "hadamard-int4"),
                                       ("hadamard-int4", "rot-cb3"), ("rot-cb4", "rot-cb2"), ("none", "int4"),
                                       ("int4", "none")])
def test_kernel_equals_the_torch_paged_path_for_every_part(key, value):
    query, pages, table, lens, starts, layout = filled_pool(key, value, LENGTHS, CHUNKS, hq=9)
    scale = 64 ** -0.5
    got = cpu_paged.attend(query, pages, table, lens, starts, layout, scale)
    assert got is not None  # the kernel ran, not the torch fallback
    assert_close(got, paged_attention_torch(query, pages, table, lens, starts, layout, scale), f"{key}/{value}")


@pytest.mark.parametrize("hq,dtype,D", [(3, torch.float32, 64), (12, torch.float16, 128), (6, torch.bfloat16, 32),
                                        (3, torch.float32, 40)])
def test_kernel_equals_the_torch_paged_path_for_gqa_dtypes_and_head_dims(hq, dtype, D):
    parts = ("rot-cb3", "hadamard-int4") if D != 40 else ("none", "none")  # 40: no power of two, no group of 32
    query, pages, table, lens, starts, layout = filled_pool(*parts,
                                                            [300, 45, 530], [2, 45, 20], hq=hq, D=D, dtype=dtype,
                                                            seed=hq)
    got = cpu_paged.attend(query, pages, table, lens, starts, layout, 0.1)
    assert_close(got, paged_attention_torch(query, pages, table, lens, starts, layout, 0.1), f"{hq} {dtype} {D}")


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("hadamard-int4", "rot-cb3"), ("rot-cb4", "none")])
def test_a_token_gets_the_same_bits_in_any_chunk_or_batch(key, value):
    """A request of SPLIT + 70 tokens computed in one chunk, in chunks of 1, 3 and 17 tokens, and inside
    steps that also carry other requests (a long decode, a prefill, a chunk of another request): every token's
    output and lse are the same bits (its arithmetic depends only on its query and the tokens before it)."""
    n = SPLIT + 70
    query, pages, table, lens, starts, layout = filled_pool(key, value, [n, 2 * SPLIT + 9, 200], [n, 1, 200], hq=9,
                                                            dtype=torch.float32, seed=5)
    other_rows = [starts[1].item(), *range(starts[2].item(), starts[3].item())]

    def steps(cut: int, with_others: bool) -> tuple[torch.Tensor, torch.Tensor]:
        outs, lses = [], []
        for a in range(0, n, cut):
            b = min(a + cut, n)
            rows, tables, seq, counts = [torch.arange(a, b)], [table[0]], [b], [b - a]
            if with_others:  # another request's decode and a chunk of a third, in the same step, before and after
                rows = [torch.tensor(other_rows[:1]), *rows, torch.tensor(other_rows[1:1 + a % 7 + 1])]
                tables, seq = [table[1], table[0], table[2]], [lens[1].item(), b, 150 + a % 7 + 1]
                counts = [1, b - a, a % 7 + 1]
            qsl = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
            out, lse = cpu_paged.attend(query[torch.cat(rows)], pages, torch.stack(tables), torch.tensor(seq,
                                        dtype=torch.int32), qsl, layout, 0.125)
            mine = slice(qsl[1].item(), qsl[2].item()) if with_others else slice(0, b - a)
            outs.append(out[mine])
            lses.append(lse[mine])
        return torch.cat(outs), torch.cat(lses)

    whole = steps(n, False)
    assert_close(whole, paged_attention_torch(query[:n], pages, table[:1], lens[:1], starts[:2], layout, 0.125),
                 "whole")
    for cut, with_others in ((1, False), (3, False), (17, False), (17, True), (n, True), (3, True)):
        got = steps(cut, with_others)
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1]), (cut, with_others,
                                                                                  (got[0] - whole[0]).abs().max())


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("hadamard-int4", "rot-cb3")])
def test_a_long_prompt_gets_the_same_bits_in_any_chunking_and_thread_count(key, value):
    """A prompt of 2 * SPLIT + 300 tokens (its rows cut into several tasks per split, taken by whichever thread
    is free) next to a shorter one: one chunk on 1 and 2 threads, and chunks of 300 and 777 tokens, give every
    token the same bits, and equal the torch paged path to float tolerance."""
    n = 2 * SPLIT + 300
    query, pages, table, lens, starts, layout = filled_pool(key, value, [n, 400], [n, 400], hq=9,
                                                            dtype=torch.float32, seed=11)
    threads = torch.get_num_threads()

    def chunked(cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        outs, lses = [], []
        for a in range(0, n, cut):
            b = min(a + cut, n)
            out, lse = cpu_paged.attend(query[a:b], pages, table[:1], torch.tensor([b], dtype=torch.int32),
                                        torch.tensor([0, b - a], dtype=torch.int32), layout, 0.125)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    try:
        torch.set_num_threads(2)
        both = cpu_paged.attend(query, pages, table, lens, starts, layout, 0.125)
        torch.set_num_threads(1)
        alone = cpu_paged.attend(query, pages, table, lens, starts, layout, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert_close(both, paged_attention_torch(query, pages, table, lens, starts, layout, 0.125), f"{key}/{value}")
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[1])
    for cut in (300, 777):
        got = chunked(cut)
        assert torch.equal(got[0], both[0][:n]) and torch.equal(got[1], both[1][:n]), (cut, (got[0] - both[0][:n]).abs().max())


def test_a_rotated_row_is_the_same_alone_and_among_many():
    """Query rotation and output un-rotation are per row: a decode query's result computed alone equals
    the same query's in a step of 40 decode queries of other requests (torch's matmul would round it
    differently by row count)."""
    lengths = [70 + 13 * i for i in range(40)]
    query, pages, table, lens, starts, layout = filled_pool("hadamard-int4", "rot-cb3", lengths, [1] * 40, hq=9,
                                                            dtype=torch.float32, seed=9)
    many = cpu_paged.attend(query, pages, table, lens, starts, layout, 0.125)
    for r in (0, 17, 39):
        alone = cpu_paged.attend(query[r:r + 1], pages, table[r:r + 1], lens[r:r + 1],
                                 torch.tensor([0, 1], dtype=torch.int32), layout, 0.125)
        assert torch.equal(alone[0][0], many[0][r]) and torch.equal(alone[1][0], many[1][r]), r


def test_paged_attention_runs_the_kernel_for_every_step(monkeypatch):
    """Decode steps and prefill chunks alike go to the kernel under use_kernel=True."""
    query, pages, table, lens, starts, layout = filled_pool("int4", "rot-cb3", [30, 70], [1, 9], hq=9)
    calls = []
    attend = cpu_paged.attend
    monkeypatch.setattr(cpu_paged, "attend", lambda *args: calls.append(args) or attend(*args))
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    assert len(calls) == 1
    assert_close(got, paged_attention_torch(query, pages, table, lens, starts, layout, 0.125), "mixed step")
    with pytest.raises(ValueError, match="written to the pages before attention"):  # both paths refuse it
        paged_attention(query, pages, table, torch.tensor([30, 5]), starts, layout, 0.125, use_kernel=True)
    assert len(calls) == 1


def test_kernel_reads_the_stored_codes():
    query, pages, table, lens, starts, layout = filled_pool("int4", "int4", [40, 50], [1, 4], hq=9)
    before, _ = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    t = 47  # a token of request 1 (queries at positions 46 .. 49): its slot's value codes get other bytes
    slot = pages[table[1, t // BLOCK], :, t % BLOCK]
    slot[:, layout.value_offset:layout.value_offset + 4] ^= 0x5A
    after, lse = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    assert torch.equal(after[:2], before[:2])  # request 0, and request 1's query before the token, do not read it
    assert all((after[row] - before[row]).abs().max() > 1e-4 for row in (2, 3, 4))
    assert_close((after, lse), paged_attention_torch(query, pages, table, lens, starts, layout, 0.125), "tampered")


def test_without_the_switch_or_off_the_cpu_the_torch_path_runs(monkeypatch):
    query, pages, table, lens, starts, layout = filled_pool("int4", "int4", [20], [3], hq=9)
    calls = []
    monkeypatch.setattr(cpu_paged, "attend", lambda *args: calls.append(args))
    want = paged_attention_torch(query, pages, table, lens, starts, layout, 0.125)
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125)  # use_kernel defaults to False
    assert not calls and torch.equal(got[0], want[0])
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)  # kernel said None
    assert len(calls) == 1 and torch.equal(got[0], want[0])
    assert not cpu_paged.supports(query.to("meta"), pages, layout) and cpu_paged.available(query, pages, layout)
