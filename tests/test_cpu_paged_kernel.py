"""The compiled CPU paged kernel (kernels.cpu_paged, cpu_paged.cpp): `paged_attention(...,
use_kernel=True)` equals the torch paged path at decode steps (one query per request, attending to
its request's stored tokens, itself included) for every kind of slot part, GQA ratio and dtype, over
random pages reached through a scrambled block table, with requests that span several of the
kernel's splits; it reads the codes (changing one stored slot changes exactly its request's output).

The extension is built once per machine into the user's cache (a few minutes cold)."""

from __future__ import annotations

import pytest
import torch
from test_paged import PARTS, paged_spec

from kvcompress import kernels
from kvcompress.kernels import cpu, cpu_paged
from kvcompress.kernels.paged_attention import paged_attention, paged_attention_torch
from kvcompress.paged import PagedLayout

BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if kernels.mode() == "torch":
        pytest.skip("KVCOMPRESS_KERNELS=torch is set: the kernel is disabled")
    module = cpu.load()
    assert module is not None, f"the CPU kernel did not build: {cpu.unavailable_reason()}"
    return module


def filled_pool(key: str, value: str, stored: list[int], chunks: list[int], hq: int, hkv: int = 3, D: int = 64,
                dtype=torch.bfloat16, seed: int = 0):
    """(query, pages, block_table, seq_lens, query_start_loc, layout): random states of stored + chunk
    tokens written to a pool whose blocks are handed out in a scrambled order, and the chunks' queries."""
    gen = torch.Generator().manual_seed(seed)
    layout = PagedLayout.for_spec(paged_spec(PARTS[key][0], PARTS[value][0]), 2, D, dtype).layers[1]
    per_request = [-(-(s + c) // BLOCK) for s, c in zip(stored, chunks)]
    order = torch.randperm(sum(per_request) + 3, generator=gen)  # 3 blocks no request owns
    pages = torch.randint(0, 256, (len(order), hkv, BLOCK, layout.slot_bytes), dtype=torch.uint8, generator=gen)
    table = torch.zeros(len(stored), max(per_request), dtype=torch.int32)
    used = 0
    for r, (s, c) in enumerate(zip(stored, chunks)):
        table[r, :per_request[r]] = order[used:used + per_request[r]]
        used += per_request[r]
        t = torch.arange(s + c)
        keys = torch.randn(s + c, hkv, D, generator=gen) * 2
        keys[..., 3] *= 6  # an outlier channel, as keys have
        values = torch.randn(s + c, hkv, D, generator=gen)
        layout.write(pages, keys.to(dtype), values.to(dtype), table[r, t // BLOCK].long() * BLOCK + t % BLOCK)
    query = (torch.randn(sum(chunks), hq, D, generator=gen) * 2).to(dtype)
    starts = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([s + c for s, c in zip(stored, chunks)], dtype=torch.int32)
    return query, pages, table, seq_lens, starts, layout


def assert_same(got, want, what):
    torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what}: {m}")


# decoding requests: one whose token is its first, short ones, one longer than two splits
STORED, CHUNKS = [37, 0, 100, 2 * cpu_paged.SPLIT_TOKENS + 75], [1, 1, 1, 1]


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("int8", "int2"), ("int3", "hadamard-int4"),
                                       ("hadamard-int4", "rot-cb3"), ("rot-cb4", "rot-cb2"), ("none", "int4"),
                                       ("int4", "none")])
def test_kernel_equals_the_torch_paged_path_for_every_part(key, value):
    query, pages, table, lens, starts, layout = filled_pool(key, value, STORED, CHUNKS, hq=9)
    scale = 64 ** -0.5
    got = cpu_paged.attend(query, pages, table, lens, starts, layout, scale)
    assert got is not None  # the kernel ran, not the torch fallback
    assert_same(got[0], paged_attention_torch(query, pages, table, lens, starts, layout, scale), f"{key}/{value}")
    assert torch.isfinite(got[1]).all()


@pytest.mark.parametrize("hq,dtype,D", [(3, torch.float32, 64), (12, torch.float16, 128), (6, torch.bfloat16, 32)])
def test_kernel_equals_the_torch_paged_path_for_gqa_dtypes_and_head_dims(hq, dtype, D):
    query, pages, table, lens, starts, layout = filled_pool("rot-cb3", "int4", [300, 45], [1, 1], hq=hq, D=D,
                                                            dtype=dtype, seed=hq)
    got = paged_attention(query, pages, table, lens, starts, layout, 0.1, use_kernel=True)
    assert_same(got, paged_attention_torch(query, pages, table, lens, starts, layout, 0.1), f"{hq} {dtype} {D}")


def test_kernel_reads_the_stored_codes():
    query, pages, table, lens, starts, layout = filled_pool("int4", "int4", [40, 50], [1, 1], hq=9)
    before = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    t = 45  # a token of request 1: its slot's value codes get other bytes
    slot = pages[table[1, t // BLOCK], :, t % BLOCK]
    slot[:, layout.value_offset:layout.value_offset + 4] ^= 0x5A
    after = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    assert torch.equal(after[0], before[0]) and (after[1] - before[1]).abs().max() > 1e-4
    assert_same(after, paged_attention_torch(query, pages, table, lens, starts, layout, 0.125), "tampered")


def test_without_the_switch_or_off_the_cpu_the_torch_path_runs(monkeypatch):
    query, pages, table, lens, starts, layout = filled_pool("int4", "int4", [20], [1], hq=9)
    calls = []
    monkeypatch.setattr(cpu_paged, "attend", lambda *args: calls.append(args))
    want = paged_attention_torch(query, pages, table, lens, starts, layout, 0.125)
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125)  # use_kernel defaults to False
    assert not calls and torch.equal(got, want)
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)  # kernel said None
    assert len(calls) == 1 and torch.equal(got, want)


def test_a_chunk_of_several_queries_takes_the_torch_path(monkeypatch):
    """The kernel attends every query to all of its request's stored tokens: right for a decode step,
    not for a chunk whose earlier queries must not see its later tokens."""
    query, pages, table, lens, starts, layout = filled_pool("int4", "int4", [20, 5], [3, 1], hq=9)
    calls = []
    monkeypatch.setattr(cpu_paged, "attend", lambda *args: calls.append(args))
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    assert not calls and torch.equal(got, paged_attention_torch(query, pages, table, lens, starts, layout, 0.125))
