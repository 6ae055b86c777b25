"""The benchmark's targets (issue goals for speed, bytes and peak memory), checked on one run's
results. A target whose figures are missing is listed with `met: None` and says what is missing.

This module only reads a results dict; it measures nothing.
"""

from __future__ import annotations


def _row(result: dict, cache: str, context: int) -> dict | None:
    return next((r for r in result["summary"] if r["cache"] == cache and r["context"] == context), None)


def evaluate_targets(result: dict, preset: str = "int4", at: int = 4096) -> list[dict]:
    """The issue's targets, checked on this run's figures (a target with missing figures is
    listed with `met: None` and says what is missing)."""
    targets = []
    mine = _row(result, preset, at)

    def add(name: str, value, met, detail: str) -> None:
        targets.append({"target": name, "value": value, "met": met, "detail": detail})

    name = f"{preset} decode >= 0.85x DynamicCache at {at} tokens"
    if mine:
        v = mine["speed_vs_dynamic"]["median"]
        add(name, v, v >= 0.85, f"median {v:.2f}x (min {mine['speed_vs_dynamic']['min']:.2f}, "
                                f"max {mine['speed_vs_dynamic']['max']:.2f})")
    else:
        add(name, None, None, f"{preset} at {at} tokens not measured")

    name = f"{preset} decode >= 1.5x the faster of quanto-4 / hqq-4 at {at} tokens, at <= their stored bytes"
    rivals = [r for r in (_row(result, "quanto-4", at), _row(result, "hqq-4", at)) if r]
    if mine and rivals:
        best = max(rivals, key=lambda r: r["tokens_per_s"]["median"])
        v = mine["tokens_per_s"]["median"] / best["tokens_per_s"]["median"]
        fewer = mine["stored_bytes"] <= best["stored_bytes"]
        add(name, v, v >= 1.5 and fewer, f"{v:.2f}x {best['cache']}; stored {mine['stored_bytes']:,} vs "
                                         f"{best['stored_bytes']:,} bytes")
    else:
        add(name, None, None, "needs the quanto/hqq baselines and the preset at that context")

    name = f"crossover: shortest context where {preset} decodes faster than DynamicCache"
    faster = [r["context"] for r in result["summary"]
              if r["cache"] == preset and r["speed_vs_dynamic"]["median"] > 1.0]
    measured = sorted(r["context"] for r in result["summary"] if r["cache"] == preset)
    add(name, min(faster) if faster else None, bool(faster),
        f"faster from {min(faster)} tokens" if faster else f"not faster at any measured context {measured}")

    worst = None
    for r in result["summary"]:
        if r["predicted_bytes"]:
            dev = abs(r["stored_bytes"] - r["predicted_bytes"]) / r["predicted_bytes"]
            worst = dev if worst is None else max(worst, dev)
    add("stored bytes within 3% of the prediction (all kvcompress rows)", worst,
        None if worst is None else worst <= 0.03,
        "no predictable rows" if worst is None else f"largest deviation {worst:.3%}")

    longest = max(result["settings"]["contexts"])
    dyn, comp = _row(result, "dynamic", longest), _row(result, preset, longest)
    name = f"peak memory at {longest} tokens: DynamicCache - {preset} >= 70% of (fp16 cache - {preset} stored)"
    if dyn and comp and dyn["peak_bytes"] is not None and comp["peak_bytes"] is not None:
        saved = dyn["peak_bytes"] - comp["peak_bytes"]
        fp16_gap = comp["fp16_bytes"] - comp["stored_bytes"]
        stored_gap = dyn["stored_bytes"] - comp["stored_bytes"]
        add(name, saved / fp16_gap, saved >= 0.7 * fp16_gap,
            f"peak saved {saved / 2**20:.1f} MiB; fp16 gap {fp16_gap / 2**20:.1f} MiB "
            f"({saved / fp16_gap:.0%}); gap to DynamicCache as stored in {result['dtype']}: "
            f"{stored_gap / 2**20:.1f} MiB ({saved / stored_gap:.0%} of it)")
    else:
        add(name, None, None, "peak memory not measured")
    return targets
