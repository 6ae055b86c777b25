"""Quality per stored bit: KIVI-style int4/int3/int2 beside the rotated-codebook bits4/bits3/bits2.

For every spec, runs decode-faithful evaluation (`kvcompress.measure.evaluate.decode_faithful_eval`, the
same code as `kvcompress eval`, the uncompressed baseline in the same run) and prints a markdown
table of bits per compressed value (8 x stored bytes of compressed tokens / their K and V
values, from the cache's memory report; window and sinks apart), KL, perplexity change and
top-1 agreement. By default it reads the evaluation (report) part of the embedded corpus, as
`kvcompress eval` does:

    OMP_NUM_THREADS=1 python benchmarks/bits_table.py --tokens 2048 --dtype bfloat16

This script does not choose anything: presets are chosen by select_bits_presets.py on other text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SPECS = "int4,int3,int2,bits4,bits3,bits2"


def measure(specs: list, *, tokens: int, dtype: str, part: str = "report", offset: int = 0,
            labels: list[str] | None = None) -> list[dict]:
    """One row per spec: label, spec description, bits per value, KL, PPL change, top-1."""
    import torch

    from kvcompress import load_model
    from kvcompress.cache.bits import report_bits_per_value
    from kvcompress.corpus import corpus_tokens
    from kvcompress.measure.evaluate import decode_faithful_eval
    from kvcompress.presets import load_spec

    model, tok = load_model(dtype=getattr(torch, dtype))
    ids = corpus_tokens(tok, part, n_tokens=tokens, offset=offset)
    store: dict = {}
    rows = []
    for i, spec_text in enumerate(specs):
        spec = load_spec(spec_text)
        captured = {}

        def factory(model, spec, captured=captured):
            from kvcompress import CompressedCache

            captured["cache"] = CompressedCache(model, spec)
            return captured["cache"]

        result = decode_faithful_eval(model, ids, spec, progress=False, cache_factory=factory, baseline_store=store)
        rows.append({"label": labels[i] if labels else spec_text, "describe": spec.describe(),
                     "bits_per_value": report_bits_per_value(captured["cache"].memory_report()),
                     "kl": result.kl, "ppl_change": result.ppl_change, "top1": result.top1,
                     "spec": spec.to_dict()})
        print(f"  {rows[-1]['label']}: {rows[-1]['bits_per_value']:.3f} bits/value, KL {result.kl:.4f}",
              file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| spec | setting | bits per value | KL | PPL change | top-1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['describe']} | {r['bits_per_value']:.2f} | {r['kl']:.4f} | "
                     f"{r['ppl_change']:+.2%} | {r['top1']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=DEFAULT_SPECS, help="comma list of presets or spec files")
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rows = measure([s.strip() for s in args.specs.split(",") if s.strip()], tokens=args.tokens, dtype=args.dtype)
    print(f"Embedded model, {args.dtype}, {args.tokens} tokens of the report part (text no calibration or selection read), decode-faithful chunks:\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
