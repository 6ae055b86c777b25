"""Whole-cache ratio of prompt specs in bfloat16, measured as select_prompt_presets.py sizes its candidates.

For each spec and kind of text: the model in bfloat16, a 1536-token prefill of the first 2049 tokens of
the kind's selection part into the spec's cache, and fp16 bytes of those tokens / every byte the cache
stores (`tuning.evaluators.make_ratio_evaluator`, the evaluator the choice uses); a spec's ratio is its
lowest over the kinds, and a floor is met when that is at least the floor. Prints one markdown row per
spec; exit 1 if a spec misses the floor given for it.

    OMP_NUM_THREADS=1 python benchmarks/prompt_floors.py --threads 1 \\
        --specs prompt-6x=6,docs/prompt_kinds/selection_segments/specs/prompt-6x-expected.json=6

This script measures sizes only, no quality, and chooses nothing.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", required=True, help="comma list of SPEC=FLOOR (a preset name or spec file)")
    parser.add_argument("--kinds", default="docs,code,plays", help="comma list of kinds whose selection part is read")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    from kvcompress.corpus import corpus_slice, parse_kinds
    from kvcompress.presets import load_spec

    try:  # before any model loads: a wrong value is one line, exit 2
        floors = {name: float(floor) for name, floor in (item.rsplit("=", 1) for item in args.specs.split(","))}
    except ValueError:
        print(f"prompt_floors: --specs {args.specs}: a comma list of SPEC=FLOOR, e.g. prompt-6x=6", file=sys.stderr)
        return 2
    try:
        kinds = parse_kinds(args.kinds)
        specs = {name: load_spec(name) for name in floors}
    except (ValueError, OSError) as err:
        print(f"prompt_floors: {err}", file=sys.stderr)
        return 2

    import torch

    from kvcompress.fingerprint import text_fingerprint
    from kvcompress.models import load_model
    from kvcompress.tuning.evaluators import make_ratio_evaluator
    from kvcompress.tuning.preset_selection import text_tokens
    from kvcompress.tuning.state import TuneState

    context, tokens = 1536, 512
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=torch.bfloat16)
    state = TuneState(None)
    sizes = {}
    for kind in kinds:
        text = corpus_slice(tokenizer, "selection", n_tokens=text_tokens(tokens, context), kind=kind)
        sizes[kind] = make_ratio_evaluator(model, text.ids, text_fingerprint(text.ids, text.record), state, context,
                                           kind=f"prompt-ratio-{kind}")
    print("| spec | " + " | ".join(sizes) + " | lowest | floor | met |")
    print("|---" * (len(sizes) + 4) + "|")
    missed = 0
    for name, floor in floors.items():
        spec = specs[name]
        ratios = {kind: size(spec)["ratio"] for kind, size in sizes.items()}
        lowest = min(ratios.values())
        missed += lowest < floor
        print(f"| `{name}` | " + " | ".join(f"{r:.4f}x" for r in ratios.values())
              + f" | {lowest:.4f}x | {floor:g}x | {'yes' if lowest >= floor else 'no'} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
