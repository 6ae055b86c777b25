"""Rotated Lloyd-Max codebook codecs: codebook values, rotation, round-trip bounds derived from the
codebook, reference encoding, rotation folding in decode attention, the read path, bad input."""

import math

import pytest
import torch
from transformers import DynamicCache

from kvcompress import CompressedCache, enable_fast_attention, load_spec
from kvcompress.kernels.reference import attend_compressed
from kvcompress.codecs import ComposedCodec
from kvcompress.codecs.centering import Centered
from kvcompress.codecs.codebook import CodebookCodec
from kvcompress.codecs.lloyd_max import gaussian_codebook
from kvcompress.codecs.packing import unpack_reference
from kvcompress.codecs.rotation import RandomizedHadamard, randomized_hadamard_matrix
from kvcompress.spec import CacheSpec, TensorSpec
from tiny_models import prompt, tiny_llama

# Max (1960), Table I: optimum quantizer for a unit Gaussian, positive output levels.
MAX_1960 = {1: [0.7980], 2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152],
            4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]}


def codebook_spec(bits: int, window: int = 16, center: bool = False, **key_extra) -> dict:
    cb = {"method": "rotated+codebook", "bits": bits, "center": center}
    return {"key": {**cb, **key_extra}, "value": cb, "window": window, "sinks": 4, "block_size": 32}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_codebook_matches_max_1960(bits):
    c = gaussian_codebook(bits)
    assert c.shape == (2 ** bits,)
    torch.testing.assert_close(c[2 ** (bits - 1):], torch.tensor(MAX_1960[bits]), atol=1e-3, rtol=0)
    torch.testing.assert_close(c, -c.flip(0))


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_rotation_is_orthogonal_seeded_and_cached(dim):
    r = RandomizedHadamard(seed=3).matrix(dim)
    torch.testing.assert_close(r @ r.T, torch.eye(dim), atol=1e-5, rtol=0)
    assert torch.equal(RandomizedHadamard(seed=3).matrix(dim), r)
    assert not torch.equal(RandomizedHadamard(seed=4).matrix(dim), r)
    assert RandomizedHadamard(seed=3).matrix(dim) is r, "the matrix must be cached, not rebuilt per call"
    x = torch.randn(2, 3, 16, dim)
    rot = RandomizedHadamard(seed=3)
    torch.testing.assert_close(rot.inverse(rot.forward(x)), x, atol=1e-5, rtol=0)
    # Dot products survive the rotation: q.k = (qR).(kR).
    q = torch.randn(dim)
    torch.testing.assert_close(rot.forward(x) @ (q @ r), x @ q, atol=1e-4, rtol=1e-5)


