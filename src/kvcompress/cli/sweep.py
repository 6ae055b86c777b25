"""`kvcompress sweep`: measure many specs, one JSON record each, resumable (see `kvcompress.experiments.sweep`)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..experiments.grid import parse_specs
from ..experiments.settings import TASKS, SweepSettings
from ..experiments.sweep import run_sweep
from ..io import parse_list
from .common import (UserError, add_corpus_arguments, add_model_arguments, add_ray_arguments, check_artifact_dir,
                     check_context_tokens, check_eval_tokens, check_model_args, check_output_dir, check_text,
                     check_tokens, load_model_from_args, ray_executor, ray_options_from_args)

NAME = "sweep"
HELP = "direct reconstruction, decode-faithful quality and tasks for many specs (one JSON record per spec)"


def _ints(text: str) -> tuple[int, ...]:
    return parse_list(text, int, "integer")


def _floats(text: str) -> tuple[float, ...]:
    return parse_list(text, float, "number")


def _tasks(text: str) -> tuple[str, ...]:
    names = tuple(x for x in parse_list(text) if x != "none")
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {list(TASKS)} or 'none'")
    return names


def add_sweep_arguments(parser: argparse.ArgumentParser, defaults: SweepSettings, out_default: str | None = None,
                        each_kind: bool = False) -> None:
    """Flags shared by `sweep` and `analyze`; their defaults come from `defaults` (--out is required
    unless `out_default` is given; `each_kind`: `--text all` runs every kind in turn)."""
    parser.add_argument("--out", required=out_default is None, default=out_default,
                        help="sweep folder: records/, config.json, baseline.json, report")
    parser.add_argument("--tokens", type=int, default=defaults.eval_tokens,
                        help="tokens of decode-faithful evaluation per spec (with --context: continuation tokens)")
    parser.add_argument("--context", type=int, default=defaults.context_tokens, metavar="N",
                        help="prompt compression instead of decode-faithful evaluation, as `kvcompress eval "
                             "--context N`: N tokens prefilled at once, then --tokens teacher-forced and scored")
    parser.add_argument("--recon-tokens", type=int, default=defaults.recon_tokens,
                        help="tokens captured for direct reconstruction")
    parser.add_argument("--tasks", type=_tasks, default=defaults.tasks,
                        help=f"comma list of tasks from {list(TASKS)}, or 'none'")
    parser.add_argument("--passkey-lengths", type=_ints, default=defaults.passkey_lengths,
                        help="comma list of passkey prompt lengths in tokens")
    parser.add_argument("--passkey-depths", type=_floats, default=defaults.passkey_depths,
                        help="comma list of needle depths (fractions of the filler)")
    parser.add_argument("--passkey-format", choices=["plain", "chat"], default=defaults.passkey_format,
                        help="passkey prompt format (plain works best on SmolLM2-135M-Instruct)")
    parser.add_argument("--agreement-prompts", type=int, default=defaults.agreement_prompts,
                        help="held-out prompts for generation agreement")
    parser.add_argument("--agreement-prompt-tokens", type=int, default=defaults.agreement_prompt_tokens,
                        help="tokens per agreement prompt")
    parser.add_argument("--agreement-new-tokens", type=int, default=defaults.agreement_new_tokens,
                        help="greedy tokens generated per agreement prompt")
    parser.add_argument("--agreement-dataset", default=defaults.agreement_dataset,
                        help="a `datasets` name whose 'text' column gives the agreement prompts (needs the "
                             "datasets library and hub access)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of passkey keys and filler offsets")
    parser.add_argument("--artifact", default=defaults.artifact,
                        help="calibration artifact folder for low-rank specs (default: the embedded model's, "
                             "built on first use)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this command (default: torch's own choice)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per evaluation")
    add_model_arguments(parser)
    add_corpus_arguments(parser, each=each_kind)
    add_ray_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    return SweepSettings(model=args.model, dtype=args.dtype, device=str(args.device), corpus=args.corpus,
                         text=None if args.text == "all" else args.text,
                         eval_tokens=args.tokens, recon_tokens=args.recon_tokens, tasks=args.tasks,
                         passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
                         passkey_format=args.passkey_format, seed=args.seed,
                         agreement_prompts=args.agreement_prompts,
                         agreement_prompt_tokens=args.agreement_prompt_tokens,
                         agreement_new_tokens=args.agreement_new_tokens, agreement_dataset=args.agreement_dataset,
                         artifact=args.artifact, context_tokens=args.context)


def check_sweep_args(args: argparse.Namespace, entries) -> None:
    """Everything `sweep` and `analyze` can check before loading the model."""
    check_output_dir(args.out, "--out")
    for entry in entries:
        if entry.eval and args.context is not None:
            check_context_tokens(entry.spec, args.context, label=f"spec {entry.label}")
        elif entry.eval:
            check_eval_tokens(entry.spec, args.tokens, label=f"spec {entry.label}")
    if args.context is not None:
        check_tokens(args.tokens, "--tokens", 1, " (continuation tokens after --context)")
    check_tokens(args.recon_tokens, "--recon-tokens", 2)
    if args.tasks and "agreement" in args.tasks:
        check_tokens(args.agreement_prompts, "--agreement-prompts", 2)
        check_tokens(args.agreement_prompt_tokens, "--agreement-prompt-tokens", 2)
        check_tokens(args.agreement_new_tokens, "--agreement-new-tokens", 2)
    if args.tasks and "passkey" in args.tasks and (not args.passkey_lengths or min(args.passkey_lengths) < 1):
        raise UserError(f"--passkey-lengths {','.join(map(str, args.passkey_lengths)) or '(none)'}: each length must be "
                        "a positive number of tokens, e.g. --passkey-lengths 256,512")
    if args.threads is not None:
        check_tokens(args.threads, "--threads", 1)
    check_artifact_dir(args.artifact)
    check_text(args)
    check_model_args(args)


def interrupted(args: argparse.Namespace) -> str:
    return (f"every record finished before the interruption is saved in {args.out}/records; run the same "
            "command again to resume")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        check_tokens(args.threads, "--threads", 1)
        torch.set_num_threads(args.threads)


def command_line() -> str:
    return "kvcompress " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--specs", required=True,
                        help="comma list of preset names / spec files, or one grid file (YAML/JSON with 'specs' "
                             "and/or 'grids'; see kvcompress.experiments.sweep)")
    add_sweep_arguments(parser, SweepSettings())


def run(args: argparse.Namespace) -> int:
    try:
        entries = parse_specs(args.specs)
    except ValueError as err:
        raise UserError(f"--specs {args.specs}: {err}") from None
    check_sweep_args(args, entries)
    settings = settings_from_args(args)
    ray = ray_options_from_args(args)
    apply_threads(args)
    wall, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load_model_from_args(args) if ray is not None else (None, None)  # else run_sweep loads it
    records = run_sweep(entries, args.out, settings, model=model, tokenizer=tokenizer, progress=args.progress,
                        command=command_line(), executor=ray_executor(ray, args, model))
    failed = [r["label"] for r in records if r.get("status") != "ok"]
    print(f"{len(records)} records in {args.out}/records ({len(failed)} failed{': ' + ', '.join(failed) if failed else ''}); "
          f"{time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU. "
          f"Next: kvcompress report {args.out}")
    return 1 if failed else 0
