"""Step 2 of tuning: Lagrangian allocation of settings to layers, and the spec of an allocation.

For a multiplier λ every (layer, tensor) takes argmin_s bytes + λ·cost; `lagrangian_path`
enumerates every distinct allocation as λ goes from 0 to ∞. This module measures nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..spec import CacheSpec, TensorSpec
from .sensitivity import TENSORS, Sensitivity

logger = logging.getLogger(__name__)


def allocate(cost: torch.Tensor, nbytes: torch.Tensor, lam: float) -> list[int]:
    """Per row (layer), the setting minimising bytes + lam * cost; ties go to fewer bytes.

    Args:
        cost, nbytes: (L, S) tensors.
        lam: the Lagrange multiplier (>= 0).
    """
    objective = nbytes + lam * cost
    best = []
    for row_obj, row_bytes in zip(objective.tolist(), nbytes.tolist()):
        low = min(row_obj)
        tol = 1e-12 * max(1.0, abs(low))
        best.append(min((b, s) for s, (o, b) in enumerate(zip(row_obj, row_bytes)) if o <= low + tol)[1])
    return best


@dataclass(frozen=True)
class PathPoint:
    """One allocation on the Lagrangian path: the setting index per layer for K and V.

    Attributes:
        key, value: per layer, an index into the candidate settings.
        nbytes: total bytes per compressed token over all layers (K + V).
        proxy: total proxy cost.
        lam: a multiplier that gives this allocation.
    """

    key: tuple[int, ...]
    value: tuple[int, ...]
    nbytes: float
    proxy: float
    lam: float


def lagrangian_path(sens: Sensitivity) -> list[PathPoint]:
    """Every distinct allocation argmin bytes + λ·cost over λ in [0, ∞), by total bytes ascending."""
    breaks = set()
    for tensor in TENSORS:
        for costs, sizes in zip(sens.cost[tensor].tolist(), sens.nbytes[tensor].tolist()):
            for i in range(len(costs)):
                for j in range(len(costs)):
                    if costs[j] > costs[i] and sizes[i] > sizes[j]:
                        breaks.add((sizes[i] - sizes[j]) / (costs[j] - costs[i]))
    breaks = sorted(b for b in breaks if b > 0 and math.isfinite(b))
    if breaks:
        lams = [breaks[0] / 2] + [math.sqrt(a * b) for a, b in zip(breaks, breaks[1:])] + [breaks[-1] * 2]
    else:
        lams = [1.0]
    seen, points = set(), []
    for lam in lams:
        choice = tuple(tuple(allocate(sens.cost[t], sens.nbytes[t], lam)) for t in TENSORS)
        if choice in seen:
            continue
        seen.add(choice)
        nbytes = sum(sens.nbytes[t][layer, s].item() for t, c in zip(TENSORS, choice) for layer, s in enumerate(c))
        proxy = sum(sens.cost[t][layer, s].item() for t, c in zip(TENSORS, choice) for layer, s in enumerate(c))
        points.append(PathPoint(choice[0], choice[1], nbytes, proxy, lam))
    points.sort(key=lambda p: (p.nbytes, p.proxy))
    return points


def _override(spec: TensorSpec, tensor: str) -> dict:
    """A full override dict: fields that `from_dict` would otherwise inherit from the default are explicit
    (a quant layer under a query-weighted codebook default must not inherit `weight`, nor a plain
    rotated codebook a centred default's `center` or a one-byte-scale default's `scale_bits`)."""
    out = spec.to_dict()
    if spec.method != "none":
        out.update(weight=spec.weight, center=spec.center, scale_bits=spec.scale_bits)
        if tensor == "key":
            out["key_space"] = spec.key_space
    return out


def spec_from_choice(key: Sequence[int], value: Sequence[int], settings: dict[str, list[TensorSpec]],
                     base: CacheSpec, name: str | None = "tuned") -> CacheSpec:
    """A CacheSpec giving layer l the settings key[l] / value[l]: the most common setting of each
    tensor is the default and the other layers get overrides, consecutive equal layers grouped
    into "a-b" ranges. Checked: `for_layer` of the result gives exactly the choice."""
    wanted = {"key": [settings["key"][i] for i in key], "value": [settings["value"][i] for i in value]}
    default = {t: max(dict.fromkeys(wanted[t]), key=wanted[t].count) for t in TENSORS}
    per_layer = []
    for layer in range(len(key)):
        override = {t: _override(wanted[t][layer], t) for t in TENSORS if wanted[t][layer] != default[t]}
        per_layer.append(override)
    layers: dict[str, dict] = {}
    start = 0
    for layer in range(1, len(per_layer) + 1):
        if layer == len(per_layer) or per_layer[layer] != per_layer[start]:
            if per_layer[start]:
                label = str(start) if layer - 1 == start else f"{start}-{layer - 1}"
                layers[label] = per_layer[start]
            start = layer
    spec = dataclasses.replace(base, key=default["key"], value=default["value"], layers=layers,
                               layers_at_depth={}, name=name)
    for layer in range(len(key)):
        got = spec.for_layer(layer)
        if got != (wanted["key"][layer], wanted["value"][layer]):
            raise AssertionError(f"layer {layer}: spec gives {got}, wanted {wanted['key'][layer]}, "
                                 f"{wanted['value'][layer]}")
    return spec
