"""Low-rank and Hadamard codecs: exact at full rank, error = discarded energy, real savings."""

import pytest
import torch
from transformers import DynamicCache

from kvcompress import CacheSpec, CompressedCache, load_spec
from kvcompress.calibration import calibrate
from kvcompress.codecs import ComposedCodec, HadamardRotation, LowRankProjection, QuantCodec
from kvcompress.codecs.hadamard import hadamard_matrix
from kvcompress.rope import key_space_for


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_artifact(tiny_llama):
    return calibrate(tiny_llama, ids(512, seed=1), seq_len=256, progress=False)


def lowrank_spec(rank: int, key_space: str = "pre_rope", quant: dict | None = None) -> dict:
    method = "lowrank+quant" if quant else "lowrank"
    key = {"method": method, "rank": rank, "key_space": key_space, **(quant or {})}
    value = {"method": method, "rank": rank, **(quant or {})}
    return {"key": key, "value": value, "window": 16, "sinks": 4, "block_size": 32}


@torch.no_grad()
def logits_vs_baseline(model, spec, artifact, tokens) -> tuple[float, CompressedCache]:
    """Max |logit difference| on the last 10 tokens, which attend to compressed earlier tokens."""
    cache, base = CompressedCache(model, spec, artifact=artifact), DynamicCache(config=model.config)
    model(tokens[:, :-10], cache=cache)
    model(tokens[:, :-10], cache=base)
    diff = (model(tokens[:, -10:], cache=cache).logits - model(tokens[:, -10:], cache=base).logits).abs().max()
    return diff.item(), cache


@pytest.mark.parametrize("key_space", ["pre_rope", "post_rope"])
def test_full_rank_projection_reproduces_the_uncompressed_logits(tiny_llama, tiny_artifact, key_space):
    tokens = ids(120)
    full, cache = logits_vs_baseline(tiny_llama, lowrank_spec(32, key_space), tiny_artifact, tokens)
    assert all(layer.n_compressed == 96 for layer in cache.layers)
    # Only the fp16 storage of the coefficients differs from the baseline (relative 2**-11 per value).
    assert full < 2e-4, f"full-rank max logit diff {full:.2e}"
    low, _ = logits_vs_baseline(tiny_llama, lowrank_spec(8, key_space), tiny_artifact, tokens)
    assert low > 100 * full, f"rank 8 diff {low:.2e} vs full rank {full:.2e}: attention does not read the projection"


@torch.no_grad()
def test_rank_r_error_on_calibration_data_equals_discarded_energy(tiny_llama):
    tokens = ids(256, seed=3)
    artifact = calibrate(tiny_llama, tokens, seq_len=256, progress=False)
    captured = DynamicCache(config=tiny_llama.config)
    tiny_llama(tokens, cache=captured)
    inverter = key_space_for(tiny_llama)[0][0]
    for layer_idx, layer in enumerate(captured.layers):
        states = {"key_post": layer.keys, "key_pre": inverter.unrotate(layer.keys, start=0), "value": layer.values}
        for kind, x in states.items():  # x: (1, H, T, D)
            spectrum = artifact.spectrum(kind, layer_idx)  # (H, D)
            for rank in (1, 8, 20, 31):
                proj = LowRankProjection(artifact.basis(kind, layer_idx, rank))
                err = (x - proj.inverse(proj.forward(x))).pow(2).sum(-1).mean(-1)[0]  # (H,) mean over tokens
                discarded = spectrum[:, rank:].sum(-1)
                torch.testing.assert_close(err, discarded, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{kind} layer {layer_idx} rank {rank}: {m}")


def test_bases_are_orthonormal_and_sorted(tiny_artifact):
    for kind in tiny_artifact.kinds:
        basis = tiny_artifact.basis(kind, 1)  # (H, D, D)
        eye = torch.eye(basis.shape[-1]).expand_as(basis)
        torch.testing.assert_close(basis.transpose(1, 2) @ basis, eye, atol=1e-5, rtol=0)
        spectrum = tiny_artifact.spectrum(kind, 1)
        assert (spectrum[:, :-1] >= spectrum[:, 1:]).all()


@torch.no_grad()
def test_lowrank_quant_stores_packed_coefficients(tiny_llama, tiny_artifact):
    spec = lowrank_spec(16, quant={"bits": 4, "axis": "channel", "group_size": 32})
    _, cache = logits_vs_baseline(tiny_llama, spec, tiny_artifact, ids(120))
    layer = cache.layers[0]
    # 96 tokens, packed 32 per row (the per-channel group): 32 x 16 coefficients x 4 bits = 256 bytes
    assert layer.stored_keys["codes"].shape == (1, 2, 3, 256)
    assert layer.stored_keys["codes"].dtype == torch.uint8
    assert layer.stored_keys["scale"].shape == (1, 2, 3, 16)  # per coefficient, per 32 tokens
    parts = layer.memory().parts
    assert parts["key_codes"] == 2 * 96 * 8
    fp16 = CompressedCache(tiny_llama, lowrank_spec(16), artifact=tiny_artifact)
    tiny_llama(ids(110), cache=fp16)
    assert fp16.layers[0].stored_keys["coefficients"].dtype == torch.float16
    assert fp16.layers[0].stored_keys["coefficients"].shape == (1, 2, 64, 16)  # 106 held - 16 window -> 2 blocks


def test_projection_codec_decodes_concatenations():
    basis = torch.linalg.qr(torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0)))[0][:, :, :16]
    codec = ComposedCodec(LowRankProjection(basis), QuantCodec(bits=4, axis="token", group_size=16))
    x = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(1))
    a, b = codec.encode(x[:, :, :32]), codec.encode(x[:, :, 32:])
    joined = {k: torch.cat([a[k], b[k]], dim=2) for k in a}
    torch.testing.assert_close(codec.decode(joined, torch.float32), codec.decode(codec.encode(x), torch.float32))


