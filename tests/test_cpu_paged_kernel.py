"""The compiled CPU paged kernel (kernels.cpu_paged, cpu_paged.cpp): every query's attention over its
request's first context_lens tokens equals the torch paged path's (each query as a one-query request
whose sequence is those tokens) for every kind of slot part, GQA ratio and dtype, over random pages
reached through a scrambled block table, with requests that decode, prefill a chunk, span several of
the kernel's splits or have nothing stored; `paged_attention(..., use_kernel=True)` runs it for decode
steps; it reads the codes (changing one stored slot changes exactly its request's output).

The extension is built once per machine into the user's cache (a few minutes cold)."""

from __future__ import annotations

import pytest
import torch
from test_paged import PARTS, paged_spec

from kvcompress.kernels import cpu_paged
from kvcompress.kernels.paged_attention import paged_attention, paged_attention_torch
from kvcompress.paged import PagedLayout

BLOCK = 16


from test_cpu_kernel import kernel  # noqa: E402,F401  (the module's autouse fixture: skip under torch, build once)


def filled_pool(key: str, value: str, stored: list[int], chunks: list[int], hq: int, hkv: int = 3, D: int = 64,
                dtype=torch.bfloat16, seed: int = 0):
    """(query, pages, block_table, context_lens, query_start_loc, layout): random states written to a
    pool whose blocks are handed out in a scrambled order, and the chunks' queries."""
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
    return query, pages, table, torch.tensor(stored, dtype=torch.int32), starts, layout


def stored_reference(query, pages, table, lens, starts, layout, scale):
    """The kernel's contract from the torch paged path: (out, lse) of every query over its request's first
    lens[r] tokens, computed as a one-query request whose sequence is those tokens (0 and -inf for none)."""
    rows = [(r, i) for r in range(len(lens)) for i in range(int(starts[r]), int(starts[r + 1])) if lens[r] > 0]
    out = torch.zeros(query.shape, dtype=torch.float32)
    lse = torch.full(query.shape[:2], float("-inf"))
    if rows:
        requests, keep = (torch.tensor(x) for x in zip(*rows))
        got = paged_attention_torch(query[keep], pages, table[requests], lens[requests],
                                    torch.arange(len(rows) + 1), layout, scale)
        out[keep], lse[keep] = got
    return out, lse


def assert_same(got, want, what):
    (out, lse), (out_t, lse_t) = got, want
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_t)), what
    torch.testing.assert_close(out, out_t, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(lse, lse_t, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what}: {m}")


# decoding requests, a request with nothing stored, a prefill chunk, one longer than two splits
STORED, CHUNKS = [37, 0, 100, 2 * cpu_paged.SPLIT_TOKENS + 75], [1, 3, 6, 1]


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("int8", "int2"), ("int3", "hadamard-int4"),
                                       ("hadamard-int4", "rot-cb3"), ("rot-cb4", "rot-cb2"), ("none", "int4"),
                                       ("int4", "none")])
def test_kernel_equals_the_torch_paged_path_for_every_part(key, value):
    query, pages, table, lens, starts, layout = filled_pool(key, value, STORED, CHUNKS, hq=9)
    scale = 64 ** -0.5
    got = cpu_paged.attend(query, pages, table, lens, starts, layout, scale)
    assert got is not None  # the kernel ran, not the torch fallback
    assert_same(got, stored_reference(query, pages, table, lens, starts, layout, scale), f"{key}/{value}")
    assert not got[0][1:4].any() and torch.isinf(got[1][1:4]).all()  # request 1 stored nothing


@pytest.mark.parametrize("hq,dtype,D", [(3, torch.float32, 64), (12, torch.float16, 128), (6, torch.bfloat16, 32)])
def test_kernel_equals_the_torch_paged_path_for_gqa_dtypes_and_head_dims(hq, dtype, D):
    query, pages, table, lens, starts, layout = filled_pool("rot-cb3", "int4", [300, 45], [2, 1], hq=hq, D=D,
                                                            dtype=dtype, seed=hq)
    got = cpu_paged.attend(query, pages, table, lens, starts, layout, 0.1)
    assert_same(got, stored_reference(query, pages, table, lens, starts, layout, 0.1), f"{hq} {dtype} {D}")


def test_paged_attention_runs_the_kernel_for_decode_steps_only(monkeypatch):
    """A decode step (one query per request, seq_lens counting it) goes to the kernel and equals the torch
    path; a step with a prefill chunk stays on the torch path (the kernel has no causal chunk)."""
    query, pages, table, lens, starts, layout = filled_pool("int4", "rot-cb3", [30, 70], [1, 1], hq=9)
    calls = []
    attend = cpu_paged.attend
    monkeypatch.setattr(cpu_paged, "attend", lambda *args: calls.append(args) or attend(*args))
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    assert len(calls) == 1
    assert_same(got, paged_attention_torch(query, pages, table, lens, starts, layout, 0.125), "decode")
    chunk = torch.tensor([0, 2], dtype=torch.int32)
    got = paged_attention(query, pages, table[1:], lens[1:], chunk, layout, 0.125, use_kernel=True)
    assert len(calls) == 1
    assert_same(got, paged_attention_torch(query, pages, table[1:], lens[1:], chunk, layout, 0.125), "chunk")


def test_kernel_reads_the_stored_codes():
    query, pages, table, lens, starts, layout = filled_pool("int4", "int4", [40, 50], [1, 1], hq=9)
    before, _ = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    t = 45  # a token of request 1: its slot's value codes get other bytes
    slot = pages[table[1, t // BLOCK], :, t % BLOCK]
    slot[:, layout.value_offset:layout.value_offset + 4] ^= 0x5A
    after, _ = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)
    assert torch.equal(after[0], before[0]) and (after[1] - before[1]).abs().max() > 1e-4
    assert_same((after, _), stored_reference(query, pages, table, lens, starts, layout, 0.125), "tampered")


def test_without_the_switch_or_off_the_cpu_the_torch_path_runs(monkeypatch):
    query, pages, table, lens, starts, layout = filled_pool("int4", "int4", [20], [1], hq=9)
    calls = []
    monkeypatch.setattr(cpu_paged, "attend", lambda *args: calls.append(args))
    want = paged_attention_torch(query, pages, table, lens, starts, layout, 0.125)
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125)  # use_kernel defaults to False
    assert not calls and torch.equal(got[0], want[0])
    got = paged_attention(query, pages, table, lens, starts, layout, 0.125, use_kernel=True)  # kernel said None
    assert len(calls) == 1 and torch.equal(got[0], want[0])
