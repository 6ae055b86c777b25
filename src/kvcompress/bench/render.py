"""Present one benchmark result: a markdown table (settings, speed, bytes, capacity, targets),
a PNG plot (needs the `report` extra: matplotlib), and the files `bench.json`, `bench.md`,
`bench.png`.

This module only reads a results dict (as `run.run_benchmark` returns it); it measures nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..extras import require_extra


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render_markdown(result: dict) -> str:
    """The results as markdown: settings, the main table, capacity and targets."""
    s = result["settings"]
    lines = [
        f"Model: {result['model']} ({result['dtype']}, {result['device']}); torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}; {result['machine']['cpu_count']} CPUs, "
        f"{result['machine']['torch_threads']} torch threads.",
        f"Per context, each cache is filled by one prefill of context - {s['repeats']} x {s['steps']} tokens, then "
        f"the caches take turns decoding {s['steps']} greedy tokens for {s['repeats']} rounds (order rotated); "
        "decode tok/s is the median [min-max] over rounds and 'vs dynamic' the median [min-max] of the ratio to "
        "DynamicCache in the same round. Prompt text: " + "; ".join(result["prompt"]) + ".",
        "",
        "| context | cache | decode tok/s | vs dynamic | prefill s | stored MiB | fp16 MiB | peak MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        t, v, p = r["tokens_per_s"], r["speed_vs_dynamic"], r["prefill_s"]  # p: one prefill
        lines.append(f"| {r['context']} | {r['cache']} | {t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}] | "
                     f"{v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}] | {p:.2f} | "
                     f"{_mib(r['stored_bytes'])} | {_mib(r['fp16_bytes'])} | {_mib(r['peak_bytes'])} |")
    lines.append("")
    lines.append("Peak MiB: " + (result["peak_memory"]["skipped"] or result["peak_memory"]["method"]) + ".")
    for name, why in result["skipped"].items():
        lines.append(f"Skipped {name}: {why}.")
    lines.append("Caches: " + "; ".join(f"`{k}` = {v}" for k, v in result["caches"].items()) + ".")
    cap = result.get("capacity")
    if cap:
        lines += ["", f"Capacity for a {_mib(cap['budget_bytes'])} MiB cache budget (model context limit "
                      f"{cap['model_context_limit']}):", "",
                  f"| cache | bytes/token | longest context (batch 1) | largest batch at {cap['capacity_context']} | "
                  "aggregate decode tok/s at that batch |", "|---|---:|---:|---:|---:|"]
        for name, row in cap["caches"].items():
            if "skipped" in row:
                lines.append(f"| {name} | - | - | - | {row['skipped']} |")
                continue
            measured = row.get("aggregate_tokens_per_s")
            batch = f"{row['largest_batch']}" + (f" (measured {row['measured_batch']})"
                                                 if row["measured_batch"] != row["largest_batch"] else "")
            lines.append(f"| {name} | {row['bytes_per_token']:.0f} | {row['longest_context']} | {batch} | "
                         f"{'-' if measured is None else f'{measured:.1f}'} |")
    lines += ["", "Targets:", ""]
    for t in result["targets"]:
        mark = {True: "met", False: "NOT met", None: "not checked"}[t["met"]]
        lines.append(f"- {t['target']}: **{mark}** ({t['detail']})")
    lines.append("")
    lines.append(f"Benchmark time: {result['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """PNG: decode tokens/s vs context (median, min-max bars) and memory vs context."""
    require_extra("report", "matplotlib", "Benchmark plots").use("Agg")
    plt = require_extra("report", "matplotlib.pyplot", "Benchmark plots")

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in result["caches"]:
        rows = sorted((r for r in result["summary"] if r["cache"] == name), key=lambda r: r["context"])
        x = [r["context"] for r in rows]
        med = [r["tokens_per_s"]["median"] for r in rows]
        err = [[m - r["tokens_per_s"]["min"] for m, r in zip(med, rows)],
               [r["tokens_per_s"]["max"] - m for m, r in zip(med, rows)]]
        line = ax_speed.errorbar(x, med, yerr=err, marker="o", capsize=3, label=name)
        color = line[0].get_color()
        ax_mem.plot(x, [r["stored_bytes"] / 2**20 for r in rows], marker="o", color=color, label=f"{name} stored")
        peak_rows = [r for r in rows if r["peak_bytes"] is not None]
        if peak_rows:
            ax_mem.plot([r["context"] for r in peak_rows], [r["peak_bytes"] / 2**20 for r in peak_rows],
                        marker="x", linestyle="--", color=color, label=f"{name} peak")
    ax_speed.set(xlabel="context (tokens)", ylabel="decode tokens/s (batch 1)", title="Decode speed")
    ax_mem.set(xlabel="context (tokens)", ylabel="MiB", title="Cache stored (solid) and peak process memory (dashed)")
    for ax in (ax_speed, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']}, {result['dtype']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out_dir`; returns their paths.

    Without the `report` extra (matplotlib) this raises MissingExtraError before writing anything.
    """
    require_extra("report", "matplotlib", "Benchmark plots")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(result))
    plot(result, paths["plot"])
    return paths