def test_hadamard_rotation_is_orthonormal_and_lossless_without_quantization():
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 10, 64, generator=torch.Generator().manual_seed(0))
    rotation = HadamardRotation()
    torch.testing.assert_close(rotation.inverse(rotation.forward(x)), x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(48)


def test_hadamard_int4_error_is_bounded_and_helps_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, 64, generator=gen)
    x[..., 5] *= 20  # an outlier channel, as keys have
    codec = ComposedCodec(HadamardRotation(), QuantCodec(bits=4, axis="token", group_size=32))
    stored = codec.encode(x)
    err = (codec.decode(stored, torch.float32) - x).norm(dim=-1)  # (B, H, T): per-token L2 error
    # Orthonormal rotation keeps L2 errors: each rotated value is off by at most scale/2 (+ fp16 zero rounding).
    scale = stored["scale"].float()  # (B, H, T, D/32)
    bound = ((scale / 2 + 1e-2) ** 2 * 32).sum(-1).sqrt()
    assert (err <= bound).all()
    plain = QuantCodec(bits=4, axis="token", group_size=32)
    plain_err = (plain.roundtrip(x) - x).norm(dim=-1)
    assert err.mean() < 0.7 * plain_err.mean(), f"hadamard {err.mean():.3f} vs plain {plain_err.mean():.3f}"


@pytest.mark.parametrize("bad, message", [
    ({"key": {"method": "lowrank"}}, "needs a positive integer rank"),
    ({"key": {"method": "lowrank+quant", "rank": 12}}, "multiple of 8"),
    ({"value": {"method": "lowrank+quant", "rank": 16, "axis": "token", "group_size": 32}}, "does not divide rank"),
    ({"value": {"method": "lowrank", "rank": 16, "key_space": "pre_rope"}}, "only applies to keys"),
    ({"key": {"method": "quant", "key_space": "rotated"}}, "key_space must be one of"),
    ({"key": {"method": "lowrank2"}}, "lowrank\\+quant"),
])
def test_invalid_lowrank_specs_name_the_allowed_values(bad, message):
    with pytest.raises(ValueError, match=message):
        load_spec(bad)


def test_rank_and_rotation_are_checked_against_the_model(tiny_llama, tiny_artifact):
    with pytest.raises(ValueError, match="exceeds head_dim 32"):
        CompressedCache(tiny_llama, {"key": {"method": "lowrank", "rank": 40}, "value": {"method": "none"}},
                        artifact=tiny_artifact)
    from conftest import make_tiny_llama

    with pytest.raises(ValueError, match="power of two"):
        CompressedCache(make_tiny_llama(head_dim=24, hidden_size=96),
                        {"key": {"method": "none"},
                         "value": {"method": "hadamard+quant", "axis": "token", "group_size": 8}})


def test_lowrank_specs_round_trip_compactly():
    spec = load_spec({"key": {"method": "lowrank+quant", "rank": 32, "bits": 4, "axis": "token", "group_size": 16,
                              "key_space": "pre_rope"},
                      "value": {"method": "lowrank", "rank": 48},
                      "layers": {"0-3": {"key": {"rank": 16}}}})
    assert spec.to_dict()["value"] == {"method": "lowrank", "rank": 48}
    assert spec.key.describe() == "lowrank32+int4/token16 pre-RoPE"
    assert spec.for_layer(2)[0].rank == 16 and spec.for_layer(2)[0].key_space == "pre_rope"
    assert CacheSpec.from_dict(spec.to_dict()) == spec
    assert load_spec({"key": {"method": "none", "key_space": "pre_rope"}, "value": {"method": "none"}}).key.to_dict() == {"method": "none"}


@pytest.mark.real_model
def test_pre_rope_keys_beat_post_rope_at_rank_32_on_the_embedded_model(real_model):
    """Decode-faithful KL at key rank 32 (V full): pre-RoPE keys lower than post-RoPE keys."""
    from kvcompress.corpus import corpus_tokens
    from kvcompress.measure.evaluate import decode_faithful_eval

    model, tokenizer = real_model
    tokens = corpus_tokens(tokenizer, "report", n_tokens=256)
    results = {}
    for key_space in ("pre_rope", "post_rope"):
        spec = {"key": {"method": "lowrank", "rank": 32, "key_space": key_space}, "value": {"method": "none"},
                "window": 32, "sinks": 4, "block_size": 64}
        results[key_space] = decode_faithful_eval(model, tokens, spec, progress=False)
    pre, post = results["pre_rope"], results["post_rope"]
    assert pre.compressed_tokens == 192
    assert pre.kl < post.kl, (f"KL pre-RoPE {pre.kl:.4f} (PPL {pre.ppl_change:+.2%}) vs post-RoPE {post.kl:.4f} "
                              f"(PPL {post.ppl_change:+.2%}), 256 tokens")
