"""Which kvcompress spec vLLM serves: KVCOMPRESS_VLLM_SPEC, resolved, checked and turned into page layouts.

KVCOMPRESS_VLLM_SPEC names a preset (`kvcompress presets`; the paged-* ones are servable) or a
.json/.yaml spec file. A spec that does not exist, or that a paged pool cannot store per token
(`paged.unservable`), raises ServingSpecError with one line naming the spec, what stands in the
way and what to use instead. This module imports no vLLM (its tests run in the main environment).
"""

from __future__ import annotations

import functools
import os

import torch

from ...extras import MissingExtraError
from ...paged import PagedLayout, slot_bytes, unservable
from ...presets import PRESETS, load_spec
from ...spec import CacheSpec, looks_like_spec_file

ENV = "KVCOMPRESS_VLLM_SPEC"
PREFIX = "kvcompress vLLM plugin"


class ServingSpecError(ValueError):
    """KVCOMPRESS_VLLM_SPEC names a spec that does not exist or cannot be served; the message is one line."""


def servable_presets() -> list[str]:
    return [name for name in PRESETS.names() if not unservable(PRESETS.get(name))]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _closest_servable(spec: CacheSpec) -> str | None:
    """The paged-* preset with the same kind of codec and the key's bit width (whole bits of a codebook's
    average: bitsN's keys have N + 1/8), if there is one."""
    key = spec.key
    if key.method in ("quant", "hadamard+quant"):
        name = f"paged-{'hadamard-' if key.method == 'hadamard+quant' else ''}int{key.bits}"
    elif key.method in ("rotated+codebook", "pca+codebook"):
        name = f"paged-bits{int(key.bits)}"
    else:
        return None
    return name if name in PRESETS.names() else None


@functools.lru_cache(maxsize=16)
def resolve(text: str) -> CacheSpec:
    """The spec that `text` (a KVCOMPRESS_VLLM_SPEC value) names, if vLLM's paged pool can serve it."""
    servable = ", ".join(servable_presets())
    if not looks_like_spec_file(text) and "@" not in text and text not in PRESETS.names():
        raise ServingSpecError(f"{PREFIX}: {ENV}={text!r} is neither a preset nor a spec file; servable presets: "
                               f"{servable} (or a .json/.yaml spec file with token-wise codecs, window 0, sinks 0)")
    try:
        spec = load_spec(text)
    except (ValueError, MissingExtraError) as err:
        raise ServingSpecError(f"{PREFIX}: {ENV}={text!r}: {_one_line(err)}") from None
    reasons = unservable(spec)
    if reasons:
        closest = _closest_servable(spec)
        instead = f"use {closest!r} or another of {servable}" if closest else f"use one of {servable}"
        raise ServingSpecError(f"{PREFIX}: {ENV}={text!r} cannot be served from vLLM's paged pool: "
                               f"{'; '.join(reasons)} (a page slot holds one token's codes and nothing else); "
                               f"{instead}, or a spec file with token-wise codecs, window 0, sinks 0")
    return spec


def configured_text() -> str | None:
    """The stripped value of KVCOMPRESS_VLLM_SPEC, or None when it is unset or empty."""
    return os.environ.get(ENV, "").strip() or None


def configured_spec() -> CacheSpec | None:
    """The spec KVCOMPRESS_VLLM_SPEC names (checked as `resolve` does), or None when it is unset."""
    text = configured_text()
    return None if text is None else resolve(text)


@functools.lru_cache(maxsize=8)
def serving_layout(num_layers: int, head_dim: int, dtype: torch.dtype) -> PagedLayout:
    """The page layout of the configured spec for a model of `num_layers` layers of head_dim `head_dim`."""
    spec = configured_spec()
    if spec is None:
        raise ServingSpecError(f"{PREFIX}: the kvcompress backend runs but {ENV} is not set")
    try:
        return PagedLayout.for_spec(spec, num_layers, head_dim, dtype)
    except ValueError as err:
        raise ServingSpecError(f"{PREFIX}: {ENV}={configured_text()!r} does not fit this model "
                               f"({num_layers} layers, head_dim {head_dim}): {_one_line(err)}") from None


def serving_slot_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes per token and KV head (K and V) of the configured spec: what every page slot holds."""
    spec = configured_spec()
    if spec is None:
        raise ServingSpecError(f"{PREFIX}: the kvcompress backend runs but {ENV} is not set")
    try:
        return slot_bytes(spec, head_dim, dtype)
    except ValueError as err:
        raise ServingSpecError(f"{PREFIX}: {ENV}={configured_text()!r} does not fit head_dim {head_dim}: "
                               f"{_one_line(err)}") from None
