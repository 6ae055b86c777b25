"""`kvcompress measure-presets`: choose the named presets by measurement, or re-verify them.

    kvcompress measure-presets                 # sweep, choose, verify; writes runs/measured_presets.json
    kvcompress measure-presets --verify        # re-measure the shipped presets; exit 1 if one misses
    kvcompress measure-presets --table         # the shipped presets as a markdown table
    kvcompress measure-presets --context 1536 --verify-tokens 512 --min-ratios prompt-6x=6,prompt-8x=8

The algorithm and its texts: `kvcompress.tuning.preset_selection` and docs/tuning.md. The command
never writes into the installed package: to ship new presets, copy the output file over
`src/kvcompress/presets/` in a source checkout and commit it.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..io import parse_list, write_json_atomic
from .common import (UserError, add_corpus_arguments, add_model_arguments, add_prompt_grid_arguments, add_ray_arguments,
                     check_context_tokens, check_eval_tokens, check_input_file, check_model_args, check_output_file,
                     check_text, check_text_protocol, check_tokens, load_model_from_args, prompt_grid_from_args,
                     ray_executor, ray_options_from_args, text_kind)

NAME = "measure-presets"
DEFAULT_OUT = "runs/measured_presets.json"
DEFAULT_PROMPT_OUT = "runs/prompt_presets.json"
HELP = "choose the named presets (lossless ... extreme) by measurement, or re-verify them with --verify"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tuning.candidates import FAMILIES as CANDIDATE_FAMILIES
    from ..tuning.preset_selection import (DEFAULT_PASSKEY_LENGTHS, DEFAULT_SWEEP_OFFSET,
                                           DEFAULT_SWEEP_TOKENS, DEFAULT_TARGETS, DEFAULT_VERIFY_TOKENS)

    parser.add_argument("--verify", action="store_true",
                        help="re-measure the presets of --file on held-out text; exit 1 if one misses its target")
    parser.add_argument("--table", action="store_true",
                        help="print the presets of --file as a markdown table (measures nothing)")
    parser.add_argument("--file", default=None,
                        help=f"measured-presets data file to write (default: {DEFAULT_OUT}) or, with --verify or "
                             "--table, to read (default: the presets shipped in the package)")
    parser.add_argument("--targets", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_TARGETS.items()),
                        help="preset=max mean KL, comma-separated")
    parser.add_argument("--min-ratios", default=None,
                        help="instead of --targets, presets defined by a compression floor, e.g. "
                             "'prompt-6x=6,prompt-8x=8': the candidate with the lowest KL on selection text among "
                             "those whose whole cache is at least that many times smaller than fp16 at the end of "
                             f"the context (needs --context; default file {DEFAULT_PROMPT_OUT})")
    parser.add_argument("--ratio-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="with --min-ratios: dtype of the model copy whose cache the ratio is measured on")
    parser.add_argument("--candidates", default="quant",
                        help=f"comma-separated candidate families among {', '.join(CANDIDATE_FAMILIES)}")
    parser.add_argument("--uniform", default=None,
                        help="keep only these uniform specs of the families, comma-separated (e.g. k4v4,cb3)")
    parser.add_argument("--window", type=int, default=128, help="full-precision window of the candidates")
    add_prompt_grid_arguments(parser)
    parser.add_argument("--sweep-tokens", type=int, default=DEFAULT_SWEEP_TOKENS,
                        help="tokens of the sweep text (calibration part of the --text kind)")
    parser.add_argument("--sweep-offset", type=int, default=DEFAULT_SWEEP_OFFSET,
                        help="first token of the sweep text in the calibration part (past calibration artifacts)")
    parser.add_argument("--verify-tokens", type=int, default=DEFAULT_VERIFY_TOKENS,
                        help="verification tokens (the start of the selection part); the chosen presets are "
                             "then measured on as many tokens of the report part")
    parser.add_argument("--passkey-lengths", default=",".join(str(x) for x in DEFAULT_PASSKEY_LENGTHS),
                        help="passkey prompt lengths in tokens, comma-separated")
    parser.add_argument("--state", default=None,
                        help="file of saved measurements (default: FILE.state.json beside --file); a rerun "
                             "resumes from it")
    parser.add_argument("--json", default=None, help="with --verify: write the re-measured figures here")
    add_corpus_arguments(parser, selection=True)
    add_model_arguments(parser)
    add_ray_arguments(parser, unit="candidate")


def run(args: argparse.Namespace) -> int:
    from ..corpus import corpus_slice
    from ..measure.evaluate import decode_faithful_eval
    from ..presets.measured import PROMPT_DATA_FILE, load_measured
    from ..tuning.candidates import uniform_candidates
    from ..tuning.evaluators import eval_figures
    from ..tuning.preset_selection import SelectionSettings, parse_targets, select_presets, verify_presets

    started = time.perf_counter()
    if args.table or args.verify:
        check_input_file(args.file, "--file", "measured-presets data file")
    else:
        check_output_file(args.file, "--file", (".json",))
    check_output_file(args.json, "--json")
    if args.state:
        check_output_file(args.state, "--state")
    if args.table:
        from ..presets.measured import markdown_table

        print(markdown_table(load_measured(args.file)))  # None: the shipped file
        return 0
    if args.verify:
        data = load_measured(args.file)
        if not data["presets"]:
            raise ValueError(f"{args.file or 'the shipped presets file'} holds no presets; run "
                             "`kvcompress measure-presets` first")
        verify = data.get("texts", {}).get("verify", {})
        if args.text is None and args.corpus is None:  # the text the file's choice was verified on
            args.text = verify.get("kind") or "docs"
        protocol = data.get("protocol", {})
        if protocol.get("name") == "prompt" and args.text == "all":
            raise UserError("--text all with prompt presets: the prompt protocol reads one contiguous text, so every "
                            "continuation token would be of the last kind; pass one kind")
        check_text(args)
        check_model_args(args)
        model, tokenizer = load_model_from_args(args)
        tokens = verify.get("n_tokens", verify.get("tokens", args.verify_tokens))
        part = verify.get("part", "selection")
        text = corpus_slice(tokenizer, part, n_tokens=tokens, path=args.corpus, kind=text_kind(args))
        ids = text.ids
        store: dict = {}
        print(f"re-measuring {len(data['presets'])} presets on tokens {text.record['tokens']} of the "
              f"{text.record['part']} part of {text.record['kind'] or text.record['source']}", flush=True)
        if protocol.get("name") == "prompt":  # prompt presets: KL under the prompt protocol, ratio in --ratio-dtype
            measure = _prompt_measure(args, model, text, protocol["context_tokens"], store)
        else:
            def measure(spec):
                return eval_figures(decode_faithful_eval(model, ids, spec, progress=False, baseline_store=store))
        rows = verify_presets(data, measure)
        failed = [r["name"] for r in rows if not r["met"]]
        if args.json:
            write_json_atomic(args.json, {"file": str(args.file or "shipped"), "text": text.record, "rows": rows})
        print(f"time        {time.perf_counter() - started:.0f} s")
        if failed:
            print(f"kvcompress measure-presets: {len(failed)} preset(s) miss their target: {', '.join(failed)}",
                  file=sys.stderr)
            return 1
        print("all presets meet their targets")
        return 0
    try:
        targets = parse_targets(args.targets)
    except ValueError as err:
        raise UserError(f"--targets {args.targets}: {err}") from None
    if args.min_ratios is None:
        check_new_preset_names(targets, f"--targets {args.targets}", load_measured())
    lengths = parse_list(args.passkey_lengths, int, "--passkey-lengths value")
    if not lengths or min(lengths) < 1:
        raise UserError(f"--passkey-lengths {args.passkey_lengths}: each length must be a positive number of tokens, "
                        "e.g. --passkey-lengths 1024,2048")
    windows, evictions = prompt_grid_from_args(args)
    try:
        candidates = uniform_candidates(parse_list(args.candidates), window=args.window, windows=windows,
                                        evictions=evictions, only=parse_list(args.uniform) if args.uniform else None)
    except ValueError as err:
        raise UserError(f"--candidates {args.candidates} / --uniform {args.uniform} / --window {args.window}: "
                        f"{err}") from None
    if not candidates:
        raise UserError(f"--candidates {args.candidates}: no candidate compresses anything; add a codec family")
    if args.context is not None:
        for spec in candidates:
            check_context_tokens(spec, args.context, label=f"candidate {spec.name}")
    for option, value in (("--sweep-tokens", args.sweep_tokens), ("--verify-tokens", args.verify_tokens)):
        if args.context is not None:
            check_tokens(value, option, 1, " (continuation tokens after --context)")
            continue
        for spec in candidates:
            check_eval_tokens(spec, value, option, label=f"candidate {spec.name}")
    check_text(args)
    check_text_protocol(args)
    check_model_args(args)
    if args.min_ratios is not None:
        return _run_floors(args, candidates, started)
    out = args.file or DEFAULT_OUT
    state = args.state or str(out).removesuffix(".json") + ".state.json"
    ray = ray_options_from_args(args)
    model, tokenizer = load_model_from_args(args)
    command = " ".join(["kvcompress", NAME, *_without_state(sys.argv[2:])])
    settings = SelectionSettings(sweep_tokens=args.sweep_tokens, sweep_offset=args.sweep_offset,
                                 verify_tokens=args.verify_tokens, passkey_lengths=tuple(lengths), context=args.context,
                                 kind=text_kind(args), path=args.corpus)
    data = select_presets(model, tokenizer, targets, candidates=candidates, settings=settings, state=state,
                          command=command, executor=ray_executor(ray, args, model))
    path = write_json_atomic(out, data)
    print(f"wrote       {path} ({len(data['presets'])} presets; {time.perf_counter() - started:.0f} s)")
    return 0


def _prompt_measure(args: argparse.Namespace, model, text, context: int, store: dict):
    """spec -> prompt-protocol figures on `text` whose "ratio" is the whole cache's in --ratio-dtype."""
    from ..measure.prompt import prompt_eval
    from ..models import DTYPES, load_model
    from ..tuning.evaluators import make_ratio_evaluator, prompt_figures
    from ..fingerprint import text_fingerprint
    from ..tuning.state import TuneState

    ratio_model = model
    if args.ratio_dtype != args.dtype:
        ratio_model, _ = load_model(args.model, dtype=DTYPES[args.ratio_dtype], device=args.device)
    ratio = make_ratio_evaluator(ratio_model, text.ids, text_fingerprint(text.ids, text.record), TuneState(None),
                                 context)

    def measure(spec):
        figures = prompt_figures(prompt_eval(model, text.ids, spec, context, progress=False, baseline_store=store))
        return {**figures, "ratio": ratio(spec)["ratio"]}

    return measure


