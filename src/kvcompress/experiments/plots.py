"""The report's PNG plots: failure curves, quality vs compression ratio and vs bits per value,
per-layer sensitivity.

Plots need the `report` extra (matplotlib). This module only draws from record dicts and curves.
"""

from __future__ import annotations

from pathlib import Path

from ..extras import require_extra
from .curves import THRESHOLDS, Curve, ok_records, pareto_front

_TENSORS = (("key", "K"), ("value", "V"))


def _pyplot():
    """matplotlib's pyplot with the file-only Agg backend; MissingExtraError without the `report` extra."""
    require_extra("report", "matplotlib", "Report plots").use("Agg", force=True)
    return require_extra("report", "matplotlib.pyplot", "Report plots")


def plot_failure_curves(all_curves: list[Curve], path: Path) -> Path | None:
    """Cosine and attention-output error vs bits and vs rank, K solid, V dashed; None if no curve."""
    axes_used = [a for a in ("bits", "rank") if any(c.axis == a for c in all_curves)]
    if not axes_used:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(axes_used), figsize=(6.2 * len(axes_used), 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    family_color: dict[str, str] = {}
    for col, axis in enumerate(axes_used):
        for curve in [c for c in all_curves if c.axis == axis]:
            color = family_color.setdefault(curve.family, colors[len(family_color) % len(colors)])
            xs = sorted(curve.points)
            style = "-" if curve.tensor == "key" else "--"
            marker = "o" if curve.tensor == "key" else "s"
            axes[0][col].plot(xs, [curve.points[x]["cosine"] for x in xs], style, marker=marker, color=color,
                              label=curve.name)
            axes[1][col].plot(xs, [max(curve.points[x]["attn_error"], 1e-6) for x in xs], style, marker=marker,
                              color=color, label=curve.name)
        for t in THRESHOLDS[:3]:
            axes[0][col].axhline(t, color="grey", linewidth=0.6, linestyle=":")
        axes[0][col].set_title(f"reconstruction cosine vs {axis}")
        axes[0][col].set_ylabel("mean cosine similarity (per token vector)")
        axes[1][col].set_title(f"attention-output error vs {axis}")
        axes[1][col].set_ylabel("relative error of softmax(QKᵀ)V")
        axes[1][col].set_yscale("log")
        for row in (0, 1):
            axes[row][col].set_xlabel(axis)
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=7)
    fig.suptitle("Failure curves (K solid, V dashed; codec only, every token after the sinks compressed)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def quality_points(records: list[dict]) -> list[dict]:
    """Per evaluated ok record: label, ratio (evaluated cache), KL, PPL change."""
    out = []
    for r in ok_records(records):
        ev = r.get("eval")
        if ev:
            out.append({"label": r["label"], "ratio": ev["compression_ratio"], "kl": ev["kl"],
                        "ppl_change": ev["ppl_change"]})
    return out


def plot_quality(records: list[dict], path: Path) -> Path | None:
    """KL and PPL change vs real compression ratio, Pareto frontier highlighted; None if nothing evaluated."""
    points = quality_points(records)
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, metric, title in ((axes[0], "kl", "mean KL(uncompressed || compressed)"),
                              (axes[1], "ppl_change", "perplexity change")):
        floor = 1e-6 if metric == "kl" else None
        pts = [(p["ratio"], max(p[metric], floor) if floor else p[metric], p["label"]) for p in points]
        front = pareto_front(pts)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", alpha=0.6, label="spec")
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:red", label="Pareto frontier")
        for r, q, label in pts:
            ax.annotate(label, (r, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if metric == "kl":
            ax.set_yscale("log")
        else:
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y * 100:+.0f}%"))
        ax.set_xlabel("real compression ratio of the evaluated cache (fp16 bytes / stored bytes)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Decode-faithful quality vs compression (lower is better; frontier: nothing both smaller and "
                 "better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_layer_sensitivity(records: list[dict], path: Path) -> Path | None:
    """Heat map of 1 - cosine, layers x specs, for K and for V; None if no record has layers."""
    recs = [r for r in ok_records(records) if r.get("reconstruction", {}).get("layers")]
    if not recs:
        return None
    import numpy as np

    plt = _pyplot()
    LogNorm = require_extra("report", "matplotlib.colors", "Report plots").LogNorm
    n_layers = max(len(r["reconstruction"]["layers"]) for r in recs)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.0 + 0.45 * len(recs)) * 1.6, 0.22 * n_layers + 3),
                             squeeze=False)
    for ax, (tensor, short) in zip(axes[0], _TENSORS):
        grid = np.full((n_layers, len(recs)), np.nan)
        for j, r in enumerate(recs):
            for layer in r["reconstruction"]["layers"]:
                grid[layer["layer"], j] = max(1.0 - layer[tensor]["cosine"], 1e-7)
        image = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=1e-5, vmax=1.0),
                          interpolation="nearest")
        ax.set_xticks(range(len(recs)), [r["label"] for r in recs], rotation=70, fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{short}: 1 - cosine per layer")
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_quality_vs_bits(points: list[dict], path: Path) -> Path | None:
    """KL vs bits per compressed value, one line per codec family (`curves.bits_points`); None if empty."""
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family in sorted({p["family"] for p in points}):
        pts = [p for p in points if p["family"] == family]
        ax.plot([p["bits"] for p in pts], [max(p["kl"], 1e-6) for p in pts], "-o", label=family)
        for p in pts:
            ax.annotate(p["label"], (p["bits"], max(p["kl"], 1e-6)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per compressed K/V value (codes, scales, zero points; window and sinks apart)")
    ax.set_ylabel("mean KL(uncompressed || compressed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Quality per stored bit (lower left is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both axes (more compression and lower KL), by x."""
    best, kept = float("inf"), []
    for p in sorted(points, key=lambda p: (-p["x"], p["kl"])):
        if p["kl"] < best:
            best = p["kl"]
            kept.append(p)
    return kept[::-1]


def plot_kl_vs_compression(points: list[dict], path: Path, xlabel: str) -> Path | None:
    """KL vs a compression ratio: every point as a marker, one colour per family (points:
    {"family", "x", "kl", "label"}), and a line through each family's frontier (the points no
    other point of the family beats on both axes), labelled; None if empty."""
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family in dict.fromkeys(p["family"] for p in points):
        pts = [p for p in points if p["family"] == family]
        front = _frontier(pts)
        line, = ax.plot([p["x"] for p in front], [max(p["kl"], 1e-6) for p in front], "-", label=family)
        ax.plot([p["x"] for p in pts], [max(p["kl"], 1e-6) for p in pts], "o", color=line.get_color(), markersize=4)
        for p in front:
            ax.annotate(p["label"], (p["x"], max(p["kl"], 1e-6)), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KL(uncompressed || compressed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Prompt compression: quality vs compression (lower right is better; lines join each "
                 "family's best points)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
