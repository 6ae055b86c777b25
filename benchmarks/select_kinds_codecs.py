"""Choose the bitsN codecs on the selection parts of every kind of text (issue 24 item 2).

Decode-faithful evaluation (the code of `kvcompress eval`) of the first `--tokens` tokens of each
kind's **selection** part, for candidate specs and calibration artifacts: "all" (the embedded
artifact, calibrated on every kind's calibration part, `calibration.all_kinds_ids`) and "docs"
(calibrated here on the first 4096 tokens of docs' calibration part, the embedded artifact of
before). Candidates: bitsN as it was (K pca by variance, V rotated), K/V splits of the bits,
values on principal directions, keys weighted by query energy, one-byte scales with the saved bits
spent on codes (K and V, K only, V only). Prints KL per kind and each
candidate's ratio to the KIVI reference of its budget. Resumable: one JSON line per (budget,
candidate, kind) in --out; `--only` runs some labels (`LABEL` or `BUDGET:LABEL`).

    nice -n 10 python benchmarks/select_kinds_codecs.py --budgets bits4 --kinds code,plays --out runs/select.jsonl

Reads no report part; it edits no preset (the chosen specs go into `presets` by hand).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REFERENCE = {"bits4": "int4", "bits3": "int3", "bits2": "int2"}


def _cb(bits, **extra):
    return {"method": "rotated+codebook", "bits": bits, **extra}


def _pca(bits, **extra):
    return {"method": "pca+codebook", "bits": bits, **extra}


def candidates(n: int) -> list[tuple[str, str, dict | str]]:
    """(label, artifact "docs" | "all" | "-", spec) for budget bitsN."""
    out = [(f"int{n}", "-", f"int{n}"),
           (f"bits{n} all-cal", "all", {"key": _pca(n, key_space="pre_rope"), "value": _cb(n)}),  # bitsN before
           (f"bits{n} docs-cal", "docs", {"key": _pca(n, key_space="pre_rope"), "value": _cb(n)}),
           ("K-0.5/V+0.5 all-cal", "all", {"key": _pca(n - 0.5, key_space="pre_rope"), "value": _cb(n + 0.5)}),
           ("K+0.5/V-0.5 all-cal", "all", {"key": _pca(n + 0.5, key_space="pre_rope"), "value": _cb(n - 0.5)}),
           ("K+1/V-1 all-cal", "all", {"key": _pca(n + 1, key_space="pre_rope"), "value": _cb(n - 1)}),
           ("K+0.5/V-0.5 docs-cal", "docs", {"key": _pca(n + 0.5, key_space="pre_rope"), "value": _cb(n - 0.5)}),
           ("K pca/V pca all-cal", "all", {"key": _pca(n, key_space="pre_rope"), "value": _pca(n)}),
           ("Kq/V all-cal", "all", {"key": _pca(n, key_space="pre_rope", weight="query"), "value": _cb(n)}),
           ("Kq+0.5/V-0.5 all-cal", "all", {"key": _pca(n + 0.5, key_space="pre_rope", weight="query"),
                                            "value": _cb(n - 0.5)}),
           # one-byte scales (8 bits per vector saved) spent as 1/8 bit per value more codes; keys'
           # directions in each head's own order of importance (cache.build.pca_codebook since then)
           ("Kq+1/8/V+1/8 byte scales", "all", {"key": _pca(n + 0.125, key_space="pre_rope", weight="query",
                                                            scale_bits=8),
                                                "value": _cb(n + 0.125, scale_bits=8)}),
           ("Kq+1/4/V byte scales", "all", {"key": _pca(n + 0.25, key_space="pre_rope", weight="query", scale_bits=8),
                                            "value": _cb(n, scale_bits=8)}),
           ("Kq/V+1/4 byte scales", "all", {"key": _pca(n, key_space="pre_rope", weight="query", scale_bits=8),
                                            "value": _cb(n + 0.25, scale_bits=8)})]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--budgets", default="bits4,bits3,bits2")
    parser.add_argument("--kinds", default="code,plays,docs")
    parser.add_argument("--only", default="", help="comma list of labels to run (default: all)")
    parser.add_argument("--out", default="runs/select_kinds.jsonl")
    parser.add_argument("--extra", action="append", default=[],
                        help="LABEL=SPEC_FILE: one more candidate (e.g. from fisher_bits.py), embedded artifact")
    args = parser.parse_args(argv)
    extra = [(label, "all", path) for label, _, path in (e.partition("=") for e in args.extra)]

    import torch

    from kvcompress import load_model
    from kvcompress.calibration import CalibrationArtifact, calibrate, embedded_artifact
    from kvcompress.corpus import corpus_slice
    from kvcompress.measure.evaluate import decode_faithful_eval
    from kvcompress.presets import load_spec

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=torch.bfloat16)
    artifacts: dict[str, CalibrationArtifact] = {}

    def artifact(name):
        if name == "-":
            return None
        if name not in artifacts:
            if name == "all":  # the embedded artifact: every kind's calibration part
                artifacts[name] = embedded_artifact(model)
            else:  # the docs-only calibration of before: the first 4096 tokens of docs' calibration part
                from kvcompress.corpus import corpus_tokens

                artifacts[name] = calibrate(model, corpus_tokens(tokenizer, "calibration", 4096, kind="docs"),
                                            progress=False)
        return artifacts[name]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["budget"], r["label"], r["kind"], r["tokens"])] = r
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for kind in args.kinds.split(","):
        text = corpus_slice(tokenizer, "selection", n_tokens=args.tokens, kind=kind)
        store: dict = {}
        for budget in args.budgets.split(","):
            for label, art, spec in candidates(int(budget[-1])) + extra:
                if only and f"{budget}:{label}" not in only and label not in only and not label.startswith("int"):
                    continue
                if (budget, label, kind, args.tokens) in done:
                    continue
                t = time.perf_counter()
                res = decode_faithful_eval(model, text.ids, load_spec(spec), progress=False,
                                           artifact=artifact(art), baseline_store=store)
                rec = {"label": label, "budget": budget, "kind": kind, "tokens": args.tokens, "artifact": art,
                       "kl": res.kl, "bits_per_value": res.bits_per_value, "text": text.record,
                       "spec": load_spec(spec).to_dict()}
                done[(budget, label, kind, args.tokens)] = rec
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{kind} {label}: {res.bits_per_value:.3f} b, KL {res.kl:.5f} ({time.perf_counter() - t:.0f} s)",
                      file=sys.stderr, flush=True)
    kinds = args.kinds.split(",")
    for budget in args.budgets.split(","):
        ref = REFERENCE[budget]
        print(f"\n{budget} (selection parts, {args.tokens} tokens): KL and ratio to {ref}")
        print("| candidate | bits | " + " | ".join(kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for label, _, _ in candidates(int(budget[-1])) + extra:
            cells, bits = [], ""
            for k in kinds:
                r, base = done.get((budget, label, k, args.tokens)), done.get((budget, ref, k, args.tokens))
                if not r:
                    cells.append("-")
                    continue
                bits = f"{r['bits_per_value']:.2f}"
                cells.append(f"{r['kl']:.4f} ({r['kl'] / base['kl']:.2f}x)" if base else f"{r['kl']:.4f}")
            print(f"| {label} | {bits} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
