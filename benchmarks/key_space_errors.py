"""Pre- against post-RoPE codebook keys on the selection part of every kind of text (a proxy).

The bitsN presets code keys pre-RoPE on calibrated principal directions, which the CPU kernel
must decode through a (n, D) matrix and re-rotate at every step; keys coded post-RoPE are scored
from the codes with the query projected once per step. This compares, per kind and bit width,
the key half of candidate codecs (the value half is bitsN's in every candidate) with the
reconstruction proxy of `benchmarks/kinds_codec_errors.py`: one float32 forward pass over the
first `--tokens` tokens of each selection part, every token after the sinks coded, the relative
error of the attention output with the real queries when only K is decoded (root mean square
over layers). Candidates: `bitsN` (pre-RoPE PCA), `pca-post` (the same codec on post-RoPE keys,
calibrated on post-RoPE keys), `rot-post` / `crot-post` (randomized Hadamard codebook, plain /
centred). Reads only selection parts; it chooses nothing.

    nice -n 10 python benchmarks/key_space_errors.py --bits 4,3,2 --out runs/key_space_errors.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kinds_codec_errors import attention_errors


def candidates(bits: int) -> dict[str, dict]:
    """label -> spec dict of the key codecs compared at `bits` (values: bitsN's rotated codebook)."""
    value = {"method": "rotated+codebook", "bits": bits}
    keys = {
        f"bits{bits}": {"method": "pca+codebook", "bits": bits, "key_space": "pre_rope"},
        "pca-post": {"method": "pca+codebook", "bits": bits},
        "rot-post": {"method": "rotated+codebook", "bits": bits},
        "crot-post": {"method": "rotated+codebook", "bits": bits, "center": True},
    }
    return {label: {"name": label, "key": key, "value": value} for label, key in keys.items()}


def main(argv: list[str] | None = None) -> int:
    from kvcompress.corpus import KINDS, parse_kinds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of kinds of text")
    parser.add_argument("--bits", default="4,3,2", help="comma list of code widths")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of each selection part")
    parser.add_argument("--out", default="runs/key_space_errors.json", help="JSON results (resumed per kind and width)")
    args = parser.parse_args(argv)
    try:
        widths = [int(b) for b in args.bits.split(",")]
    except ValueError:
        widths = []
    if not widths or any(b not in (2, 3, 4) for b in widths):
        print(f"key_space_errors: --bits {args.bits}: give a comma list of 2, 3 and 4", file=sys.stderr)
        return 2
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as err:
        print(f"key_space_errors: {err}", file=sys.stderr)
        return 2

    from kvcompress import load_model
    from kvcompress.calibration import artifact_for
    from kvcompress.corpus import corpus_tokens
    from kvcompress.measure.reconstruction import capture_states, reconstruct
    from kvcompress.presets import load_spec

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype=torch.float32)
    artifact = artifact_for(model, load_spec("bits4"))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for kind in kinds:
        todo = [b for b in widths if f"{kind}/{b}" not in results]
        if not todo:
            continue
        capture = capture_states(model, corpus_tokens(tokenizer, "selection", args.tokens, kind=kind))
        for bits in todo:
            row = {}
            for label, spec in candidates(bits).items():
                pairs, memory = reconstruct(model, load_spec(spec), capture, artifact=artifact)
                layers = attention_errors(capture, pairs)
                row[label] = {"stored_bytes": memory["stored_bytes"], "K_layer": [x["K_layer"] for x in layers]}
            results[f"{kind}/{bits}"] = row
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results))
    print("| kind | bits | " + " | ".join(["pre-RoPE (bitsN)", "pca-post", "rot-post", "crot-post"])
          + " | stored bytes (all equal) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, row in results.items():
        kind, bits = key.split("/")
        rms = {label: (sum(x * x for x in r["K_layer"]) / len(r["K_layer"])) ** 0.5 for label, r in row.items()}
        stored = {r["stored_bytes"] for r in row.values()}
        print(f"| {kind} | {bits} | " + " | ".join(f"{v:.4f}" for v in rms.values())
              + f" | {', '.join(f'{s:,}' for s in sorted(stored))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
