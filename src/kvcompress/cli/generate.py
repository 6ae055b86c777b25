"""`kvcompress generate`: greedy generation with a compressed cache for a JSONL file of prompts (see
`kvcompress.generate`)."""

from __future__ import annotations

import argparse

from ..generate import GenerateSettings, generate_file
from .common import (add_model_arguments, add_ray_arguments, check_artifact_dir, check_input_file, check_model_args,
                     check_output_file, check_positive, check_spec, ray_executor, ray_options_from_args)

NAME = "generate"
HELP = ("greedy generation with a compressed cache for every prompt of a JSONL file; one JSON line per prompt "
        "(text, stored bytes, ratio) and a summary line; resumes if interrupted")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help='JSONL file, one {"id": ..., "prompt": ...} per line')
    parser.add_argument("--output", required=True,
                        help="JSONL file of the results, one line per prompt; a rerun skips the prompts with an 'ok' "
                             "line of the same id, text and settings there and redoes the others (a file written with "
                             "another spec, model or --max-new-tokens is refused)")
    parser.add_argument("--spec", default="int4", help="preset name or .json/.yaml spec file")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    parser.add_argument("--artifact", default=None,
                        help="calibration artifact folder for low-rank specs (default: the embedded model's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in this process (default: torch's own choice)")
    add_model_arguments(parser)
    add_ray_arguments(parser, unit="prompt")


def interrupted(args: argparse.Namespace) -> str:
    from ..generate import read_output

    results = [line for line in read_output(args.output) if line.get("status") in ("ok", "error")]
    ok = sum(line["status"] == "ok" for line in results)
    return (f"{args.output} holds {ok} generated prompt(s) and {len(results) - ok} error line(s); run the same "
            "command again to resume")


def run(args: argparse.Namespace) -> int:
    check_input_file(args.input, "--input", "JSONL file")
    check_output_file(args.output, "--output")
    check_spec(args.spec)
    check_positive(args.max_new_tokens, "--max-new-tokens")
    check_artifact_dir(args.artifact)
    check_model_args(args)
    ray = ray_options_from_args(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = GenerateSettings(spec=args.spec, max_new_tokens=args.max_new_tokens, model=args.model,
                                dtype=args.dtype, device=str(args.device), artifact=args.artifact)
    summary = generate_file(args.input, args.output, settings, executor=ray_executor(ray, args, model=None))
    print(f"{summary['ok']} of {summary['prompts']} prompts generated ({summary['errors']} errors, "
          f"{summary['skipped']} already done); ratio {summary['ratio']:.2f}x; {summary['wall_s']:.0f} s. "
          f"Output: {args.output}")
    return 1 if summary["errors"] else 0