def _run_floors(args: argparse.Namespace, candidates: list, started: float) -> int:
    """--min-ratios: prompt presets chosen by compression floor (see `select_prompt_presets`)."""
    from ..models import DTYPES, load_model
    from ..presets.measured import PROMPT_DATA_FILE, load_measured
    from ..tuning.preset_selection import parse_floors, select_prompt_presets

    if args.context is None:
        raise UserError("--min-ratios chooses prompt presets by their whole cache at the end of a prompt: add "
                        "--context N (e.g. --context 1536)")
    try:
        floors = parse_floors(args.min_ratios)
    except ValueError as err:
        raise UserError(f"--min-ratios {args.min_ratios}: {err}") from None
    check_new_preset_names(floors, f"--min-ratios {args.min_ratios}", load_measured(PROMPT_DATA_FILE))
    if args.ray is not None:
        raise UserError("--min-ratios runs here, not on Ray: leave out --ray")
    out = args.file or DEFAULT_PROMPT_OUT
    state = args.state or str(out).removesuffix(".json") + ".state.json"
    model, tokenizer = load_model_from_args(args)
    ratio_model = model
    if args.ratio_dtype != args.dtype:
        ratio_model, _ = load_model(args.model, dtype=DTYPES[args.ratio_dtype], device=args.device)
    command = " ".join(["kvcompress", NAME, *_without_state(sys.argv[2:])])
    data = select_prompt_presets(model, tokenizer, floors, candidates=candidates, context=args.context,
                                 tokens=args.verify_tokens, ratio_model=ratio_model, state=state, command=command,
                                 kind=text_kind(args), path=args.corpus)
    path = write_json_atomic(out, data)
    print(f"wrote       {path} ({len(data['presets'])} presets; {time.perf_counter() - started:.0f} s)")
    for entry in data["presets"]:
        v, r = entry["verified"], entry["report"]
        print(f"{entry['name']:11s} {entry['candidate']}: whole cache {entry['cache']['ratio']:.2f}x "
              f"({entry['cache']['dtype']}), selection KL {v['kl']:.4f}, report KL {r['kl']:.4f}")
    return 0


def check_new_preset_names(named: dict, option: str, replaced: dict) -> None:
    """The preset names a run would write must not be taken by another preset: only the names of
    the presets of the shipped file the run replaces (`replaced`, measured-presets data) may come back."""
    from ..presets import PRESETS

    taken = [name for name in PRESETS.names() if name not in {e["name"] for e in replaced["presets"]}]
    clash = [name for name in named if name in taken]
    if clash:
        raise UserError(f"{option}: {', '.join(repr(n) for n in clash)} is already the name of another preset "
                        "(`kvcompress presets` lists them), so the measured one could not be registered beside it; "
                        "choose another name")


def interrupted(args: argparse.Namespace) -> str:
    if args.verify or args.table:
        return "nothing was written"
    return "the measurements so far are saved in the --state file; run the same command again to resume"


def _without_state(argv: list[str]) -> list[str]:
    """The arguments minus `--state PATH` (a local file that does not shape the results)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--state":
            skip = True
        elif not arg.startswith("--state="):
            out.append(arg)
    return out
