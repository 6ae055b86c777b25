"""Named presets: one registry of ready-made specs.

Every preset is a `CacheSpec`; `PRESETS.get(name)` returns it and an unknown name lists the
valid ones. This module does not measure presets: the README's table of their quality comes
from `kvcompress eval` (see README).
"""

from __future__ import annotations

from collections.abc import Callable

from .spec import CacheSpec, TensorSpec


class Registry:
    """Name -> factory of CacheSpec; registering a name twice is an error."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[], CacheSpec]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str, factory: Callable[[], CacheSpec]) -> None:
        if name in self._factories:
            raise ValueError(f"preset {name!r} is already registered")
        self._factories[name] = factory
        self._help[name] = help

    def get(self, name: str) -> CacheSpec:
        if name not in self._factories:
            raise ValueError(
                f"unknown preset {name!r}; valid presets: {', '.join(self.names())} "
                "(or give the path of a .json/.yaml spec file)"
            )
        spec = self._factories[name]()
        return spec

    def names(self) -> list[str]:
        return list(self._factories)

    def help(self, name: str) -> str:
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
