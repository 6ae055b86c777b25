"""`kvcompress eval`: decode-faithful quality of one spec on one text (see `kvcompress.measure.evaluate`);
with `--context N`, prompt compression: N tokens prefilled at once, then `--tokens` teacher-forced
(see `kvcompress.measure.prompt`)."""

from __future__ import annotations

import argparse

from ..calibration import artifact_for
from ..measure.bootstrap import interval_text
from ..measure.evaluate import decode_faithful_eval
from ..measure.prompt import prompt_eval
from .common import (UserError, add_corpus_arguments, add_model_arguments, check_artifact_dir, check_context_tokens,
                     check_eval_tokens, check_model_args, check_output_file, check_spec, check_text, check_tokens,
                     load_model_from_args, text_kind, text_label)
from ..io import write_json_atomic

NAME = "eval"
HELP = ("decode-faithful perplexity, KL and top-1 agreement of a spec vs the uncompressed cache (--context N: of a "
        "compressed N-token prompt)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default="int4", help="preset name or .json/.yaml spec file")
    parser.add_argument("--tokens", type=int, default=1024,
                        help="evaluation tokens (with --context: continuation tokens teacher-forced after the context)")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="prompt compression: prefill N context tokens at once into the compressed cache, then "
                             "teacher-force --tokens more in chunks of 32 and score those (issue 18's protocol; "
                             "reads N + tokens + 1 tokens of text)")
    parser.add_argument("--offset", type=int, default=0,
                        help="first token read within the report part (e.g. 2048 to skip text a selection read)")
    parser.add_argument("--json", default=None, help="write the result as JSON to this file")
    parser.add_argument("--mode", default="chunked", choices=["chunked", "token"],
                        help="chunked (fast) or one token per forward (slow; validates chunked)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice); 1 on a machine shared with other jobs")
    parser.add_argument("--artifact", default=None,
                        help="calibration artifact folder (from `kvcompress calibrate`) for low-rank specs; "
                             "built automatically for the embedded model")
    add_model_arguments(parser)
    add_corpus_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..corpus import CorpusError, corpus_slice
    from ..models import model_id

    spec = check_spec(args.spec)
    if args.context is not None:
        check_context_args(spec, args)
    else:
        check_eval_tokens(spec, args.tokens, label=f"spec {args.spec}")
    check_output_file(args.json, "--json")
    check_artifact_dir(args.artifact)
    check_text(args)
    check_model_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.offset < 0:
        raise UserError(f"--offset must be >= 0, got {args.offset}")
    model, tokenizer = load_model_from_args(args)
    n_read = args.tokens if args.context is None else args.context + args.tokens + 1
    try:
        text = corpus_slice(tokenizer, part="report", n_tokens=n_read, path=args.corpus, offset=args.offset,
                            kind=text_kind(args))
    except CorpusError as err:
        option = "--tokens" if args.context is None else f"--context {args.context} --tokens"
        need = "" if args.context is None else f" (this protocol reads context + tokens + 1 = {n_read} tokens)"
        raise UserError(f"{option} {args.tokens}{need}: {err}") from None
    ids = text.ids
    artifact, artifact_info = artifact_for(model, spec, args.artifact), None
    if artifact is not None:
        artifact_info = {"path": str(artifact.path), "fingerprint": artifact.metadata["fingerprint"],
                         "corpus": artifact.metadata["corpus"], "tokens": artifact.metadata["tokens"]}
    head = {"model": model_id(model), "corpus": args.corpus or "embedded", "text": text.record}
    if args.context is not None:
        result = prompt_eval(model, ids, spec, args.context, progress=not args.no_progress, artifact=artifact)
        record = {**head, "ranges": absolute_ranges(result.protocol, text.record), "dtype": args.dtype,
                  "artifact": artifact_info, **result.to_dict()}
        print_prompt_result(args, spec, text, result)
        if args.json:
            print(f"wrote       {write_json_atomic(args.json, record)}")
        return 0
    result = decode_faithful_eval(model, ids, spec, mode=args.mode, progress=not args.no_progress,
                                  artifact=artifact)
    record = {**head, "mode": args.mode, "dtype": args.dtype, "artifact": artifact_info, **result.to_dict()}
    first, last = text.record["tokens"]
    print(f"spec        {args.spec}: {spec.describe()}")
    print(f"text        {text.record['part']} part of {text_label(args)}, tokens [{first}, {last})")
    print(f"tokens      {result.tokens} ({result.compressed_tokens} compressed per layer, {result.chunks} chunks)")
    print(f"ratio       {result.compression_ratio:.2f}x  ({result.stored_bytes:,} stored bytes vs "
          f"{result.fp16_bytes:,} in fp16)")
    _print_quality(result)
    if args.json:
        print(f"wrote       {write_json_atomic(args.json, record)}")
    return 0


def check_context_args(spec, args: argparse.Namespace) -> None:
    """--context, --tokens and --mode of the prompt-compression mode, before any model is loaded."""
    if args.mode != "chunked":
        raise UserError(f"--mode {args.mode} does not apply with --context: the prompt protocol prefills the context "
                        "at once and continues in chunks of 32; drop --mode")
    check_context_tokens(spec, args.context, label=f"spec {args.spec}")
    check_tokens(args.tokens, "--tokens", 1, " (continuation tokens after --context)")


def absolute_ranges(protocol: dict, text_record: dict) -> dict:
    """The protocol's token ranges as positions within the corpus part that was read."""
    first = text_record["tokens"][0]
    return {name: [first + a, first + b] for name, (a, b) in protocol["ranges"].items()}


def print_prompt_result(args: argparse.Namespace, spec, text, result) -> None:
    ranges = absolute_ranges(result.protocol, text.record)
    held = sum(x["held"] for x in result.layers)
    seen = sum(x["seen"] for x in result.layers)
    print(f"spec        {args.spec}: {spec.describe()}")
    print(f"text        {text.record['part']} part of {text_label(args)}: context "
          f"[{ranges['context'][0]}, {ranges['context'][1]}) prefilled at once, continuation "
          f"[{ranges['continuation'][0]}, {ranges['continuation'][1]}) teacher-forced in chunks of {result.chunk}")
    print(f"tokens      {seen:,} seen, {held:,} held over {len(result.layers)} layers at the end of the context "
          f"({result.compressed_tokens} compressed and {result.evicted_tokens} dropped per layer, at most)")
    print(f"whole cache {result.whole_cache_ratio:.2f}x at the end of the context ({result.stored_bytes:,} stored "
          f"bytes vs {result.fp16_bytes:,} in fp16; window and sinks included)")
    print(f"context     {result.context_compression:.2f}x kvpress-style (kept {result.kept_fraction:.1%} of the tokens "
          f"x codec {result.codec_ratio:.2f}x; window and sinks not counted)")
    _print_quality(result)


def _print_quality(result) -> None:
    """The bits, perplexity, KL and top-1 lines both evaluation modes print."""
    interval = result.interval
    method = "" if result.kl_ci95 is None else f"; {interval['ci_method']}, {interval['block_tokens']}-token blocks"
    print(f"bits/value  {result.bits_per_value:.3f} per compressed K/V value (window and sinks apart)")
    print(f"perplexity  {result.ppl_baseline:.3f} -> {result.ppl:.3f}  ({result.ppl_change:+.2%}, "
          f"{interval_text(result.ppl_change_ci95, interval, '+.2%')})")
    print(f"KL          {result.kl:.4f}  ({interval_text(result.kl_ci95, interval)}{method})")
    print(f"top-1       {result.top1:.3f}")
