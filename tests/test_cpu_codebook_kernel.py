"""The CPU decode kernel's codebook path (kvcompress.kernels.cpu_codebook, cpu_codebook.cpp):
equals the pure-torch `attend_compressed` for the codecs of the bitsN presets (pre-RoPE keys on
calibrated principal directions with bits allocated by variance, rotated codebook values) at 2, 3
and 4 bits, for every GQA ratio, head_dim, dtype and mask; with pre-RoPE keys at the positions
eviction kept (each KV head its own) as at consecutive ones; reads the stored codes (tampering with
any code group or scale changes the output); a decode step of a model through it never decodes a
tensor, evicted or not; layers it does not handle fall back to the torch path; a failed build falls
back with one warning.

The extension is built once per machine into the user's cache (a minute or two cold)."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kvcompress import CompressedCache, kernels
from kvcompress.cache import attention as attention_module
from kvcompress.cache.attention import attend
from kvcompress.cache.build import mixed_codebook, pca_codebook
from kvcompress.cache.layer import CompressedLayer
from kvcompress.codecs import ComposedCodec, QuantCodec
from kvcompress.codecs.allocated import AllocatedCodebookCodec, allocate_bits
from kvcompress.codecs.centering import Centered
from kvcompress.codecs.codebook import CodebookCodec
from kvcompress.codecs.lowrank import LowRankProjection
from kvcompress.codecs.packing import unpack_reference
from kvcompress.codecs.rotation import RandomizedHadamard
from kvcompress.kernels import cpu, cpu_codebook, reference
from kvcompress.kernels.reference import attend_compressed
from kvcompress.presets import load_spec
from kvcompress.rope import RopeInverter
from kvcompress.spec import EvictionSpec
from tiny_models import prompt, tiny_llama


from test_cpu_kernel import kernel  # noqa: E402,F401  (the module's autouse fixture: skip under torch, build once)


def tolerance(dtype: torch.dtype, largest_score: float = 1.0) -> dict:
    """fp32 accumulation in a different order (64 ulp of fp32, of the largest |score| where that
    is above 1: pre-RoPE keys are decoded, rotated and dotted in another order than the torch
    path's, and a score error d moves the softmax output by about d), plus one rounding of the
    output to `dtype`."""
    fp32 = 64 * torch.finfo(torch.float32).eps * max(1.0, largest_score)
    tol = fp32 + (torch.finfo(dtype).eps if dtype != torch.float32 else 0.0)
    return {"atol": tol, "rtol": tol}


def largest_score(layer, query, scale: float) -> float:
    """max |q.k| * scale over every token the layer holds (keys from the full reconstruction)."""
    keys, _ = layer.reconstruct()  # (B, H, seq, D)
    B, Hq, _, D = query.shape
    q = query.float().reshape(B, keys.shape[1], Hq // keys.shape[1], D) * scale
    return (q @ keys.float().transpose(-1, -2)).abs().max().item()


class Rotary(nn.Module):
    """A rotary embedding in transformers' convention: cos, sin (1, n, D) = cos/sin of [f, f] * factor."""

    def __init__(self, dim: int, base: float = 10000.0, factor: float = 1.0, equal_halves: bool = True):
        super().__init__()
        self.inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
        self.factor = factor
        self.equal_halves = equal_halves  # False: a table whose halves differ (the kernel reads both)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq  # (1, n, D/2)
        emb = torch.cat([freqs, freqs if self.equal_halves else freqs * 1.5], dim=-1)
        return emb.cos() * self.factor, emb.sin() * self.factor


def statistics(H: int, D: int, gen: torch.Generator):
    """A calibrated-looking (basis (H, D, D), spectrum (H, D) falling steeply, mean (H, D))."""
    basis = torch.linalg.qr(torch.randn(H, D, D, generator=gen))[0]
    spectrum = torch.logspace(1, -3, D)[None].expand(H, D).contiguous()
    return basis, spectrum, torch.randn(H, D, generator=gen)


def make_codec(kind: str, bits: int, H: int, D: int, gen: torch.Generator):
    """`pca`: the bitsN keys' codec; `rotated` / `centred`: the bitsN values' codec without / with
    a mean; `lowrank`: principal directions of rank 3D/4 with bits allocated by variance."""
    if kind == "pca":
        return pca_codebook(bits, *statistics(H, D, gen))
    if kind == "rotated":
        return ComposedCodec(RandomizedHadamard(seed=7), CodebookCodec(bits))
    if kind == "pca-byte":  # the bitsN keys: N + 1/8 code bits, one-byte scales
        basis, spectrum, mean = statistics(H, D, gen)
        return pca_codebook(bits + 0.125, basis, spectrum, mean, query_energy=torch.rand(H, D, generator=gen),
                            scale_bits=8)
    if kind == "rotated-byte":  # the bitsN values: rotated, relative to a per-head rms, one-byte scales
        return ComposedCodec(RandomizedHadamard(seed=7),
                             mixed_codebook(bits + 0.125, D, torch.rand(H, 1, generator=gen) + 0.5, scale_bits=8))
    if kind == "centred":
        return ComposedCodec(Centered(torch.randn(H, D, generator=gen) * 0.5, RandomizedHadamard(seed=11)),
                             CodebookCodec(bits))
    if kind == "lowrank":
        basis, spectrum, _ = statistics(H, D, gen)
        rank = 3 * D // 4
        widths = allocate_bits(spectrum[0, :rank], bits * rank)
        return ComposedCodec(LowRankProjection(basis[:, :, :rank]),
                             AllocatedCodebookCodec(widths=widths, std=spectrum[:, :rank].sqrt()))
    raise ValueError(kind)


def filled_layer(bits: int, D: int, dtype=torch.float32, B: int = 2, H: int = 2, tokens: int = 1200,
                 key: str = "pca", value: str = "centred", pre_rope: bool = True, sinks: int = 4,
                 window: int = 40, factor: float = 1.0, equal_halves: bool = True, seed: int = 0,
                 eviction: EvictionSpec | None = None) -> CompressedLayer:
    """A layer holding `tokens` random tokens: sinks, several kernel blocks of codes, a window.

    With `eviction`, the tokens are a prompt the layer evicts from (scored with random queries,
    as kvcompress's attention hands them over at prefill) before compressing the kept ones."""
    gen = torch.Generator().manual_seed(seed)
    key_space = RopeInverter(Rotary(D, factor=factor, equal_halves=equal_halves)) if pre_rope else None
    config = SimpleNamespace(_attn_implementation=attention_module.ATTENTION_NAME)  # prompt queries reach the layer
    layer = CompressedLayer(make_codec(key, bits, H, D, gen), make_codec(value, bits, H, D, gen),
                            window=window, sinks=sinks, block_size=64, key_space=key_space, eviction=eviction,
                            config=config if eviction is not None else None)
    keys = torch.randn(B, H, tokens, D, generator=gen) * 2 + torch.randn(1, H, 1, D, generator=gen)
    values = torch.randn(B, H, tokens, D, generator=gen)
    layer.update(keys.to(dtype), values.to(dtype))
    if eviction is not None:
        queries = torch.randn(B, 2 * H, tokens, D, generator=gen) * 2
        layer.evict_prompt(queries.to(dtype), D ** -0.5)
    assert layer.n_compressed > 2 * cpu.BLOCK_TOKENS  # several blocks, and the last one partial
    return layer


def evicted_layer(bits: int, D: int, dtype=torch.float32, **kwargs) -> CompressedLayer:
    """`filled_layer` after snapkv eviction kept half of a 2400-token prompt: each KV head holds its
    own tokens, so its pre-RoPE compressed keys sit at positions of its own, not n_sinks + i."""
    layer = filled_layer(bits, D, dtype, tokens=2400, eviction=EvictionSpec("snapkv", keep=0.5), **kwargs)
    positions = layer.key_positions(0, layer.n_compressed)  # (B, H, n)
    assert not isinstance(positions, int), "eviction left the compressed keys at consecutive positions"
    assert (positions.diff(dim=-1) > 1).any(), "no gap among the kept positions"
    assert not torch.equal(positions[:, 0], positions[:, 1]), "both heads kept the same positions"
    return layer


def query_for(layer, rep: int, seed: int = 1) -> torch.Tensor:
    B, H, _, D = layer.window_keys.shape
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H * rep, 1, D, generator=gen) * 2).to(layer.window_keys.dtype)


