"""Report: a sweep folder's JSON records turned into `report.md` and PNG plots, by code only.

Tables: per spec, ratios, K/V cosine, attention-output error, PPL change (bootstrap interval), KL,
top-1; failure boundaries (the first setting of a bits or rank curve whose cosine falls below
0.99 ... 0.50); safe zones by PPL change (`ZONES`); passkey and agreement with the uncompressed
score beside. Plots: failure curves, quality vs real ratio with the Pareto frontier, quality per
stored bit, per-layer sensitivity. Curves use specs without per-layer overrides; a K curve is the
specs whose K codec differs only in bits (or rank). The records are never edited.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from .curves import (
    THRESHOLDS,
    ZONES,
    Curve,
    base_family,
    bits_points,
    curves,
    failure_boundary,
    ok_records,
    zone_of,
)
from ..measure.evaluate import is_lossy
from ..spec import CacheSpec
from .plots import plot_failure_curves, plot_layer_sensitivity, plot_quality, plot_quality_vs_bits
from .records import BASELINE_FILE, CONFIG_FILE, load_records, read_record

PLOTS = ("failure_curves.png", "quality_vs_ratio.png", "layer_sensitivity.png", "quality_vs_bits.png")
_TENSORS = (("key", "K"), ("value", "V"))


# --------------------------------------------------------------------------- formatting


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _spec_text(tensor_spec: dict) -> str:
    from ..spec import TensorSpec

    return TensorSpec.from_dict(tensor_spec).describe()


# --------------------------------------------------------------------------- markdown


def summary_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["spec", "K", "V", "codec ratio", "eval ratio", "K cos", "V cos", "attn err", "PPL change",
              "PPL 95% CI", "KL", "top-1", "zone"]
    rows = []
    for r in ok_records(records):
        rec, ev = r["reconstruction"], r.get("eval")
        mean = rec["mean"]
        row = [r["label"], _spec_text(r["spec"]["key"]), _spec_text(r["spec"]["value"]), _f(rec["codec_ratio"], 2),
               _f(ev["compression_ratio"], 2) if ev else "n/a", _f(mean["key"]["cosine"]),
               _f(mean["value"]["cosine"]), _f(mean["attention"]["both"]["rel_error"])]
        if ev:
            ci = ev["ppl_change_ci95"]  # None: too few tokens for an interval
            row += [_pct(ev["ppl_change"]), f"{_pct(ci[0])} .. {_pct(ci[1])}" if ci else "n/a", _f(ev["kl"]),
                    _f(ev["top1"], 3), zone_of(ev["ppl_change"])]
        else:
            row += ["n/a"] * 5
        rows.append(row)
    return header, rows


def boundary_rows(all_curves: list[Curve]) -> tuple[list[str], list[list[str]]]:
    header = ["cosine below"] + [f"{c.name} ({c.axis})" for c in all_curves]
    rows = []
    for t in THRESHOLDS:
        row = [f"{t:.2f}"]
        for c in all_curves:
            hit = failure_boundary(c, t)
            if hit is None:
                mildest, worst = max(c.points), min(c.points)
                row.append(f"none ({c.axis} {mildest}..{worst})")
            else:
                row.append(f"{c.axis} {hit[0]} ({hit[1]:.3f})")
        rows.append(row)
    return header, rows


def zone_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["zone", "PPL change", "specs (eval ratio, PPL change)"]
    members: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r in ok_records(records):
        ev = r.get("eval")
        if ev:
            members[zone_of(ev["ppl_change"])].append(
                (ev["compression_ratio"], f"{r['label']} ({ev['compression_ratio']:.2f}x, {_pct(ev['ppl_change'])})"))
    rows, lower = [], -math.inf
    for name, bound in ZONES:
        span = (f"< {bound * 100:+.0f}%" if lower == -math.inf else
                f">= {lower * 100:+.0f}%" if bound == math.inf else f"{lower * 100:+.0f}% .. {bound * 100:+.0f}%")
        specs = ", ".join(text for _, text in sorted(members[name], reverse=True)) or "none"
        rows.append([name, span, specs])
        lower = bound
    return header, rows


def passkey_rows(records: list[dict], baseline: dict | None) -> tuple[list[str], list[list[str]], list[str]]:
    """Passkey table (compressed accuracy, uncompressed beside) and sentences on baseline failures."""
    base = (baseline or {}).get("passkey")
    with_pk = [r for r in ok_records(records) if "passkey" in r.get("tasks", {})]
    if not base and not with_pk:
        return [], [], []
    base = base or with_pk[0]["tasks"]["passkey"]["uncompressed"]
    lengths = list(base["by_length"])
    header = ["spec"] + [f"{n} tokens" for n in lengths] + ["all"]
    rows = [["uncompressed"] + [_f(base["by_length"][n], 2) for n in lengths] + [_f(base["accuracy"], 2)]]
    for r in with_pk:
        pk = r["tasks"]["passkey"]
        unc = pk["uncompressed"]
        rows.append([r["label"]] + [f"{_f(pk['by_length'][n], 2)} ({_f(unc['by_length'][n], 2)})" for n in lengths]
                    + [f"{_f(pk['accuracy'], 2)} ({_f(unc['accuracy'], 2)})"])
    notes = []
    for n in lengths:
        if base["by_length"][n] < 1.0:
            failed = [c for c in base.get("cases", []) if str(c["length"]) == n and not c["correct"]]
            where = ", ".join(f"depth {c['depth']:.0%} answered {c['answer'].strip()!r}" for c in failed)
            notes.append(f"The uncompressed model itself fails the passkey task at {n} tokens (accuracy "
                         f"{base['by_length'][n]:.2f}{'; ' + where if where else ''}): at that length a compressed "
                         "score is bounded by the model, not by the cache.")
    return header, rows, notes


def agreement_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    with_ag = [r for r in ok_records(records) if "agreement" in r.get("tasks", {})]
    header = ["spec", "prompts", "mean matching prefix (tokens)", "prefix fraction", "exact-match rate"]
    rows = [[r["label"], str(ag["prompts"]), _f(ag["mean_prefix"], 1), _f(ag["mean_prefix_fraction"], 3),
             _f(ag["exact_match_rate"], 2)] for r in with_ag for ag in [r["tasks"]["agreement"]]]
    return header, rows


def findings(records: list[dict], all_curves: list[Curve]) -> list[str]:
    """Plain statements derived from the data (no hand-written numbers)."""
    lines = []
    evaluated = [r for r in ok_records(records) if r.get("eval")]
    if evaluated:
        for zone, bound in ZONES[:2]:
            members = [r for r in evaluated if r["eval"]["ppl_change"] < bound]
            if members:
                best = max(members, key=lambda r: (r["eval"]["compression_ratio"], -r["eval"]["ppl_change"]))
                lines.append(f"Highest compression with a PPL change below {bound:+.0%} ({zone} zone or better): "
                             f"**{best['label']}** at {best['eval']['compression_ratio']:.2f}x of the evaluated "
                             f"cache (codec {best['reconstruction']['codec_ratio']:.2f}x), PPL change "
                             f"{_pct(best['eval']['ppl_change'])}, KL {best['eval']['kl']:.4f}.")
            else:
                lines.append(f"No evaluated spec has a PPL change below {bound:+.0%}.")
    for v in [c for c in all_curves if c.tensor == "value"]:
        for k in [c for c in all_curves if c.tensor == "key" and c.axis == v.axis and base_family(c.family) == v.family]:
            common = sorted(set(k.points) & set(v.points), reverse=True)
            if common:
                v_worse = sum(v.points[x]["cosine"] < k.points[x]["cosine"] for x in common)
                lines.append(f"{v.name} vs {k.name}: V reconstructs worse than K (lower mean cosine) at {v_worse} "
                             f"of {len(common)} common {v.axis} settings.")
    keys = {c.family: c for c in all_curves if c.tensor == "key"}
    for family, pre in sorted(keys.items()):
        if not family.endswith(" pre-RoPE"):
            continue
        post = keys.get(base_family(family) + " post-RoPE") or keys.get(base_family(family))
        common = sorted(set(pre.points) & set(post.points), reverse=True) if post else []
        if common:
            text = ", ".join(f"{x}: {pre.points[x]['cosine']:.3f} vs {post.points[x]['cosine']:.3f}" for x in common)
            lines.append(f"K {base_family(family)}, pre-RoPE vs post-RoPE mean cosine by {pre.axis}: {text}.")
    return lines


def _text_line(settings: dict, records: list[dict]) -> str:
    """The text a sweep read: the report part of a file or of a kind of text, with its source and hash."""
    read = next((r["texts"]["eval"] for r in records if isinstance(r.get("texts"), dict) and "eval" in r["texts"]),
                None)
    if settings.get("corpus"):
        where = f"report part of the file {settings['corpus']}"
    else:
        where = f"report part of the kind {settings.get('text') or 'docs'!r}"
    if read and read.get("source"):
        where += f" ({read['source']}, text sha256 {read.get('text_sha256')})"
    return where


def _settings_lines(config: dict | None, baseline: dict | None, records: list[dict]) -> list[str]:
    lines = []
    if config:
        s = config.get("settings", {})
        lines.append(f"- model: {records[0].get('model') if records else s.get('model')}; dtype {s.get('dtype')}; "
                     f"text: {_text_line(s, records)}")
        if s.get("context_tokens"):
            evaluation = (f"prompt compression: {s['context_tokens']} context tokens prefilled at once, then "
                          f"{s.get('eval_tokens')} teacher-forced and scored (ratios at the end of the context)")
        else:
            evaluation = f"decode-faithful evaluation: {s.get('eval_tokens')} tokens"
        lines.append(f"- direct reconstruction: {s.get('recon_tokens')} tokens captured; {evaluation}")
        if s.get("tasks"):
            lines.append(f"- tasks: {', '.join(s['tasks'])}; passkey lengths {s.get('passkey_lengths')}, depths "
                         f"{s.get('passkey_depths')}, format {s.get('passkey_format')!r}; agreement "
                         f"{s.get('agreement_prompts')} prompts x {s.get('agreement_prompt_tokens')} tokens, "
                         f"{s.get('agreement_new_tokens')} new tokens")
        if config.get("command"):
            lines.append(f"- command: `{config['command']}`")
    if baseline and "capture_check_max_error" in baseline:
        lines.append(f"- capture self-check: attention recomputed from the captured Q, K, V matches the model's own "
                     f"output to a relative error of {baseline['capture_check_max_error']:.2g} (worst layer)")
    if records:
        lines.append(f"- versions: kvcompress {records[0].get('kvcompress')}, transformers "
                     f"{records[0].get('transformers')}, torch {records[0].get('torch')}")
    return lines


class UnreadableRecordsError(ValueError):
    """Some record files of a sweep folder cannot be read; the message names them."""


def _nothing_compressed(record: dict) -> bool:
    """An ok record whose evaluation compressed no token of a lossy spec (written by a kvcompress
    older than the check in `evaluate.check_eval_tokens`) and evicted none: its figures are the baseline's."""
    ev = record.get("eval")
    if record.get("status") != "ok" or not isinstance(ev, dict) or ev.get("compressed_tokens") != 0:
        return False
    if ev.get("evicted_tokens"):  # eviction alone changed what later tokens read
        return False
    try:
        return is_lossy(CacheSpec.from_dict(record.get("spec") or {}))
    except ValueError:
        return True


