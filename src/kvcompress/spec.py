"""The spec: a small, validated, serializable description of what the cache does to K and V.

For keys and values separately: the codec and its settings; the recent (`window`) and first
(`sinks`) tokens kept in full precision; the tokens compressed at a time (`block_size`); per-layer
overrides, and more for a model of one depth (`layers_at_depth`); optional token eviction. It
round-trips through JSON or YAML:

    {"key": {"method": "quant", "bits": 4, "axis": "channel", "group_size": 32},
     "value": {"method": "quant", "bits": 4, "axis": "token", "group_size": 32},
     "window": 128, "sinks": 4, "block_size": 32, "layers": {"0-1": {"value": {"bits": 8}}},
     "eviction": {"policy": "snapkv", "keep": 0.5}}
Fields and their allowed values: docs/specs.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .codecs.codebook import ROW_TOKENS as CODEBOOK_ROW_TOKENS
from .codecs.quant import ALLOWED_AXES, ALLOWED_BITS, TOKEN_AXIS_ROW_TOKENS
from .extras import MissingExtraError, require_extra
from .io import write_text_atomic

METHODS = ("none", "quant", "lowrank", "lowrank+quant", "hadamard+quant", "rotated+codebook", "pca+codebook")
_CODEBOOK_METHODS = ("rotated+codebook", "pca+codebook")
CODEBOOK_BITS = (1, 2, 3, 4)
PCA_MAX_BITS = 6  # codebook methods: any multiple of 1/8 in 1..6 bits per value on average
PCA_MIN_BITS = 0.125  # "pca+codebook" may go below 1 bit per value (its least important directions store nothing)
KEY_SPACES = ("post_rope", "pre_rope")
_QUANT_METHODS = ("quant", "lowrank+quant", "hadamard+quant")
_LOWRANK_METHODS = ("lowrank", "lowrank+quant")
_TENSOR_FIELDS = ("method", "bits", "axis", "group_size", "rank", "key_space", "seed", "center", "weight",
                  "scale_bits")
SCALE_BITS = (16, 8)
WEIGHTS = ("none", "query")
_SPEC_FIELDS = ("name", "key", "value", "window", "sinks", "block_size", "layers", "layers_at_depth", "eviction")
# Token eviction (see `kvcompress.cache.eviction`, which scores tokens for each policy).
EVICTION_POLICIES = ("snapkv", "tova", "expected", "streaming", "knorm")
EVICTION_APPLIES = ("prompt", "generation")
_EVICTION_FIELDS = ("policy", "keep", "keep_tokens", "applies", "observation", "pooling")
# What a spec file writes for K and V: both fields are required (a missing one would be a silent default).
_WRITTEN_OUT = {"key": '"key": {"method": "quant", "bits": 4, "axis": "channel", "group_size": 32}',
                "value": '"value": {"method": "quant", "bits": 4, "axis": "token", "group_size": 32}'}


@dataclass(frozen=True)
class TensorSpec:
    """What happens to one of K or V.

    Attributes:
        method: one of METHODS. "none" keeps the tensor in full precision; "quant" quantizes
            it; "lowrank" keeps only its coefficients on the top-`rank` calibrated directions
            (stored in fp16); "lowrank+quant" quantizes those coefficients; "hadamard+quant"
            rotates each head by an orthonormal Hadamard matrix before quantizing;
            "rotated+codebook" rotates each head by a seeded randomized Hadamard matrix and stores
            Lloyd-Max codebook indices plus one fp16 scale per vector (bits + 16/head_dim bits
            per value; `axis` and `group_size` do not apply); "pca+codebook" projects each head,
            centred, onto its calibrated principal directions and gives them `bits` x head_dim
            code bits in all, by calibrated variance (transform coding), plus one fp16 scale per
            vector (needs a calibration artifact).
        bits: code width for quantization, one of ALLOWED_BITS; for the codebook methods the
            average code bits per value, a multiple of 1/8 in 1..6 (e.g. 3.5: 3.5 x head_dim code
            bits per vector; "rotated+codebook" then gives its rotated coordinates 3 or 4 bits,
            "pca+codebook" allocates them by variance, and may go down to 1/8: 0.5 codes only
            the directions that 0.5 x head_dim bits reach, the others decode to the mean).
        axis: "channel" or "token": which values share quantization statistics.
        group_size: values per scale (tokens for axis="channel", channels for axis="token";
            for lowrank+quant the "channels" are the `rank` coefficients).
        rank: directions kept by the low-rank methods, 1..head_dim (a multiple of 8 when the
            coefficients are quantized, as codes are bit-packed 8 at a time).
        key_space: "post_rope" (as attention gives them) or "pre_rope" (the cache undoes the
            rotary embedding before compressing and re-applies it after decoding); keys only.
        seed: draws the random signs of "rotated+codebook" (each layer derives its own from it).
        center: "rotated+codebook" only: subtract the calibrated per-head mean before rotating
            (needs a calibration artifact; the mean is stored once per layer, not per token).
        weight: "pca+codebook" keys only: "query" allocates the bits by each direction's variance
            times the calibrated mean squared query along it (the logit error it causes), "none"
            by variance alone. Values ignore it.
        scale_bits: codebook methods only: 16 stores each vector's scale in fp16; 8 stores it as one
            logarithmic byte (1/16 octave steps, `codecs.scalecode`) relative to calibrated standard
            deviations and chooses the codes for the coded scale (needs a calibration artifact; a
            "rotated+codebook" spec then codes its rotated coordinates relative to the calibrated
            rms of each head, with the 3/4-style mixed widths of fractional bits).
    """

    method: str = "quant"
    bits: int = 4
    axis: str = "token"
    group_size: int = 32
    rank: int | None = None
    key_space: str = "post_rope"
    seed: int = 0
    center: bool = False
    weight: str = "none"
    scale_bits: int = 16

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "none":
            # Settings mean nothing without a codec: make every "none" spec equal.
            for name in ("bits", "axis", "group_size", "rank", "key_space", "seed", "center", "weight", "scale_bits"):
                object.__setattr__(self, name, TensorSpec.__dataclass_fields__[name].default)
            return
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be one of {KEY_SPACES}, got {self.key_space!r}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {WEIGHTS}, got {self.weight!r}")
        if self.weight != "none" and self.method != "pca+codebook":
            raise ValueError(f"weight {self.weight!r} applies to method 'pca+codebook' only, not {self.method!r}")
        if (self.method in _CODEBOOK_METHODS and isinstance(self.bits, float) and self.bits.is_integer()
                and 1 <= self.bits <= PCA_MAX_BITS):
            object.__setattr__(self, "bits", int(self.bits))  # 3.0 is 3: whole widths keep their codec
        if self.method in _CODEBOOK_METHODS and (isinstance(self.bits, bool) or self.bits not in CODEBOOK_BITS):
            low = PCA_MIN_BITS if self.method == "pca+codebook" else 1
            if (isinstance(self.bits, bool) or not isinstance(self.bits, (int, float))
                    or not low <= self.bits <= PCA_MAX_BITS or (self.bits * 8) != int(self.bits * 8)):
                raise ValueError(f"{self.method} bits must be a multiple of 1/8 in {low:g}..{PCA_MAX_BITS} (e.g. 4 "
                                 f"or 3.5), got {self.bits!r}")
            if self.bits == int(self.bits):
                object.__setattr__(self, "bits", int(self.bits))
        if self.method in _CODEBOOK_METHODS:
            if isinstance(self.scale_bits, bool) or self.scale_bits not in SCALE_BITS:
                raise ValueError(f"scale_bits must be one of {SCALE_BITS}, got {self.scale_bits!r}")
            if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
                raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
            if not isinstance(self.center, bool):
                raise ValueError(f"center must be true or false, got {self.center!r}")
            for name in ("axis", "group_size", "rank"):  # one scale per vector: no grouping settings
                object.__setattr__(self, name, TensorSpec.__dataclass_fields__[name].default)
            if self.method == "pca+codebook":  # always centred, no random rotation
                object.__setattr__(self, "seed", 0)
                object.__setattr__(self, "center", False)
            return
        object.__setattr__(self, "scale_bits", 16)  # like seed and center: a layer override to quant drops it
        object.__setattr__(self, "seed", 0)
        object.__setattr__(self, "center", False)
        if self.method in _LOWRANK_METHODS:
            if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
                raise ValueError(f"method {self.method!r} needs a positive integer rank (1..head_dim), "
                                 f"got {self.rank!r}")
        else:
            object.__setattr__(self, "rank", None)
        if self.method == "lowrank":
            # fp16 coefficients: no quantization settings.
            for name in ("bits", "axis", "group_size"):
                object.__setattr__(self, name, TensorSpec.__dataclass_fields__[name].default)
            return
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {self.bits!r}")
        if self.axis not in ALLOWED_AXES:
            raise ValueError(f"axis must be one of {ALLOWED_AXES}, got {self.axis!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.method == "lowrank+quant":
            if self.rank % 8:
                raise ValueError(f"lowrank+quant needs a rank that is a multiple of 8 (codes are bit-packed "
                                 f"8 at a time), got {self.rank}")
            if self.axis == "token" and self.rank % self.group_size:
                divisors = [d for d in range(1, self.rank + 1) if self.rank % d == 0]
                raise ValueError(f"per-token group_size {self.group_size} does not divide rank {self.rank}; "
                                 f"allowed: {divisors}")

    @property
    def is_quantized(self) -> bool:
        return self.method in _QUANT_METHODS

    @property
    def is_lowrank(self) -> bool:
        return self.method in _LOWRANK_METHODS

    @property
    def needs_artifact(self) -> bool:
        """True if the codec reads calibrated statistics (low-rank bases, codebook centring means)."""
        return (self.is_lowrank or self.method == "pca+codebook"
                or (self.method == "rotated+codebook" and (self.center or self.scale_bits == 8)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: TensorSpec | None = None) -> TensorSpec:
        """Build from a dict; fields missing from `data` come from `base` (or the defaults)."""
        if not isinstance(data, dict):
            raise ValueError(f"a key/value spec must be a mapping, got {data!r}")
        unknown = set(data) - set(_TENSOR_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in key/value spec; allowed: {list(_TENSOR_FIELDS)}")
        return dataclasses.replace(base, **data) if base is not None else cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that matter for the method (key_space only when pre-RoPE)."""
        if self.method == "none":
            return {"method": "none"}
        out: dict[str, Any] = {"method": self.method}
        if self.is_lowrank:
            out["rank"] = self.rank
        if self.is_quantized:
            out.update(bits=self.bits, axis=self.axis, group_size=self.group_size)
        if self.method == "pca+codebook":
            out["bits"] = self.bits
            if self.weight != "none":
                out["weight"] = self.weight
        if self.method == "rotated+codebook":
            out.update(bits=self.bits, seed=self.seed)
            if self.center:
                out["center"] = True
        if self.method in _CODEBOOK_METHODS and self.scale_bits != 16:
            out["scale_bits"] = self.scale_bits
        if self.key_space != "post_rope":
            out["key_space"] = self.key_space
        return out

    def describe(self) -> str:
        """Short human-readable form, e.g. 'int4/channel32' or 'lowrank32+int4/token16 pre-RoPE'."""
        if self.method == "none":
            return "full"
        quant = f"int{self.bits}/{self.axis}{self.group_size}"
        text = {"quant": quant, "lowrank": f"lowrank{self.rank}", "lowrank+quant": f"lowrank{self.rank}+{quant}",
                "hadamard+quant": f"hadamard+{quant}",
                "rotated+codebook": ("centred+" if self.center else "") + f"rot+lloyd{self.bits}"
                + (f"/seed{self.seed}" if self.seed else ""),
                "pca+codebook": f"pca+lloyd{self.bits}" + ("/q-weighted" if self.weight == "query" else "")}[self.method]
        if self.method in _CODEBOOK_METHODS and self.scale_bits != 16:
            text += f"/scale{self.scale_bits}"
        return text + (" pre-RoPE" if self.key_space == "pre_rope" else "")


