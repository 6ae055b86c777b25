"""The paged slot layout (kvcompress.paged) and attention over pages (kernels.paged_attention).

Slots are read back field by field from their documented byte layout (`by_hand.manual_slot_part`),
written through a scrambled block table, compared with the codecs CompressedCache uses, and attended
over against a float64 softmax computed by hand from the hand-decoded slots.
"""

from __future__ import annotations

import math

import pytest
import torch
from by_hand import manual_slot_part

from kvcompress.cache.build import build_codec
from kvcompress.codecs.lloyd_max import gaussian_codebook
from kvcompress.kernels.paged_attention import paged_attention
from kvcompress.paged import PagedLayout, PartLayout, SlotLayout, UnservableSpecError, unservable
from kvcompress.spec import CacheSpec, TensorSpec

D = 64
PARTS = {  # name -> (TensorSpec, bytes of the part at head_dim 64)
    "int8": (TensorSpec(method="quant", bits=8, axis="token", group_size=32), 72),
    "int4": (TensorSpec(method="quant", bits=4, axis="token", group_size=32), 40),
    "int3": (TensorSpec(method="quant", bits=3, axis="token", group_size=32), 32),
    "int2": (TensorSpec(method="quant", bits=2, axis="token", group_size=16), 32),
    "hadamard-int4": (TensorSpec(method="hadamard+quant", bits=4, axis="token", group_size=32), 40),
    "rot-cb4": (TensorSpec(method="rotated+codebook", bits=4, seed=3), 34),
    "rot-cb3": (TensorSpec(method="rotated+codebook", bits=3), 26),
    "rot-cb2": (TensorSpec(method="rotated+codebook", bits=2), 18),
    "none": (TensorSpec(method="none"), 128),
}


def paged_spec(key: TensorSpec, value: TensorSpec, **extra) -> CacheSpec:
    return CacheSpec(key=key, value=value, window=0, sinks=0, block_size=32, **extra)