def mark_nothing_compressed(records: list[dict]) -> list[dict]:
    """The records, with those that compressed nothing turned into errors (never in a zone)."""
    return [dict(r, status="error", error=f"nothing compressed: the {r['eval'].get('tokens')}-token evaluation "
                 "text fits in the spec's window and sinks, so its figures equal the uncompressed baseline's; "
                 "re-run the sweep with more --tokens") if _nothing_compressed(r) else r for r in records]


def write_report(out_dir: str | os.PathLike, skip_unreadable: bool = False) -> Path:
    """Write `report.md` and the PNG plots into the sweep folder `out_dir`; returns the report path.

    Raises UnreadableRecordsError naming every record file that cannot be read, unless
    `skip_unreadable` (then the report lists them under "Records that could not be read").
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"sweep folder {out} does not exist; run `kvcompress sweep --out {out}` first")
    unreadable: list[Path] = []
    records = mark_nothing_compressed(load_records(out, unreadable))
    if unreadable and not skip_unreadable:
        names = ", ".join(str(p) for p in unreadable)
        raise UnreadableRecordsError(
            f"{len(unreadable)} record file(s) cannot be read: {names}; delete them and re-run the same "
            f"`kvcompress sweep --out {out}` to measure them again, or pass --skip-unreadable to report without them")
    if not records:
        raise ValueError(f"{out} holds no sweep records ({out}/records/*.json); run `kvcompress sweep --out {out}` "
                         "first")
    config, baseline = read_record(out / CONFIG_FILE), read_record(out / BASELINE_FILE)
    all_curves = curves(records)
    plots = {name: fn for name, fn in zip(PLOTS, (
        lambda p: plot_failure_curves(all_curves, p), lambda p: plot_quality(records, p),
        lambda p: plot_layer_sensitivity(records, p), lambda p: plot_quality_vs_bits(bits_points(records), p)))}
    written = {name: fn(out / name) for name, fn in plots.items()}
    md = ["# KV-cache compression: breaking-point report", ""]
    md += _settings_lines(config, baseline, records) + [""]
    md += ["Direct reconstruction runs each spec's codecs over the captured keys and values with no "
           "full-precision window (the spec's sinks kept): every other token is decoded from stored codes. "
           "`codec ratio` is fp16 bytes / stored bytes of that cache; `eval ratio` is that of the real cache (with "
           "its window) at the end of the evaluation text. `attn err` is the relative error of the attention output "
           "with the real queries when both K and V are compressed. PPL change, KL and top-1 are decode-faithful "
           "(each chunk reads the compressed cache of all earlier ones), against the uncompressed model on the "
           "same chunks.", ""]
    lines = findings(records, all_curves)
    if lines:
        md += ["## Findings", ""] + [f"- {line}" for line in lines] + [""]
    header, rows = summary_rows(records)
    md += ["## Summary", "", _table(header, rows), ""]
    notes = [f"- {r['label']}: {note}" for r in ok_records(records)
             for note in (r["reconstruction"].get("note"), r.get("eval_skipped")) if note]
    if notes:
        md += ["Notes:", ""] + notes + [""]
    if written["failure_curves.png"]:
        md += ["## Failure curves", "", "![failure curves](failure_curves.png)", ""]
    if all_curves:
        header, rows = boundary_rows(all_curves)
        md += ["## Failure boundaries", "",
               "First setting, from the mildest down, whose mean cosine similarity falls below each threshold "
               "(its cosine in brackets); `none` when no measured setting does (the measured range in brackets).", "",
               _table(header, rows), ""]
    header, rows = zone_rows(records)
    md += ["## Safe zones", "", "Specs grouped by decode-faithful perplexity change (highest compression first).",
           "", _table(header, rows), ""]
    if written["quality_vs_ratio.png"]:
        md += ["## Quality vs compression", "", "![quality vs ratio](quality_vs_ratio.png)", ""]
    bits = bits_points(records)
    if bits:
        md += ["## Quality per bit", "",
               "KIVI-style uniform quantization beside the codebook family (both K and V coded by the family; "
               "bits per compressed value count codes, scales and zero points; window and sinks apart).", "",
               _table(["spec", "family", "bits/value", "KL", "PPL change"],
                      [[p["label"], p["family"], f"{p['bits']:.2f}", _f(p["kl"]), _pct(p["ppl_change"])] for p in bits]),
               ""]
        if written["quality_vs_bits.png"]:
            md += ["![quality vs bits](quality_vs_bits.png)", ""]
    if written["layer_sensitivity.png"]:
        md += ["## Per-layer sensitivity", "", "![layer sensitivity](layer_sensitivity.png)", ""]
    header, rows, notes = passkey_rows(records, baseline)
    if rows:
        md += ["## Passkey retrieval", "",
               "Accuracy per prompt length (exact match of the 5-digit key), uncompressed in brackets.", "",
               _table(header, rows), ""] + [f"**{note}**" for note in notes] + ([""] if notes else [])
        if not notes:
            md += ["The uncompressed model finds every key at every measured length.", ""]
    header, rows = agreement_rows(records)
    if rows:
        md += ["## Generation agreement", "", "Greedy continuations with the compressed cache vs the uncompressed "
               "one, same prompts.", "", _table(header, rows), ""]
    errors = [r for r in records if r.get("status") != "ok"]
    if errors:
        md += ["## Specs that failed", ""] + [f"- **{r['label']}**: {r.get('error')}" for r in errors] + [""]
    if unreadable:
        md += ["## Records that could not be read", ""] + [f"- {p.name}" for p in unreadable] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def write_kinds_report(out_dir: str | os.PathLike, kinds: list[str]) -> Path:
    """`OUT/report.md` for sweeps of several kinds of text (`OUT/<kind>/`, each with its own report):
    per spec, decode-faithful KL and PPL change on every kind side by side, and links to the reports."""
    out = Path(out_dir)
    by_kind = {kind: {r["label"]: r for r in ok_records(load_records(out / kind))} for kind in kinds}
    labels = list(dict.fromkeys(label for records in by_kind.values() for label in records))
    header = ["spec"] + [f"KL on {k}" for k in kinds] + [f"PPL change on {k}" for k in kinds]
    rows = []
    for label in labels:
        evals = [by_kind[k].get(label, {}).get("eval") for k in kinds]
        if not any(evals):
            continue
        rows.append([label] + [_f(e["kl"]) if e else "n/a" for e in evals]
                    + [_pct(e["ppl_change"]) if e else "n/a" for e in evals])
    md = ["# kvcompress analysis on every kind of text", "",
          "The same sweep on the report part of each kind of text (see `kvcompress.corpus`); each kind's "
          "full report: " + ", ".join(f"[{k}]({k}/report.md)" for k in kinds) + ".", "",
          _table(header, rows), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
