"""The prompt presets against kvpress's best policy at 5x, per kind of text (issue 24's criterion).

Reads the `side_by_side.json` that `benchmarks/side_by_side.py --out FOLDER/KIND` wrote for each
kind (kvpress's presses at keep 0.2 and the kvcompress rows in one run, fp32 protocol) and prints
one markdown row per kind and kvcompress row: its KL, kvpress's best KL at 5x context compression
on the same ids, their ratio and whether it meets the target (prompt-6x <= 0.5x, prompt-8x <= 0.7x).

    python benchmarks/prompt_kinds_table.py docs/prompt_kinds

With `--segments`, the folder holds `KIND/OFFSET/side_by_side.json`, one run per disjoint segment of a
kind's report part (`side_by_side.py --export-ids ... --offset OFFSET`), and the table is per kind:
each segment's KLs and ratios to kvpress's best press on that segment, then the means over the
segments and the ratio of means, against the best press chosen per segment (the mean of the
per-segment minima) and against the one press with the lowest mean KL.

    python benchmarks/prompt_kinds_table.py --segments docs/prompt_kinds/segments [--offsets 0,2049]

With several kinds, a last table applies the worst-kind rule of the preset choice to the specs measured
on every kind and segment: per spec, its ratio of means on each kind, the worst kind, and per target
(prompt-6x, prompt-8x: a spec counts for the target its name starts with) the spec whose worst kind is
lowest; then the same rule on each segment alone (the offsets shared by every kind). `--presses` restricts
the kvpress presses the ratios are taken to (e.g. SnapKV,TOVA,StreamingLLM: the references a choice used).

This script measures nothing; a kvcompress row is matched to a target by its spec's file or preset
name (`prompt-6x`, `runs/x/prompt-6x-kinds.json` -> prompt-6x).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"prompt-6x": 0.5, "prompt-8x": 0.7}
KVPRESS_5X = 5.0


def target_of(spec: str) -> tuple[str, float] | None:
    name = Path(spec).name.removesuffix(".json")
    for preset, ratio in TARGETS.items():
        if name == preset or name.startswith(preset + "-"):
            return preset, ratio
    return None


def kvpress_at_5x(data: dict, presses: set[str] | None = None) -> list[dict]:
    """kvpress's rows at 5x context compression of one side_by_side.json (only `presses`, by `press_name`, if
    given); ValueError if there are none."""
    kvpress = [r for r in data["rows"]
               if r["library"] == "kvpress" and abs(r["context_compression"] - KVPRESS_5X) < 0.05
               and (presses is None or press_name(r["method"]) in presses)]
    if not kvpress:
        raise ValueError("no kvpress row at 5x context compression (run_kvpress.py --keep 0.2)"
                         + ("" if presses is None else f" among {', '.join(sorted(presses))}"))
    return kvpress


def rows_of(data: dict) -> list[dict]:
    """Markdown-ready figures of one side_by_side.json: one entry per kvcompress row with a target."""
    best = min(kvpress_at_5x(data), key=lambda r: r["kl"])
    out = []
    for r in data["rows"]:
        target = target_of(r.get("spec", "")) if r["library"] == "kvcompress" else None
        if target is None:
            continue
        preset, limit = target
        out.append({"kind": data["text"].get("kind"), "spec": r["spec"], "preset": preset, "kl": r["kl"],
                    "kl_ci95": r["kl_ci95"], "whole_cache_fp32": r["whole_cache_ratio"],
                    "best_kvpress": best["method"], "best_kl": best["kl"], "ratio": r["kl"] / best["kl"],
                    "target": limit, "met": r["kl"] <= limit * best["kl"]})
    return out


def segment_kls(data: dict, presses: set[str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """KL per kvcompress spec with a target, and KL per kvpress press at 5x (only `presses` if given), of one
    segment's run."""
    ours = {r["spec"]: r["kl"] for r in data["rows"]
            if r["library"] == "kvcompress" and target_of(r.get("spec", "")) is not None}
    return ours, {r["method"]: r["kl"] for r in kvpress_at_5x(data, presses)}


