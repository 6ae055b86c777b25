"""Named presets: one registry of ready-made specs, and `load_spec`, which resolves any spec.

Every preset is a `CacheSpec`; `PRESETS.get(name)` returns it and an unknown name lists the
valid ones. The measured presets (lossless ... extreme) are read from `measured_presets.json`,
the prompt presets (prompt-6x, prompt-8x) from `prompt_presets.json`, on the first lookup, not at
import (see `presets.measured`).

This module does not measure presets: `kvcompress measure-presets` chooses the measured ones
(see `kvcompress.tuning.preset_selection`), and the README's table of their quality comes from
`kvcompress eval`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ..spec import CacheSpec, TensorSpec, looks_like_spec_file, read_spec_file
from .measured import PROMPT_DATA_FILE, load_measured, register_measured


class Registry:
    """Name -> factory of CacheSpec; registering a name twice is an error.

    `add_source(fn)` defers registrations: `fn(registry)` runs once, on the first lookup.
    """

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[], CacheSpec]] = {}
        self._help: dict[str, str] = {}
        self._sources: list[Callable[[Registry], object]] = []

    def add_source(self, source: Callable[[Registry], object]) -> None:
        self._sources.append(source)

    def _load_sources(self) -> None:
        while self._sources:
            self._sources.pop(0)(self)

    def register(self, name: str, help: str, factory: Callable[[], CacheSpec]) -> None:
        if name in self._factories:
            raise ValueError(f"preset {name!r} is already registered")
        self._factories[name] = factory
        self._help[name] = help

    def get(self, name: str) -> CacheSpec:
        self._load_sources()
        if name not in self._factories:
            raise ValueError(
                f"unknown preset {name!r}; valid presets: {', '.join(self.names())} "
                "(or give the path of a .json/.yaml spec file)"
            )
        spec = self._factories[name]()
        return spec

    def names(self) -> list[str]:
        self._load_sources()
        return list(self._factories)

    def help(self, name: str) -> str:
        self._load_sources()
        return self._help[name]


PRESETS = Registry()


def _kivi(name: str, key_bits: int, value_bits: int) -> Callable[[], CacheSpec]:
    """K per-channel (32-token groups), V per-token (32-channel groups), KIVI-style."""
    return lambda: CacheSpec(
        key=TensorSpec(method="quant", bits=key_bits, axis="channel", group_size=32),
        value=TensorSpec(method="quant", bits=value_bits, axis="token", group_size=32),
        name=name,
    )


PRESETS.register("none", "no compression (full precision; the baseline)", lambda: CacheSpec(
    key=TensorSpec(method="none"), value=TensorSpec(method="none"), name="none"))
PRESETS.register("int8", "8-bit K per-channel, 8-bit V per-token", _kivi("int8", 8, 8))
PRESETS.register("int4", "4-bit K per-channel, 4-bit V per-token (KIVI-style)", _kivi("int4", 4, 4))
PRESETS.register("int3", "3-bit K per-channel, 3-bit V per-token", _kivi("int3", 3, 3))
PRESETS.register("int2", "2-bit K per-channel, 2-bit V per-token", _kivi("int2", 2, 2))
PRESETS.register("k4v2", "4-bit K per-channel, 2-bit V per-token", _kivi("k4v2", 4, 2))
PRESETS.register("k2v4", "2-bit K per-channel, 4-bit V per-token", _kivi("k2v4", 2, 4))


# Low-rank and rotation presets (ranks are absolute: 32 of the embedded model's head_dim 64).
# Low-rank specs need a calibration artifact (built automatically for the embedded model).
PRESETS.register("lowrank-k32", "K pre-RoPE low-rank 32 (fp16 coefficients), V full precision", lambda: CacheSpec(
    key=TensorSpec(method="lowrank", rank=32, key_space="pre_rope"), value=TensorSpec(method="none"),
    name="lowrank-k32"))
PRESETS.register("lowrank-k48-int4", "K pre-RoPE low-rank 48 with 4-bit per-channel coefficients, "
                 "V 4-bit per-token", lambda: CacheSpec(
                     key=TensorSpec(method="lowrank+quant", rank=48, bits=4, axis="channel", group_size=32,
                                    key_space="pre_rope"),
                     value=TensorSpec(method="quant", bits=4, axis="token", group_size=32),
                     name="lowrank-k48-int4"))
PRESETS.register("hadamard-int4", "Hadamard-rotated K and V, 4-bit per-token groups of 32 (llama.cpp-style)",
                 lambda: CacheSpec(key=TensorSpec(method="hadamard+quant", bits=4, axis="token", group_size=32),
                                   value=TensorSpec(method="hadamard+quant", bits=4, axis="token", group_size=32),
                                   name="hadamard-int4"))



def _widths(layers: dict[str, tuple[float, float]]) -> dict[str, dict]:
    """{layer range: (key bits, value bits)} -> a spec's layer table of those widths."""
    return {r: {"key": {"bits": kb}, "value": {"bits": vb}} for r, (kb, vb) in layers.items()}


