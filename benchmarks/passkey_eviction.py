"""Passkey with the needle where a naive eviction policy drops it: does each policy keep the needle?

Each case hides a 5-digit key at a depth of report-part filler (`kvcompress.measure.tasks`); the
prompt is prefilled into a cache that evicts part of it, and the model answers greedily. At keep
fractions below 1 - depth, StreamingLLM (sinks + most recent tokens) drops a needle at that depth
by construction; an attention-based policy keeps it only if the prompt's last queries attend to it.
Printed per policy and keep fraction: accuracy, and the mean fraction of the needle's tokens the
eviction kept (over layers and KV heads). The uncompressed model runs the same cases first.

    python benchmarks/passkey_eviction.py --lengths 1024 --depths 0.2,0.4,0.6 --keep 0.25,0.5 --threads 1

The codecs are off (method "none") unless --codec names a preset whose codecs to compose with.
`--specs prompt-6x,prompt-8x` runs those presets (or spec files) as they are, their own codecs,
window and eviction, after the policy grid (`--policies ''` for the presets alone).
This script does not select anything: it reads the report part, which no selection step reads.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kvcompress import CompressedCache, load_model, load_spec
from kvcompress.io import parse_list
from kvcompress.measure.tasks import passkey_cases, run_passkey
from kvcompress.spec import EVICTION_POLICIES


def _spec(policy: str, keep: float, codec: str | None) -> dict:
    base = load_spec(codec).to_dict() if codec else {"key": {"method": "none"}, "value": {"method": "none"}}
    base.update(name=f"{policy}-{keep:g}" + (f"+{codec}" if codec else ""),
                eviction={"policy": policy, "keep": keep})
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024", help="comma list of prompt lengths in tokens")
    parser.add_argument("--depths", default="0.2,0.4,0.6", help="comma list of needle depths in [0, 1]")
    parser.add_argument("--keep", default="0.25,0.5", help="comma list of keep fractions in (0, 1]")
    parser.add_argument("--policies", default=",".join(EVICTION_POLICIES), help="comma list of policies")
    parser.add_argument("--codec", default=None, help="preset whose codecs compress the kept tokens (default: none)")
    parser.add_argument("--specs", default="",
                        help="comma list of presets or spec files with eviction, run as they are (e.g. prompt-6x)")
    parser.add_argument("--seed", type=int, default=0, help="seed of keys and filler offsets")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        lengths = parse_list(args.lengths, int, "--lengths value")
        depths = parse_list(args.depths, float, "--depths value")
        keeps = parse_list(args.keep, float, "--keep value")
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        specs = [_spec(policy, keep, args.codec) for keep in keeps for policy in policies]
        presets: set[str] = set()  # names of the --specs, whose codecs are their own
        for spec in specs:
            load_spec(spec)  # a bad policy, keep or codec is refused before the model loads
        for name in (n.strip() for n in args.specs.split(",") if n.strip()):
            spec = load_spec(name).to_dict()
            if not spec.get("eviction"):
                raise ValueError(f"--specs {name}: it evicts nothing; name a spec with an eviction section")
            specs.append(spec)
            presets.add(spec["name"])
    except (ValueError, FileNotFoundError) as err:
        print(f"passkey_eviction: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    cases = passkey_cases(tokenizer, lengths, depths, seed=args.seed)
    baseline = run_passkey(model, tokenizer, cases)
    rows = [{"spec": "uncompressed", "accuracy": baseline["accuracy"], "needle_kept": 1.0}]
    print(f"{'spec':28s} accuracy  needle kept   ({len(cases)} cases: lengths {args.lengths}, depths {args.depths})")
    print(f"{'uncompressed':28s} {baseline['accuracy']:8.2f}  {1.0:11.2f}", flush=True)
    for spec in specs:
        policy, keep = spec["eviction"]["policy"], spec["eviction"]["keep"]
        result = run_passkey(model, tokenizer, cases, lambda spec=spec: CompressedCache(model, spec))
        codec = spec["name"] if spec["name"] in presets else args.codec
        rows.append({"spec": spec["name"], "policy": policy, "keep": keep, "codec": codec,
                     "accuracy": result["accuracy"], "needle_kept": result["needle_kept"], "cases": result["cases"]})
        print(f"{spec['name']:28s} {result['accuracy']:8.2f}  {result['needle_kept']:11.2f}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"command": " ".join(sys.argv), "lengths": args.lengths, "depths": args.depths,
                       "seed": args.seed, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
