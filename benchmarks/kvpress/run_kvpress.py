"""kvpress presses under kvcompress's prompt-compression protocol; runs in kvpress's own environment.

Run it with the Python of the environment that `benchmarks/kvpress/setup.sh` creates (kvpress
0.5.5 pins transformers < 5.3, so it is never a kvcompress dependency). It imports nothing from
kvcompress; its input and output are plain JSON:

    input   --ids FILE    written by `benchmarks/side_by_side.py --export-ids FILE`: the token ids
                          (context + continuation + the last target), the protocol (context N,
                          continuation M, chunk 32) and the local folder of the model's weights
    output  --out FILE    JSON lines, one record per row: method, keep fraction, context
                          compression, KL, PPL change, top-1, and the per-position series that
                          `benchmarks/side_by_side.py` turns into bootstrap intervals

The protocol is that of `kvcompress.measure.prompt` (see its docstring): the N context tokens in
one forward inside the press's context manager (kvpress compresses the cache after each attention
layer of that forward, the forward itself attends to every token), then the M continuation tokens
teacher-forced in chunks of 32 at their true positions (`position_ids` N, N + 1, ..., as kvpress's
own pipeline passes them; the cache holds fewer tokens), and the next-token distributions at the M
continuation tokens scored against the uncompressed model (`DynamicCache`, same chunks).

Context compression = context tokens / tokens kept (the mean over layers of what the cache holds
after the prefill); the kept tokens stay in the model's dtype, counted as fp16 as kvpress counts them.

Example (fp32, one thread):
    .venv-kvpress/bin/python benchmarks/kvpress/run_kvpress.py --ids ids.json --out kvpress.jsonl \\
        --presses tova,snapkv --keep 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

PRESSES = {  # name -> (kvpress class name, display name)
    "tova": ("TOVAPress", "TOVA"),
    "snapkv": ("SnapKVPress", "SnapKV"),
    "expected_attention": ("ExpectedAttentionPress", "expected attention"),
    "streaming_llm": ("StreamingLLMPress", "StreamingLLM"),
    "knorm": ("KnormPress", "Knorm"),
}
KEEP = (0.5, 0.3125, 0.2)  # 2x, 3.2x, 5x fewer context tokens


class UsageError(ValueError):
    """A wrong option or input file; printed as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", required=True, help="JSON written by benchmarks/side_by_side.py --export-ids")
    parser.add_argument("--out", required=True, help="JSON-lines file the records are appended to")
    parser.add_argument("--presses", default=",".join(PRESSES),
                        help=f"comma list of presses from {', '.join(PRESSES)}")
    parser.add_argument("--keep", default=",".join(str(k) for k in KEEP),
                        help="comma list of fractions of the context tokens kept, each in (0, 1]")
    parser.add_argument("--model", default=None,
                        help="local transformers folder of the model (default: the one the --ids file names)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[dict, list[str], list[float]]:
    path = Path(args.ids)
    if not path.is_file():
        raise UsageError(f"--ids {args.ids}: no such file; write it with benchmarks/side_by_side.py --export-ids")
    try:
        data = json.loads(path.read_text())
        data["ids"], data["protocol"]["context_tokens"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--ids {args.ids} is not an export of benchmarks/side_by_side.py ({exc}); "
                         "write it again") from None
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    unknown = [p for p in presses if p not in PRESSES]
    if unknown or not presses:
        raise UsageError(f"--presses {args.presses}: unknown {unknown}; choose from {', '.join(PRESSES)}")
    try:
        keep = [float(k) for k in args.keep.split(",") if k.strip()]
    except ValueError:
        raise UsageError(f"--keep {args.keep}: give a comma list of numbers in (0, 1], e.g. 0.5,0.2") from None
    if not keep or any(not 0 < k <= 1 for k in keep):
        raise UsageError(f"--keep {args.keep}: every fraction must be in (0, 1], e.g. 0.5,0.2")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    model = args.model or data.get("model", {}).get("folder")
    if not model or not (Path(model) / "config.json").is_file():
        raise UsageError(f"--model {model}: not a transformers folder with config.json; pass the folder of the "
                         "model's weights (the export names it when the model was loaded from local files)")
    args.model = model
    return data, presses, keep


def make_press(name: str, keep: float):
    import kvpress

    return getattr(kvpress, PRESSES[name][0])(compression_ratio=1.0 - keep)


def run_protocol(model, ids, context: int, chunk: int, press=None):
    """(logits of the continuation chunks (each (T, vocab) float32), tokens held per layer after the prefill)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext():
            model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        held = [cache.get_seq_length(i) for i in range(len(cache))]
        end = ids.shape[1] - 1
        logits = []
        for start in range(context, end, chunk):
            stop = min(start + chunk, end)
            positions = torch.arange(start, stop)[None]
            out = model(input_ids=ids[:, start:stop], past_key_values=cache, position_ids=positions, use_cache=True)
            logits.append(out.logits[0].float())
    return logits, held


def score(logits_b, logits_c, targets) -> dict:
    """Per-position nll of both, KL(baseline || press) and top-1 agreement, and their means."""
    import torch
    import torch.nn.functional as F

    lb = F.log_softmax(torch.cat(logits_b), dim=-1)
    lc = F.log_softmax(torch.cat(logits_c), dim=-1)
    nll_b = -lb.gather(1, targets[:, None])[:, 0]
    nll_c = -lc.gather(1, targets[:, None])[:, 0]
    kl = (lb.exp() * (lb - lc)).sum(-1)
    agree = (lb.argmax(-1) == lc.argmax(-1)).double()
    ppl_b, ppl_c = math.exp(nll_b.double().mean().item()), math.exp(nll_c.double().mean().item())
    return {"ppl_baseline": ppl_b, "ppl": ppl_c, "ppl_change": ppl_c / ppl_b - 1.0, "kl": kl.double().mean().item(),
            "top1": agree.mean().item(),
            "series": {"nll_baseline": nll_b.tolist(), "nll": nll_c.tolist(), "kl": kl.tolist()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        data, presses, keep = check_args(args)
    except UsageError as err:
        print(f"run_kvpress: {err}", file=sys.stderr)
        return 2
    import kvpress  # noqa: F401  (fails here, not after the baseline, outside kvpress's environment)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    protocol = data["protocol"]
    context, chunk = protocol["context_tokens"], protocol["chunk_tokens"]
    ids = torch.tensor([data["ids"]], dtype=torch.long)
    if ids.shape[1] != context + protocol["continuation_tokens"] + 1:
        print(f"run_kvpress: --ids {args.ids}: {ids.shape[1]} ids, expected context + continuation + 1",
              file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    targets = ids[0, context + 1:]
    environment = {"kvpress": _version("kvpress"), "transformers": transformers.__version__,
                   "torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads(),
                   "model": args.model, "ids_sha256": data.get("ids_sha256")}
    start = time.perf_counter()
    base_logits, _ = run_protocol(model, ids, context, chunk)
    base_seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in presses:
        for fraction in keep:
            start = time.perf_counter()
            logits, held = run_protocol(model, ids, context, chunk, make_press(name, fraction))
            figures = score(base_logits, logits, targets)
            kept = sum(held) / len(held)
            record = {"library": "kvpress", "method": f"kvpress {PRESSES[name][1]}", "press": PRESSES[name][0],
                      "keep": fraction, "kept_tokens_per_layer": held, "context_compression": context / kept,
                      "protocol": protocol, "text": data.get("text"), **figures,
                      "baseline_ppl_kvcompress": data.get("baseline", {}).get("ppl"),
                      "seconds": round(time.perf_counter() - start, 2),
                      "baseline_seconds": round(base_seconds, 2), "environment": environment}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{record['method']:<32} keep {fraction:.4g}: context {record['context_compression']:.2f}x, "
                  f"KL {figures['kl']:.4f}, PPL {figures['ppl_change']:+.2%}, top-1 {figures['top1']:.3f} "
                  f"({record['seconds']:.0f} s)")
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