def _bits(name: str, key_bits: float, value_bits: float, layers: dict[str, tuple[float, float]],
          at_depth: dict[int, dict[str, tuple[float, float]]]) -> Callable[[], CacheSpec]:
    """K pre-RoPE on calibrated principal directions (bits allocated by variance x query energy),
    V rotated codebook relative to each head's calibrated rms; a one-byte scale per vector each.
    `layers`: {layer range: (key bits, value bits)} overrides of the widths; `at_depth`: {model depth:
    more such overrides}, used only on a model of that many layers."""
    return lambda: CacheSpec(key=TensorSpec(method="pca+codebook", bits=key_bits, key_space="pre_rope",
                                            weight="query", scale_bits=8),
                             value=TensorSpec(method="rotated+codebook", bits=value_bits, scale_bits=8),
                             layers=_widths(layers),
                             layers_at_depth={str(d): _widths(table) for d, table in at_depth.items()}, name=name)


# The bitsN presets: N + 1/8 + 8/head_dim bits per compressed value (N + 1/8 code bits per value
# on average over K and V plus a one-byte logarithmic scale per vector; N + 0.25 on a head_dim-64
# model), chosen by benchmarks/select_kinds_codecs.py on the selection parts (see docs/texts.md):
# bits4 and bits3 give the byte each vector saves on its scale to its own codes (K and V N + 1/8),
# bits2 gives both bytes to the values (K 2, V 2.25), where 2-bit values lose most, and in its first
# two layers moves code bits from keys to values and from layer 0's keys to layer 1's values (layers 0
# and 1 keep K + V = 8.5 bits per value pair between them, every other layer 4.25, so the preset costs
# 2.25 bits per value on a model of any depth): the first layers' values move the KL most and layer 0's
# keys least (benchmarks/layer_bits_sensitivity.py, benchmarks/select_kinds_codecs.py, docs/texts.md).
# On a model of 30 layers (the embedded model's depth, where it was measured) bits2 also moves code
# bits between middle layers by their sensitivity with the window kept exact (`--window 128`): keys
# of layers 3, 5, 7, 8 and layer 20 take 4 bits per value pair in all from layers 11, 13, 16 and 25
# (1 each), so it still costs 2.25 bits per value; on any other depth that table is not used.
# They need a calibration artifact (built automatically for the embedded model, on every kind of text).
_BITS_WIDTHS = {4: (4.125, 4.125), 3: (3.125, 3.125), 2: (2, 2.25)}
_BITS_LAYERS = {2: {"0": (0.5, 3.25), "1": (1.5, 3.25)}}
_BITS_AT_DEPTH = {2: {30: {"3": (3, 2.25), "8": (3, 2.25), "5": (2.5, 2.25), "7": (2.5, 2.25), "20": (2.5, 2.75),
                           "11": (1.5, 1.75), "13": (1.5, 1.75), "16": (1.5, 1.75), "25": (1.5, 1.75)}}}
for _n, (_kb, _vb) in _BITS_WIDTHS.items():
    _layers, _at_depth = _BITS_LAYERS.get(_n, {}), _BITS_AT_DEPTH.get(_n, {})
    _first = "".join(f"; layer {r}: K {kb:g}, V {vb:g} bits" for r, (kb, vb) in _layers.items())
    _first += "".join(f"; on a {d}-layer model {len(t)} more layers' widths moved at the same total"
                      for d, t in _at_depth.items())
    PRESETS.register(f"bits{_n}", f"K pre-RoPE, centred, on calibrated principal directions with {_kb:g} bits per "
                     f"value allocated by variance times query energy; V randomized-Hadamard-rotated Lloyd-Max "
                     f"codebooks, {_vb:g} bits per value{_first}; one logarithmic byte of scale per vector (needs a "
                     "calibration artifact)", _bits(f"bits{_n}", _kb, _vb, _layers, _at_depth))


def _bits_fast(name: str, bits: int) -> Callable[[], CacheSpec]:
    """K post-RoPE, centred, randomized-Hadamard codebook; V randomized-Hadamard N-bit codebook with an
    fp16 scale (bitsN's values before their one-byte scales; bitsN's bytes)."""
    return lambda: CacheSpec(key=TensorSpec(method="rotated+codebook", bits=bits, center=True),
                             value=TensorSpec(method="rotated+codebook", bits=bits), name=name)


