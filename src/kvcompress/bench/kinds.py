"""The caches a benchmark compares, by name, and how to build an empty one for a model.

Names: "dynamic" (`DynamicCache`), "quanto-<bits>" / "hqq-<bits>" (transformers' `QuantizedCache`,
`bench` extra), anything else a kvcompress preset or spec file, optionally with "+monitor",
"+reconstruct" or "+torch" (see `CacheKind`). Every cache is built from the model's config, as
`generate` builds its own, so on sliding-window layers the `DynamicCache` baseline keeps only the
window, as kvcompress does.
"""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

from ..fingerprint import text_config

DEFAULT_CACHES = ("dynamic", "int4", "int2", "quanto-4", "quanto-2", "hqq-4", "hqq-2")
# transformers' QuantizedCache defaults, used for both backends (recorded in the results).
QUANTIZED_CACHE_SETTINGS = {"q_group_size": 64, "residual_length": 128, "axis_key": 0, "axis_value": 0}
_BASELINE_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}
_BASELINE_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}
_SUFFIXES = ("+monitor", "+reconstruct", "+torch")


@dataclass(frozen=True)
class CacheKind:
    """One cache to benchmark, parsed from its name.

    Names: "dynamic" (transformers' `DynamicCache`), "quanto-<bits>" / "hqq-<bits>"
    (transformers' `QuantizedCache` with that backend), anything else a kvcompress preset
    name or spec file. Suffixes on a kvcompress name: "+monitor" ("int4+monitor") runs it with
    its runtime quality monitor on, to show the monitor's overhead; "+reconstruct" runs it on the
    model's sdpa attention (attention reads the full reconstruction every step), to show what
    attention over the codes saves; "+torch" runs it with KVCOMPRESS_KERNELS=torch (decode steps
    over the codes in pure torch, without a compiled kernel), to show what the kernel saves.
    `running` applies the two for the steps of that cache only.
    """

    name: str
    family: str  # "dynamic" | "quantized" | "kvcompress"
    backend: str | None = None
    nbits: int | None = None
    monitor: bool = False
    reconstruct: bool = False
    torch_only: bool = False

    def describe(self) -> str:
        if self.family == "dynamic":
            return "transformers DynamicCache (uncompressed, model dtype)"
        if self.family == "quantized":
            s = QUANTIZED_CACHE_SETTINGS
            return (f"transformers QuantizedCache, {self.backend} backend, {self.nbits}-bit, groups of "
                    f"{s['q_group_size']}, {s['residual_length']}-token residual")
        from ..presets import load_spec

        monitor = " + runtime quality monitor" if self.monitor else ""
        reconstruct = "; attention reads the full reconstruction (the model on sdpa)" if self.reconstruct else ""
        torch_only = "; decode steps in pure torch (KVCOMPRESS_KERNELS=torch)" if self.torch_only else ""
        return f"kvcompress {load_spec(self.spec_name).describe()}{monitor}{reconstruct}{torch_only}"

    @property
    def spec_name(self) -> str:
        """The preset or spec file of a kvcompress cache (the name without its suffixes)."""
        return _split_suffixes(self.name)[0]


def _split_suffixes(name: str) -> tuple[str, set[str]]:
    """"int4+monitor+reconstruct" -> ("int4", {"+monitor", "+reconstruct"})."""
    found = set()
    stripped = True
    while stripped:
        stripped = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, stripped = name.removesuffix(suffix), True
                found.add(suffix)
    return name, found


def parse_cache_name(name: str) -> CacheKind:
    """The `CacheKind` for a name; ValueError naming the valid forms if it is malformed."""
    if name == "dynamic":
        return CacheKind(name, "dynamic")
    match = re.fullmatch(r"(quanto|hqq)-(\d+)", name)
    if match:
        backend, nbits = match.group(1), int(match.group(2))
        if nbits not in _BASELINE_BITS[backend]:
            raise ValueError(f"{backend} supports bits {_BASELINE_BITS[backend]}, got {name!r}")
        return CacheKind(name, "quantized", backend, nbits)
    if name.startswith(("quanto", "hqq")):
        raise ValueError(f"cache {name!r}: write transformers' quantized caches as quanto-<bits> or hqq-<bits>, "
                         "e.g. quanto-4")
    from ..presets import load_spec

    spec_name, suffixes = _split_suffixes(name)
    load_spec(spec_name)  # raises ValueError listing the presets
    return CacheKind(name, "kvcompress", monitor="+monitor" in suffixes, reconstruct="+reconstruct" in suffixes,
                     torch_only="+torch" in suffixes)


def baseline_unavailable(backend: str) -> str | None:
    """Why transformers' `QuantizedCache` with `backend` cannot run here, or None if it can.

    The benchmark skips such a cache with this note rather than failing: the baselines are
    an optional comparison, not something kvcompress needs.
    """
    module, package = _BASELINE_PACKAGES[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return (f"the {package!r} package is not installed (install the optional extra: "
                f"pip install 'kvcompress[bench]', or pip install {package})")
    return None


def make_cache(kind: CacheKind, model):
    """A fresh, empty cache of `kind` for `model`, built from the model's config."""
    from transformers import DynamicCache, QuantizedCache

    if kind.family == "dynamic":
        return DynamicCache(config=text_config(model))  # as `generate` builds it
    if kind.family == "quantized":
        return QuantizedCache(backend=kind.backend, config=text_config(model), nbits=kind.nbits, **QUANTIZED_CACHE_SETTINGS)
    from ..cache.cache import CompressedCache

    return CompressedCache(model, kind.spec_name, monitor=kind.monitor)


@contextmanager
def running(kind: CacheKind, model):
    """Run the steps of `kind` as its suffixes say, restoring everything afterwards: "+reconstruct"
    on the model's sdpa attention (if it runs kvcompress's), "+torch" with KVCOMPRESS_KERNELS=torch."""
    from ..cache.attention import ATTENTION_NAME, REPLACED_IMPLEMENTATION
    from ..kernels import ENV

    switch = kind.reconstruct and model.config._attn_implementation == ATTENTION_NAME
    previous = os.environ.get(ENV)
    if switch:
        model.set_attn_implementation(REPLACED_IMPLEMENTATION)
    if kind.torch_only:
        os.environ[ENV] = "torch"
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(ATTENTION_NAME)
        if kind.torch_only and previous is None:
            os.environ.pop(ENV, None)
        elif kind.torch_only:
            os.environ[ENV] = previous
