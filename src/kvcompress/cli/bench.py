"""`kvcompress bench`: decode speed, stored bytes, peak memory and capacity of caches (see `kvcompress.bench`)."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..bench.kinds import DEFAULT_CACHES
from ..bench.render import render_markdown, write_outputs
from ..bench.run import DEFAULT_CONTEXTS, BenchConfig, run_benchmark
from ..extras import require_extra
from ..io import parse_list
from .common import add_model_arguments, check_corpus, check_model_args, check_output_dir, check_tokens

NAME = "bench"
HELP = ("speed and memory of kvcompress presets vs DynamicCache and transformers' QuantizedCache "
        "(JSON, markdown table and PNG plot)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = parse_list(text, int, "integer")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    values = parse_list(text)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one cache name")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for bench.json, bench.md and bench.png")
    parser.add_argument("--contexts", type=_int_list, default=DEFAULT_CONTEXTS,
                        help="comma-separated context lengths: tokens the cache holds after decoding")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds; medians and min-max are over rounds")
    parser.add_argument("--caches", type=_name_list, default=DEFAULT_CACHES,
                        help="comma-separated: dynamic, kvcompress presets or spec files, quanto-<bits>, hqq-<bits> "
                             "(the last two need the optional 'bench' extra; skipped with a note when absent)")
    parser.add_argument("--no-peak", action="store_true",
                        help="skip peak-memory measurement (one fresh process per cache and context)")
    parser.add_argument("--peak-contexts", type=_int_list, default=None,
                        help="comma-separated contexts (among --contexts) whose peak memory is measured "
                             "(default: all)")
    parser.add_argument("--budget-mb", type=float, default=128.0,
                        help="cache memory budget (MiB) for the capacity section; 0 skips it")
    parser.add_argument("--capacity-context", type=int, default=2048,
                        help="context of the largest-batch question")
    parser.add_argument("--capacity-steps", type=int, default=16, help="decode steps of the capacity measurement")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch the capacity section measures")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this run (default: torch's own choice); on a machine shared "
                             "with other jobs, 1 avoids threads waiting on each other")
    parser.add_argument("--corpus", default=None,
                        help="UTF-8 text file for prompts (default: the held-out part of the embedded corpus)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    for option, value in (("--steps", args.steps), ("--repeats", args.repeats),
                          ("--capacity-steps", args.capacity_steps), ("--max-batch", args.max_batch),
                          ("--capacity-context", args.capacity_context)):
        check_tokens(value, option, 1)
    if args.threads is not None:
        check_tokens(args.threads, "--threads", 1)
    check_corpus(args.corpus)
    check_model_args(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # this command's own process (and its peak children, below)
    cfg = BenchConfig(model=args.model, dtype=args.dtype, device=args.device, contexts=args.contexts,
                      steps=args.steps, repeats=args.repeats, caches=args.caches, peak=not args.no_peak,
                      peak_contexts=args.peak_contexts,
                      budget_mb=args.budget_mb, capacity_context=args.capacity_context,
                      capacity_steps=args.capacity_steps, max_batch=args.max_batch, corpus=args.corpus)
    require_extra("report", "matplotlib", "The benchmark's plot")  # before the run, not after it
    result = run_benchmark(cfg)  # progress: the kvcompress.bench loggers, printed by cli.main
    result["command"] = "kvcompress " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    paths = write_outputs(result, args.out)
    print(render_markdown(result))
    for kind, path in paths.items():
        print(f"wrote {kind:8s} {path}")
    return 0