# The bitsN-fast presets: the bytes of bitsN with keys coded as attention gives them (post-RoPE),
# so the CPU kernel scores them from the codes with the query projected once per step instead of
# decoding and re-rotating every pre-RoPE key; they cost quality (docs/decode.md, "bitsN-fast").
for _n in (4, 3, 2):
    PRESETS.register(f"bits{_n}-fast", f"K post-RoPE, centred, randomized-Hadamard-rotated {_n}-bit Lloyd-Max "
                     f"codebook; V rotated {_n}-bit codebook; one fp16 scale per vector: bits{_n}'s bytes, decodes faster, "
                     "higher KL (needs a calibration artifact)", _bits_fast(f"bits{_n}-fast", _n))


def _paged(name: str, tensor: TensorSpec) -> Callable[[], CacheSpec]:
    """The same token-wise codec for K and V, no window, no sinks: every token's bytes complete on their own."""
    return lambda: CacheSpec(key=tensor, value=tensor, window=0, sinks=0, name=name)


# The paged-* presets: what a paged KV pool (vLLM, see kvcompress.paged) can store, each token written once
# into its own slot; keys post-RoPE, as serving engines hand them over.
for _n in (8, 4, 3, 2):
    PRESETS.register(f"paged-int{_n}", f"{_n}-bit K and V per token (groups of 32 channels), no window or sinks "
                     "(servable from a paged pool, e.g. the vLLM plugin)",
                     _paged(f"paged-int{_n}", TensorSpec(method="quant", bits=_n, axis="token", group_size=32)))
PRESETS.register("paged-hadamard-int4", "Hadamard-rotated 4-bit K and V per token (groups of 32), no window or sinks "
                 "(servable from a paged pool)",
                 _paged("paged-hadamard-int4", TensorSpec(method="hadamard+quant", bits=4, axis="token", group_size=32)))
for _n in (4, 3, 2):
    PRESETS.register(f"paged-bits{_n}", f"randomized-Hadamard-rotated {_n}-bit Lloyd-Max codebook for K (post-RoPE) "
                     "and V, one fp16 scale per vector, no window or sinks (servable from a paged pool)",
                     _paged(f"paged-bits{_n}", TensorSpec(method="rotated+codebook", bits=_n)))


PRESETS.add_source(lambda registry: register_measured(registry, load_measured()))
# prompt-6x, prompt-8x: whole cache at least 6x / 8x smaller than fp16 at the end of a 1536-token prompt
# (eviction composed with a codec; see `kvcompress measure-presets --min-ratios` and the README).
PRESETS.add_source(lambda registry: register_measured(registry, load_measured(PROMPT_DATA_FILE)))


def load_spec(spec: str | Path | dict | CacheSpec) -> CacheSpec:
    """Resolve a spec from a preset name, a JSON/YAML file path, a dict, or a CacheSpec.

    A name `BASE@POLICY:KEEP` is the spec BASE (a preset name or spec file) with an eviction
    section added: e.g. `int4@snapkv:0.5` (int4 codecs, SnapKV keeping half the prompt),
    `none@tova:0.25`, `bits3@expected:600` (KEEP > 1: tokens kept per KV head).
    """
    if isinstance(spec, CacheSpec):
        return spec
    if isinstance(spec, dict):
        return CacheSpec.from_dict(spec)
    text = str(spec)
    if looks_like_spec_file(text):
        return read_spec_file(text)
    if "@" in text:
        return _with_eviction(text)
    return PRESETS.get(text)


def _with_eviction(text: str) -> CacheSpec:
    """`BASE@POLICY:KEEP` -> the spec BASE with eviction {policy, keep (fraction) or keep_tokens}."""
    base, _, eviction = text.partition("@")
    if not base.strip():
        raise ValueError(f"spec {text!r}: write BASE@POLICY:KEEP with BASE a preset name or spec file before the "
                         f"'@', e.g. int4{text} (or none{text} to evict without compressing)")
    policy, colon, keep_text = eviction.partition(":")
    try:
        keep = float(keep_text)
    except ValueError:
        keep = None
    if (not colon or keep is None or not math.isfinite(keep) or keep <= 0
            or (keep > 1 and keep != int(keep))):
        raise ValueError(f"spec {text!r}: after '@' write POLICY:KEEP, KEEP a fraction in (0, 1] or a whole number "
                         f"of tokens, e.g. {base}@snapkv:0.5 or {base}@snapkv:256")
    fields = {"policy": policy, "keep": keep} if keep <= 1 else {"policy": policy, "keep_tokens": int(keep)}
    data = load_spec(base).to_dict()
    if data.get("eviction"):
        raise ValueError(f"spec {text!r}: {base!r} already has an eviction section; use one '@'")
    data.update(name=text, eviction=fields)
    try:
        return CacheSpec.from_dict(data)
    except ValueError as err:
        raise ValueError(f"spec {text!r}: {err}") from None
