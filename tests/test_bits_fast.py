"""The bitsN-fast presets (post-RoPE centred rotated-codebook keys, bitsN's values) on a tiny Llama:
what they build, that every decode step reads their stored codes through the CPU kernel's
post-RoPE path and equals the torch path, that tampering with the stored key codes changes the
step, and that the bytes reported are the bytes stored (N + 16/D bits per compressed value).

The extension is built once per machine into the user's cache (a minute or two cold)."""

import pytest
import torch

from kvcompress import CompressedCache
from kvcompress.codecs import ComposedCodec
from kvcompress.codecs.centering import Centered
from kvcompress.codecs.codebook import CodebookCodec
from kvcompress.codecs.rotation import RandomizedHadamard
from kvcompress.kernels import cpu_codebook, reference
from kvcompress.presets import PRESETS
from tiny_models import prompt, tiny_llama

from test_cpu_kernel import kernel  # noqa: F401  (autouse: skip under KVCOMPRESS_KERNELS=torch, build once)

WINDOW, SINKS, BLOCK = 16, 4, 32


@pytest.fixture(scope="module")
def tiny_artifact():
    from kvcompress.calibration import calibrate

    return calibrate(tiny_llama(seed=2, head_dim=64), prompt(256, seed=9), seq_len=128, progress=False)


def fast_spec(bits: int) -> dict:
    spec = PRESETS.get(f"bits{bits}-fast").to_dict()
    spec.update(window=WINDOW, sinks=SINKS, block_size=BLOCK)  # a tiny model's prompt fills several blocks
    return spec


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_preset_keys_are_post_rope_centred_rotated_codebooks_and_values_rotated_codebooks(bits, tiny_artifact):
    model = tiny_llama(seed=2, head_dim=64)
    cache = CompressedCache(model, f"bits{bits}-fast", artifact=tiny_artifact)
    bits_n = CompressedCache(model, f"bits{bits}", artifact=tiny_artifact)
    for idx, (layer, reference_layer) in enumerate(zip(cache.layers, bits_n.layers)):
        kc = layer.key_codec
        assert layer.key_space is None, "bitsN-fast keys must stay post-RoPE"
        assert type(kc) is ComposedCodec and type(kc.inner) is CodebookCodec and kc.inner.bits == bits
        assert type(kc.transform) is Centered and type(kc.transform.inner) is RandomizedHadamard
        torch.testing.assert_close(kc.transform.mean, tiny_artifact.mean("key_post", idx))
        vc = layer.value_codec  # bitsN's values before one-byte scales: rotated N-bit codebook, fp16 scale
        assert type(vc) is ComposedCodec and type(vc.inner) is CodebookCodec and vc.inner.bits == bits
        assert type(vc.transform) is RandomizedHadamard
        assert vc.transform == reference_layer.value_codec.transform  # the same rotation of each layer


@torch.no_grad()
@pytest.mark.parametrize("bits", [4, 2])
def test_decode_steps_read_the_codes_through_the_kernel_and_equal_the_torch_path(bits, monkeypatch, fast_attention,
                                                                                 tiny_artifact):
    model = fast_attention(tiny_llama(seed=2, head_dim=64))
    cache = CompressedCache(model, fast_spec(bits), artifact=tiny_artifact)
    torch_cache = CompressedCache(model, fast_spec(bits), artifact=tiny_artifact)
    model(prompt(150), cache=cache)
    model(prompt(150), cache=torch_cache)
    assert all(layer.n_compressed > 0 and cpu_codebook.supports(layer) for layer in cache.layers)
    calls = []
    kernel_attend = cpu_codebook.attend
    monkeypatch.setattr(cpu_codebook, "attend", lambda *args: calls.append(1) or kernel_attend(*args))

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step with the kernel decoded the codes into a tensor")

    for step in range(3):
        token = torch.tensor([[11 + step]])
        monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
        expected = model(token, cache=torch_cache).logits
        monkeypatch.setenv("KVCOMPRESS_KERNELS", "auto")
        with pytest.MonkeyPatch.context() as patch:
            for target, name in ((CodebookCodec, "decode"), (reference, "attend_compressed")):
                patch.setattr(target, name, refuse)
            got = model(token, cache=cache).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert len(calls) == (step + 1) * len(cache.layers)


@torch.no_grad()
def test_tampered_key_codes_change_the_decode_step(fast_attention, tiny_artifact):
    model = fast_attention(tiny_llama(seed=2, head_dim=64))
    cache = CompressedCache(model, fast_spec(4), artifact=tiny_artifact)
    model(prompt(150), cache=cache)
    tampered = cache.copy()
    for layer in tampered.layers:
        codes = layer.stored_keys["codes"]
        codes.copy_(255 - codes)
    token = torch.tensor([[7]])
    clean, changed = model(token, cache=cache).logits, model(token, cache=tampered).logits
    assert (clean - changed).abs().max() > 1e-3, "the decode step did not read the stored key codes"


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_bytes_reported_are_the_bytes_stored(bits, tiny_artifact):
    model = tiny_llama(seed=2, head_dim=64)
    cache = CompressedCache(model, fast_spec(bits), artifact=tiny_artifact)
    with torch.no_grad():
        model(prompt(150), cache=cache)
    stored = 0
    for layer in cache.layers:
        codes = sum(t.numel() * t.element_size() for t in (*layer.stored_keys.values(), *layer.stored_values.values()))
        full = [layer.sink_keys, layer.sink_values, layer.window_keys, layer.window_values]
        stored += codes + sum(t.numel() * t.element_size() for t in full if t is not None)
        B, H, _, D = layer.window_keys.shape
        assert layer.n_compressed > 0
        assert 8 * codes / (2 * B * H * layer.n_compressed * D) == bits + 16 / D  # codes plus one fp16 scale
    assert cache.memory_report().stored_bytes == stored


@pytest.mark.parametrize("rep, D, dtype", [(1, 64, torch.float32), (3, 128, torch.bfloat16), (8, 256, torch.float16)])
def test_post_rope_centred_keys_equal_the_torch_path_for_every_group_and_head_dim(rep, D, dtype):
    """The kernel's post-RoPE key scores (8 tokens of a row reduced together) for bitsN-fast's key
    codec, with the value codec of bitsN, against `attend_compressed`, left padding included."""
    from test_cpu_codebook_kernel import check_equal, filled_layer, left_padding_mask, query_for

    layer = filled_layer(4 if D == 64 else 3, D, dtype, key="centred", value="rotated", pre_rope=False)
    check_equal(layer, query_for(layer, rep), left_padding_mask(layer, 333, additive=rep % 2 == 0))
