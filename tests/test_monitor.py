"""The runtime quality monitor: measures what the cache compresses, warns once, costs nothing when off."""

import warnings

import pytest
import torch

from kvcompress import CompressedCache
from by_hand import manual_dequantize
from kvcompress.cache.monitor import QualityMonitor

SPEC = {"window": 16, "sinks": 4, "block_size": 32}


def tokens(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def quant(bits):
    return {**SPEC, "key": {"bits": bits, "axis": "channel"}, "value": {"bits": bits, "axis": "token"}}


@torch.no_grad()
def test_monitor_statistics_match_an_independent_measurement(tiny_llama, monkeypatch):
    """The states transformers hands the cache, decoded by hand (`manual_dequantize`), and a cosine
    written out here: the monitor's per-layer figures must equal them."""
    received = {}
    original_update = CompressedCache.update

    def recording_update(self, key_states, value_states, layer_idx, *args, **kwargs):
        received[layer_idx] = {"key": key_states.clone(), "value": value_states.clone()}
        return original_update(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(CompressedCache, "update", recording_update)
    cache = CompressedCache(tiny_llama, quant(4), monitor=QualityMonitor())
    tiny_llama(tokens(150), cache=cache)
    summary = cache.monitor.summary()
    assert set(summary["layers"]) == {0, 1}
    sinks, block = SPEC["sinks"], SPEC["block_size"]
    for layer_idx, layer in enumerate(cache.layers):
        for tensor, stored, axis in (("key", layer.stored_keys, "channel"), ("value", layer.stored_values, "token")):
            decoded = manual_dequantize(stored, 4, axis, 32)  # (B, H, 128, D)
            states = received[layer_idx][tensor][:, :, sinks:sinks + decoded.shape[2]].float()
            cosines, errors = [], []
            for start in range(0, decoded.shape[2], block):
                x, y = states[:, :, start:start + block], decoded[:, :, start:start + block]
                cos = (x * y).sum(-1) / (x.pow(2).sum(-1).sqrt() * y.pow(2).sum(-1).sqrt())
                cosines.append(cos.mean().item())
                errors.append(((x - y).pow(2).sum().sqrt() / x.pow(2).sum().sqrt()).item())
            stats = summary["layers"][layer_idx][tensor]
            assert stats["blocks"] == len(cosines) == 4 and stats["tokens"] == 128
            assert stats["cosine_mean"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-6)
            assert stats["cosine_min"] == pytest.approx(min(cosines), abs=1e-6)
            assert stats["rel_error_mean"] == pytest.approx(sum(errors) / len(errors), rel=1e-5)
            assert stats["rel_error_max"] == pytest.approx(max(errors), rel=1e-5)
            assert 0.0 < min(errors) and max(cosines) < 1.0  # 4-bit codes lose something: not placeholders


@torch.no_grad()
def test_lower_bits_measure_worse_and_warn_once_per_layer(tiny_llama, fast_attention):
    fast_attention(tiny_llama)  # decode steps as the README's first example runs them
    results = {}
    for bits in (8, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = CompressedCache(tiny_llama, quant(bits), monitor=QualityMonitor(min_cosine=0.99))
            tiny_llama(tokens(150), cache=cache)
            for step in range(40):
                tiny_llama(tokens(1, seed=step), cache=cache)
        results[bits] = (cache.monitor.summary(), [w for w in caught if "kvcompress monitor" in str(w.message)])
    summary8, warned8 = results[8]
    summary2, warned2 = results[2]
    assert summary2["layers"][0]["key"]["cosine_mean"] < summary8["layers"][0]["key"]["cosine_mean"]
    assert not warned8
    # at 2 bits both layers fall below cosine 0.99: exactly one warning per (layer, tensor) that did
    assert len(warned2) == len(summary2["warned"]) >= 2
    assert len({str(w.message) for w in warned2}) == len(warned2)


@torch.no_grad()
def test_sampling_checks_a_subset_of_blocks(tiny_llama):
    cache = CompressedCache(tiny_llama, quant(4), monitor=QualityMonitor(sample_every=2))
    tiny_llama(tokens(150), cache=cache)
    assert cache.monitor.summary()["layers"][0]["key"]["blocks"] == 2  # blocks 1 and 3 of 4


@torch.no_grad()
def test_monitor_off_is_never_called_and_changes_nothing(tiny_llama):
    plain = CompressedCache(tiny_llama, quant(4))
    assert plain.monitor is None and all(layer.monitor is None for layer in plain.layers)
    monitored = CompressedCache(tiny_llama, quant(4), monitor=True)
    a = tiny_llama(tokens(150), cache=plain).logits
    b = tiny_llama(tokens(150), cache=monitored).logits
    assert torch.equal(a, b)


def test_invalid_monitor_settings():
    with pytest.raises(ValueError, match="sample_every"):
        QualityMonitor(sample_every=0)
    with pytest.raises(ValueError, match="min_cosine"):
        QualityMonitor(min_cosine=2)
