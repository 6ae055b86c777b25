"""`kvcompress tune`: per-layer K/V settings for a quality target, verified on selection text.

The tuning text is the calibration part from `--tune-offset` (8192 in a shipped kind of text, 0 in
a `--corpus` file); the verification text is the first `--verify-tokens` of the selection part; the
report part is never read, so `kvcompress eval --spec OUT` reports on text the tune never saw.
`--context N` tunes under the prompt protocol, with `--windows`, `--keep`, `--policies` crossed;
`--ray` measures the probes and the K/V weight evaluations on Ray actors
(`distributed.RayExecutor`). The method: `kvcompress.tuning.tune` and docs/tuning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..calibration import artifact_for
from .common import (UserError, add_corpus_arguments, add_model_arguments, add_prompt_grid_arguments, add_ray_arguments,
                     check_artifact_dir, check_context_tokens, check_eval_tokens, check_model_args, check_model_context,
                     check_output_file, check_positive, check_text, check_text_protocol, check_tokens,
                     load_model_from_args, prompt_grid_from_args, ray_executor, ray_options_from_args, text_kind,
                     text_label)
from ..io import write_json_atomic

NAME = "tune"
HELP = "find per-layer K/V settings with the highest compression ratio that meet a quality target"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tuning.candidates import FAMILIES
    from ..tuning.tune import (DEFAULT_MAX_TRIES, DEFAULT_REFINE, DEFAULT_TUNE_OFFSET, DEFAULT_TUNE_TOKENS,
                               DEFAULT_VERIFY_TOKENS)

    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-kl", type=float,
                        help="target: mean KL(uncompressed || compressed) on the verification (selection) text")
    target.add_argument("--max-ppl-change", type=float,
                        help="target: relative perplexity change on the verification (selection) text (0.01 = +1%%)")
    parser.add_argument("--out", required=True, help="spec file to write (.json or .yaml)")
    parser.add_argument("--state", default=None,
                        help="file of saved measurements (default: OUT.tune-state.json); an interrupted tune "
                             "resumes from it")
    parser.add_argument("--candidates", default="quant",
                        help=f"comma-separated candidate families among {', '.join(FAMILIES)} (lowrank needs a "
                             "calibration artifact)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TUNE_TOKENS, help="tuning tokens")
    parser.add_argument("--tune-offset", type=int, default=None,
                        help=f"first token of the tuning text in the calibration part (default: {DEFAULT_TUNE_OFFSET} "
                             "in a --text kind, 0 in a --corpus file)")
    parser.add_argument("--verify-tokens", type=int, default=DEFAULT_VERIFY_TOKENS,
                        help="verification tokens (the start of the selection part)")
    parser.add_argument("--window", type=int, default=128, help="full-precision window of the tuned spec")
    parser.add_argument("--sinks", type=int, default=4, help="full-precision first tokens of the tuned spec")
    parser.add_argument("--block-size", type=int, default=32, help="tokens compressed together")
    parser.add_argument("--max-tries", type=int, default=DEFAULT_MAX_TRIES,
                        help="verifications before giving up (each miss tightens the internal target)")
    parser.add_argument("--refine", type=int, default=DEFAULT_REFINE,
                        help="verifications spent after the first spec that meets the target, bisecting the "
                             "allocations between it and a more compressed one that missed, on the selection "
                             "text (0: keep the first that meets)")
    parser.add_argument("--no-tensor-weights", action="store_true",
                        help="do not rescale the K and V proxy costs by their measured KL (for comparison)")
    parser.add_argument("--compare-uniform", action="store_true",
                        help="also find the uniform spec (same setting on every layer) with the highest ratio "
                             "that meets the target on the same selection text, and report both")
    parser.add_argument("--artifact", default=None, help="calibration artifact folder (for lowrank candidates)")
    parser.add_argument("--json", default=None, help="write the full report (all measurements) to this file")
    add_corpus_arguments(parser, selection=True)
    add_prompt_grid_arguments(parser)
    add_model_arguments(parser)
    add_ray_arguments(parser, unit="sensitivity probe (or tensor-weight evaluation)")


def interrupted(args: argparse.Namespace) -> str:
    state = args.state or str(Path(args.out).with_name(Path(args.out).name + ".tune-state.json"))
    return f"the measurements so far are saved in {state}; run the same command again to resume"


def run(args: argparse.Namespace) -> int:
    from ..corpus import CorpusError, corpus_slice
    from ..fingerprint import text_fingerprint
    from ..models import model_id
    from ..spec import CacheSpec
    from ..tuning.state import TuneState
    from ..tuning.evaluators import make_evaluator
    from ..tuning.tune import (DEFAULT_REFINE, DEFAULT_TUNE_OFFSET, TuneError, TuneSettings, best_uniform,
                               parse_candidates, tune, tune_grid)

    metric, target = ("kl", args.max_kl) if args.max_kl is not None else ("ppl_change", args.max_ppl_change)
    check_positive(target, "--max-kl" if metric == "kl" else "--max-ppl-change", "0.01")
    check_output_file(args.out, "--out", (".json", ".yaml", ".yml"))
    out = Path(args.out)
    state_path = Path(args.state) if args.state else out.with_name(out.name + ".tune-state.json")
    check_output_file(str(state_path), "--state")
    check_output_file(args.json, "--json")
    check_tokens(args.window, "--window", 0, " (tokens kept in full precision; e.g. 64)")
    check_tokens(args.sinks, "--sinks", 0, " (first tokens kept in full precision; e.g. 4)")
    check_tokens(args.block_size, "--block-size", 1, " (tokens compressed together; e.g. 32)")
    try:
        base = CacheSpec(window=args.window, sinks=args.sinks, block_size=args.block_size)
    except ValueError as err:
        raise UserError(f"--window {args.window} / --sinks {args.sinks} / --block-size {args.block_size}: "
                        f"{err}") from None
    try:
        settings = parse_candidates(args.candidates)
    except ValueError as err:
        raise UserError(f"--candidates {args.candidates}: {err}") from None
    windows, evictions = prompt_grid_from_args(args)
    try:
        bases = [dataclasses.replace(base, window=w, eviction=e) for w in (windows or (args.window,))
                 for e in (evictions or (None,))]
    except ValueError as err:
        raise UserError(f"--windows {args.windows}: {err}") from None
    if args.compare_uniform and len(bases) > 1:
        raise UserError("--compare-uniform compares with one base spec: give one --windows value and one --keep value")
    for option, value in (("--tokens", args.tokens), ("--verify-tokens", args.verify_tokens)):
        if args.context is None:
            check_tokens(value, option, 64)
            for spec in bases:
                check_eval_tokens(spec, value, option,
                                  label=f"window {spec.window}, sinks {args.sinks}, block {args.block_size}")
        else:
            check_tokens(value, option, 1, " (continuation tokens after --context)")
    for spec in bases if args.context is not None else ():
        check_context_tokens(spec, args.context, label=f"window {spec.window}, sinks {spec.sinks}, "
                                                      f"block {spec.block_size}")
    check_positive(args.max_tries, "--max-tries")
    if args.refine < 0:
        raise UserError(f"--refine must be 0 or more (verifications spent refining), got {args.refine}; e.g. "
                        "--refine 3")
    if args.tune_offset is not None and args.tune_offset < 0:
        raise UserError(f"--tune-offset must be 0 or more (a token of the calibration part), got {args.tune_offset}; "
                        f"pass e.g. --tune-offset {DEFAULT_TUNE_OFFSET}")
    check_artifact_dir(args.artifact)
    check_text(args)
    check_text_protocol(args)
    check_model_args(args)
    ray = ray_options_from_args(args)
    started = time.perf_counter()
    model, tokenizer = load_model_from_args(args)
    offset = args.tune_offset if args.tune_offset is not None else (0 if args.corpus else DEFAULT_TUNE_OFFSET)
    read = (lambda n: n) if args.context is None else (lambda n: args.context + n + 1)
    if args.context is not None:
        check_model_context(model, read(max(args.tokens, args.verify_tokens)), f"--context {args.context}",
                            "each text reads context + tokens + 1", args.context)
    try:
        tune_text = corpus_slice(tokenizer, "calibration", n_tokens=read(args.tokens), path=args.corpus, offset=offset,
                                 kind=text_kind(args))
        verify_text = corpus_slice(tokenizer, "selection", n_tokens=read(args.verify_tokens), path=args.corpus,
                                   kind=text_kind(args))
    except CorpusError as err:
        if args.context is None:
            raise UserError(f"--tokens {args.tokens} / --verify-tokens {args.verify_tokens}: {err}") from None
        raise UserError(f"--context {args.context} (with --tokens {args.tokens} / --verify-tokens "
                        f"{args.verify_tokens}; each text reads context + tokens + 1): {err} A smaller --context "
                        "is the usual fix") from None
    artifact = artifact_for(model, [s for tensor in settings.values() for s in tensor], args.artifact)
    where = text_label(args)
    print(f"tuning {metric} <= {target:g} for {model_id(model)} on {where}: tuning text calibration part tokens "
          f"{tune_text.record['tokens']}, verification text selection part tokens {verify_text.record['tokens']}; "
          f"state {state_path}", flush=True)

    state = TuneState(state_path)
    verify_fp = text_fingerprint(verify_text.ids, verify_text.record)
    verify = make_evaluator(model, verify_text.ids, "verify-eval", verify_fp, state, artifact=artifact,
                            context=args.context)
    tuning = TuneSettings(target, metric, candidates=settings, max_tries=args.max_tries,
                          weight_tensors=not args.no_tensor_weights, context=args.context, refine=args.refine)
    options = {"state": state, "artifact": artifact, "verify": verify, "executor": ray_executor(ray, args, model)}
    grid = None
    try:
        if len(bases) == 1:
            result = tune(model, tune_text, verify_text, tuning, base=bases[0], **options)
        else:
            result, grid = tune_grid(model, tune_text, verify_text, tuning, bases, **options)
    except TuneError as err:
        print(f"kvcompress tune: failed: {err}", file=sys.stderr)
        return 1
    result.spec.save(out)
    v = result.verified
    print(f"spec        {out}: {result.spec.describe()}")
    print(f"target      {metric} <= {target:g}")
    print(f"selection   {metric} {v[metric]:.4f}, ratio {v['ratio']:.2f}x, PPL change {v['ppl_change']:+.2%}, "
          f"KL {v['kl']:.4f}, top-1 {v['top1']:.3f} ({v['tokens']} tokens)")
    report = {"command": "kvcompress " + " ".join(sys.argv[1:]) if sys.argv else None,
              "model": model_id(model), "metric": metric, "target": target,
              "texts": {"tune": tune_text.record, "verify": verify_text.record},
              **({} if args.context is None else {"context": args.context}),
              **({} if grid is None else {"grid": grid}),
              **result.to_dict()}
    if args.compare_uniform:
        uniform, tried = best_uniform(settings, bases[0], target, verify, metric=metric, sens=result.sens)
        report["uniform"] = {"best": uniform.to_dict() if uniform else None, "tried": tried}
        if uniform is not None:
            u = next(t for t in tried if t["spec"] == uniform.to_dict())
            gain = v["ratio"] / u["ratio"] - 1.0
            report["uniform"]["ratio_gain"] = gain
            print(f"uniform     {uniform.name}: ratio {u['ratio']:.2f}x, {metric} {u[metric]:.4f} (same text)")
            print(f"gain        tuned ratio is {gain:+.1%} vs the best uniform spec meeting the target")
        else:
            print("uniform     no uniform spec of these candidates meets the target on the selection text")
    print(f"time        {time.perf_counter() - started:.0f} s ({state.hits} measurement(s) reused from the state file)")
    if args.json:
        print(f"wrote       {write_json_atomic(args.json, report)}")
    if state.redone:
        print(f"redone      {len(state.redone)} saved measurement(s) whose fingerprint changed "
              f"(first: {state.redone[0]})")
    context = f" --context {args.context}" if args.context is not None else ""
    for text in _report_texts(args):
        print(f"report it   kvcompress eval --spec {out}{context} --tokens {args.verify_tokens}{text}  (report part: "
              "text the tune never read)")
    return 0


def _report_texts(args: argparse.Namespace) -> list[str]:
    """The text options of the `kvcompress eval` commands that report on what this tune selected on."""
    from ..corpus import ALL_KINDS, DEFAULT_KIND, KINDS

    if args.corpus:
        return [f" --corpus {args.corpus}"]
    kind = args.text or DEFAULT_KIND
    kinds = KINDS if kind == ALL_KINDS else (kind,)
    return ["" if k == DEFAULT_KIND and kind == DEFAULT_KIND else f" --text {k}" for k in kinds]