def check_disjoint(texts: dict[int, dict]) -> None:
    """ValueError unless the segments (offset -> the runs' `text` records) are the same part of the same
    text and their token ranges do not overlap."""
    sources = {(t.get("kind"), t.get("source"), t.get("part")) for t in texts.values()}
    if len(sources) > 1:
        raise ValueError(f"segments of different texts or parts: {sorted(map(str, sources))}")
    spans = sorted(tuple(t["tokens"]) for t in texts.values())
    for (start, stop), (next_start, _) in zip(spans, spans[1:]):
        if next_start < stop:
            raise ValueError(f"segments overlap: tokens {start}-{stop} and {next_start}-")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def segments_summary(runs: dict[int, dict], presses: set[str] | None = None) -> dict:
    """One kind's figures over its segments (offset -> side_by_side.json): per segment, each spec's KL,
    the best press and its KL, and each spec's ratio to it; over the segments, each spec's mean KL,
    the mean of the per-segment best KLs, the press with the lowest mean KL and that mean, and each
    spec's ratio of means to both (kvpress: only `presses` if given). ValueError if a spec or press is missing
    from a segment."""
    check_disjoint({offset: data["text"] for offset, data in runs.items()})
    figures = {offset: segment_kls(data, presses) for offset, data in sorted(runs.items())}
    specs = sorted(set.union(*(set(ours) for ours, _ in figures.values())))
    presses = sorted(set.union(*(set(theirs) for _, theirs in figures.values())))
    for offset, (ours, theirs) in figures.items():
        missing = [name for name in specs if name not in ours] + [name for name in presses if name not in theirs]
        if missing:
            raise ValueError(f"segment at offset {offset} lacks {', '.join(missing)}")
    segments = []
    for offset, (ours, theirs) in figures.items():
        best = min(theirs, key=theirs.get)
        segments.append({"offset": offset, "kl": ours, "best": best, "best_kl": theirs[best],
                         "ratio": {spec: kl / theirs[best] for spec, kl in ours.items()}})
    mean_kl = {spec: mean(s["kl"][spec] for s in segments) for spec in specs}
    press_mean = {press: mean(theirs[press] for _, theirs in figures.values()) for press in presses}
    best_press = min(press_mean, key=press_mean.get)
    best_mean = mean(s["best_kl"] for s in segments)
    return {"segments": segments, "mean_kl": mean_kl, "best_mean": best_mean, "best_press": best_press,
            "best_press_mean": press_mean[best_press],
            "ratio_of_means": {spec: mean_kl[spec] / best_mean for spec in specs},
            "ratio_of_means_press": {spec: mean_kl[spec] / press_mean[best_press] for spec in specs}}


def read_segments(folder: Path, offsets: set[int] | None = None) -> dict[str, dict[int, dict]]:
    """kind -> offset -> side_by_side.json, from FOLDER/KIND/OFFSET/side_by_side.json (only `offsets` if given)."""
    from kvcompress.corpus import KINDS

    out = {}
    for kind in KINDS:
        runs = {int(path.parent.name): json.loads(path.read_text())
                for path in (folder / kind).glob("*/side_by_side.json") if path.parent.name.isdigit()
                and (offsets is None or int(path.parent.name) in offsets)}
        if runs:
            out[kind] = runs
    return out