def states(n: int, heads: int = 3, seed: int = 0) -> torch.Tensor:
    """(n, heads, D) bfloat16 states with an outlier channel, as keys have."""
    x = torch.randn(n, heads, D, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 8
    return x.bfloat16()


@pytest.mark.parametrize("name", sorted(PARTS))
def test_part_bytes_decode_by_hand_to_the_layout_decode_and_near_the_input(name):
    spec, nbytes = PARTS[name]
    part = PartLayout.from_spec(spec, D, layer_idx=7, dtype=torch.bfloat16)
    assert part.nbytes == nbytes
    x = states(5)
    raw = part.encode(x)
    assert raw.shape == (5, 3, nbytes) and raw.dtype == torch.uint8
    decoded = part.decode(raw)
    rotation = part.rotation()
    centroids = gaussian_codebook(part.bits) if spec.method == "rotated+codebook" else None
    for n in range(5):
        for h in range(3):
            by_hand = manual_slot_part(bytes(raw[n, h].tolist()), spec.method, D, part.bits, part.group_size,
                                       rotation=rotation, centroids=centroids, dtype=torch.bfloat16)
            assert torch.allclose(decoded[n, h].double(), by_hand, atol=1e-5), (name, n, h)
    error = (decoded - x.float()).norm() / x.float().norm()
    bound = {"none": 0, "int8": 0.01, "int4": 0.12, "hadamard-int4": 0.1, "rot-cb4": 0.12, "int3": 0.25,
             "rot-cb3": 0.2, "int2": 0.45, "rot-cb2": 0.35}[name]
    assert error <= bound, f"{name}: relative error {error:.3f} > {bound}"


@pytest.mark.parametrize("name", ["int8", "int3", "hadamard-int4", "rot-cb3", "rot-cb4"])
def test_slots_decode_to_what_compressed_cache_codecs_decode(name):
    """The same token-wise codes and scales as the codec CompressedCache builds for the same spec and layer."""
    spec, _ = PARTS[name]
    x = states(16, seed=1)
    part = PartLayout.from_spec(spec, D, layer_idx=4, dtype=torch.bfloat16)
    codec = build_codec(spec, layer_idx=4, kind="key_post")
    from_codec = codec.decode(codec.encode(x.transpose(0, 1)[None]), torch.float32)[0].transpose(0, 1)  # (n, H, D)
    assert torch.allclose(part.decode(part.encode(x)), from_codec, atol=1e-5)


def test_slot_is_key_then_value_padded_to_four_bytes():
    key = PartLayout.from_spec(PARTS["int8"][0], D, 0, torch.bfloat16)
    value = PartLayout.from_spec(PARTS["rot-cb3"][0], D, 0, torch.bfloat16)
    layout = SlotLayout(key, value, slot_bytes=100)  # 72 + 26 = 98 -> 100
    k, v = states(4, seed=2), states(4, seed=3)
    slots = layout.encode(k, v)
    assert torch.equal(slots[..., :72], key.encode(k)) and torch.equal(slots[..., 72:98], value.encode(v))
    assert not slots[..., 98:].any()
    with pytest.raises(ValueError, match="multiple of 4"):
        SlotLayout(key, value, slot_bytes=98)


def test_write_and_read_through_a_scrambled_block_table():
    layout = PagedLayout.for_spec(paged_spec(PARTS["int4"][0], PARTS["rot-cb3"][0]), 2, D, torch.bfloat16).layers[1]
    block_size, n = 16, 70
    pages = torch.zeros(9, 3, block_size, layout.slot_bytes, dtype=torch.uint8)
    blocks = torch.tensor([6, 2, 8, 0, 4])  # the request's 5 blocks, in token order
    k, v = states(n, seed=4), states(n, seed=5)
    slot_of = blocks[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for chunk in order.split(23):  # three writes in scrambled order, each with a padding slot (-1)
        mapping = torch.cat([slot_of[chunk], torch.tensor([-1])])
        layout.write(pages, torch.cat([k[chunk], k[:1]]), torch.cat([v[chunk], v[:1]]), mapping)
    keys, values = layout.read(pages, blocks, n)  # (H, n, D)
    want_k, want_v = layout.decode(layout.encode(k, v))  # (n, H, D)
    assert torch.equal(keys, want_k.transpose(0, 1)) and torch.equal(values, want_v.transpose(0, 1))
    untouched = [b for b in range(9) if b not in blocks.tolist()]
    assert not pages[untouched].any()
    assert not pages[4, :, n - 4 * block_size:].any()  # the last block (4) holds tokens 64..69: rows 6.. stay empty


def test_per_layer_specs_give_every_layer_the_widest_slot():
    spec = paged_spec(PARTS["int4"][0], PARTS["int4"][0], layers={"0": {"key": {"bits": 8}, "value": {"bits": 8}}})
    layout = PagedLayout.for_spec(spec, 3, D, torch.bfloat16)
    assert layout.slot_bytes == 144 and layout.narrowest_bytes == 80
    assert [s.key.bits for s in layout.layers] == [8, 4, 4]
    # a layer table for one depth: used at that depth; the slot is sized before the depth is known
    deep = paged_spec(PARTS["int4"][0], PARTS["int4"][0],
                      layers_at_depth={"3": {"1": {"key": {"bits": 8}, "value": {"bits": 8}}}})
    assert [s.key.bits for s in PagedLayout.for_spec(deep, 3, D, torch.bfloat16).layers] == [4, 8, 4]
    shallow = PagedLayout.for_spec(deep, 2, D, torch.bfloat16)
    assert [s.key.bits for s in shallow.layers] == [4, 4] and shallow.slot_bytes == 144
    none = PagedLayout.for_spec(paged_spec(TensorSpec(method="none"), TensorSpec(method="none")), 1, D, torch.float32)
    assert none.slot_bytes == 2 * D * 4  # full precision in the model's dtype


def test_unservable_names_each_thing_a_token_slot_cannot_hold():
    kivi = CacheSpec()  # K per channel, window 128, sinks 4
    reasons = unservable(kivi)
    assert reasons == ["a full-precision window of 128 tokens", "4 full-precision sink tokens",
                       "keys quantized per channel (groups of tokens share a scale)"]
    pre = paged_spec(TensorSpec(method="pca+codebook", bits=3, key_space="pre_rope"), PARTS["rot-cb3"][0])
    assert unservable(pre) == ["keys method 'pca+codebook' (paged pages serve quant, hadamard+quant, "
                               "rotated+codebook, none)"]
    layered = paged_spec(PARTS["int4"][0], PARTS["int4"][0], layers={"2": {"key": {"axis": "channel"}}})
    assert unservable(layered) == ["keys (layer 2) quantized per channel (groups of tokens share a scale)"]
    assert unservable(paged_spec(PARTS["int4"][0], PARTS["rot-cb2"][0])) == []
    with pytest.raises(UnservableSpecError, match="window of 128"):
        PagedLayout.for_spec(kivi, 2, D, torch.bfloat16)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        PagedLayout.for_spec(paged_spec(TensorSpec(bits=4, axis="token", group_size=64), PARTS["int4"][0]), 2, 96,
                             torch.bfloat16)


def _attention_by_hand(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q.k * scale) @ v in float64 for one query (Hq, D) over keys/values (Hkv, n, D)."""
    rep = q.shape[0] // keys.shape[0]
    k, v = keys.repeat_interleave(rep, 0), values.repeat_interleave(rep, 0)  # (Hq, n, D)
    weights = torch.softmax((k @ q[:, :, None]).squeeze(-1) * scale, dim=-1)  # (Hq, n)
    return (weights[:, None, :] @ v).squeeze(1)


def _hand_decoded(pages: torch.Tensor, table: torch.Tensor, layout: SlotLayout, n: int) -> list[torch.Tensor]:
    """Keys and values (H, n, D) float64 of a request's first n tokens, from its slots' bytes by hand."""
    block_size, heads = pages.shape[2], pages.shape[1]
    out = []
    for offset, part in ((0, layout.key), (layout.value_offset, layout.value)):
        rotation = part.rotation()
        centroids = gaussian_codebook(part.bits) if part.method == "rotated+codebook" else None
        rows = []
        for t in range(n):
            slot = pages[table[t // block_size], :, t % block_size]  # (H, slot_bytes)
            rows.append(torch.stack([manual_slot_part(bytes(slot[h, offset:offset + part.nbytes].tolist()),
                                                      part.method, D, part.bits, part.group_size, rotation=rotation,
                                                      centroids=centroids) for h in range(heads)]))
        out.append(torch.stack(rows, 1))
    return out


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("name", ["int4", "hadamard-int4", "rot-cb3"])
def test_paged_attention_equals_causal_softmax_over_hand_decoded_slots_own_chunk_included(name, use_kernel):
    """Two requests (one decoding, one mid-prefill with a chunk of 5), everything written first as vLLM does:
    each query attends to the hand-decoded codes of its request's tokens up to and including itself, on the
    torch path and on the compiled CPU kernel (`cpu_paged`; the torch path again where it is not built)."""
    spec, _ = PARTS[name]
    layout = PagedLayout.for_spec(paged_spec(spec, spec), 3, D, torch.bfloat16).layers[2]
    block_size, hq, scale = 8, 9, 1 / math.sqrt(D)
    pages = torch.zeros(12, 3, block_size, layout.slot_bytes, dtype=torch.uint8)
    table = torch.tensor([[3, 7, 1, 0, 0, 0], [5, 2, 9, 11, 4, 6]])
    seq_lens, chunk = [22, 42], [1, 5]
    k_all = [states(seq_lens[r], seed=10 + r) for r in range(2)]
    v_all = [states(seq_lens[r], seed=20 + r) for r in range(2)]
    for r in range(2):
        t = torch.arange(seq_lens[r])
        layout.write(pages, k_all[r], v_all[r], table[r, t // block_size] * block_size + t % block_size)
    query = torch.randn(sum(chunk), hq, D, generator=torch.Generator().manual_seed(7)).bfloat16()
    qsl = torch.tensor([0, 1, 6])
    result, _ = paged_attention(query, pages, table, torch.tensor(seq_lens), qsl, layout, scale, use_kernel=use_kernel)
    for r in range(2):
        keys, values = _hand_decoded(pages, table[r], layout, seq_lens[r])
        for i in range(chunk[r]):
            row, position = qsl[r] + i, seq_lens[r] - chunk[r] + i
            want = _attention_by_hand(query[row].double(), keys[:, :position + 1], values[:, :position + 1], scale)
            assert torch.allclose(result[row].double(), want, atol=2e-5), (name, r, i, (result[row] - want).abs().max())
    fp = _attention_by_hand(query[0].double(), k_all[0].transpose(0, 1).double(), v_all[0].transpose(0, 1).double(),
                            scale)
    assert (result[0].double() - fp).abs().max() > 1e-3  # the tokens were read from their codes


def test_a_token_gets_the_same_attention_whatever_chunk_it_came_in():
    """A 70-token request attended as one chunk, as chunks of 16 and 5, and token by token (decode): the
    same output for every token, bit for bit (what makes serving independent of vLLM's scheduling)."""
    layout = PagedLayout.for_spec(paged_spec(PARTS["int4"][0], PARTS["int4"][0]), 1, D, torch.bfloat16).layers[0]
    pages = torch.zeros(12, 3, 8, layout.slot_bytes, dtype=torch.uint8)
    table = torch.tensor([[4, 0, 9, 2, 11, 7, 1, 3, 5]])
    n = 70
    t = torch.arange(n)
    layout.write(pages, states(n, seed=1), states(n, seed=2), table[0, t // 8] * 8 + t % 8)
    query = states(n, heads=9, seed=3)

    def attend(bounds):
        return torch.cat([paged_attention(query[a:b], pages, table, torch.tensor([b]), torch.tensor([0, b - a]),
                                          layout, 0.125)[0] for a, b in zip(bounds[:-1], bounds[1:])])

    whole = attend([0, n])
    for bounds in ([*range(0, n, 16), n], [*range(0, n, 5), n], list(range(n + 1))):
        got = attend(bounds)
        assert torch.equal(got, whole), (bounds, (got - whole).abs().max())


def test_a_request_without_queries_is_skipped_and_too_few_stored_tokens_refused():
    layout = PagedLayout.for_spec(paged_spec(PARTS["int4"][0], PARTS["int4"][0]), 1, D, torch.bfloat16).layers[0]
    pages = torch.full((2, 3, 8, layout.slot_bytes), 255, dtype=torch.uint8)  # garbage that must not be read
    k, v = states(4, seed=1), states(4, seed=2)
    layout.write(pages, k, v, torch.arange(4) + 8)  # block 1
    query = states(4, heads=9)
    out, lse = paged_attention(query, pages, torch.tensor([[0], [1]]), torch.tensor([5, 4]), torch.tensor([0, 0, 4]),
                               layout, 0.125)
    keys, values = layout.decode(pages[1, :, :1])  # the first token sees only itself
    assert torch.allclose(out[0], values[:, 0].repeat_interleave(3, 0), atol=1e-6)
    own_score = (query[0].float().reshape(3, 3, D) * keys[:, 0, None]).sum(-1).flatten() * 0.125  # (Hq,)
    assert torch.allclose(lse[0], own_score, atol=1e-4)  # the log of a one-term softmax denominator
    with pytest.raises(ValueError, match="written to the pages before attention"):
        paged_attention(query, pages, torch.tensor([[1]]), torch.tensor([3]), torch.tensor([0, 4]), layout, 0.125)


def test_the_paged_presets_are_servable_with_these_slot_sizes():
    from kvcompress.presets import PRESETS, load_spec

    sizes = {name: PagedLayout.for_spec(load_spec(name), 30, D, torch.bfloat16).slot_bytes
             for name in PRESETS.names() if name.startswith("paged-")}
    assert sizes == {"paged-int8": 144, "paged-int4": 80, "paged-int3": 64, "paged-int2": 48,
                     "paged-hadamard-int4": 80, "paged-bits4": 68, "paged-bits3": 52, "paged-bits2": 36}
    for name in ("int4", "hadamard-int4", "bits3", "lossless"):
        assert unservable(load_spec(name)), name
