"""The compiled paged encoder (`cpu_paged.write`, cpu_paged_write.cpp) writes the bytes `SlotLayout.write`
writes, for every kind of slot part, dtype and head dim: on random states with outliers and on edge values
(zeros of both signs, constant groups, values at the fp16 limit, subnormals, rounding ties), through a
scrambled slot mapping with padding, from strided views; and it refuses what the torch writer refuses
with the torch writer's error, writing nothing.

The extension is built once per machine into the user's cache (a few minutes cold)."""

from __future__ import annotations

import pytest
import torch
from test_paged import PARTS, paged_spec

from kvcompress.kernels import cpu_paged
from kvcompress.paged import PagedLayout

from test_cpu_kernel import kernel  # noqa: E402,F401  (the module's autouse fixture: skip under torch, build once)

BLOCK = 16


def layout_of(key: str, value: str, D: int = 64, dtype=torch.bfloat16):
    return PagedLayout.for_spec(paged_spec(PARTS[key][0], PARTS[value][0]), 2, D, dtype).layers[1]


def edge_states(n: int, heads: int, D: int, gen: torch.Generator, limit: float = 64000.0) -> torch.Tensor:
    """(n, heads, D) float32 states: random with an outlier channel, then rows of edge values (one row at
    +-limit: near the fp16 limit unrotated; a rotation multiplies it by up to sqrt(D))."""
    x = torch.randn(n, heads, D, generator=gen) * 2
    x[..., 3] *= 9
    x[0, 0] = 0.0  # all zeros
    x[0, 1] = -0.0
    x[1, 0, ::2], x[1, 0, 1::2] = -0.0, 0.0  # zeros of both signs are the group minimum and maximum
    x[1, 1] = x[1, 1].abs()
    x[1, 1, ::3] = -0.0
    x[2, 0] = 1.5  # a constant vector
    x[2, 1, : D // 2] = limit
    x[2, 1, D // 2:] = -limit
    x[3, 0] = torch.arange(D) * 0.5  # steps that land on rounding ties
    x[3, 1] = torch.randn(D, generator=gen) * 1e-6  # fp16 subnormal scales
    x[4, 0] = torch.randn(D, generator=gen) * 1e-30
    signs = torch.randint(0, 2, (3, D), generator=gen) * 2.0 - 1
    x[5, 0] = 0.0 * signs[0]  # zeros of random signs
    x[5, 1] = torch.where(signs[1] > 0, x[5, 1].abs(), 0.0 * signs[2])  # the minimum a zero of either sign
    x[6, 0] = torch.where(signs[1] > 0, -x[6, 0].abs(), 0.0 * signs[2])  # the maximum a zero of either sign
    return x


def assert_same_pages(key, value, x_key, x_value, slots, dtype, D):
    layout = layout_of(key, value, D, dtype)
    blocks = int(slots.max()) // BLOCK + 2
    want = torch.randint(0, 256, (blocks, x_key.shape[1], BLOCK, layout.slot_bytes), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    got = want.clone()
    layout.write(want, x_key, x_value, slots)
    assert cpu_paged.write(got, x_key, x_value, slots, layout)  # the compiled encoder ran
    same = (got == want).all(-1)
    assert bool(same.all()), f"{key}/{value} {dtype} D={D}: slots differ at {same.logical_not().nonzero()[:4].tolist()}"


@pytest.mark.parametrize("key,value", [("int4", "int4"), ("int8", "int2"), ("int3", "hadamard-int4"),
                                       ("hadamard-int4", "rot-cb3"), ("rot-cb4", "rot-cb2"), ("none", "int4"),
                                       ("int4", "none")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_encoder_writes_the_torch_writers_bytes_for_every_part(key, value, dtype):
    gen = torch.Generator().manual_seed(7)
    n, heads, D = 40, 3, 64
    rotated = any("hadamard" in part or "rot" in part for part in (key, value))
    x_key, x_value = (edge_states(n, heads, D, gen, 7900.0 if rotated else 64000.0) for _ in range(2))
    if dtype == torch.float16:  # values fp16 cannot hold would be inf in the input
        x_key, x_value = (x.clamp(-60000, 60000) for x in (x_key, x_value))
    slots = torch.randperm(4 * BLOCK, generator=gen)[:n]
    slots[[5, 17]] = -1  # padding rows are skipped
    assert_same_pages(key, value, x_key.to(dtype), x_value.to(dtype), slots, dtype, D)


@pytest.mark.parametrize("key,value,D", [("rot-cb3", "hadamard-int4", 128), ("int4", "rot-cb4", 32),
                                         ("none", "none", 40), ("int8", "int8", 256)])
def test_encoder_writes_the_torch_writers_bytes_for_other_head_dims(key, value, D):
    gen = torch.Generator().manual_seed(D)
    x_key, x_value = (edge_states(24, 2, D, gen, 4000.0).bfloat16() for _ in range(2))
    assert_same_pages(key, value, x_key, x_value, torch.arange(24) + 3, torch.bfloat16, D)


def test_encoder_reads_strided_views_of_a_fused_projection():
    """vLLM hands keys and values as views into one (N, (Hq + 2 Hkv) D) projection."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(20, 15 * 64, generator=gen).bfloat16()
    key, value = qkv[:, 9 * 64:12 * 64].view(20, 3, 64), qkv[:, 12 * 64:].view(20, 3, 64)
    assert not key.is_contiguous()
    assert_same_pages("int4", "hadamard-int4", key, value, torch.arange(20) * 2, torch.bfloat16, 64)


@pytest.mark.parametrize("bad,message", [(float("nan"), "NaN"), (float("inf"), "NaN"), (7e4, "fp16 range")])
@pytest.mark.parametrize("key", ["int4", "rot-cb3"])
def test_encoder_refuses_what_the_torch_writer_refuses_and_writes_nothing(bad, message, key):
    if key == "rot-cb3" and bad == 7e4:
        pytest.skip("a codebook scale stays in the fp16 range for a value of 7e4")
    layout = layout_of(key, "int4", 64, torch.float32)
    x = torch.randn(6, 3, 64)
    x[4, 2, 10] = bad
    pages = torch.zeros(2, 3, BLOCK, layout.slot_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        cpu_paged.write(pages, x, torch.randn(6, 3, 64), torch.arange(6), layout)
    assert not pages.any()