def worst_kind_rule(ratios: dict[str, dict[str, float]]) -> dict:
    """The preset choice's worst-kind rule on ratios to kvpress (kind -> spec -> ratio): per spec present in every
    kind, its worst kind and ratio there; per target, the spec with the lowest worst ratio (ties: the lower
    geometric mean over the kinds)."""
    specs = sorted(set.intersection(*(set(by_spec) for by_spec in ratios.values())))
    worst = {}
    for spec in specs:
        kind = max(ratios, key=lambda k: ratios[k][spec])
        geomean = 1.0
        for k in ratios:
            geomean *= ratios[k][spec] ** (1 / len(ratios))
        worst[spec] = {"kind": kind, "ratio": ratios[kind][spec], "geomean": geomean}
    picks = {}
    for preset in TARGETS:
        entrants = [spec for spec in specs if target_of(spec)[0] == preset]
        if entrants:
            picks[preset] = min(entrants, key=lambda spec: (worst[spec]["ratio"], worst[spec]["geomean"]))
    return {"worst": worst, "picks": picks}


def short(spec: str) -> str:
    """'docs/x/specs/prompt-6x-expected.json' -> 'prompt-6x-expected': a spec's name in a table."""
    return Path(spec).name.removesuffix(".json")


def worst_kind_markdown(summaries: dict[str, dict]) -> str:
    """The worst-kind rule over the kinds' segment summaries: on the ratios of means, then on each shared offset."""
    kinds = list(summaries)
    overall = worst_kind_rule({kind: s["ratio_of_means"] for kind, s in summaries.items()})
    lines = ["| spec | " + " | ".join(f"{kind}: ratio of means" for kind in kinds) + " | worst kind | picked for |",
             "|---" * (len(kinds) + 3) + "|"]
    for spec, w in overall["worst"].items():
        picked = [preset for preset, pick in overall["picks"].items() if pick == spec]
        lines.append(f"| `{short(spec)}` | " + " | ".join(f"{summaries[k]['ratio_of_means'][spec]:.3f}x" for k in kinds)
                     + f" | {w['kind']} {w['ratio']:.3f}x | {', '.join(picked) or '-'} |")
    offsets = sorted(set.intersection(*({s["offset"] for s in summary["segments"]} for summary in summaries.values())))
    presets = list(overall["picks"])
    lines += ["", "| the rule on | " + " | ".join(f"{preset}: pick (worst kind)" for preset in presets) + " |",
              "|---" * (len(presets) + 1) + "|"]
    n = len(offsets)
    rows = [(f"ratio of means over {n} segments", overall)]
    for offset in offsets:
        ratios = {kind: next(s["ratio"] for s in summary["segments"] if s["offset"] == offset)
                  for kind, summary in summaries.items()}
        rows.append((f"segment {offset} alone", worst_kind_rule(ratios)))
    for label, rule in rows:
        cells = []
        for preset in presets:
            pick = rule["picks"].get(preset)
            cells.append("-" if pick is None else
                         f"`{short(pick)}` ({rule['worst'][pick]['kind']} {rule['worst'][pick]['ratio']:.3f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(spec: str, ratio: float) -> str:
    """'0.412x, yes': a ratio to kvpress and whether it meets the spec's target."""
    return f"{ratio:.3f}x, {'yes' if ratio <= target_of(spec)[1] else 'no'}"


def press_name(method: str) -> str:
    """'kvpress SnapKV, keep 20%' -> 'SnapKV'."""
    return method.removeprefix("kvpress ").split(",")[0]


def segments_markdown(kind: str, summary: dict) -> str:
    """One kind's table: a row per segment, then the means against the per-segment best and the best press."""
    specs = list(summary["mean_kl"])
    n = len(summary["segments"])
    lines = ["| kind | segment (offset) | " + " | ".join(f"`{short(s)}` KL" for s in specs) + " | kvpress best at 5x (KL) | "
             + " | ".join(f"`{short(s)}` / best (<= {target_of(s)[1]:g}x?)" for s in specs) + " |",
             "|---" * (3 + 2 * len(specs)) + "|"]
    for s in summary["segments"]:
        lines.append(f"| {kind} | {s['offset']} | " + " | ".join(f"{s['kl'][spec]:.4f}" for spec in specs)
                     + f" | {press_name(s['best'])} {s['best_kl']:.4f} | "
                     + " | ".join(verdict(spec, s["ratio"][spec]) for spec in specs) + " |")
    lines.append(f"| {kind} | mean of {n} | " + " | ".join(f"{summary['mean_kl'][spec]:.4f}" for spec in specs)
                 + f" | per-segment best {summary['best_mean']:.4f} | "
                 + " | ".join(f"**{verdict(spec, summary['ratio_of_means'][spec])}**" for spec in specs) + " |")
    lines.append(f"| {kind} | mean of {n} | " + " | ".join("" for _ in specs)
                 + f" | {press_name(summary['best_press'])} (best mean) {summary['best_press_mean']:.4f} | "
                 + " | ".join(verdict(spec, summary["ratio_of_means_press"][spec]) for spec in specs) + " |")
    return "\n".join(lines)


def print_segments(folder: str, offsets: set[int] | None, presses: set[str] | None = None) -> int:
    kinds = read_segments(Path(folder), offsets)
    if not kinds:
        print(f"prompt_kinds_table: {folder}: no KIND/OFFSET/side_by_side.json; write them with "
              "benchmarks/side_by_side.py --out FOLDER/KIND/OFFSET", file=sys.stderr)
        return 2
    summaries = {}
    for kind, runs in kinds.items():
        try:
            summary = summaries[kind] = segments_summary(runs, presses)
        except (ValueError, KeyError) as err:
            print(f"prompt_kinds_table: {folder}/{kind}: {err}", file=sys.stderr)
            return 2
        print(segments_markdown(kind, summary) + "\n")
    if len(summaries) > 1:
        print(worst_kind_markdown(summaries) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder with one side_by_side --out folder per kind (docs, code, plays)")
    parser.add_argument("--segments", action="store_true",
                        help="the folder holds KIND/OFFSET/ runs, one per disjoint segment: per-kind table with "
                             "per-segment ratios and the ratio of means")
    parser.add_argument("--offsets", default=None,
                        help="with --segments: comma list of the offsets read (default: every OFFSET folder)")
    parser.add_argument("--presses", default=None,
                        help="with --segments: comma list of the kvpress presses the ratios are taken to, by name "
                             "(e.g. SnapKV,TOVA,StreamingLLM; default: every press at 5x)")
    args = parser.parse_args(argv)
    if (args.offsets is not None or args.presses is not None) and not args.segments:
        parser.error("--offsets and --presses read segment folders: pass --segments too")
    if args.segments:
        try:
            offsets = None if args.offsets is None else {int(o) for o in args.offsets.split(",")}
        except ValueError:
            parser.error(f"--offsets {args.offsets}: a comma list of token offsets, e.g. 0,2049")
        presses = None if args.presses is None else {p.strip() for p in args.presses.split(",") if p.strip()}
        return print_segments(args.folder, offsets, presses)
    from kvcompress.corpus import KINDS

    # one folder per kind of text; others beside them (docs_extra/, records of earlier choices) are not read
    files = [path for kind in KINDS if (path := Path(args.folder) / kind / "side_by_side.json").is_file()]
    if not files:
        print(f"prompt_kinds_table: {args.folder}: no KIND/side_by_side.json; write them with "
              "benchmarks/side_by_side.py --out FOLDER/KIND", file=sys.stderr)
        return 2
    print("| kind | spec | KL (95% CI) | kvpress best at 5x | its KL | ratio | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for path in files:
        try:
            rows = rows_of(json.loads(path.read_text()))
        except (ValueError, KeyError) as err:
            print(f"prompt_kinds_table: {path}: {err}", file=sys.stderr)
            return 2
        for r in rows:
            lo, hi = r["kl_ci95"]
            print(f"| {r['kind']} | `{r['spec']}` | {r['kl']:.4f} ({lo:.4f} .. {hi:.4f}) | {r['best_kvpress']} | "
                  f"{r['best_kl']:.4f} | {r['ratio']:.3f}x | <= {r['target']:g}x | {'yes' if r['met'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
