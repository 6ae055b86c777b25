"""Measure the low-rank family on the embedded model: K ranks pre-/post-RoPE, V ranks, +/- int4.

Runs decode-faithful evaluation (see `kvcompress.measure.evaluate`) on held-out text for:
  K rank r (pre-RoPE and post-RoPE), coefficients in fp16 or int4, V full;
  V rank r, coefficients in fp16 or int4, K full;
for each r in --ranks, plus the int4 preset for reference. Writes every result as JSON
and a markdown table (ratio, PPL change, KL, top-1) to --out.

    python benchmarks/lowrank_table.py --tokens 1024 --out runs/lowrank

This script does not calibrate anything itself: the embedded model's artifact is built on
first use (or pass --artifact DIR from `kvcompress calibrate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_specs(ranks: list[int], window: int, sinks: int, block: int, int4: dict) -> list[tuple[str, dict]]:
    base = {"window": window, "sinks": sinks, "block_size": block}
    full = {"method": "none"}
    specs = []
    for rank in ranks:
        for key_space in ("pre_rope", "post_rope"):
            for quant in (None, int4):
                key = {"method": "lowrank+quant" if quant else "lowrank", "rank": rank, "key_space": key_space,
                       **(quant or {})}
                label = f"K rank {rank} {'pre' if key_space == 'pre_rope' else 'post'}-RoPE" + (" +int4" if quant else "")
                specs.append((label, {"key": key, "value": full, **base}))
    for rank in ranks:
        for quant in (None, int4):
            value = {"method": "lowrank+quant" if quant else "lowrank", "rank": rank, **(quant or {})}
            specs.append((f"V rank {rank}" + (" +int4" if quant else ""), {"key": full, "value": value, **base}))
    return specs


def codec_ratio(spec, artifact, config) -> dict[str, float]:
    """fp16 bytes / stored bytes of one block of K and of V through layer 0's codecs (real encoded sizes)."""
    import torch

    from kvcompress.codecs import stored_nbytes
    from kvcompress.cache.build import build_codec

    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    block = torch.randn(1, heads, spec.block_size, dim)  # (B, H, T, D)
    out = {}
    for which, tensor_spec, kind in (("key", spec.key, "key_post"), ("value", spec.value, "value")):
        if tensor_spec.method == "none":
            out[which] = 1.0  # counted as fp16, the reference
            continue
        codec = build_codec(tensor_spec, layer_idx=0, kind=kind, artifact=artifact)
        out[which] = block.numel() * 2 / stored_nbytes(codec.encode(block))
    return out


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| setting | spec | K ratio | V ratio | cache ratio | PPL change | mean KL | top-1 agree |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | `{row['describe']}` | {row['codec_ratio']['key']:.2f}x | "
                     f"{row['codec_ratio']['value']:.2f}x | {row['compression_ratio']:.2f}x | "
                     f"{row['ppl_change']:+.1%} | {row['kl']:.4f} | {row['top1']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="held-out evaluation tokens")
    parser.add_argument("--out", default="runs/lowrank", help="folder for results.json and table.md")
    parser.add_argument("--ranks", type=int, nargs="+", default=[48, 32, 16], help="ranks to measure")
    parser.add_argument("--window", type=int, default=128, help="full-precision window (tokens)")
    parser.add_argument("--sinks", type=int, default=4, help="full-precision first tokens")
    parser.add_argument("--block-size", type=int, default=64,
                        help="tokens compressed together (also the evaluation chunk length)")
    parser.add_argument("--int4-axis", default="channel", choices=["channel", "token"],
                        help="statistics of the int4 coefficients: per coefficient over 32 tokens, or per token "
                             "over groups of 16 coefficients")
    parser.add_argument("--artifact", default=None, help="calibration artifact folder (default: the embedded "
                                                         "model's, built on first use)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per evaluation")
    args = parser.parse_args(argv)

    from kvcompress.calibration import resolve_artifact
    from kvcompress.corpus import corpus_tokens
    from kvcompress.measure.evaluate import decode_faithful_eval
    from kvcompress.models import load_model, model_id
    from kvcompress.spec import load_spec

    model, tokenizer = load_model(device=args.device)
    artifact = resolve_artifact(model, args.artifact)
    ids = corpus_tokens(tokenizer, part="report", n_tokens=args.tokens)
    int4 = {"bits": 4, "axis": args.int4_axis, "group_size": 32 if args.int4_axis == "channel" else 16}
    specs = build_specs(args.ranks, args.window, args.sinks, args.block_size, int4)
    specs.append(("int4 preset (reference)", {**load_spec("int4").to_dict(), "window": args.window,
                                              "sinks": args.sinks, "block_size": args.block_size, "name": None}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for label, spec in specs:
        result = decode_faithful_eval(model, ids, spec, progress=args.progress, artifact=artifact)
        resolved = load_spec(spec)
        row = {"label": label, "describe": f"K {resolved.key.describe()}, V {resolved.value.describe()}",
               "codec_ratio": codec_ratio(resolved, artifact, model.config), **result.to_dict()}
        rows.append(row)
        (out / "partial.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"{label:28s} ratio {row['compression_ratio']:5.2f}x  PPL {row['ppl_change']:+7.2%}  "
              f"KL {row['kl']:.4f}  top-1 {row['top1']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    record = {"model": model_id(model), "tokens": args.tokens, "artifact": artifact.metadata,
              "command": "python benchmarks/lowrank_table.py " + " ".join(sys.argv[1:] if argv is None else argv), "results": rows,
              "seconds": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    header = (f"Decode-faithful evaluation, {model_id(model)}, {args.tokens} held-out tokens, window {args.window}, "
              f"sinks {args.sinks}, blocks of {args.block_size}; artifact: {artifact.metadata['tokens']} calibration "
              f"tokens ({artifact.metadata['corpus']}). K/V ratio: fp16 bytes / stored bytes of the compressed "
              "tensor's codec (a full tensor counts as fp16). Cache ratio: fp16 bytes / all stored bytes at the end "
              "of the text, including sinks, window and any full tensor, which are kept in the model dtype (float32 "
              "here, hence ratios below 1 when only one tensor is compressed).")
    (out / "table.md").write_text(markdown(rows, header))
    (out / "partial.json").unlink()
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
