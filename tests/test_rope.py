"""Pre-RoPE keys: the cache undoes the model's rotary embedding exactly, at every position."""

import warnings

import pytest
import torch

from conftest import make_tiny_llama
from kvcompress import CompressedCache, CompressedLayer
from kvcompress.codecs import IdentityCodec
from kvcompress.rope import key_space_for

YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rope", [None, YARN], ids=["default", "yarn"])
def test_unrotate_matches_the_models_own_rotation(rope):
    """unrotate(R(p) k) == k with R(p) applied by the model's own apply_rotary_pos_emb (yarn scales cos/sin)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make_tiny_llama(**({"rope_parameters": rope} if rope else {}))
    inverters, reason = key_space_for(model)
    assert reason is None
    inverter = inverters[0]
    k = torch.randn(2, 2, 40, 32, generator=torch.Generator().manual_seed(1))
    for start in (0, 5, 700):
        cos, sin = model.model.rotary_emb(k, torch.arange(start, start + 40)[None])
        _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
        assert rel_err(inverter.unrotate(k_rot, start), k) < 1e-5
        assert rel_err(inverter.rotate(k, start), k_rot) < 1e-5


@torch.no_grad()
def test_pre_rope_round_trip_across_blocks_and_after_crop(tiny_llama):
    """A layer that stores pre-RoPE keys losslessly returns the post-RoPE keys to 1e-5, at every position:
    after prefill, across many flushed blocks, token by token, and after crops into compressed blocks."""
    inverters, _ = key_space_for(tiny_llama)
    layer = CompressedLayer(IdentityCodec(), IdentityCodec(), window=16, sinks=4, block_size=32,
                            key_space=inverters[0])
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 400, 32, generator=gen) * 3  # (B, H, T, D) post-RoPE keys, position = index
    values = torch.randn(2, 2, 400, 32, generator=gen)

    def check(n):
        out_k, out_v = layer.reconstruct()
        assert out_k.shape[2] == n
        err = rel_err(out_k, keys[:, :, :n])
        assert err < 1e-5, f"relative error {err:.2e} at length {n} ({layer.n_compressed} compressed)"
        assert torch.equal(out_v, values[:, :, :n])

    layer.update(keys[:, :, :150], values[:, :, :150])  # prefill: sinks + 4 blocks + window
    assert layer.n_compressed == 128
    check(150)
    for t in range(150, 230):  # one token at a time, crossing block boundaries
        layer.update(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    assert layer.n_compressed == 192
    check(230)
    layer.crop(-100)  # cut inside the compressed blocks: the cut block returns to the window
    check(130)
    layer.update(keys[:, :, 130:400], values[:, :, 130:400])  # re-compress at the same positions
    check(400)
    assert layer.n_compressed == 352


def test_pre_rope_changes_what_is_stored(tiny_llama):
    """The stored keys really are un-rotated: they differ from the post-RoPE keys (except position 0)."""
    inverters, _ = key_space_for(tiny_llama)
    layer = CompressedLayer(IdentityCodec(), IdentityCodec(), window=0, sinks=0, block_size=32,
                            key_space=inverters[0])
    keys = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(2))
    layer.update(keys, keys.clone())
    stored = layer.stored_keys["states"]
    assert torch.allclose(stored[:, :, 0], keys[:, :, 0], atol=1e-6)
    assert (stored[:, :, 1:] - keys[:, :, 1:]).abs().max() > 0.1


def test_length_dependent_rope_falls_back_with_one_warning():
    model = make_tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    spec = {"key": {"method": "quant", "axis": "channel", "key_space": "pre_rope"}, "value": {"method": "none"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = CompressedCache(model, spec)
    messages = [str(w.message) for w in caught if "pre-RoPE" in str(w.message)]
    assert len(messages) == 1 and "dynamic" in messages[0]
    assert cache.key_space_fallback and all(layer.key_space is None for layer in cache.layers)


def test_pre_rope_needs_the_model_not_its_config(tiny_llama):
    with pytest.raises(ValueError, match="need the model itself"):
        CompressedCache(tiny_llama.config, {"key": {"method": "quant", "axis": "channel", "key_space": "pre_rope"},
                                            "value": {"method": "none"}})
