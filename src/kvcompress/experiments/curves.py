"""Failure curves, zones and the Pareto front, derived from sweep records by code.

A K curve is the set of specs (without per-layer overrides) whose K codec differs only in bits
(or rank), whatever their V codec, and vice versa. This module reads record dicts; it draws and
writes nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

THRESHOLDS = (0.99, 0.95, 0.90, 0.75, 0.50)
# (zone, upper bound of the decode-faithful PPL change): a spec is in the first zone whose bound it is below.
ZONES = (("safe", 0.01), ("moderate", 0.05), ("aggressive", 0.20), ("extreme", math.inf))
_TENSORS = (("key", "K"), ("value", "V"))


@dataclass
class Curve:
    """One failure curve: a tensor (K or V), a codec family, points x -> metrics.

    `axis` is "bits" or "rank"; `points` maps x to {"cosine", "attn_error"} (means over the
    specs that share the setting, which give the same figures).
    """

    tensor: str
    family: str
    axis: str
    points: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{dict(_TENSORS)[self.tensor]} {self.family}"

    def ordered(self) -> list[tuple[int, dict[str, float]]]:
        """Points from the mildest setting (most bits / highest rank) to the most aggressive."""
        return sorted(self.points.items(), reverse=True)


def _family(tensor_spec: dict, tensor: str = "value") -> tuple[str, str, int] | None:
    """(family label, axis, x) of a K or V spec dict, or None for full precision.

    Key labels say "pre-RoPE" where keys are compressed pre-RoPE, and "post-RoPE" for low-rank
    keys compressed post-RoPE (where the difference is large); values carry no rotation.
    """
    method = tensor_spec.get("method", "quant")
    space = ""
    if tensor == "key" and tensor_spec.get("key_space") == "pre_rope":
        space = " pre-RoPE"
    elif tensor == "key" and method in ("lowrank", "lowrank+quant"):
        space = " post-RoPE"
    if method in ("quant", "hadamard+quant"):
        prefix = "hadamard+" if method == "hadamard+quant" else ""
        return f"{prefix}int/{tensor_spec['axis']}{tensor_spec['group_size']}{space}", "bits", tensor_spec["bits"]
    if method == "lowrank":
        return f"lowrank{space}", "rank", tensor_spec["rank"]
    if method == "lowrank+quant":
        return (f"lowrank+int{tensor_spec['bits']}/{tensor_spec['axis']}{tensor_spec['group_size']}{space}", "rank",
                tensor_spec["rank"])
    return None


def base_family(family: str) -> str:
    """A family label without its key-space suffix."""
    return family.replace(" pre-RoPE", "").replace(" post-RoPE", "")


def ok_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def curves(records: list[dict]) -> list[Curve]:
    """Failure curves from the records' reconstruction figures (see module doc)."""
    sums: dict[tuple, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for record in ok_records(records):
        if record["spec"].get("layers"):
            continue
        mean = record["reconstruction"]["mean"]
        for tensor, _ in _TENSORS:
            fam = _family(record["spec"][tensor], tensor)
            if fam is None:
                continue
            label, axis, x = fam
            variant = "key_only" if tensor == "key" else "value_only"
            sums[(tensor, label, axis)][x].append((mean[tensor]["cosine"], mean["attention"][variant]["rel_error"]))
    out = []
    for (tensor, label, axis), points in sums.items():
        curve = Curve(tensor, label, axis)
        for x, values in points.items():
            curve.points[x] = {"cosine": sum(v[0] for v in values) / len(values),
                               "attn_error": sum(v[1] for v in values) / len(values)}
        out.append(curve)
    return sorted(out, key=lambda c: (c.axis, c.family, c.tensor))


def failure_boundary(curve: Curve, threshold: float) -> tuple[int, float] | None:
    """The first setting (mildest first) whose cosine is below `threshold`, with that cosine; None if none."""
    for x, metrics in curve.ordered():
        if metrics["cosine"] < threshold:
            return x, metrics["cosine"]
    return None


def zone_of(ppl_change: float) -> str:
    for name, bound in ZONES:
        if ppl_change < bound:
            return name
    return ZONES[-1][0]


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (ratio, loss, label) not dominated by another with ratio >= and loss <= (one strictly).

    Returned by increasing ratio.
    """
    front = []
    for r, q, label in points:
        dominated = any((r2 >= r and q2 <= q) and (r2 > r or q2 < q) for r2, q2, _ in points)
        if not dominated:
            front.append((r, q, label))
    return sorted(front)


# The codec families compared per stored bit: both K and V coded by one of these methods.
BIT_FAMILIES = {"KIVI-style uniform quantization": ("quant",),
                "codebook (rotation / principal directions + Lloyd-Max)": ("rotated+codebook", "pca+codebook")}


def bits_family(record: dict) -> str | None:
    """The `BIT_FAMILIES` name of a record's spec (no per-layer overrides), or None."""
    spec = record.get("spec") or {}
    if spec.get("layers"):
        return None
    methods = {spec.get(t, {}).get("method", "quant") for t in ("key", "value")}
    for name, allowed in BIT_FAMILIES.items():
        if methods <= set(allowed):
            return name
    return None


def bits_points(records: list[dict]) -> list[dict]:
    """Per evaluated ok record of a `BIT_FAMILIES` spec: label, family, bits per compressed value, KL."""
    out = []
    for r in ok_records(records):
        ev, family = r.get("eval"), bits_family(r)
        if ev and family and ev.get("bits_per_value"):
            out.append({"label": r["label"], "family": family, "bits": ev["bits_per_value"], "kl": ev["kl"],
                        "ppl_change": ev["ppl_change"]})
    return sorted(out, key=lambda p: (p["family"], p["bits"]))