@dataclass(frozen=True)
class EvictionSpec:
    """Which prompt tokens a full-attention layer drops before compressing the rest.

    At the end of the first forward pass on an empty cache (the prompt), each layer scores its
    prompt tokens with `policy`, keeps the best ones per KV head and drops the others (they
    cost no bytes and no later query reads them); the kept tokens are then stored like any
    others (sinks, codec-compressed blocks, full-precision window). The `sinks` first tokens
    and the last `window` tokens of the prompt are always kept and count towards the budget.

    Attributes:
        policy: one of EVICTION_POLICIES: "snapkv" (attention of the prompt's last
            `observation` queries, max-pooled over `pooling` neighbouring tokens), "tova"
            (attention of the last query), "expected" (expected attention of queries drawn from
            a Gaussian fitted to the last `observation` queries, weighted by the value's norm),
            "streaming" (sinks and the most recent tokens: StreamingLLM), "knorm" (smallest key
            norm first).
        keep: fraction of the prompt's tokens each KV head keeps, in (0, 1]; or None when
            `keep_tokens` is given.
        keep_tokens: tokens each KV head keeps (>= 1), instead of a fraction.
        applies: where eviction runs, one of EVICTION_APPLIES: "prompt" (once, at the end of the
            prompt) or "generation" (the prompt, and then every `ceil(block_size / keep)` tokens that
            leave the full-precision window keep `block_size` of them per KV head, scored with the
            latest query: so the cache keeps about `keep` of the generated tokens too; needs `keep`).
        observation: prompt queries (the last ones) whose attention scores tokens (snapkv, expected).
        pooling: odd width of the max-pooling of snapkv's scores over neighbouring tokens (1 = none).
    """

    policy: str = "snapkv"
    keep: float | None = None
    keep_tokens: int | None = None
    applies: str = "prompt"
    observation: int = 32
    pooling: int = 7

    def __post_init__(self):
        if self.policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction policy {self.policy!r} does not exist; allowed: {list(EVICTION_POLICIES)}")
        if self.applies not in EVICTION_APPLIES:
            raise ValueError(f"eviction applies {self.applies!r} is not supported; allowed: {list(EVICTION_APPLIES)}")
        if (self.keep is None) == (self.keep_tokens is None):
            raise ValueError("eviction needs exactly one of keep (a fraction in (0, 1]) and keep_tokens (an integer "
                             f">= 1), got keep={self.keep!r}, keep_tokens={self.keep_tokens!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float))
                                      or not 0 < self.keep <= 1):
            raise ValueError(f"eviction keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.applies == "generation" and self.keep is None:
            raise ValueError("eviction applies 'generation' keeps a fraction of the tokens that leave the window: "
                             "give keep (a fraction in (0, 1]) instead of keep_tokens")
        if self.keep_tokens is not None and (not isinstance(self.keep_tokens, int) or isinstance(self.keep_tokens, bool)
                                             or self.keep_tokens < 1):
            raise ValueError(f"eviction keep_tokens must be an integer >= 1, got {self.keep_tokens!r}")
        for attr in ("observation", "pooling"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"eviction {attr} must be an integer >= 1, got {value!r}")
        if self.pooling % 2 == 0:
            raise ValueError(f"eviction pooling must be odd (a centred window), got {self.pooling}")

    def generation_span(self, block_size: int) -> int:
        """Tokens leaving the window from which generation-time eviction keeps one block of `block_size`."""
        return max(block_size, math.ceil(block_size / self.keep - 1e-9))

    def budget(self, n_tokens: int) -> int:
        """Tokens each KV head keeps of an `n_tokens`-token prompt (before the cache's own rounding)."""
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n_tokens)
        return min(n_tokens, max(1, math.ceil(self.keep * n_tokens - 1e-9)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvictionSpec:
        if not isinstance(data, dict):
            raise ValueError(f"eviction must be a mapping such as {{\"policy\": \"snapkv\", \"keep\": 0.5}}, "
                             f"got {data!r}")
        unknown = set(data) - set(_EVICTION_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in eviction; allowed: {list(_EVICTION_FIELDS)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.policy}
        if self.keep_tokens is not None:
            out["keep_tokens"] = self.keep_tokens
        else:
            out["keep"] = self.keep
        out["applies"] = self.applies
        if self.policy in ("snapkv", "expected"):
            out["observation"] = self.observation
        if self.policy == "snapkv":
            out["pooling"] = self.pooling
        return out

    def describe(self) -> str:
        """'evict snapkv keep 50% observing 32' or 'evict tova keep 256 tokens' (the observation window only
        for the policies that read it, snapkv and expected)."""
        kept = f"{self.keep_tokens} tokens" if self.keep_tokens is not None else f"{100 * self.keep:g}%"
        observing = f" observing {self.observation}" if self.policy in ("snapkv", "expected") else ""
        return f"evict {self.policy} keep {kept}{observing}"


def _check_layer_table(table: Any, where: str) -> None:
    """A layer table maps layer ranges ('3', '2-5') to {'key': {...}, 'value': {...}} overrides."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a mapping of layer ranges to overrides, got {table!r}")
    for key_text, override in table.items():
        _parse_layer_range(str(key_text))
        if not isinstance(override, dict) or set(override) - {"key", "value"}:
            raise ValueError(
                f"layer override {key_text!r} must be a mapping with 'key' and/or 'value', got {override!r}"
            )


def _parse_layer_range(text: str) -> range:
    """'3' -> range(3, 4); '2-5' -> range(2, 6)."""
    try:
        if "-" in text:
            lo, hi = text.split("-", 1)
            result = range(int(lo), int(hi) + 1)
        else:
            result = range(int(text), int(text) + 1)
    except ValueError:
        raise ValueError(f"layer override keys must look like '3' or '2-5', got {text!r}") from None
    if len(result) == 0 or result.start < 0:
        raise ValueError(f"empty or negative layer range {text!r}")
    return result


@dataclass(frozen=True)
class CacheSpec:
    """Everything a `CompressedCache` needs to know about compression, for every layer.

    Attributes:
        key, value: the default treatment of keys and values.
        window: most recent tokens kept in full precision (>= 0).
        sinks: first tokens kept in full precision (>= 0).
        block_size: tokens compressed together; per-channel group sizes must divide it.
        layers: overrides, {"3": {"key": {...}}, "0-1": {"value": {...}}}; fields not given
            fall back to `key`/`value`.
        layers_at_depth: {"30": {"3": {"key": {...}}, ...}}: more overrides, used only on a model of
            exactly that many layers (a split measured at one depth), after `layers`; `at_depth(n)`
            gives the spec a model of n layers runs, with them merged into `layers`.
        name: a label (the preset name, or None).
        eviction: an `EvictionSpec` (prompt tokens dropped before compression), or None (keep every token).
    """

    key: TensorSpec = field(default_factory=lambda: TensorSpec(axis="channel"))
    value: TensorSpec = field(default_factory=lambda: TensorSpec(axis="token"))
    window: int = 128
    sinks: int = 4
    block_size: int = 32
    layers: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    layers_at_depth: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    name: str | None = None
    eviction: EvictionSpec | None = None

    def __post_init__(self):
        if isinstance(self.eviction, dict):
            object.__setattr__(self, "eviction", EvictionSpec.from_dict(self.eviction))
        if self.eviction is not None and not isinstance(self.eviction, EvictionSpec):
            raise ValueError(f"eviction must be a mapping or an EvictionSpec, got {self.eviction!r}")
        for attr, minimum in (("window", 0), ("sinks", 0), ("block_size", 1)):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{attr} must be an integer >= {minimum}, got {value!r}")
        _check_layer_table(self.layers, "layers")
        self._check_depth_tables()
        for layer in self._override_layers():
            self.for_layer(layer)  # validates the merged specs
        for which, tensor_spec in self._all_tensor_specs():
            self._check_block(which, tensor_spec)
            if which.startswith("value") and tensor_spec.key_space != "post_rope":
                raise ValueError(f"{which}: key_space {tensor_spec.key_space!r} only applies to keys; "
                                 "values carry no rotary embedding (use 'post_rope' or leave it out)")

    def _check_depth_tables(self) -> None:
        """Each `layers_at_depth` entry: a whole depth, a layer table naming layers below it and
        no range that `layers` names too (an entry is written once); its merged specs valid."""
        if not isinstance(self.layers_at_depth, dict):
            raise ValueError(f"layers_at_depth must map a model depth to a layer table, e.g. "
                             f"{{\"30\": {{\"3\": {{\"key\": {{\"bits\": 3}}}}}}}}, got {self.layers_at_depth!r}")
        for depth_text, table in self.layers_at_depth.items():
            if not str(depth_text).isdigit() or int(depth_text) < 1:
                raise ValueError(f"layers_at_depth keys are model depths (whole numbers of layers >= 1), "
                                 f"got {depth_text!r}")
            where = f"layers_at_depth {depth_text!r}"
            _check_layer_table(table, where)
            for key_text in table:
                if _parse_layer_range(str(key_text)).stop > int(depth_text):
                    raise ValueError(f"{where}: layer override {key_text!r} names layers beyond its {depth_text} "
                                     "layers")
                if key_text in self.layers:
                    raise ValueError(f"{where}: layer override {key_text!r} is also in layers; write it once")
            self.at_depth(int(depth_text))  # validates the merged specs

    def at_depth(self, num_layers: int) -> CacheSpec:
        """The spec a model of `num_layers` layers runs: its `layers_at_depth` table for that depth,
        if any, merged after `layers`, and no depth tables left."""
        if not self.layers_at_depth:
            return self
        extra = next((table for depth, table in self.layers_at_depth.items() if int(depth) == num_layers), {})
        return dataclasses.replace(self, layers={**self.layers, **extra}, layers_at_depth={})

    def _override_layers(self) -> list[int]:
        return sorted({i for k in self.layers for i in _parse_layer_range(str(k))})

    def override_layers(self) -> list[int]:
        """The layers that some entry of `layers` names, ascending."""
        return self._override_layers()

    def _all_tensor_specs(self):
        yield "key", self.key
        yield "value", self.value
        for layer in self._override_layers():
            key, value = self.for_layer(layer)
            yield f"key (layer {layer})", key
            yield f"value (layer {layer})", value

    def _check_block(self, which: str, spec: TensorSpec) -> None:
        if spec.is_quantized and spec.axis == "channel" and self.block_size % spec.group_size:
            raise ValueError(
                f"{which}: per-channel group_size {spec.group_size} must divide block_size {self.block_size}"
            )
        if spec.method in _CODEBOOK_METHODS and self.block_size % CODEBOOK_ROW_TOKENS:
            raise ValueError(
                f"{which}: {spec.method} packs {CODEBOOK_ROW_TOKENS} tokens per row, so block_size "
                f"must be a multiple of {CODEBOOK_ROW_TOKENS}, got {self.block_size}"
            )
        if spec.is_quantized and spec.axis == "token" and self.block_size % TOKEN_AXIS_ROW_TOKENS:
            raise ValueError(
                f"{which}: per-token quantization packs {TOKEN_AXIS_ROW_TOKENS} tokens per row, so block_size "
                f"must be a multiple of {TOKEN_AXIS_ROW_TOKENS}, got {self.block_size}"
            )

    def for_layer(self, layer_idx: int) -> tuple[TensorSpec, TensorSpec]:
        """The (key, value) specs that apply to layer `layer_idx`, overrides merged in order."""
        key, value = self.key, self.value
        for key_text, override in self.layers.items():
            if layer_idx in _parse_layer_range(str(key_text)):
                try:
                    if "key" in override:
                        key = TensorSpec.from_dict(override["key"], base=key)
                    if "value" in override:
                        value = TensorSpec.from_dict(override["value"], base=value)
                except ValueError as err:
                    raise ValueError(f"layer override {key_text!r} (layer {layer_idx}): {err}") from None
        return key, value

    def needs_artifact(self, num_layers: int) -> bool:
        """True if some layer uses a low-rank method or centring (which need a calibration artifact)."""
        spec = self.at_depth(num_layers)
        return any(tensor.needs_artifact for idx in range(num_layers) for tensor in spec.for_layer(idx))

    def validate_for(self, num_layers: int, head_dim: int) -> None:
        """Check the spec against a model's shape; raise ValueError naming what to change."""
        if self.layers_at_depth:
            self.at_depth(num_layers).validate_for(num_layers, head_dim)
            return
        for key_text in self.layers:
            r = _parse_layer_range(str(key_text))
            if r.stop > num_layers:
                raise ValueError(f"layer override {key_text!r} names layers beyond the model's {num_layers} layers")
        for which, spec in self._all_tensor_specs():
            if spec.is_lowrank and spec.rank > head_dim:
                raise ValueError(f"{which}: rank {spec.rank} exceeds head_dim {head_dim}; allowed: 1..{head_dim}")
            if spec.method in ("hadamard+quant", "rotated+codebook") and head_dim & (head_dim - 1):
                raise ValueError(f"{which}: {spec.method} needs head_dim to be a power of two, got {head_dim}; "
                                 "use method 'quant' for this model")
            if spec.method in ("quant", "hadamard+quant") and spec.axis == "token" and head_dim % spec.group_size:
                divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
                raise ValueError(
                    f"{which}: per-token group_size {spec.group_size} does not divide head_dim {head_dim}; "
                    f"allowed: {divisors}"
                )
            if spec.method in ("quant", "hadamard+quant", *_CODEBOOK_METHODS) and head_dim % 8:
                raise ValueError(f"bit packing needs head_dim to be a multiple of 8, got {head_dim}")

    # ---- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key.to_dict(),
            "value": self.value.to_dict(),
            "window": self.window,
            "sinks": self.sinks,
            "block_size": self.block_size,
            "layers": {str(k): v for k, v in self.layers.items()},
            **({"layers_at_depth": {str(d): {str(k): v for k, v in table.items()}
                                    for d, table in self.layers_at_depth.items()}} if self.layers_at_depth else {}),
            **({"eviction": self.eviction.to_dict()} if self.eviction is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        """Build from a dict (a spec file's content); "key" and "value" must both be given (write
        {"method": "none"} for full precision), the other fields default."""
        if not isinstance(data, dict):
            raise ValueError(f"a spec must be a mapping, got {type(data).__name__}")
        unknown = set(data) - set(_SPEC_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in spec; allowed: {list(_SPEC_FIELDS)}")
        kwargs = dict(data)
        defaults = cls()
        for which in ("key", "value"):
            try:
                kwargs[which] = TensorSpec.from_dict(data.get(which, {}), base=getattr(defaults, which))
            except ValueError as err:
                raise ValueError(f"{which}: {err}") from None
        layers = data.get("layers") or {}
        if not isinstance(layers, dict):
            raise ValueError(f"layers must be a mapping of layer ranges to overrides, e.g. "
                             f"{{\"0-1\": {{\"value\": {{\"bits\": 8}}}}}}, got {layers!r}")
        kwargs["layers"] = {str(k): v for k, v in layers.items()}
        depth_tables = data.get("layers_at_depth") or {}
        if isinstance(depth_tables, dict):
            depth_tables = {str(d): ({str(k): v for k, v in table.items()} if isinstance(table, dict) else table)
                            for d, table in depth_tables.items()}
        kwargs["layers_at_depth"] = depth_tables
        if data.get("eviction") is not None:
            try:
                kwargs["eviction"] = EvictionSpec.from_dict(data["eviction"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"eviction: {err}") from None
        spec = cls(**kwargs)  # errors in the fields given come first
        missing = [which for which in ("key", "value") if which not in data]
        if missing:
            written = ", ".join(_WRITTEN_OUT[which] for which in missing)
            full = ", ".join(f'"{which}": {{"method": "none"}}' for which in missing)
            raise ValueError(f"the spec has no {' and no '.join(repr(m) for m in missing)} field (refused rather than "
                             f"given a silent default); write it out, e.g. {written}, or {full} for full precision")
        return spec

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON (or YAML if the name ends in .yaml/.yml), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            yaml = require_extra("yaml", "yaml", "YAML spec files")
            write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            write_text_atomic(path, self.to_json() + "\n")

    def describe(self) -> str:
        """One line: 'K int4/channel32, V int4/token32, window 128, sinks 4'."""
        extra = f", {len(self.layers)} layer override(s)" if self.layers else ""
        for depth, table in self.layers_at_depth.items():
            extra += f", {len(table)} more on a model of {depth} layers"
        if self.eviction is not None:
            extra += f", {self.eviction.describe()}"
        return (
            f"K {self.key.describe()}, V {self.value.describe()}, window {self.window}, "
            f"sinks {self.sinks}, block {self.block_size}{extra}"
        )


def read_spec_file(path: str | Path) -> CacheSpec:
    """The spec in a .json, .yaml or .yml file (YAML needs the `yaml` extra)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"spec {str(path)!r} is a folder; pass a .json or .yaml spec file or a preset name "
                         "(`kvcompress presets` lists them)")
    if not path.is_file():
        raise ValueError(f"spec file {str(path)!r} does not exist; pass an existing .json or .yaml spec file or a "
                         "preset name (`kvcompress presets` lists them)")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"spec file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    try:
        if kind == "YAML":
            yaml = require_extra("yaml", "yaml", "YAML spec files")
            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except (json.JSONDecodeError, Exception) as err:  # yaml raises its own error types
        if isinstance(err, MissingExtraError):
            raise
        detail = " ".join(str(err).split())
        raise ValueError(f"spec file {str(path)!r} is not valid {kind}: {detail}") from err
    if data is None:
        raise ValueError(f"spec file {str(path)!r} is empty; write a spec such as "
                         "{\"key\": {\"bits\": 4}, \"value\": {\"bits\": 4}} (see `kvcompress presets --json`)")
    try:
        return CacheSpec.from_dict(data)
    except ValueError as err:
        raise ValueError(f"spec file {str(path)!r}: {err}") from None


def looks_like_spec_file(text: str) -> bool:
    """Whether `text` names a spec file (a .json/.yaml/.yml name or an existing path) rather than a preset."""
    path = Path(text)
    return path.suffix in (".json", ".yaml", ".yml") or path.exists()
