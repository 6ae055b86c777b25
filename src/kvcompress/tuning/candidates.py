"""The candidate families, one list: what `tune` may give each layer's K and V, and the uniform
specs `measure-presets` chooses among.

A family ("quant", "hadamard", "lowrank", "wide", "codebook", "codebook-fine", "none", ...) lists, for K and for V,
its settings (most faithful first) and the uniform specs it contributes; "none" keeps K and V in
full precision (with an eviction grid: eviction alone). `uniform_candidates` crosses the uniform
specs with windows and eviction settings (`eviction_grid`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..spec import CacheSpec, EvictionSpec, TensorSpec


@dataclass(frozen=True)
class Family:
    """One candidate family.

    Attributes:
        name: the name given on the command line (`--candidates quant,hadamard`).
        help: one line for `--help`.
        key, value: per-tensor settings `tune` may choose for one layer, most faithful first.
        uniform: (name, K setting, V setting) of each uniform spec this family adds to preset selection.
    """

    name: str
    help: str
    key: tuple[TensorSpec, ...]
    value: tuple[TensorSpec, ...]
    uniform: tuple[tuple[str, TensorSpec, TensorSpec], ...]


def _kivi_key(bits: int, group: int = 32) -> TensorSpec:
    return TensorSpec(method="quant", bits=bits, axis="channel", group_size=group)


def _per_token(bits: int, group: int = 32, method: str = "quant") -> TensorSpec:
    return TensorSpec(method=method, bits=bits, axis="token", group_size=group)


_LOWRANK_KEYS = tuple(TensorSpec(method="lowrank+quant", rank=r, bits=4, axis="token", group_size=16,
                                 key_space="pre_rope") for r in (48, 32))
# the bitsN presets' K and V (N = 4, 3, 2): one-byte scales, the saved bits spent on codes
_BITS_WIDTHS = ((4, 4.125, 4.125), (3, 3.125, 3.125), (2, 2, 2.25))  # (N, key bits, value bits)
_PCA_KEYS = tuple(TensorSpec(method="pca+codebook", bits=kb, key_space="pre_rope", weight="query", scale_bits=8)
                  for _, kb, _ in _BITS_WIDTHS)
_ROTATED = tuple(TensorSpec(method="rotated+codebook", bits=vb, scale_bits=8) for _, _, vb in _BITS_WIDTHS)
# widths between the bitsN ones (3.75, 3.5 and 2.75 bits per value with the one-byte scale), so that
# a per-layer allocation can land between bits4 and bits3 without mixing whole bits only
_FINE_WIDTHS = (3.625, 3.375, 2.625)
_PCA_FINE = tuple(TensorSpec(method="pca+codebook", bits=b, key_space="pre_rope", weight="query", scale_bits=8)
                  for b in _FINE_WIDTHS)
_ROTATED_FINE = tuple(TensorSpec(method="rotated+codebook", bits=b, scale_bits=8) for b in _FINE_WIDTHS)
_HADAMARD = tuple(_per_token(b, method="hadamard+quant") for b in (4, 3, 2))
_HADAMARD_WIDE = tuple(_per_token(b, 64, method="hadamard+quant") for b in (4, 3, 2))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("none", "K and V in full precision (with an eviction grid: eviction alone)", key=(), value=(),
           uniform=(("full", TensorSpec(method="none"), TensorSpec(method="none")),)),
    Family("quant", "K per-channel and V per-token (KIVI layout) at 8, 4, 3, 2 bits",
           key=tuple(_kivi_key(b) for b in (8, 4, 3, 2)), value=tuple(_per_token(b) for b in (8, 4, 3, 2)),
           uniform=tuple((f"k{kb}v{vb}", _kivi_key(kb), _per_token(vb)) for kb in (8, 4, 3, 2) for vb in (8, 4, 3, 2))),
    Family("hadamard", "Hadamard rotation then per-token quantization at 4, 3, 2 bits (K and V)",
           key=_HADAMARD, value=_HADAMARD, uniform=tuple((f"h{t.bits}", t, t) for t in _HADAMARD)),
    Family("wide", "per-token groups of 64 channels (half the scale overhead of 32): V quantized and K and V "
                   "Hadamard-rotated, at 4, 3, 2 bits (head_dim a multiple of 64)",
           key=_HADAMARD_WIDE, value=tuple(_per_token(b, 64) for b in (4, 3, 2)) + _HADAMARD_WIDE,
           uniform=tuple((f"hw{t.bits}", t, t) for t in _HADAMARD_WIDE)),
    Family("codebook", "K pre-RoPE on calibrated principal directions (bits by variance x query energy) and V "
                       "rotated, Lloyd-Max codebooks at "
                       "4, 3, 2 bits per value (4.125 / 3.125 / 2 and 2.25 code bits) plus one logarithmic byte of scale "
                       "per vector (the bitsN presets; needs a calibration artifact)",
           key=_PCA_KEYS, value=_ROTATED, uniform=tuple((f"cb{n}", k, v) for (n, _, _), k, v in zip(_BITS_WIDTHS, _PCA_KEYS, _ROTATED))),
    Family("codebook-fine", "the codebook family's K and V at the widths between its own: 3.625, 3.375 and 2.625 "
                            "code bits plus the one-byte scale (3.75 / 3.5 / 2.75 bits per value; needs a "
                            "calibration artifact)",
           key=_PCA_FINE, value=_ROTATED_FINE,
           uniform=tuple((f"cb{b + 0.125:g}", k, v) for b, k, v in zip(_FINE_WIDTHS, _PCA_FINE, _ROTATED_FINE))),
    Family("lowrank", "pre-RoPE low-rank K (rank 48, 32) and low-rank V (rank 48), int4 coefficients per token "
                      "(needs a calibration artifact)",
           key=_LOWRANK_KEYS,
           value=(TensorSpec(method="lowrank+quant", rank=48, bits=4, axis="token", group_size=16),),
           uniform=tuple((f"lr32k4v{vb}", _LOWRANK_KEYS[1], _per_token(vb)) for vb in (4, 2))),
)}


def families(names: Sequence[str]) -> list[Family]:
    """The families named, in order; ValueError listing the allowed names for an unknown one."""
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown or not names:
        raise ValueError(f"unknown candidate famil(ies) {unknown or list(names)}; allowed: {list(FAMILIES)}")
    return [FAMILIES[name] for name in names]


def candidate_settings(names: Sequence[str] = ("quant",)) -> dict[str, list[TensorSpec]]:
    """Per-tensor candidates of the named families for `tune`, "none" first, no duplicates."""
    out: dict[str, list[TensorSpec]] = {"key": [TensorSpec(method="none")], "value": [TensorSpec(method="none")]}
    wanted = {family.name for family in families(names)}
    for family in (f for f in FAMILIES.values() if f.name in wanted):  # a fixed order, whatever order is asked
        for tensor, settings in (("key", family.key), ("value", family.value)):
            out[tensor] += [s for s in settings if s not in out[tensor]]
    return out


def eviction_grid(policies: Sequence[str], keeps: Sequence[float]) -> list[EvictionSpec | None]:
    """Every (policy, fraction kept) as an `EvictionSpec`; a fraction of 1 is no eviction (None, once).

    ValueError (from `EvictionSpec`) naming the allowed values for an unknown policy or a fraction
    outside (0, 1]."""
    out: list[EvictionSpec | None] = []
    for keep in keeps:
        if keep == 1:
            if None not in out:
                out.append(None)
            continue
        out += [EvictionSpec(policy=policy, keep=float(keep)) for policy in policies]
    return out


def _suffix(window: int | None, eviction: EvictionSpec | None) -> str:
    """'-w64-tova50' (window, then policy and % kept; '-all' for no eviction) for candidate names."""
    text = "" if window is None else f"-w{window}"
    if eviction is not None:
        return text + f"-{eviction.policy}{100 * eviction.keep:g}"
    return text + "-all"


def uniform_candidates(names: Sequence[str] = ("quant",), *, window: int = 128, sinks: int = 4,
                       block_size: int = 32, windows: Sequence[int] | None = None,
                       evictions: Sequence[EvictionSpec | None] | None = None,
                       only: Sequence[str] | None = None) -> list[CacheSpec]:
    """The named uniform specs of the named families (for `measure-presets`).

    Args:
        windows: full-precision windows to cross them with (default: `window` alone).
        evictions: eviction settings to cross them with (None in the list: no eviction; see
            `eviction_grid`); default: no eviction.
        only: keep only the uniform specs of these names (e.g. "k4v4", "cb3"); ValueError listing
            the names of the families for a name none of them has.

    Names are the uniform spec's ("k4v4"); with `windows` or `evictions` given, a suffix says the
    window and the eviction ("k4v4-w64-tova50", see `_suffix`). Specs with no codec and no
    eviction (family "none" without eviction) are left out: they compress nothing.
    """
    base = CacheSpec(window=window, sinks=sinks, block_size=block_size)
    chosen = families(names)
    uniform = [u for family in chosen for u in family.uniform]
    if only is not None:
        unknown = sorted(set(only) - {name for name, _, _ in uniform})
        if unknown:
            raise ValueError(f"unknown uniform spec(s) {unknown}; the families {list(names)} have: "
                             f"{[name for name, _, _ in uniform]}")
        uniform = [u for u in uniform if u[0] in only]
    if windows is None and evictions is None:
        return [dataclasses.replace(base, name=name, key=key, value=value) for name, key, value in uniform]
    out = []
    for name, key, value in uniform:
        for w in (windows if windows is not None else (None,)):
            for eviction in (evictions if evictions is not None else (None,)):
                if eviction is None and key.method == "none" and value.method == "none":
                    continue
                out.append(dataclasses.replace(base, name=name + _suffix(w, eviction), key=key, value=value,
                                               window=window if w is None else w, eviction=eviction))
    return out