def left_padding_mask(layer, padded: int, additive: bool) -> torch.Tensor:
    """(B, 1, 1, seq): the second row has `padded` left-padding positions."""
    B, seq = layer.window_keys.shape[0], layer.held_tokens()
    keep = torch.ones(B, 1, 1, seq, dtype=torch.bool)
    keep[1, ..., :padded] = False
    if not additive:
        return keep
    return torch.zeros(B, 1, 1, seq).masked_fill(~keep, torch.finfo(torch.float32).min)


def check_equal(layer, query, mask=None, scale=None):
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    ref = attend_compressed(layer, query, mask, scale)
    out = cpu.attend(layer, query, mask, scale)
    assert out is not None, "the codebook path did not take this layer"
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tolerance(query.dtype, largest_score(layer, query, scale)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bits_preset_codecs_equal_the_torch_path(bits, D, dtype):
    layer = filled_layer(bits, D, dtype)
    check_equal(layer, query_for(layer, 3), left_padding_mask(layer, 700, additive=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_one_byte_scale_codecs_equal_the_torch_path(bits, dtype):
    layer = filled_layer(bits, 64, dtype, key="pca-byte", value="rotated-byte")
    assert layer.stored_keys["scale"].dtype == layer.stored_values["scale"].dtype == torch.uint8
    check_equal(layer, query_for(layer, 3), left_padding_mask(layer, 700, additive=False))


@pytest.mark.parametrize("rep", [1, 2, 4, 8])
def test_every_gqa_ratio(rep):
    layer = filled_layer(3, 64)
    check_equal(layer, query_for(layer, rep), left_padding_mask(layer, 100, additive=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D, value", [(96, "pca"), (256, "centred")])  # Hadamard sizes are powers of two
def test_other_head_dims_and_float16(D, value, dtype):
    layer = filled_layer(4, D, dtype, tokens=1200, value=value)
    check_equal(layer, query_for(layer, 2), None)


@pytest.mark.parametrize("key, value, pre_rope", [
    ("pca", "rotated", True), ("pca", "pca", True), ("pca", "centred", False), ("rotated", "centred", False),
    ("centred", "rotated", True), ("centred", "rotated", False), ("lowrank", "lowrank", True),
    ("lowrank", "centred", False)])
@pytest.mark.parametrize("bits", [2, 4])
def test_every_codebook_codec_pairing_and_key_space(key, value, pre_rope, bits):
    layer = filled_layer(bits, 64, key=key, value=value, pre_rope=pre_rope, sinks=0)
    check_equal(layer, query_for(layer, 2), left_padding_mask(layer, 300, additive=True), scale=0.3)


def test_scaled_rope_tables_and_masks_bool_and_additive():
    layer = filled_layer(2, 64, factor=1.25)  # a rope with an attention factor (yarn-like)
    query = query_for(layer, 4)
    for padded in (0, 5, 600, 1100):
        bool_out = check_equal(layer, query, left_padding_mask(layer, padded, additive=False))
        add_out = check_equal(layer, query, left_padding_mask(layer, padded, additive=True))
        torch.testing.assert_close(add_out, bool_out, **tolerance(torch.float32))


def test_rope_tables_with_unequal_halves_are_read_whole():
    layer = filled_layer(3, 64, equal_halves=False)
    assert layer.key_space.half_tables(4, 8, torch.device("cpu")) is None
    check_equal(layer, query_for(layer, 3), None)
    halves = filled_layer(3, 64).key_space.half_tables(4, 8, torch.device("cpu"))
    assert halves is not None and halves[0].shape == (8, 32)  # the usual case: half the bytes


def test_folded_rows_reproduce_the_codec_decode():
    """x = offset + s * sum_j book[code_j] rows[j], from the codes unpacked by the reference unpacker,
    is what each codec decodes to: the form the kernel reads is the codec's own."""
    gen = torch.Generator().manual_seed(3)
    for kind in ("pca", "centred", "lowrank"):
        codec = make_codec(kind, 3, 2, 64, gen)
        stored = codec.encode(torch.randn(1, 2, 16, 64, generator=gen) * 3)
        form = cpu_codebook.describe(codec, 64)
        values = []
        for name, bits, book in zip(form.names, form.bits, form.books):
            codes = unpack_reference(stored[name], bits).long()  # (1, H, rows, 8 * count)
            values.append(book[codes].reshape(1, 2, 16, -1))  # (1, H, T, count)
        c = torch.cat(values, dim=-1).double()
        offset = form.offset.double()[None, :, None, :] if form.offset.numel() else 0.0
        rebuilt = offset + stored["scale"].double() * (c @ form.rows.double().expand(2, -1, -1)[None])
        torch.testing.assert_close(rebuilt.float(), codec.decode(stored, torch.float32), atol=2e-5, rtol=2e-5)


def test_result_does_not_depend_on_the_thread_count():
    layer = filled_layer(4, 64)
    query = query_for(layer, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.attend(layer, query, None, 0.125)
        torch.set_num_threads(2)
        two = cpu.attend(layer, query, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # the split into tasks is fixed; threads only run them


@pytest.mark.parametrize("kind, name", [("key", "codes4"), ("key", "codes2"), ("key", "scale"),
                                        ("value", "codes"), ("value", "scale")])
def test_tampered_codes_change_the_output(kind, name):
    layer = filled_layer(4, 64)
    query = query_for(layer, 3)
    before = cpu.attend(layer, query, None, 0.125)
    stored = layer.stored_keys if kind == "key" else layer.stored_values
    assert name in stored, f"{name} not among the stored tensors {sorted(stored)}"
    tensor = stored[name]
    if name == "scale":
        tensor[:, :, 10:20] *= -1.5
    else:
        tensor[:, :, 3:9].copy_(255 - tensor[:, :, 3:9])  # a few rows of one block
    after = cpu.attend(layer, query, None, 0.125)
    assert (after - before).abs().max() > 1e-3, f"tampering with the {kind} {name} did not change the output"
    torch.testing.assert_close(after, attend_compressed(layer, query, None, 0.125), **tolerance(torch.float32))


def test_layers_the_path_does_not_read_fall_back_to_the_torch_path():
    layer = filled_layer(4, 64)
    query = query_for(layer, 2)
    assert cpu.attend(layer, query, None, 0.125) is not None
    saved, layer.key_space = layer.key_space, object()  # a key space without cos/sin tables
    assert cpu.attend(layer, query, None, 0.125) is None
    layer.key_space = saved
    mixed = CompressedLayer(QuantCodec(4, "channel", 32), make_codec("rotated", 4, 2, 64, torch.Generator()),
                            window=40, sinks=4, block_size=64)
    mixed.update(torch.randn(2, 2, 400, 64), torch.randn(2, 2, 400, 64))
    assert cpu.attend(mixed, query, None, 0.125) is None  # uniform keys, codebook values: neither path
    odd = CompressedLayer(make_codec("pca", 4, 2, 40, torch.Generator()),
                          make_codec("pca", 4, 2, 40, torch.Generator()), window=40, sinks=4, block_size=64)
    odd.update(torch.randn(2, 2, 400, 40), torch.randn(2, 2, 400, 40))
    assert cpu.attend(odd, torch.randn(2, 4, 1, 40), None, 0.125) is None  # head_dim not a multiple of 16


@pytest.mark.parametrize("bits, dtype, key, equal_halves", [
    (2, torch.float32, "pca", True), (4, torch.float32, "pca", True), (4, torch.bfloat16, "pca", True),
    (3, torch.float32, "lowrank", True), (3, torch.float32, "pca", False)])
def test_pre_rope_keys_at_evicted_positions_equal_the_torch_path(bits, dtype, key, equal_halves):
    """After eviction the kernel rotates each compressed key at its own (batch, head) position
    (half or whole cos/sin rows), as `attend_compressed` does."""
    layer = evicted_layer(bits, 64, dtype, key=key, equal_halves=equal_halves)
    query = query_for(layer, 3)
    check_equal(layer, query, left_padding_mask(layer, 300, additive=False))
    check_equal(layer, query, None)


def test_evicted_positions_are_read_not_assumed_consecutive():
    """The kernel's result follows the positions it is handed: the same codes rotated at
    consecutive positions (what ignoring eviction would do) give another output."""
    layer = evicted_layer(4, 64)
    query = query_for(layer, 2)
    at_kept = check_equal(layer, query)
    kept = layer.token_positions
    n_sinks = layer.sink_keys.shape[2]
    layer.token_positions = torch.arange(layer.held_tokens(), dtype=torch.int32).expand_as(kept).clone()
    layer.token_positions[:, :, n_sinks + layer.n_compressed:] = kept[:, :, n_sinks + layer.n_compressed:]
    consecutive = check_equal(layer, query)
    assert (at_kept - consecutive).abs().max() > 1e-2


def test_positions_outside_the_rope_tables_are_refused():
    """Positions index the cos/sin tables unchecked in the inner loop: the call checks them first."""
    layer = evicted_layer(2, 64)
    query = query_for(layer, 2)
    layer.token_positions[0, 1, layer.sink_keys.shape[2] + 5] = layer.get_seq_length() + 10**6
    with pytest.raises(RuntimeError, match="rope positions must lie in"):
        cpu.attend(layer, query, None, 0.125)


def test_post_rope_keys_are_read_whatever_their_positions():
    layer = filled_layer(3, 64, pre_rope=False)
    held = torch.arange(layer.held_tokens(), dtype=torch.int32)
    layer.token_positions = (held * 2).expand(2, 2, -1).clone()  # positions matter only to pre-RoPE keys
    check_equal(layer, query_for(layer, 3), left_padding_mask(layer, 50, additive=False))


@torch.no_grad()
@pytest.mark.parametrize("bits", [2, 4, "bits2"])
def test_decode_step_of_a_model_never_decodes_or_reconstructs(bits, monkeypatch, fast_attention, tiny_artifact):
    """The bitsN form (pre-RoPE pca+codebook keys, rotated codebook values) on a tiny Llama: the
    decode step reads the codes through the kernel, and its logits equal the torch path's; "bits2":
    the preset itself (one-byte scales, other widths in its first two layers), window 16."""
    model = fast_attention(tiny_llama(seed=2, head_dim=64))
    spec = {"key": {"method": "pca+codebook", "bits": bits, "key_space": "pre_rope"},
            "value": {"method": "rotated+codebook", "bits": bits}, "window": 16, "sinks": 4, "block_size": 32}
    if bits == "bits2":
        spec = {**load_spec("bits2").to_dict(), "window": 16}
    ids = prompt(150)
    cache = CompressedCache(model, spec, artifact=tiny_artifact)
    model(ids, cache=cache)
    torch_cache = cache.copy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVCOMPRESS_KERNELS", "torch")
        expected = model(torch.tensor([[7]]), cache=torch_cache).logits

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step with the kernel decoded the codes into a tensor")

    for target, name in ((CodebookCodec, "decode"), (AllocatedCodebookCodec, "decode"),
                         (CompressedLayer, "reconstruct"), (reference, "attend_compressed")):
        monkeypatch.setattr(target, name, refuse)
    got = model(torch.tensor([[7]]), cache=cache).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if bits == "bits2":  # layer 0's keys below 1 bit, layer 1's values wider: 2.25 bits per value from stored bytes
        from kvcompress.cache.bits import report_bits_per_value

        assert report_bits_per_value(cache.memory_report()) == pytest.approx(2.25)


@torch.no_grad()
@pytest.mark.parametrize("applies", ["prompt", "generation"])
def test_evicted_bits_cache_decodes_through_the_kernel(applies, monkeypatch, fast_attention, tiny_artifact):
    """A bitsN-like spec with snapkv eviction (as `bits4@snapkv:0.5`) on a tiny Llama: prefill
    evicts (pre-RoPE keys at each head's kept positions; with "generation", later spans leaving
    the window too), then every decode step runs the kernel, never `attend_compressed`, and its
    logits equal the torch path's."""
    model = fast_attention(tiny_llama(seed=2, head_dim=64))
    spec = {"key": {"method": "pca+codebook", "bits": 4, "key_space": "pre_rope"},
            "value": {"method": "rotated+codebook", "bits": 4}, "window": 16, "sinks": 4, "block_size": 32,
            "eviction": {"policy": "snapkv", "keep": 0.5, "applies": applies}}
    cache = CompressedCache(model, spec, artifact=tiny_artifact)
    model(prompt(300), cache=cache)
    torch_cache = CompressedCache(model, spec, artifact=tiny_artifact)  # decodes with KVCOMPRESS_KERNELS=torch
    model(prompt(300), cache=torch_cache)
    for layer in cache.layers:
        assert layer.n_compressed > 0 and layer.token_positions is not None
        assert layer.held_tokens() < layer.get_seq_length() == 300
    evicted_after_prompt = [layer.evicted_tokens() for layer in cache.layers]

    calls = []
    kernel_attend = cpu_codebook.attend
    monkeypatch.setattr(cpu_codebook, "attend", lambda *args: calls.append(1) or kernel_attend(*args))
    torch_path = reference.attend_compressed

    def only_torch_cache(layer, *args):
        assert kernels.mode() == "torch", "a decode step of the kernel cache ran attend_compressed"
        return torch_path(layer, *args)

    monkeypatch.setattr(reference, "attend_compressed", only_torch_cache)
    steps = 90 if applies == "generation" else 4  # generation: 64-token spans leave the 16-token window
    for step in range(steps):
        token = torch.tensor([[5 + step % 60]])
        monkeypatch.setenv("KVCOMPRESS_KERNELS", "auto")
        got = model(token, cache=cache).logits
        monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
        expected = model(token, cache=torch_cache).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert len(calls) == (step + 1) * len(cache.layers)
    for layer, evicted in zip(cache.layers, evicted_after_prompt):
        assert layer.held_tokens() + layer.evicted_tokens() == 300 + steps
        assert (layer.evicted_tokens() > evicted) == (applies == "generation")


@pytest.fixture(scope="module")
def tiny_artifact():
    from kvcompress.calibration import calibrate

    return calibrate(tiny_llama(seed=2, head_dim=64), prompt(256, seed=9), seq_len=128, progress=False)


def test_disabled_by_environment_gives_the_torch_result_without_warning(monkeypatch):
    layer = filled_layer(3, 64)
    query = query_for(layer, 4)
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.attend(layer, query, None, 0.125) is None
        without = attend(layer, query, None, 0.125)
    assert torch.equal(without, attend_compressed(layer, query, None, 0.125))


def test_failed_build_warns_once_and_gives_the_same_result(monkeypatch):
    layer = filled_layer(4, 64)
    query = query_for(layer, 3)
    with_kernel = attend(layer, query, None, 0.125)

    def failing_build():
        raise RuntimeError("Error building extension 'kvcompress_cpu_decode':\n"
                           "cpu_codebook.cpp:1:10: fatal error: cpu_common.h: No such file or directory")

    monkeypatch.setattr(cpu, "_build", failing_build)
    monkeypatch.setattr(cpu, "_state", {"tried": False, "module": None, "reason": None})
    with pytest.warns(RuntimeWarning) as caught:
        outs = [attend(layer, query, None, 0.125) for _ in range(3)]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "could not be built" in message and "cpu_common.h" in message and "KVCOMPRESS_KERNELS=torch" in message
    for out in outs:
        assert torch.equal(out, attend_compressed(layer, query, None, 0.125))
        torch.testing.assert_close(out, with_kernel, **tolerance(torch.float32))