def test_rotation_rejects_bad_sizes_and_seeds():
    with pytest.raises(ValueError, match="power of two"):
        randomized_hadamard_matrix(96, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        RandomizedHadamard(seed=-1)


def _reference_indices(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmin over centroids of |x / rms(x) - c_j|, per value (the plain definition)."""
    u = x / x.square().mean(-1, keepdim=True).sqrt()
    return (u[..., None] - c).abs().argmin(-1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_encoding_matches_plain_argmin_reference(bits, dim):
    x = torch.randn(1, 2, 16, dim, generator=torch.Generator().manual_seed(bits * dim)) * 3
    codec = CodebookCodec(bits=bits)
    stored = codec.encode(x)
    c = gaussian_codebook(bits)
    idx = _reference_indices(x, c)
    # Unpack one code at a time (the packing layout's reference) and compare with the argmin.
    codes = unpack_reference(stored["codes"], bits).long().reshape(idx.shape)
    assert torch.equal(codes, idx)
    # Decoding is the scale times the centroids, the scale the least-squares fit to those centroids.
    values = c[idx]
    scale = (x * values).sum(-1, keepdim=True) / values.square().sum(-1, keepdim=True)
    torch.testing.assert_close(stored["scale"].float(), scale, atol=0, rtol=2 ** -10)
    torch.testing.assert_close(codec.decode(stored, torch.float32), stored["scale"].float() * values)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 100.0])
def test_round_trip_error_bounded_by_the_codebook(bits, magnitude):
    """Per vector: ||x - x_hat|| <= rms(x) * ||u - c[idx]|| + fp16 scale rounding, where every in-range
    |u_d - c[idx_d]| is at most half the largest gap between neighbouring centroids."""
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(bits)) * magnitude
    x[0, 1, 5, 7] = 40 * magnitude  # an outlier channel in one vector
    codec = ComposedCodec(RandomizedHadamard(seed=1), CodebookCodec(bits=bits))
    stored = codec.encode(x)
    y = RandomizedHadamard(seed=1).forward(x)  # the rotated states the codebook sees
    c = gaussian_codebook(bits)
    rms = y.square().mean(-1, keepdim=True).sqrt()
    u = y / rms
    err_u = (u[..., None] - c).abs().amin(-1)  # distance to the nearest centroid
    half_gap = (c[1:] - c[:-1]).max() / 2
    inside = (u >= c[0]) & (u <= c[-1])
    assert (err_u[inside] <= half_gap + 1e-6).all()
    scale = stored["scale"].float()
    bound = rms * err_u.norm(dim=-1, keepdim=True) + scale.abs() * c.abs().max() * math.sqrt(64) * 2 ** -10
    err = (codec.decode(stored, torch.float32) - x).norm(dim=-1, keepdim=True)  # rotation keeps norms
    assert (err <= bound * (1 + 1e-4) + 1e-6 * magnitude).all(), f"max excess {(err - bound).max().item():.3g}"


def test_zero_vectors_round_trip_exactly():
    x = torch.zeros(1, 1, 8, 64)
    x[0, 0, 3] = torch.randn(64)
    codec = ComposedCodec(RandomizedHadamard(), CodebookCodec(bits=2))
    out = codec.roundtrip(x)
    assert torch.equal(out[0, 0, :3], x[0, 0, :3])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_states_are_refused(bad):
    x = torch.randn(1, 1, 8, 64)
    x[0, 0, 2, 2] = bad
    with pytest.raises(ValueError, match="NaN|inf"):
        ComposedCodec(RandomizedHadamard(), CodebookCodec(bits=3)).encode(x)
    with pytest.raises(ValueError, match="NaN|inf"):
        CodebookCodec(bits=3).encode(x)


def test_bad_settings_name_the_allowed_values():
    for bits in (7, 4.1, 0):
        with pytest.raises(ValueError, match=r"rotated\+codebook bits must be a multiple of 1/8 in 1..6"):
            TensorSpec(method="rotated+codebook", bits=bits)
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 3, 4\)"):
        CodebookCodec(bits=8)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        TensorSpec(method="rotated+codebook", seed=-2)
    with pytest.raises(ValueError, match="multiple of 8"):
        CacheSpec.from_dict({**codebook_spec(2), "block_size": 12})
    with pytest.raises(ValueError, match="power of two"):
        CacheSpec.from_dict(codebook_spec(2)).validate_for(2, 96)
    with pytest.raises(ValueError, match="multiple of 8"):
        CodebookCodec(bits=2).encode(torch.randn(1, 1, 12, 64))


def test_spec_round_trip_and_describe():
    spec = CacheSpec.from_dict(codebook_spec(3, center=True, seed=5, key_space="pre_rope"))
    assert CacheSpec.from_dict(spec.to_dict()) == spec
    assert spec.key.to_dict() == {"method": "rotated+codebook", "bits": 3, "seed": 5, "center": True,
                                  "key_space": "pre_rope"}
    assert "centred+rot+lloyd3/seed5" in spec.describe()
    assert spec.needs_artifact(2)


def test_centring_without_an_artifact_says_how_to_make_one():
    from kvcompress.cache.build import build_codec

    with pytest.raises(ValueError, match="kvcompress calibrate"):
        build_codec(TensorSpec(method="rotated+codebook", bits=2, center=True), kind="value")


def test_centring_mean_of_another_shape_is_refused():
    codec = ComposedCodec(Centered(torch.zeros(3, 64), RandomizedHadamard()), CodebookCodec(bits=2))
    with pytest.raises(ValueError, match="calibrated on this model"):
        codec.encode(torch.randn(1, 2, 8, 64))


class _MeanArtifact:
    """Stands in for a calibration artifact: a fixed random per-layer mean for every kind."""

    def __init__(self, layers: int, heads: int, dim: int):
        self.means = torch.randn(layers, heads, dim, generator=torch.Generator().manual_seed(7))

    def mean(self, kind: str, layer_idx: int) -> torch.Tensor:
        return self.means[layer_idx]


def _filled_layer(head_dim: int, bits: int, center: bool, dtype: torch.dtype):
    """A CompressedLayer holding 4 sinks, 96 compressed tokens and a window, from random states."""
    from kvcompress.cache import CompressedLayer
    from kvcompress.cache.build import build_codec

    spec = TensorSpec(method="rotated+codebook", bits=bits, center=center, seed=1)
    artifact = _MeanArtifact(1, 2, head_dim) if center else None
    layer = CompressedLayer(build_codec(spec, kind="key_post", artifact=artifact),
                            build_codec(spec, kind="value", artifact=artifact), window=16, sinks=4, block_size=32)
    gen = torch.Generator().manual_seed(head_dim)
    offset = artifact.means[0][None, :, None, :] if center else 0.0
    keys = (torch.randn(1, 2, 130, head_dim, generator=gen) + offset).to(dtype)
    values = (torch.randn(1, 2, 130, head_dim, generator=gen) + offset).to(dtype)
    layer.update(keys, values)
    assert layer.n_compressed == 96
    return layer


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_folding_equals_attention_over_the_reconstruction(head_dim, center, dtype, monkeypatch):
    layer = _filled_layer(head_dim, 2, center, dtype)
    query = torch.randn(1, 4, 1, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = head_dim ** -0.5
    with monkeypatch.context() as patch:  # the folded path never un-rotates stored tokens
        patch.setattr(ComposedCodec, "decode", lambda *a, **k: pytest.fail("stored tokens were un-rotated"))
        folded = attend_compressed(layer, query, None, scale).float()  # rotates q once, reads codes rotated
    keys, values = layer.reconstruct()  # un-rotated, every token decoded
    q = query.float().reshape(1, 2, 2, head_dim)
    probs = torch.softmax(q @ keys.float().transpose(-1, -2) * scale, dim=-1)
    plain = (probs @ values.float()).reshape(1, 4, 1, head_dim)
    # The folded path computes in float32 and rounds once to `dtype`; the reconstruction is in `dtype`.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(folded, plain, atol=4 * eps * plain.abs().max().item() + 1e-5, rtol=4 * eps)


@torch.no_grad()
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_read_path_two_bit_codebook_logits_equal_a_manual_reconstruction(head_dim):
    model = tiny_llama(seed=2, head_dim=head_dim)
    tokens = prompt(100)
    cache = CompressedCache(model, codebook_spec(2))
    model(tokens[:, :-1], cache=cache)
    assert all(layer.n_compressed == 64 for layer in cache.layers)
    reference = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        parts = []
        for codec, stored, sink, window in ((layer.key_codec, layer.stored_keys, layer.sink_keys, layer.window_keys),
                                            (layer.value_codec, layer.stored_values, layer.sink_values,
                                             layer.window_values)):
            # Manual reconstruction: reference unpacking, centroid lookup, scale, inverse rotation R^T.
            bits = codec.inner.bits
            codes = unpack_reference(stored["codes"], bits).long().reshape(1, 2, 64, head_dim)
            rotated = gaussian_codebook(bits)[codes] * stored["scale"].float()
            r = randomized_hadamard_matrix(head_dim, codec.transform.seed)
            parts.append(torch.cat([sink, rotated @ r.T, window], dim=2))
        reference.update(parts[0], parts[1], idx)
    fast = cache.copy()
    logits = model(tokens[:, -1:], cache=cache).logits
    with enable_fast_attention(model):  # the decode step over the codes, rotation folded out
        logits_fast = model(tokens[:, -1:], cache=fast).logits
    logits_reference = model(tokens[:, -1:], cache=reference).logits
    logits_exact = model(tokens).logits[:, -1:]
    torch.testing.assert_close(logits_fast, logits, atol=1e-4, rtol=1e-4)
    diff_ref = (logits - logits_reference).abs().max().item()
    diff_exact = (logits - logits_exact).abs().max().item()
    assert diff_ref < 1e-4, f"compressed vs reconstruction-fed reference: max_diff={diff_ref:.3g}"
    assert diff_exact > 1e-3, f"2-bit logits equal the uncompressed ones (max_diff={diff_exact:.3g})"


@torch.no_grad()
def test_tampered_codes_change_the_output():
    model, tokens = tiny_llama(seed=2), prompt(100)
    outputs = []
    for tamper in (False, True):
        cache = CompressedCache(model, codebook_spec(2))
        model(tokens[:, :-1], cache=cache)
        if tamper:
            for layer in cache.layers:
                layer.stored_keys["codes"] = 255 - layer.stored_keys["codes"]
        outputs.append(model(tokens[:, -1:], cache=cache).logits)
    max_diff = (outputs[0] - outputs[1]).abs().max().item()
    assert max_diff > 1e-3, f"tampered codes did not change the logits (max_diff={max_diff:.3g})"


def test_memory_report_counts_codes_and_scales():
    model, tokens = tiny_llama(seed=2, head_dim=64), prompt(100)
    cache = CompressedCache(model, codebook_spec(2))
    with torch.no_grad():
        model(tokens, cache=cache)
    from kvcompress.cache.bits import report_bits_per_value, spec_bits_per_value

    layer = cache.memory_report().layers[0]
    n = layer.compressed_tokens * 2 * 64  # values per tensor: tokens x heads x head_dim
    assert layer.parts["key_codes"] == n * 2 // 8 and layer.parts["key_scale"] == layer.compressed_tokens * 2 * 2
    assert report_bits_per_value(cache.memory_report()) == pytest.approx(2 + 16 / 64)
    assert spec_bits_per_value(codebook_spec(2), 2, 64) == pytest.approx(2 + 16 / 64)


# ---- pca+codebook: calibrated principal directions, bits allocated by variance ----------------------

MAX_1960_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_mse_matches_max_1960(bits):
    from kvcompress.codecs.lloyd_max import gaussian_mse

    assert gaussian_mse(bits) == pytest.approx(MAX_1960_MSE[bits], rel=2e-3)


def test_bit_allocation_is_the_brute_force_optimum():
    import itertools

    from kvcompress.codecs.allocated import allocate_bits
    from kvcompress.codecs.lloyd_max import gaussian_mse

    variances = torch.tensor([9.0, 4.0, 1.0, 0.3, 0.01])
    for total in (3, 6, 10):
        widths = allocate_bits(variances, total)
        assert sum(widths) == total
        cost = sum(v * gaussian_mse(w) for v, w in zip(variances.tolist(), widths))
        best = min(sum(v * gaussian_mse(w) for v, w in zip(variances.tolist(), ws))
                   for ws in itertools.product(range(7), repeat=5) if sum(ws) == total)
        assert cost == pytest.approx(best)
        assert list(widths) == sorted(widths, reverse=True)  # more variance, never fewer bits


@pytest.mark.parametrize("bits", [2, 3])
def test_allocated_codec_error_close_to_the_transform_coding_prediction(bits):
    """On Gaussian coefficients with the calibrated variances, the error is what the allocation
    predicts, sum_j var_j * mse(b_j), within the slack of a per-vector scale (factor 1.3)."""
    from kvcompress.codecs.allocated import AllocatedCodebookCodec, allocate_bits
    from kvcompress.codecs.lloyd_max import gaussian_mse

    variances = torch.logspace(1, -3, 64)  # a steep spectrum, like pre-RoPE keys
    widths = allocate_bits(variances, bits * 64)
    codec = AllocatedCodebookCodec(widths=widths, std=variances.sqrt()[None].repeat(2, 1))
    y = torch.randn(1, 2, 512, 64, generator=torch.Generator().manual_seed(bits)) * variances.sqrt()
    stored = codec.encode(y)
    assert set(stored) == {"scale"} | {f"codes{w}" for w in set(widths) if w}
    assert sum(t[0, 0, 0].numel() for n, t in stored.items() if n != "scale") * 8 == 8 * bits * 64  # 8 tokens/row
    err = (codec.decode(stored, torch.float32) - y).square().sum(-1).mean()
    predicted = sum(v * gaussian_mse(w) for v, w in zip(variances.tolist(), widths))
    assert err <= 1.3 * predicted, f"error {err:.4g} vs predicted {predicted:.4g}"


@pytest.fixture(scope="module")
def tiny_artifact():
    from kvcompress.calibration import calibrate

    return calibrate(tiny_llama(seed=2, head_dim=64), prompt(256, seed=9), seq_len=128, progress=False)


@torch.no_grad()
@pytest.mark.parametrize("key_space,key_bits,value_bits,value_method,weight", [
    ("post_rope", 2, 2, "pca+codebook", "none"), ("pre_rope", 2, 2, "pca+codebook", "none"),
    ("pre_rope", 1.5, 2.5, "pca+codebook", "none"), ("pre_rope", 2.25, 1.75, "pca+codebook", "none"),
    ("pre_rope", 2.5, 1.5, "rotated+codebook", "query"), ("post_rope", 2, 2.5, "rotated+codebook", "query")])
def test_pca_codebook_read_path(tiny_artifact, key_space, key_bits, value_bits, value_method, weight):
    model, tokens = tiny_llama(seed=2, head_dim=64), prompt(100)
    spec = {"key": {"method": "pca+codebook", "bits": key_bits, "key_space": key_space, "weight": weight},
            "value": {"method": value_method, "bits": value_bits}, "window": 16, "sinks": 4, "block_size": 32}
    fast, slow = (CompressedCache(model, spec, artifact=tiny_artifact) for _ in range(2))  # read with / without
    for cache in (fast, slow):
        model(tokens[:, :-1], cache=cache)
    tampered, tampered_values = fast.copy(), fast.copy()
    for cache, part in ((tampered, "stored_keys"), (tampered_values, "stored_values")):  # flip every code
        for layer in cache.layers:
            stored = getattr(layer, part)
            for name in stored:
                if name.startswith("codes"):
                    stored[name] = 255 - stored[name]
    with enable_fast_attention(model):
        logits_fast, logits_tampered, logits_tampered_values = (model(tokens[:, -1:], cache=c).logits
                                                                for c in (fast, tampered, tampered_values))
    logits_slow = model(tokens[:, -1:], cache=slow).logits
    exact = model(tokens).logits[:, -1:]
    torch.testing.assert_close(logits_fast, logits_slow, atol=1e-4, rtol=1e-4)
    assert (logits_fast - exact).abs().max() > 1e-3, "2-bit codes gave the uncompressed logits"
    assert (logits_tampered - logits_fast).abs().max() > 1e-3, "tampered key codes did not change the output"
    assert (logits_tampered_values - logits_fast).abs().max() > 1e-3, "tampered value codes changed nothing"
    from kvcompress.kernels.cpu_codebook import describe

    assert describe(fast.layers[0].value_codec, 64) is not None  # the kernel reads these codes
    from kvcompress.cache.bits import report_bits_per_value

    # bytes stored per compressed token: the code bits of K and V (fractional averages spread by
    # the allocation) plus one fp16 scale each; the spec's size estimate agrees with the cache's
    layer = fast.layers[0]
    for name, bits in (("stored_keys", key_bits), ("stored_values", value_bits)):
        stored = getattr(layer, name)
        codes = sum(t.numel() for n, t in stored.items() if n.startswith("codes"))
        assert codes * 8 == bits * 64 * stored["scale"].shape[2] * stored["scale"].shape[1]
    assert report_bits_per_value(fast.memory_report()) == pytest.approx((key_bits + value_bits) / 2 + 16 / 64)
    from kvcompress.cache.bits import spec_bits_per_value

    assert spec_bits_per_value(spec, 2, 64) == pytest.approx((key_bits + value_bits) / 2 + 16 / 64)


def test_fractional_pca_bits_spend_their_bits_and_lower_the_error():
    """bits 2.5 puts 160 code bits per 64-value vector, and its error lies between 2 and 3 bits'."""
    from kvcompress.cache.build import pca_codebook

    gen = torch.Generator().manual_seed(3)
    variances = torch.logspace(0.5, -1.5, 64)
    y = torch.randn(1, 2, 256, 64, generator=gen) * variances.sqrt()
    basis, spectrum, mean = torch.eye(64).repeat(2, 1, 1), variances.repeat(2, 1), torch.zeros(2, 64)
    errors = {}
    for bits in (2, 2.5, 3):
        codec = pca_codebook(bits, basis, spectrum, mean)
        stored = codec.encode(y)
        assert sum(t[0, 0].numel() for n, t in stored.items() if n.startswith("codes")) * 8 == bits * 64 * 256
        errors[bits] = (codec.decode(stored, torch.float32) - y).square().mean().item()
    assert errors[3] < errors[2.5] < errors[2]


@pytest.mark.parametrize("bits", [0, 0.1, 3.3, 6.5, True, "4"])
def test_pca_bits_outside_the_allowed_values_are_refused(bits):
    with pytest.raises(ValueError, match="multiple of 1/8 in 0.125..6"):
        TensorSpec(method="pca+codebook", bits=bits)


def test_pca_codebook_below_one_bit_codes_only_its_leading_directions():
    """pca+codebook at 0.5 bit per value: 32 code bits per vector on the leading directions, the
    others decode to the (centred) mean; rotated+codebook stays at 1 bit or more."""
    from kvcompress.cache.build import pca_codebook

    assert TensorSpec(method="pca+codebook", bits=0.5).bits == 0.5
    with pytest.raises(ValueError, match=r"rotated\+codebook bits must be a multiple of 1/8 in 1..6"):
        TensorSpec(method="rotated+codebook", bits=0.5)
    gen = torch.Generator().manual_seed(3)
    variances = torch.logspace(0.5, -1.5, 64)
    y = torch.randn(1, 2, 64, 64, generator=gen) * variances.sqrt()
    basis, spectrum, mean = torch.eye(64).repeat(2, 1, 1), variances.repeat(2, 1), torch.zeros(2, 64)
    codec = pca_codebook(0.5, basis, spectrum, mean)
    stored = codec.encode(y)
    assert sum(t[0, 0].numel() for n, t in stored.items() if n.startswith("codes")) * 8 == 0.5 * 64 * 64
    error = (codec.decode(stored, torch.float32) - y).square().mean().item()
    assert error < y.square().mean().item() * 0.8, "half a bit per value should still code the leading directions"


def test_pca_codebook_without_an_artifact_says_how_to_make_one():
    from kvcompress.cache.build import build_codec

    with pytest.raises(ValueError, match="kvcompress calibrate"):
        build_codec(TensorSpec(method="pca+codebook", bits=2), kind="value")


@pytest.mark.parametrize("n", [4, 3, 2])
def test_bits_presets_fit_their_budget(n):
    from kvcompress.cache.bits import spec_bits_per_value
    from kvcompress.presets import PRESETS

    for head_dim in (64, 128, 256):
        assert spec_bits_per_value(PRESETS.get(f"bits{n}"), 2, head_dim) == pytest.approx(n + 1 / 8 + 8 / head_dim)
    # per-layer widths (bits2's first two layers) trade bits between layers 0 and 1 only, and its
    # table for 30-layer models (the embedded model's depth) between its own layers: the same budget at
    # any depth, with the depth table used at 30 layers only
    for layers in (3, 12, 29, 30, 31):
        assert spec_bits_per_value(PRESETS.get(f"bits{n}"), layers, 64) == pytest.approx(n + 1 / 8 + 8 / 64)
    if n == 2:
        spec = PRESETS.get("bits2")
        assert spec.at_depth(30).for_layer(3)[0].bits == 3 and spec.at_depth(30).for_layer(11)[1].bits == 1.75
        assert spec.at_depth(29).for_layer(3)[0].bits == 2 and spec.at_depth(31).for_layer(11)[1].bits == 2.25


@torch.no_grad()
def test_bits2_on_a_30_layer_model_stores_its_depth_table_at_2_25_bits():
    """bits2 on a 30-layer Llama: the cache's stored bytes give layer 3's keys 3 bits and layer 11's
    values 1.75 (plus the one-byte scale per vector, 1/8 bit at head_dim 64), and 2.25 bits per
    value over every layer, scales included."""
    from kvcompress.cache.bits import report_bits_per_value
    from kvcompress.calibration import calibrate

    model = tiny_llama(seed=2, head_dim=64, num_hidden_layers=30)
    artifact = calibrate(model, prompt(128, seed=9), seq_len=128, progress=False)
    cache = CompressedCache(model, {**load_spec("bits2").to_dict(), "window": 16}, artifact=artifact)
    model(prompt(150), cache=cache)
    report = cache.memory_report()

    def bits(layer: int, prefix: str) -> float:
        m = report.layers[layer]
        values = m.fp16_bytes // 2 * m.compressed_tokens // m.fp16_tokens // 2  # K's (or V's) compressed values
        return 8 * sum(v for k, v in m.parts.items() if k.startswith(prefix)) / values

    assert bits(3, "key_") == pytest.approx(3 + 1 / 8) and bits(3, "value_") == pytest.approx(2.25 + 1 / 8)
    assert bits(11, "key_") == pytest.approx(1.5 + 1 / 8) and bits(11, "value_") == pytest.approx(1.75 + 1 / 8)
    assert bits(12, "key_") == pytest.approx(2 + 1 / 8)
    assert report_bits_per_value(report) == pytest.approx(2.25)


# ---- query-weighted allocation of key bits ------------------------------------------------------


@torch.no_grad()
def test_calibrated_query_energy_is_the_mean_square_of_the_queries_per_rotary_pair():
    """The artifact's pre-RoPE query energies, summed over each rotary pair (d, d + D/2) and over the
    query heads of a KV head, equal those of the post-RoPE queries attention uses (RoPE turns pairs)."""
    from kvcompress.calibration import calibrate
    from kvcompress.measure.reconstruction import capture_states

    model, ids = tiny_llama(seed=2, head_dim=64), prompt(128, seed=9)  # one calibration sequence of 128
    artifact = calibrate(model, ids, seq_len=128, progress=False)
    capture = capture_states(model, ids)
    for layer, q in enumerate(capture.queries):  # (1, Hq, T, D) post-RoPE
        heads = artifact.query_energy(layer).shape[0]
        energy = q.double().square().mean(2)[0].reshape(heads, -1, 64).sum(1)  # (H, D)
        pairs = energy[:, :32] + energy[:, 32:]
        got = artifact.query_energy(layer).double()
        torch.testing.assert_close(got[:, :32] + got[:, 32:], pairs, rtol=1e-4, atol=1e-6)


def test_query_weighting_moves_key_bits_to_the_directions_queries_read():
    """Two directions of equal variance: the one queries never read gets no bits, and the logit
    error q.(k^ - k) drops against the unweighted allocation, for the same stored bytes."""
    from kvcompress.cache.build import pca_codebook
    from kvcompress.codecs import stored_nbytes

    gen = torch.Generator().manual_seed(5)
    variances = torch.linspace(2.0, 1.0, 64)
    basis, spectrum, mean = torch.eye(64)[None], variances[None], torch.zeros(1, 64)
    query = torch.ones(1, 64)
    query[0, :16] = 1e-6  # dims 0..15 and their rotary partners 32..47 carry no query energy
    query[0, 32:48] = 1e-6
    plain = pca_codebook(2, basis, spectrum, mean)
    weighted = pca_codebook(2, basis, spectrum, mean, query_energy=query)
    # the codec's directions are the identity's columns in the head's order of importance
    dims = weighted.transform.inner.basis[0].abs().argmax(0).tolist()  # direction of each rank
    widths = dict(zip(dims, weighted.inner.widths))
    assert sorted(dims) == list(range(64))
    assert all(widths[d] == 0 for d in (*range(16), *range(32, 48)))
    assert sum(weighted.inner.widths) == sum(plain.inner.widths) == 128
    k = torch.randn(1, 1, 512, 64, generator=gen) * variances.sqrt()
    q = torch.randn(512, 64, generator=gen) * query[0].sqrt()
    errors = {}
    for name, codec in (("plain", plain), ("weighted", weighted)):
        stored = codec.encode(k)
        errors[name] = ((codec.decode(stored, torch.float32) - k)[0, 0] * q).sum(-1).square().mean().item()
        errors[name + " bytes"] = stored_nbytes(stored)
    assert errors["plain bytes"] == errors["weighted bytes"]
    assert errors["weighted"] < 0.7 * errors["plain"], errors


def test_query_weight_is_for_pca_codebooks_only():
    with pytest.raises(ValueError, match="weight must be one of"):
        TensorSpec(method="pca+codebook", bits=4, weight="attention")
    with pytest.raises(ValueError, match="applies to method 'pca\\+codebook' only"):
        TensorSpec(method="rotated+codebook", bits=4, weight="query")
    spec = TensorSpec(method="pca+codebook", bits=3.5, key_space="pre_rope", weight="query")
    assert TensorSpec.from_dict(spec.to_dict()) == spec


def test_query_weight_without_query_energies_warns_and_allocates_by_variance(tiny_artifact):
    from kvcompress.cache.build import build_codec
    from kvcompress.calibration import QUERY_ENERGY, CalibrationArtifact

    old = CalibrationArtifact({k: v for k, v in tiny_artifact.tensors.items() if k != QUERY_ENERGY},
                              dict(tiny_artifact.metadata))
    spec = TensorSpec(method="pca+codebook", bits=2, key_space="pre_rope", weight="query")
    with pytest.warns(UserWarning, match="no query energies"):
        codec = build_codec(spec, kind="key_pre", artifact=old)
    plain = build_codec(TensorSpec(method="pca+codebook", bits=2, key_space="pre_rope"), kind="key_pre",
                        artifact=tiny_artifact)
    assert codec.inner.widths == plain.inner.widths


def test_each_head_gives_its_widest_codes_to_its_own_most_important_directions():
    """Two heads whose queries read opposite halves of the same spectrum: with one allocation per
    layer (shared widths by rank), each head's widest codes go to the directions its own queries read,
    and its logit error is below that of the head-averaged order of before (variance order)."""
    from kvcompress.cache.build import pca_codebook

    gen = torch.Generator().manual_seed(8)
    variances = torch.linspace(2.0, 1.0, 64)
    basis, spectrum, mean = torch.eye(64).repeat(2, 1, 1), variances.repeat(2, 1), torch.zeros(2, 64)
    query = torch.full((2, 64), 1e-6)
    query[0, :16], query[0, 32:48] = 1.0, 1.0  # head 0 reads dims 0..15 (and rotary partners)
    query[1, 16:32], query[1, 48:] = 1.0, 1.0  # head 1 the others
    codec = pca_codebook(2, basis, spectrum, mean, query_energy=query)
    for head, read in ((0, {*range(16), *range(32, 48)}), (1, {*range(16, 32), *range(48, 64)})):
        dims = codec.transform.inner.basis[head].abs().argmax(0).tolist()
        coded = {d for d, w in zip(dims, codec.inner.widths) if w}
        assert coded == read, (head, sorted(coded))
    k = torch.randn(1, 2, 512, 64, generator=gen) * variances.sqrt()
    q = torch.randn(2, 512, 64, generator=gen) * query[:, None].sqrt()
    error = ((codec.decode(codec.encode(k), torch.float32) - k)[0] * q).sum(-1).square().mean().item()
    plain = pca_codebook(2, basis, spectrum, mean)  # variance order, the same for both heads
    plain_error = ((plain.decode(plain.encode(k), torch.float32) - k)[0] * q).sum(-1).square().mean().item()
    assert error < 0.5 * plain_error, (error, plain_error)


# ---- one-byte scales ------------------------------------------------------------------------------


def test_one_byte_scales_round_trip_within_half_a_step():
    from kvcompress.codecs.scalecode import SCALE8_MAX, SCALE8_MIN, STEPS_PER_OCTAVE, decode_scale8, encode_scale8

    s = torch.logspace(math.log10(SCALE8_MIN), math.log10(SCALE8_MAX), 1001)
    back = decode_scale8(encode_scale8(s)).float()
    half_step = 2 ** (0.5 / STEPS_PER_OCTAVE)
    ratio = back / s
    assert (ratio <= half_step * 1.001).all() and (ratio >= 1 / half_step / 1.001).all()
    assert decode_scale8(encode_scale8(torch.tensor([0.0, -1.0]))).tolist() == [0.0, 0.0]
    assert decode_scale8(encode_scale8(torch.tensor([1e6]))).item() == pytest.approx(SCALE8_MAX, rel=1e-3)
    assert encode_scale8(torch.tensor([1.0])).dtype == torch.uint8


@pytest.mark.parametrize("bits", [2, 4])
def test_one_byte_scale_costs_little_error_and_its_byte_lowers_it_as_codes(bits):
    """Same widths: an 8-bit scale (codes re-chosen for it) is within 2% of the fp16 scale's error;
    spending the saved byte on 1/8 bit more codes per value gives less error at the same bytes."""
    from kvcompress.cache.build import mixed_codebook
    from kvcompress.codecs import stored_nbytes

    gen = torch.Generator().manual_seed(bits)
    y = torch.randn(1, 2, 512, 64, generator=gen) * torch.rand(1, 2, 512, 1, generator=gen) * 3
    errors, sizes = {}, {}
    for name, codec in (("fp16", mixed_codebook(bits, 64)), ("byte", mixed_codebook(bits, 64, scale_bits=8)),
                        ("byte+codes", mixed_codebook(bits + 0.125, 64, scale_bits=8))):
        stored = codec.encode(y)
        errors[name] = (codec.decode(stored, torch.float32) - y).square().mean().item()
        sizes[name] = stored_nbytes(stored)
    assert stored["scale"].dtype == torch.uint8
    assert sizes["byte"] == sizes["fp16"] - 2 * 512 and sizes["byte+codes"] == sizes["fp16"]
    assert errors["byte"] <= 1.02 * errors["fp16"], errors
    assert errors["byte+codes"] < 0.95 * errors["fp16"], errors


def test_one_byte_scale_spec_settings():
    with pytest.raises(ValueError, match="scale_bits must be one of"):
        TensorSpec(method="rotated+codebook", bits=2, scale_bits=4)
    # a quant layer override under a one-byte-scale codebook default drops the setting, as seed and center
    base = TensorSpec(method="pca+codebook", bits=2, key_space="pre_rope", scale_bits=8)
    override = TensorSpec.from_dict({"method": "quant", "bits": 4, "axis": "channel", "group_size": 32}, base)
    assert override.scale_bits == 16 and "scale_bits" not in override.to_dict()
    spec = TensorSpec(method="rotated+codebook", bits=2.125, scale_bits=8)
    assert TensorSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["scale_bits"] == 8
    assert spec.needs_artifact and "scale8" in spec.describe()
    assert "scale_bits" not in TensorSpec(method="rotated+codebook", bits=2).to_dict()
    from kvcompress.cache.build import build_codec

    with pytest.raises(ValueError, match="kvcompress calibrate"):
        build_codec(spec, kind="value", head_dim=64)


@torch.no_grad()
def test_one_byte_scale_read_path_and_bytes(tiny_artifact):
    """The bitsN layout (one-byte scales, N + 1/8 code bits) through a model: kernel and torch path
    agree, tampered scales change the output, and the cache stores N + 1/8 + 8/64 bits per value."""
    from kvcompress.cache.bits import report_bits_per_value, spec_bits_per_value

    model, tokens = tiny_llama(seed=2, head_dim=64), prompt(100)
    spec = {"key": {"method": "pca+codebook", "bits": 2.125, "key_space": "pre_rope", "weight": "query",
                    "scale_bits": 8},
            "value": {"method": "rotated+codebook", "bits": 2.125, "scale_bits": 8},
            "window": 16, "sinks": 4, "block_size": 32}
    fast, slow = (CompressedCache(model, spec, artifact=tiny_artifact) for _ in range(2))
    for cache in (fast, slow):
        model(tokens[:, :-1], cache=cache)
    tampered = fast.copy()
    for layer in tampered.layers:
        layer.stored_values["scale"] = layer.stored_values["scale"] // 2
    with enable_fast_attention(model):
        logits_fast, logits_tampered = (model(tokens[:, -1:], cache=c).logits for c in (fast, tampered))
    logits_slow = model(tokens[:, -1:], cache=slow).logits
    torch.testing.assert_close(logits_fast, logits_slow, atol=1e-4, rtol=1e-4)
    assert (logits_tampered - logits_fast).abs().max() > 1e-3, "tampered scales did not change the output"
    assert fast.layers[0].stored_keys["scale"].dtype == torch.uint8
    assert report_bits_per_value(fast.memory_report()) == pytest.approx(2.125 + 8 / 64)
    assert spec_bits_per_value(spec, 2, 64) == pytest.approx(2.125 + 8 / 64)
