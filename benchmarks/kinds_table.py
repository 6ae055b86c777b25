"""The baseline table on every kind of text: KIVI-style int4/int3/int2 beside bits4/bits3/bits2.

For every kind (`kvcompress.corpus.KINDS`) and spec, decode-faithful evaluation of the first
`--tokens` tokens of the kind's report part, exactly what

    kvcompress eval --spec SPEC --text KIND --tokens 2048 --dtype bfloat16 --threads 1

measures (same code, same text; the uncompressed logits are computed once per kind and shared,
which changes no figure). Prints a markdown table of bits per compressed value and KL with its
95% interval, then the ratios bits4/int4, bits3/int3, bits2/int2 of KL against issue 24's targets.
Resumable: one JSON per kind and spec under --out, skipped when present with the same key (spec,
text record with its hashes, dtype, library versions, model fingerprint, calibration text).

    nice -n 10 python benchmarks/kinds_table.py --threads 1 --out runs/kinds_table

This script does not choose anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_SPECS = "int4,bits4,int3,bits3,int2,bits2"
# (numerator, denominator, the most KL(numerator) / KL(denominator) issue 24 accepts)
TARGETS = (("bits4", "int4", 0.8), ("bits3", "int3", 0.5), ("bits2", "int2", 0.15))


def measure_kind(model, tokenizer, kind: str, specs: list[str], *, tokens: int, dtype: str, out: Path,
                 model_fp: dict) -> dict[str, dict]:
    """spec -> the eval record of `spec` on `kind`'s report part (read from --out when its key matches)."""
    from kvcompress.calibration import artifact_for
    from kvcompress.corpus import corpus_slice
    from kvcompress.fingerprint import environment
    from kvcompress.io import content_hash, write_json_atomic
    from kvcompress.measure.evaluate import decode_faithful_eval
    from kvcompress.models import model_id
    from kvcompress.presets import load_spec

    text = corpus_slice(tokenizer, "report", n_tokens=tokens, kind=kind)
    store: dict = {}
    records = {}
    for name in specs:
        spec = load_spec(name)
        artifact = artifact_for(model, spec, None)  # calibrated codecs: their figures move with its text
        calibrated_on = None if artifact is None else artifact.metadata.get("tensors_sha256")
        key = content_hash({"spec": spec.to_dict(), "text": text.record, "dtype": dtype, "mode": "chunked",
                            "environment": environment(), "model": model_fp, "calibration": calibrated_on})
        path = out / kind / f"{name}.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            records[name] = saved
            continue
        started = time.perf_counter()
        result = decode_faithful_eval(model, text.ids, spec, progress=False, artifact=artifact,
                                      baseline_store=store)
        records[name] = {"key": key, "model": model_id(model), "spec_name": name, "text": text.record,
                         "mode": "chunked", "dtype": dtype,
                         "command": f"kvcompress eval --spec {name} --text {kind} --tokens {tokens} --dtype {dtype} "
                                    "--threads 1",
                         **result.to_dict()}
        write_json_atomic(path, records[name])
        print(f"  {kind} {name}: {result.bits_per_value:.3f} bits/value, KL {result.kl:.4f} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return records


def markdown(results: dict[str, dict[str, dict]], specs: list[str]) -> str:
    """The KL table (one column per kind) and the ratio table against issue 24's targets."""
    kinds = list(results)
    lines = ["| spec | bits per value | " + " | ".join(f"KL on {k} (95% CI)" for k in kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for name in specs:
        got = [results[k].get(name) for k in kinds]
        bits = sorted({f"{r['bits_per_value']:.2f}" for r in got if r})
        cells = [f"{r['kl']:.4f} ({r['kl_ci95'][0]:.4f} .. {r['kl_ci95'][1]:.4f})" if r else "not measured"
                 for r in got]
        lines.append(f"| {name} | {' / '.join(bits)} | " + " | ".join(cells) + " |")
    lines += ["", "| KL ratio | target | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for num, den, target in TARGETS:
        if num not in specs or den not in specs:
            continue
        cells = []
        for k in kinds:
            if num not in results[k] or den not in results[k]:
                cells.append("not measured")
                continue
            ratio = results[k][num]["kl"] / results[k][den]["kl"]
            cells.append(f"{ratio:.2f}x {'met' if ratio <= target else 'NOT met'}")
        lines.append(f"| {num} / {den} | <= {target:g}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from kvcompress.corpus import KINDS, parse_kinds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=DEFAULT_SPECS, help="comma list of presets")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of kinds of text among {', '.join(KINDS)}")
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation tokens of each report part")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--out", default="runs/kinds_table", help="folder of the per-kind, per-spec JSON records")
    args = parser.parse_args(argv)
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as err:
        parser.exit(2, f"kinds_table.py: {err}\n")
    if args.tokens < 256:
        parser.exit(2, f"kinds_table.py: --tokens {args.tokens} is too few; pass --tokens 256 or more\n")

    import torch

    from kvcompress import load_model
    from kvcompress.fingerprint import model_fingerprint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=getattr(torch, args.dtype))
    model_fp = model_fingerprint(model)
    results = {kind: measure_kind(model, tokenizer, kind, specs, tokens=args.tokens, dtype=args.dtype,
                                  out=Path(args.out), model_fp=model_fp) for kind in kinds}
    print(f"Embedded model, {args.dtype}, decode-faithful `kvcompress eval`, first {args.tokens} tokens of each "
          "kind's report part, window 128 (the presets'):\n")
    print(markdown(results, specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
