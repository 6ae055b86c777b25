"""`kvcompress analyze`: the default breaking-point sweep plus its report (see `kvcompress.experiments.analysis`)."""

from __future__ import annotations

import argparse
import time

from ..corpus import ALL_KINDS, KINDS
from ..experiments.analysis import DEFAULT_SETTINGS, analyze, analyze_kinds, default_entries
from .common import load_model_from_args, ray_executor, ray_options_from_args
from .sweep import add_sweep_arguments, apply_threads, check_sweep_args, command_line, settings_from_args
from .sweep import interrupted  # noqa: F401  (what a Ctrl-C leaves: the same as sweep's)

NAME = "analyze"
HELP = ("breaking-point analysis of the default specs (quantization, Hadamard, low rank) on one model: sweep "
        "then report (--text all: on every kind of text); resumes if interrupted")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sweep_arguments(parser, DEFAULT_SETTINGS, out_default="runs/analysis", each_kind=True)


def run(args: argparse.Namespace) -> int:
    check_sweep_args(args, default_entries())
    ray = ray_options_from_args(args)
    apply_threads(args)
    wall, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load_model_from_args(args) if ray is not None else (None, None)  # else the sweep loads it
    options = {"entries": default_entries(), "progress": args.progress, "command": command_line(), "model": model,
               "tokenizer": tokenizer, "executor": ray_executor(ray, args, model)}
    if args.text == ALL_KINDS:
        path = analyze_kinds(args.out, settings_from_args(args), list(KINDS), **options)
    else:
        path = analyze(args.out, settings_from_args(args), **options)
    print(f"wrote {path}; {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    return 0
